"""OffloadConfig: the settings of expert offloading, checked when made.

    OffloadConfig(gpu_memory="24GiB")                 # a byte budget for everything on the device
    OffloadConfig(gpu_memory=0.25, policy="lfu")      # a fraction of the device's memory
    OffloadConfig(slots_per_layer=2, device="cpu")    # an explicit pool size (tests)

The budget covers the dense weights, the shared experts and the KV cache first; what is left
becomes the expert slot pool (`cache.plan_slots`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

POLICIES = ("lru", "lfu", "predictor", "belady")
PREFETCH = ("none", "next_layer_gate", "attention", "probe", "predictor")
DRIVERS = ("host", "device", "auto")
PACK_AUTO_FROM = 10 << 20  # bytes of one expert from which pack_experts='auto' packs (copy-bound; see pack_experts)
PACK_AUTO_FROM_DEVICE = 8 << 20  # the same under driver='device' (packed measured faster at 9.4 MB there: 3p)
# driver='auto' takes the device driver for experts up to this size (Mixtral's 352 MB ones are copy-bound, where the
# copy engine's 55 GB/s beat the fill kernel's 51: 1.03x; OLMoE's 12.6 MB and Qwen3's 9.4 MB won, BENCHMARKS 3q)
AUTO_DEVICE_MAX_EXPERT = 64 << 20

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value: str | int | float) -> int:
    """'24GiB' -> 25769803776; '24GB' -> 24e9; an int is bytes already."""
    if isinstance(value, bool):
        raise ValueError(f"a byte size cannot be a bool ({value!r}); write e.g. '24GiB'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a byte size must be >= 0, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a byte size; write e.g. '24GiB', '500MB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class OffloadConfig:
    """Settings of `apply_offload`.

    gpu_memory       budget on the device: '24GiB' / bytes (int) / a fraction in (0, 1] of the
                     device's total memory. None with slots_per_layer set: the pool size is given.
    slots_per_layer  explicit expert slots per MoE layer (overrides the budget's expert share)
    policy           eviction policy: lfu (the default) | lru | predictor | belady (belady needs `trace`)
    lfu_half_life    policy 'lfu': each layer's use counts halve over this many of its steps (None:
                     policies.LFU_HALF_LIFE = 23; math.inf: counted over the whole run). 23 kept
                     3-6 points more accesses than LRU and than whole-run counts on a trained
                     model's routing (BENCHMARKS 3j) and decoded it 8% faster than LRU on the GPU (3k)
    prefetch         none | next_layer_gate (apply layer l+1's router to layer l's input) |
                     attention (layer l+1's own attention on the residual entering layer l's experts,
                     then its router: offload.prefetch.AttentionRouter; one more attention a layer,
                     0.957 one-ahead recall against the gate's 0.918 on BENCHMARKS 7m's model; into the
                     second MoE layer it cannot see the first's experts (0.23 there): a predictor trained
                     with `moe predictor train --attention` takes the better source per layer) |
                     probe (the same with fitted probes instead of the router: `probes`) |
                     predictor (the routing predictor's probabilities)
    prefetch_k       experts to prefetch per token for the next layer, its most confident guesses (0: the
                     model's top-k for attention, whose guesses are right ~97% of the time, and for the
                     predictor; half the top-k, rounded up, of the next_layer_gate / probe guesses, whose
                     tails are mostly wrong: offload.prefetch.guess_count)
    cpu_fallback     compute a missed expert on the CPU when the cost model says it is cheaper,
                     and split a step's misses between the copy engine and the CPU
    miss_split       how cpu_fallback shares a step's misses: 'reuse' (CPU time weighted by
                     1 + the cache's hit ratio: a unit computed on the CPU stays a miss next time)
                     or 'makespan' (copy engine and CPU simply finish together)
    driver           who decides hits, misses and evictions: 'host' (the routing read back
                     at every layer, copies by the copy engine, every policy and prefetch) or 'device'
                     (offload/device_cache.py: the GPU plans, reads missed experts from pinned host
                     memory itself, decoding packed ones on the way, and computes, no host sync, a
                     decode step is one CUDA graph; policies lru / lfu, whole experts in host memory,
                     prefetch none / next_layer_gate / attention / probe (on a side stream), no cpu_fallback), or
                     'auto' (the default): 'device' where it runs and measured faster (offload.apply.resolve_driver: a CUDA
                     device, the triton expert backend, none of the settings it refuses, experts in host memory
                     of at most AUTO_DEVICE_MAX_EXPERT bytes, and decode_batch x top-k <= slots: a step's experts
                     in one round, or bfloat16 experts it packs and the host path would not), else 'host'
                     (copy-bound steps, where the copy engine's rate wins: BENCHMARKS 3q)
    pack_experts     keep the experts in host memory packed to 12 bits a weight, losslessly
                     (kernels/unpack.py: the exponent as a 4-bit code), so each copy moves a
                     quarter fewer bytes and is decoded on the device; bfloat16 experts, host
                     memory store, whole experts, no cpu_fallback. 'auto' (the default): packed
                     where all of that holds, on a GPU, for experts of PACK_AUTO_FROM bytes or more
                     (copy-bound: OLMoE's 12.6 MB and Mixtral's 352 MB experts step 0.80x and 0.81x
                     packed; Qwen3's 9.4 MB ones are host-bound, 1.06x serial and 1.24x eager,
                     BENCHMARKS 3n), of PACK_AUTO_FROM_DEVICE (8 MiB) or more with driver='device'
                     (Qwen3's 0.88x packed there, 3p); True packs (or says why it cannot), False never does
    expert_slices    G: cache, copy and compute experts in G slices of their ffn dimension
                     (offload/slices.py); with cpu_fallback, one missed expert is then shared
                     between a copy and the CPU. 1 = whole experts; slots count slices
    predictor        object with `predict_batch` (routing predictor contract), for the
                     predictor policy / prefetch
    probes           routing.ProbeLookahead fitted on this model's recorded hidden states, for
                     prefetch='probe' (its layer l -> l+1 probe runs on the device like a router)
    predict_every    ask the predictor after every n-th layer and prefetch n layers ahead
                     (the predictor's own cost is on the critical path)
    prefetch_threshold  predicted use probability above which an expert is prefetched (None: 0 with
                     a prefetch_budget and policy 'predictor', where the budget bounds the copies and
                     a prefetch only displaces an expert rated lower; else 0.3)
    prefetch_budget  expert copies the predictor's prefetch may queue per MoE layer, behind that
                     layer's demand copies (credit banked up to max(1, budget x predict_every));
                     about what the copy engine moves during one layer's compute. None: the
                     predictor prefetches only while the copy engine is idle
    trace            RoutingTrace, the future for the Belady policy (simulation / benchmarks)
    trace_batch      tokens per model step in that trace (1 = single-sequence decode)
    decode_batch     rows a decode step carries (1: one sequence, `moe generate`; the serving engine's
                     max_batch_size): driver='auto' weighs it
    kv_cache_bytes   bytes the KV cache will take on the device (counted before the experts)
    reserve_bytes    working memory left free for activations
    device           'cuda' / 'cuda:N' / 'cpu' (cpu: the pool is a CPU tensor, same code path)
    backend          kernels backend run on the slot pool ('torch' | 'triton'; None: the model's)
    store            'memory' (pinned host memory) | 'disk' (memory-mapped safetensors) |
                     'auto' (disk when a checkpoint is given and the experts would not fit in
                     the host memory available, else memory)
    checkpoint       directory or file of safetensors, needed for store='disk'
    calibrate        measure copy bandwidth and CPU rate at start-up (else use the given rates)
    copy_gbps, cpu_gflops   rates used when not calibrating (GB/s host->device, CPU GFLOP/s)
    """
    gpu_memory: str | int | float | None = None
    slots_per_layer: int | None = None
    policy: str = "lfu"
    lfu_half_life: float | None = None
    prefetch: str = "none"
    prefetch_k: int = 0
    cpu_fallback: bool = False
    predictor: Any = None
    probes: Any = None
    predict_every: int = 1
    prefetch_threshold: float | None = None
    prefetch_budget: float | None = None
    trace: Any = None
    trace_batch: int = 1
    decode_batch: int = 1
    kv_cache_bytes: int | str = 0
    reserve_bytes: int | str = "256MiB"
    device: str | None = None
    backend: str | None = None
    store: str = "memory"
    checkpoint: str | None = None
    calibrate: bool = True
    copy_gbps: float = 25.0
    cpu_gflops: float = 50.0
    expert_slices: int = 1
    miss_split: str = "reuse"
    pack_experts: bool | str = "auto"
    driver: str = "auto"

    def lfu_steps(self) -> float | None:
        """The half-life the LFU policy is built with (policies.resolve_lfu_half_life: 23 steps when not
        given, None = no decay for math.inf); None for the other policies."""
        from .policies import resolve_lfu_half_life
        return resolve_lfu_half_life(self.lfu_half_life) if self.policy == "lfu" else None

    def pack_clashes(self, use_disk: bool) -> list[str]:
        """What keeps the experts from being packed (whole experts in host memory for the copy engine):
        pack_experts=True refuses them, 'auto' does not pack where any holds."""
        return [what for what, on in (("store='disk' (use store='memory')", use_disk),
                                      ("cpu_fallback (the CPU would decode every expert it computes)",
                                       self.cpu_fallback),
                                      ("expert_slices > 1", self.expert_slices > 1)) if on]

    def device_clashes(self) -> list[str]:
        """What driver='device' cannot do (offload/device_cache.py), as the settings that ask for it."""
        return [what for what, on in ((f"policy={self.policy!r}", self.policy not in ("lru", "lfu")),
                                      (f"prefetch={self.prefetch!r}", self.prefetch == "predictor"),
                                      ("cpu_fallback", self.cpu_fallback),
                                      ("expert_slices > 1", self.expert_slices > 1),
                                      ("store='disk'", self.store == "disk")) if on]

    def __post_init__(self):
        if self.gpu_memory is None and self.slots_per_layer is None:
            raise ValueError("OffloadConfig needs gpu_memory (e.g. '24GiB' or 0.3) or slots_per_layer")
        if isinstance(self.gpu_memory, str):
            parse_bytes(self.gpu_memory)  # raises with the fix
            s = self.gpu_memory.strip()
            if re.fullmatch(r"0?\.[0-9]+|1(\.0*)?", s):
                self.gpu_memory = float(s)  # '0.25' on the command line is a fraction
            elif re.fullmatch(r"[0-9]*\.[0-9]*", s):  # '2.0', '1.5': no unit, and not a fraction (nor whole bytes)
                raise ValueError(f"gpu_memory={s!r} has no unit and is not a fraction in (0, 1]: write a fraction of "
                                 "the device's memory such as 0.3, or a size with its unit such as '2GiB'")
        if isinstance(self.gpu_memory, float) and not 0.0 < self.gpu_memory <= 1.0:
            raise ValueError(f"gpu_memory as a fraction must be in (0, 1], got {self.gpu_memory}; "
                             "for bytes write a string such as '24GiB'")
        if self.slots_per_layer is not None and self.slots_per_layer < 1:
            raise ValueError(f"slots_per_layer must be >= 1, got {self.slots_per_layer}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown offload policy {self.policy!r}; choose one of {POLICIES}")
        if self.lfu_half_life is not None and (self.policy != "lfu" or not self.lfu_half_life > 0):
            raise ValueError(f"lfu_half_life={self.lfu_half_life!r} needs policy='lfu' (it is {self.policy!r}) and a "
                             "number of steps > 0 (math.inf: counted over the whole run)")
        if self.prefetch not in PREFETCH:
            raise ValueError(f"unknown prefetch mode {self.prefetch!r}; choose one of {PREFETCH}")
        if self.prefetch_k < 0:
            raise ValueError(f"prefetch_k must be >= 0, got {self.prefetch_k}")
        needs_pred = self.policy == "predictor" or self.prefetch == "predictor"
        if needs_pred and not hasattr(self.predictor, "predict_batch"):
            raise ValueError("policy/prefetch 'predictor' needs predictor=<object with predict_batch> "
                             "(e.g. a routing.PathPredictor)")
        if self.prefetch == "probe" and not all(hasattr(self.probes, a) for a in ("mean_lD", "std_lD", "W_lDSE", "b_lSE")):
            raise ValueError("prefetch 'probe' needs probes=<routing.ProbeLookahead> fitted on this model's hidden "
                             "states (`moe predictor train --features` writes them)")
        if self.policy == "belady" and self.trace is None:
            raise ValueError("policy 'belady' is an oracle: give trace=<RoutingTrace> of the future routing")
        if self.prefetch_budget is not None:
            if not self.prefetch_budget >= 0:
                raise ValueError(f"prefetch_budget must be >= 0 expert copies per layer (or None), "
                                 f"got {self.prefetch_budget}")
            if self.prefetch != "predictor":
                raise ValueError(f"prefetch_budget limits the predictor's prefetch; it does nothing with "
                                 f"prefetch={self.prefetch!r} (use prefetch='predictor' or drop it)")
        if self.predict_every < 1:
            raise ValueError(f"predict_every must be >= 1, got {self.predict_every}")
        if self.prefetch_threshold is not None and not 0.0 <= self.prefetch_threshold < 1.0:
            raise ValueError(f"prefetch_threshold must be in [0, 1), got {self.prefetch_threshold}")
        if self.trace_batch < 1:
            raise ValueError(f"trace_batch must be >= 1, got {self.trace_batch}")
        if not isinstance(self.decode_batch, int) or self.decode_batch < 1:
            raise ValueError(f"decode_batch must be an integer >= 1 (rows a decode step carries), got {self.decode_batch!r}")
        self.kv_cache_bytes = parse_bytes(self.kv_cache_bytes)
        self.reserve_bytes = parse_bytes(self.reserve_bytes)
        if self.store not in ("memory", "disk", "auto"):
            raise ValueError(f"store must be 'memory', 'disk' or 'auto', got {self.store!r}")
        if self.store == "disk" and not self.checkpoint:
            raise ValueError("store='disk' reads experts from safetensors: give checkpoint=<model directory>")
        if self.miss_split not in ("reuse", "makespan"):
            raise ValueError(f"miss_split must be 'reuse' or 'makespan', got {self.miss_split!r}")
        if not isinstance(self.expert_slices, int) or self.expert_slices < 1:
            raise ValueError(f"expert_slices must be an integer >= 1 (1 = whole experts), got {self.expert_slices!r}")
        if self.pack_experts not in (True, False, "auto"):
            raise ValueError(f"pack_experts must be True, False or 'auto', got {self.pack_experts!r}")
        if self.pack_experts is True:
            clash = self.pack_clashes(self.store == "disk")
            if clash:
                raise ValueError(f"pack_experts packs whole experts in host memory for the copy engine; it does "
                                 f"not go with {', '.join(clash)}")
        if self.driver not in DRIVERS:
            raise ValueError(f"driver must be one of {DRIVERS}, got {self.driver!r}")
        if self.driver == "device":
            clash = self.device_clashes()
            if clash:
                raise ValueError(f"driver='device' decides on the GPU with LRU or LFU over whole experts in host "
                                 f"memory; it does not go with {', '.join(clash)} (use driver='host' for those)")
        if self.copy_gbps <= 0 or self.cpu_gflops <= 0:
            raise ValueError(f"copy_gbps ({self.copy_gbps}) and cpu_gflops ({self.cpu_gflops}) must be > 0")
