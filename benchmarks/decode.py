"""Resident decode on one GPU: eager steps against CUDA-graph replay (moe.cuda_graph), against the floor.

    python benchmarks/decode.py --out $OUT --peers transformers   # H200: Qwen3-30B-A3B and Mixtral-8x7B shapes
    python benchmarks/decode.py --models tiny --device cpu  # a check of the script (eager only)
    python benchmarks/decode.py --models qwen3 --decode-attention triton,sdpa --prompt-len 32,2048   # the decode attention
    python benchmarks/decode.py --models olmoe --layers 48 --batch 1 --steps 64 --offload-slots 16 \
        --trace d48_test.npz --lookahead d48_test.lookahead.npz       # next-layer prefetch on a recorded trace

The whole model (attention, router, experts, lm_head) at the published shapes, random bf16 weights,
expert backend "triton", every weight in GPU memory. Each batch row gets a 32-token random prompt
(prefill, not timed), then --steps greedy decode steps are timed: "eager" = model(ids, cache) as
the engine ran it before (two host syncs per step for the cache's room and slots), "graph" = the
same step replayed from a CUDA graph (DecodeGraphs, 256-slot buckets). Both run from the same
cache state and their logits are compared. The graph steps run twice from the same prompt (graph =
the faster of the two; "repeat": whether the two gave the same logits bit for bit).

--decode-attention picks how a decode step attends (moe.attention.DECODE_ATTENTION): "triton" =
kernels.decode_attention (repeatable), "sdpa" = torch's SDPA (cuDNN on the H200); a comma list times
each. --prompt-len sets the context (a comma list: each is its own rows).

Floor per step = bytes that must be read / measured copy bandwidth: every non-expert weight once
(attention, norms, routers, lm_head), the experts the batch activates (expected distinct experts
per layer under uniform routing, E * (1 - (1 - K/E)^B)), and the KV cache read by attention.

Offloaded (--offload-slots S1,S2,...; run after the resident rows, with --layers to fit host RAM):
the experts move to pinned host memory (offload.HostExpertStore) and S per layer are cached on
the GPU (LRU; S = E: every expert cached); "eager" = model(ids, cache), "graph" = the step as
CUDA-graph pieces around the offloaded experts (moe.cuda_graph.PiecewiseDecodeGraphs), which run
eagerly in between, each piece queued before the host has read the previous layer's routing
(run-ahead, at the layers whose speculations are mostly kept), "graph_serial" = the same pieces each
queued after it, "graph_always" (offloaded rows) = run-ahead at every layer. The floor is the resident one
(copies not counted). --eager-bucket 256 adds resident eager steps whose attention width is rounded
up as the graphs' is.

--trace-routing: every router returns a synthetic routing trace's choices instead of its own (the
trace of benchmarks/offload.py: routing.synthesize with the shape's popularity skew, --locality,
--affinity), keyed by (batch row, position) on the device (placement.trace_routing), so it holds in
CUDA graphs and pieces too; row b decodes request b of the trace. Random weights route uniformly,
which no trained model does: this is how offloaded decode (--offload-slots, --offload-policy) meets
realistic hit ratios on the engine's own path. The resident floor still assumes uniform routing; the
offloaded rows add the bytes their timed steps copied, at the host -> GPU rate measured in the run.
--trace FILE (a recorded trace, NAME.npz of `moe predictor record`): the same routing replacement from a
trained model's routing; row b decodes the file's b-th request. --lookahead FILE (benchmarks/lookahead_ids.py):
that model's own guesses of each next layer's experts for the same tokens (probes on its hidden states);
the offloaded rows then add pieces whose layers prefetch those guesses one layer ahead (graph_lookahead),
beside the trace's own next layer as the guess (graph_oracle, the bound of one-ahead prefetch; every
trace routing adds it). --lookahead-pays attention adds lookahead+C: the same guesses, while each layer also
computes point C live (prefetch='attention''s work, its answer dropped), so the row carries C's real cost. The
pieces start beside those copies (copies still running are left out of the
speculation, offload.apply.prepare_speculation). A random-weight model of a published size thus meets a
trained model's routing and prediction quality; the trace's models are small (routing/record.py).
--offload-policy lru,lfu: one cache whose deciding policy is switched between rounds (every policy sees every
routing and use, SwitchPolicy), a row each, so policies compare in one process.
--rounds N: every graph variant and prefetch row of the offloaded rows runs N times, interleaved, and keeps its
fastest round; each round also records (`*_all`) its ms per step, the host's Python speed (host_speed_ns) and the
host -> GPU copy rate probed right before it. On the H200 machine one 16-step round of the same variant spread
+-10% within a process, with neither probe moving with it (s24-h): compare variants over rounds, not single runs.
--profile-steps N: N more steps of each offloaded row with misses under torch.profiler, the host-side parts
of an offloaded layer labelled (where the time above the copy floor goes: BENCHMARKS 3i).

Peer (--peers transformers, measured in the same run after our model is freed): Hugging Face
transformers' own implementation of the same family at the same shapes (random weights, same dtype,
on the GPU), decoding with its own KV cache step by step. vLLM and SGLang are not
installed on the GPU machine.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe.config import MoEConfig  # noqa: E402
from moe.cuda_graph import DecodeGraphs, PiecewiseDecodeGraphs, graph_support  # noqa: E402
from moe.model import MoEForCausalLM  # noqa: E402

# published shapes (attention and expert dimensions, vocabulary, depth)
MODELS = {
    "qwen3": ("Qwen3-30B-A3B", dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_hidden_layers=48,
                                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                                    num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144)),
    "mixtral": ("Mixtral-8x7B", dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_experts=8, num_experts_per_tok=2,
                                     moe_intermediate_size=14336, intermediate_size=14336)),
    "olmoe": ("OLMoE-1B-7B", dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=16, head_dim=128, num_experts=64,
                                  num_experts_per_tok=8, moe_intermediate_size=1024, intermediate_size=1024)),
    "tiny": ("tiny", dict(model_type="qwen3_moe", vocab_size=512, num_hidden_layers=3)),
}


def build(key: str, device: str, layers: int = 0, bf16: bool = False) -> MoEForCausalLM:
    name, kw = MODELS[key]
    if layers:
        kw = dict(kw, num_hidden_layers=layers)
    cfg = MoEConfig.tiny(kw["model_type"], **{k: v for k, v in kw.items() if k != "model_type"},
                         max_position_embeddings=4096)
    backend = "triton" if device == "cuda" else "torch"
    dtype = torch.bfloat16 if device == "cuda" or bf16 else torch.float32  # bf16: packed experts on the CPU
    m = MoEForCausalLM(cfg, backend=backend, dtype=dtype, device=device)
    m.init_weights(seed=0)
    return m.eval()


def install_synthetic_routing(model: MoEForCausalLM, key: str, rows: int, tokens: int, locality: float,
                              affinity: float, seed: int = 0):
    """Route ``model`` by a synthetic trace of ``rows`` requests x ``tokens`` tokens (row b = request b);
    returns (the hook handles, the TraceRoutingSpec)."""
    import numpy as np

    from benchmarks.offload import SHAPES  # the popularity skew of offload.py's synthetic routing, per shape
    from placement.trace_routing import TraceRoutingSpec, install_trace_routing
    from routing import synthesize
    cfg = model.config
    trace = synthesize(num_layers=len(model.moe_blocks()), num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                       num_requests=rows, tokens_per_request=tokens, popularity_skew=SHAPES.get(key, {}).get("skew", 1.0),
                       temporal_locality=locality, affinity=affinity, seed=seed)
    # synthesize interleaves the requests; the trace routing reads row b's tokens at b * tokens + position
    order = np.lexsort((trace.positions, trace.request_ids_or_default()))
    spec = TraceRoutingSpec.from_trace(trace.select_tokens(order), stride=tokens)
    return install_trace_routing(model, spec), spec


def install_recorded_routing(model: MoEForCausalLM, path: str, lookahead: str | None, need: int):
    """Route ``model`` by a recorded trace (``moe predictor record``'s NAME.npz): row b decodes the b-th
    request of the file, each request cut to the most common length (requests shorter than that
    are left out); its first MoE layers route the model's. ``lookahead``: a file of layer l's
    guesses of layer l+1's experts for the same tokens (``next_ids`` [L, N, K], from
    benchmarks/lookahead_ids.py), reordered alike. Returns (handles, spec, next_ids or None)."""
    import numpy as np

    from placement.trace_routing import TraceRoutingSpec, install_trace_routing
    from routing import RoutingTrace
    trace = RoutingTrace.load(path)
    L = len(model.moe_blocks())
    if trace.num_layers < L or trace.num_experts != model.config.num_experts:
        raise SystemExit(f"{path}: {trace.num_layers} MoE layers x {trace.num_experts} experts; the model needs "
                         f">= {L} layers x {model.config.num_experts} experts (pick --models / --layers to match)")
    req = trace.request_ids_or_default()
    uniq, counts = np.unique(req, return_counts=True)
    n = int(np.bincount(counts).argmax())
    if n < need:
        raise SystemExit(f"{path}: requests of {n} tokens, the decode needs {need} (prompt + steps + 16)")
    order = np.concatenate([np.flatnonzero(req == r)[:n] for r in uniq[counts >= n]])
    spec = TraceRoutingSpec(trace.expert_ids[:L, order], None if trace.weights is None else trace.weights[:L, order],
                            trace.num_experts, stride=n)
    nxt = None
    if lookahead:
        with np.load(lookahead) as f:
            nxt = f["next_ids"]
        if nxt.shape[1] != trace.num_tokens:
            raise SystemExit(f"{lookahead} guesses {nxt.shape[1]} tokens, {path} holds {trace.num_tokens}: "
                             "make both from the same recording")
        nxt = nxt[:L, order]
    return install_trace_routing(model, spec), spec, nxt


def floor_bytes(model: MoEForCausalLM, B: int, ctx: int) -> float:
    cfg = model.config
    expert_bytes = sum(p.numel() * p.element_size() for b in model.moe_blocks() for p in b.experts.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed.weight.numel() * model.embed.weight.element_size()
    dense = total - expert_bytes - (0 if cfg.tie_word_embeddings else embed)  # one embedding row is read, not all
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    active = E * (1 - (1 - K / E) ** B) / E
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * B * ctx * heads * hd * cfg.num_hidden_layers * model.embed.weight.element_size()
    return dense + active * expert_bytes + kv


@torch.inference_mode()
def run_transformers(cfg: MoEConfig, batches: list[int], steps: int, device: str, dtype: torch.dtype,
                     prompt_len: int = 32) -> dict[int, float]:
    """{B: seconds per decode step} of transformers' model of the same config (random weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    d = cfg.to_hf_dict()
    hcfg = AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hcfg, dtype=dtype).eval()
    dev = torch.device(device)
    # the KV cache argument is ``cache`` in newer transformers, ``past_key_values`` before
    key = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    g = torch.Generator(device="cpu").manual_seed(0)
    times = {}
    for B in batches:
        prompt = torch.randint(3, cfg.vocab_size, (B, prompt_len), generator=g).to(dev)
        out = hf(input_ids=prompt, use_cache=True)
        past, ids = out[key], out.logits[:, -1:].argmax(-1)
        for s in range(steps + 2):
            if s == 2:
                sync(dev)
                t0 = time.perf_counter()
            out = hf(input_ids=ids, use_cache=True, **{key: past})
            past, ids = out[key], out.logits[:, -1:].argmax(-1)
        sync(dev)
        times[B] = (time.perf_counter() - t0) / steps
        del past, out
    del hf
    return times


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def host_speed_ns(turns: int = 30000) -> float:
    """A fixed pure-Python loop, ns per turn (the fastest of three readings): how fast this host runs Python
    right now. On the H200 machine it read 99-220 ns in processes a few seconds apart, and per core ~100 on
    some and ~200 on others (runs s24-c, s24-e); pinning the stepping thread to the fastest core changed no
    step time (s24-f, s24-g), and the steps spread +-10% at either speed (s24-h)."""
    best = float("inf")
    for _ in range(3):
        d: dict = {}
        t = time.perf_counter()
        for i in range(turns):
            d[i & 1023] = d.get(i & 1023, 0) + i
        best = min(best, (time.perf_counter() - t) / turns * 1e9)
    return best


LAST_RUN: dict = {}  # the last run()'s timed steps: the collector's runs and pauses


class _GcClock:
    """Counts the collector's runs and their pauses while installed (gc.callbacks)."""
    def __init__(self):
        self.n, self.seconds, self._t = 0, 0.0, None

    def __call__(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.n += 1
            self.seconds += time.perf_counter() - self._t
            self._t = None


@torch.inference_mode()
def run(model: MoEForCausalLM, B: int, steps: int, graph: bool, prompt_len: int = 32, seed: int = 0,
        run_ahead: bool = True, bucket: int = 0, on_timing=None, min_kept: float = 0.5):
    """Seconds per decode step after a prompt of ``prompt_len`` random tokens, and the first 8 steps' logits.
    ``on_timing()`` is called when the timed steps start (after the prefill and the capture / warm-up steps)."""
    dev = model.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    cache = model.new_cache(B, prompt_len + steps + 8)
    prompt = torch.randint(3, model.config.vocab_size, (B, prompt_len), generator=g).to(dev)
    ids = model(prompt, cache=cache, last_only=True).argmax(-1)  # [B, 1]
    valid = torch.ones(B, 1, dtype=torch.bool, device=dev)
    # offloaded experts decide on the host: graph pieces around them (PiecewiseDecodeGraphs)
    if not graph:
        graphs = None
    elif graph_support(model) is None:
        graphs = DecodeGraphs(model, cache)
    else:
        graphs = PiecewiseDecodeGraphs(model, cache, run_ahead=run_ahead, run_ahead_min_kept=min_kept)
    logits = []
    length = prompt_len
    clock = _GcClock()
    marks: list[float] = []  # host time at the start of each timed step (the steps read routing back: near-synchronous)
    try:
        for s in range(steps + 2):
            if s == 2:  # the first steps capture / warm up
                sync(dev)
                # what earlier runs left for the collector (their graphs: cudaGraphExecDestroy ~0.1 ms each) is
                # collected now, not inside the timed steps (s24-b's profile caught 49 such destroys there)
                gc.collect()
                if on_timing is not None:
                    on_timing()
                gc.callbacks.append(clock)
                t0 = time.perf_counter()
            if s >= 2:
                marks.append(time.perf_counter())
            if graph:
                out = graphs.step(ids, valid, length)
            elif bucket:  # eager with the attention width rounded up as the graphs do (fewer distinct shapes)
                out = model(ids, cache=cache, num_slots=min(-(-(length + 1) // bucket) * bucket, cache.max_len))
            else:
                out = model(ids, cache=cache)
            ids = out[:, -1].argmax(-1, keepdim=True)
            if s < 8:
                logits.append(out[:, -1].float().clone())
            length += 1
        sync(dev)
        marks.append(time.perf_counter())
        t = (time.perf_counter() - t0) / steps
    finally:
        if clock in gc.callbacks:
            gc.callbacks.remove(clock)
    gaps = sorted(b - a for a, b in zip(marks, marks[1:]))
    LAST_RUN.update(collections=clock.n, ms_per_step=clock.seconds / steps * 1e3,
                    median_step_ms=gaps[len(gaps) // 2] * 1e3, max_step_ms=gaps[-1] * 1e3)
    return t, logits


def steps_before_parting(logits_a: list[torch.Tensor], logits_b: list[torch.Tensor]) -> int:
    """How many leading steps two decodes' greedy tokens agree (a near-tie can flip, then they part)."""
    same = 0
    for a, b in zip(logits_a, logits_b):
        if not torch.equal(a.argmax(-1), b.argmax(-1)):
            break
        same += 1
    return same


def profile_offloaded(model: MoEForCausalLM, B: int, steps: int, graph: bool, out_dir: Path, tag: str) -> str:
    """``steps`` timed decode steps under torch.profiler, the host-side parts of an offloaded layer labelled
    (the piecewise runner's experts call and its preparation before a piece; the experts' forward, remap and
    kernel; the cache's observe / ensure / wait / copies / slot table) by wrapping them for this run only (a
    label costs ~1-2 us, too much to leave in the step). The runner's wait for the routing ids shows as the
    driver's event synchronisation. Returns the two tables (by self CPU time and by device time) and writes
    them to ``out_dir``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from offload.apply import OffloadedExperts
    from offload.cache import ExpertCache
    targets = [(PiecewiseDecodeGraphs, "_experts"), (PiecewiseDecodeGraphs, "_before_piece"),
               (OffloadedExperts, "forward"), (OffloadedExperts, "_remap"), (OffloadedExperts, "_kernel"),
               (ExpertCache, "ensure"), (ExpertCache, "wait"), (ExpertCache, "observe"), (ExpertCache, "_copy_in"),
               (ExpertCache, "slot_table")]
    saved = [(cls, name, getattr(cls, name)) for cls, name in targets]

    def labelled(label, fn):
        def wrapper(*a, **kw):
            with record_function(label):
                return fn(*a, **kw)
        return wrapper
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    prof = profile(activities=acts)
    try:
        for cls, name, fn in saved:
            setattr(cls, name, labelled(f"moeflow.{cls.__name__}.{name}", fn))
        run(model, B, steps, graph=graph, on_timing=prof.start)
        prof.stop()
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    prof.export_chrome_trace(str(out_dir / f"profile_{tag}.json"))  # the timeline: chrome://tracing, perfetto
    avg = prof.key_averages()
    text = (f"## profile {tag}: {steps} timed steps\n" + avg.table(sort_by="self_cpu_time_total", row_limit=30)
            + ("\n" + avg.table(sort_by="self_cuda_time_total", row_limit=20) if model.device.type == "cuda" else ""))
    (out_dir / f"profile_{tag}.txt").write_text(text)
    return text


class SwitchPolicy:
    """Several eviction policies over one cache, one deciding at a time (``active``): every policy sees
    every routing, use and eviction, so each keeps the statistics it would keep alone, and rounds of
    different policies interleave in one process (--offload-policy lru,lfu)."""
    name = "switch"

    def __init__(self, policies: dict):
        self.policies = policies
        self.active = next(iter(policies))

    def bind(self, num_layers, num_experts):
        for p in self.policies.values():
            p.bind(num_layers, num_experts)

    def observe(self, layer, step, ids_NK):
        for p in self.policies.values():
            p.observe(layer, step, ids_NK)

    def touch(self, layer, expert, clock):
        for p in self.policies.values():
            p.touch(layer, expert, clock)

    def evicted(self, layer, expert):
        for p in self.policies.values():
            p.evicted(layer, expert)

    def victim(self, layer, candidates, step):
        return self.policies[self.active].victim(layer, candidates, step)


def record_round(r: dict, label: str, t: float, st: dict, host_ns: float, info: dict, steps: int, floor_ms: float,
                 h2d: float) -> bool:
    """A variant's figures over the timed decode steps into row ``r`` (st: the cache's stats of those steps;
    info: LAST_RUN and the copy rate probed before, ``h2d_gbs``); with --rounds, those of its fastest round
    ({label}_all: every round's ms, host ns and the host -> GPU copy rate measured right before it, the MB its
    steps copied, its median and slowest step, in order). True when this round is the fastest so far."""
    mb = st["bytes_copied"] / steps / 1e6
    r.setdefault(f"{label}_all", []).append([round(t * 1e3, 3), round(host_ns, 1),
                                             round(info.get("h2d_gbs", float("nan")), 1), round(mb, 1),
                                             round(info["median_step_ms"], 3), round(info["max_step_ms"], 3)])
    if f"{label}_ms" in r and r[f"{label}_ms"] <= t * 1e3:
        r[f"{label}_rounds"] += 1
        return False
    r[f"{label}_rounds"] = r.get(f"{label}_rounds", 0) + 1
    r[f"{label}_ms"] = t * 1e3
    r[f"{label}_host_ns"] = host_ns  # the host's Python speed right before (host_speed_ns)
    r[f"{label}_gc_ms"] = info["ms_per_step"]  # collector pauses per timed step
    r[f"{label}_hit"] = st["hit_ratio"]
    r[f"{label}_mb_per_step"] = mb
    # resident floor + the step's copies at the measured rate (copies and compute not overlapped)
    r[f"{label}_copy_floor_ms"] = floor_ms + mb * 1e6 / h2d * 1e3
    return True


def probe_host(dev: torch.device, probe: torch.Tensor) -> tuple[float, float]:
    """The host's Python speed (host_speed_ns) and its copy rate to the GPU in GB/s (NaN off a GPU), right
    before a run."""
    from offload.cost_model import copy_bytes_per_s
    return host_speed_ns(), (copy_bytes_per_s(dev, probe) / 1e9 if dev.type == "cuda" else float("nan"))


class PaidGuess:
    """A recorded guess of the next layer's experts (TraceLookahead) that first pays for point C live: the next
    MoE layer's attention and router run on this layer's pre-expert residual (offload.prefetch.AttentionRouter,
    what prefetch='attention' computes), their answer dropped, then the trace's guess is returned. The rows of a
    ``lookahead+C`` run thus carry the recorded guesses' quality with C's real cost on the step (its time on the
    compute stream, in the graphs), which a random-weight model's own C could not give (its guesses are noise)."""

    def __init__(self, attention, recorded):
        self.attention, self.recorded = attention, recorded
        self.guesses = recorded.guesses

    def forward(self, x_TD: torch.Tensor):
        self.attention.forward(x_TD)
        return self.recorded.forward(x_TD)

    __call__ = forward

    def remove(self) -> None:  # (offload.prefetch.release_router: the attention's hooks come off with it)
        self.attention.remove()


def lookahead_routers(model: MoEForCausalLM, name: str, next_ids, num_experts: int, stride: int):
    """(hook handles, next routers) of the guesses row ``name``: the recorded guesses (TraceLookahead); a name
    ending in '+C' pays for point C besides (PaidGuess)."""
    from placement.trace_routing import install_trace_lookahead
    handles, routers = install_trace_lookahead(model, next_ids, num_experts, stride)
    if name.endswith("+C"):
        from offload.prefetch import attention_routers
        routers = [PaidGuess(a, r) for a, r in zip(attention_routers(model), routers)]
    return handles, routers


def run_offloaded(model: MoEForCausalLM, key: str, args, bw: float, lookaheads: dict | None = None,
                  stride: int = 0, spec=None, resident_ms: dict | None = None) -> list[dict]:
    """The same steps with the experts in pinned host memory and S slots per layer on the GPU (an LRU
    cache, offload.install): eager steps against graph pieces around the offloaded experts. The
    model's experts move to the host store for good (run last).

    ``lookaheads`` {name: next_ids [L, N, K]} (trace routing only, keyed like it with ``stride``):
    each adds graph pieces whose layers prefetch those guesses of the next layer's experts
    (placement.trace_routing.TraceLookahead; serial pieces, as every layer with a next-layer guess
    runs), as ``graph_<name>_ms``. With a trace (``spec``) and the resident steps' ms by batch (``resident_ms``),
    every row also gets issue 5's oracle bound for its slots (``oracle_ms``, ``oracle_hit``: oracle_step_ms)."""
    from offload import HostExpertStore, PackedHostExpertStore
    dev = model.device
    batches = [int(b) for b in args.batch.split(",")]
    floors = {B: floor_bytes(model, B, 32 + args.steps) / bw * 1e3 for B in batches}  # with the experts resident
    blocks = model.moe_blocks()
    cuda = dev.type == "cuda"
    release = lambda i: setattr(blocks[i], "experts", None)  # noqa: E731
    if args.pack_experts:  # 12 bits a weight in host memory, decoded on the device (kernels/unpack.py)
        store = PackedHostExpertStore.from_blocks(blocks, release=release, pin=cuda)
    else:
        store = HostExpertStore.from_blocks(blocks, release=release, pin=cuda)
    if cuda:
        torch.cuda.empty_cache()
    E, K = model.config.num_experts, model.config.num_experts_per_tok
    # the copy floor of a step: the bytes its misses copied over the measured host -> GPU rate (pinned)
    from offload.cost_model import copy_bytes_per_s
    # back-to-back copies of a 64 MiB buffer and of one expert's w13 straight from the store's pinned memory;
    # the floor takes the faster (a floor)
    probe = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=cuda)  # (also probed before every round below)
    h2d_64m = copy_bytes_per_s(dev, probe) if cuda else float("nan")
    one = store.packed(0, 0)[0] if args.pack_experts else store.get(0, 0)[0]  # a packed expert, or one w13
    h2d_expert = copy_bytes_per_s(dev, one) if cuda else float("nan")
    h2d = max(h2d_64m, h2d_expert)
    what = "packed buffer" if args.pack_experts else "w13"
    print(f"host -> GPU copies: {h2d_64m / 1e9:.1f} GB/s (pinned, 64 MiB), {h2d_expert / 1e9:.1f} GB/s (one expert's "
          f"{what} from the store, {one.numel() * one.element_size() / 1e6:.1f} MB)", flush=True)
    rows = []
    # what one miss moves, for the oracle bound: the packed buffers' mean, or an unpacked expert
    miss_bytes = (sum(store.copy_nbytes(i, e) for i in range(store.num_layers) for e in range(store.num_experts))
                  / (store.num_layers * store.num_experts) if args.pack_experts else store.expert_bytes)
    oracle = {}  # (S, B) -> the oracle's fields of those rows
    rate = h2d if h2d == h2d else 25e9  # off a GPU (a check of the script): OffloadConfig's nominal copy rate
    if spec is not None and resident_ms:
        for S in [int(v) for v in args.offload_slots.split(",")]:
            for B in batches:
                if B in resident_ms:
                    ms, hit = oracle_step_ms(spec, B, 32, args.steps, S, miss_bytes, rate, resident_ms[B])
                    oracle[S, B] = dict(oracle_ms=ms, oracle_hit=hit, oracle_rate_gbs=rate / 1e9)
    drivers = args.offload_driver.split(",")
    if "device" in drivers:
        rows += run_device_driven(model, key, args, store, floors, h2d, probe, lookaheads, stride, oracle)
    if "host" in drivers:
        rows += run_host_driven(model, key, args, store, floors, h2d, probe, lookaheads, stride, oracle, batches)

    def oracle_at(S: int, B: int, rate_gbs: float) -> dict:
        ms, hit = oracle_step_ms(spec, B, 32, args.steps, S, miss_bytes, rate_gbs * 1e9, resident_ms[B])
        return dict(oracle_ms=ms, oracle_hit=hit, oracle_rate_gbs=rate_gbs)
    rerate_to_fastest_probe(rows, oracle_at if oracle else None)
    return rows


def rerate_to_fastest_probe(rows: list[dict], oracle_at=None) -> None:
    """Floors and the oracle bound stand on the fastest host -> GPU rate probed in the run: the probes at the start
    or any probe right before a round (``*_all``' third field). A start probe once read 26.9 GB/s where every
    round's probe read 55.0-55.4 and the device rows moved 43.5 GB/s themselves (s30-d, Qwen3 48 layers just
    built: 58 GB written to pinned memory): floors at it were 1.7x too slow and the oracle bound 33.3 ms for
    16.7. Where a round's probe beat the start's by 2%, the row's ``*_copy_floor_ms`` and oracle fields are
    recomputed at it (``h2d_start_gbs`` keeps the start's). ``oracle_at(S, B, rate_gbs)`` -> the oracle fields
    (None: no oracle)."""
    for r in rows:
        start = r.get("h2d_gbs")
        if start is None or start != start:
            continue
        rates = [v[2] for k, vs in r.items() if k.endswith("_all") for v in vs if v[2] == v[2]]
        best = max(rates, default=start)
        if best <= 1.02 * start:
            continue
        r["h2d_start_gbs"], r["h2d_gbs"] = start, best
        for k in [k for k in r if k.endswith("_copy_floor_ms")]:
            r[k] = r["floor_ms"] + r[k[:-len("copy_floor_ms")] + "mb_per_step"] * 1e6 / (best * 1e9) * 1e3
        if oracle_at is not None and "oracle_ms" in r:
            r.update(oracle_at(r["slots"], r["B"], best))
        print(f"  {r['model']} {r['policy']}: floors and oracle at {best:.1f} GB/s, a round's probe (the start's read "
              f"{start:.1f})", flush=True)


def run_host_driven(model: MoEForCausalLM, key: str, args, store, floors: dict, h2d: float, probe, lookaheads,
                    stride: int, oracle: dict, batches: list[int]) -> list[dict]:
    """run_offloaded's host-driven rows (OffloadConfig(driver='host')): graph pieces around the offloaded experts,
    serial, always and run-ahead, then the lookahead rows, each policy over the same cache (SwitchPolicy)."""
    from offload import OffloadConfig
    from offload.apply import install
    from offload.policies import make_policy
    rows, dev, blocks = [], model.device, model.moe_blocks()
    cuda = dev.type == "cuda"
    E, K = model.config.num_experts, model.config.num_experts_per_tok
    for S in [int(v) for v in args.offload_slots.split(",")]:
        # prefetch_k = top-k: the guesses rows prefetch as many guesses as each holds (--lookahead-k)
        policies = args.offload_policy.split(",")
        cfgs = {p: OffloadConfig(slots_per_layer=S, device=str(dev), calibrate=False, policy=p, driver="host",
                                 lfu_half_life=args.lfu_half_life if p == "lfu" else None, prefetch_k=K)
                for p in policies}
        ocfg = cfgs[policies[0]]
        cache = install(blocks, store, ocfg, device=dev, top_k=K, slots=S, backend="triton" if cuda else "torch")
        # the installed policy decides alone, or, with several, a switch between rounds (its loops cost host time
        # in the timed steps: only where there is something to switch)
        switch = SwitchPolicy({policies[0]: cache.policy,
                               **{p: make_policy(p, lfu_half_life=cfgs[p].lfu_half_life) for p in policies[1:]}})
        for p in policies[1:]:
            switch.policies[p].bind(cache.num_layers, cache.num_experts)
        if len(policies) > 1:
            cache.policy = switch
        if S >= E:
            for layer in range(len(blocks)):
                cache.prefetch(layer, list(range(E)))
        for B in batches:
            name = f"{MODELS[key][0]} offloaded {S}/{E}" + (" packed" if args.pack_experts else "")
            by_policy = {p: dict(model=name, B=B, slots=S, layers=len(model.layers), floor_ms=floors[B],
                                 policy=p + (f"-hl{c.lfu_steps():g}" if c.lfu_steps() else ""),
                                 routing="rec" if args.trace else "trace" if args.trace_routing else "model",
                                 h2d_gbs=h2d / 1e9) for p, c in cfgs.items()}
            for row in by_policy.values():
                row.update(oracle.get((S, B), {}))
            r = by_policy[policies[0]]  # the row being filled (record() and run_lookaheads() write into it)
            # graph: run-ahead where a layer's speculations are mostly kept (the default); always: at every layer
            variants = (("eager", False, True, 0.5), ("graph", True, True, 0.5), ("graph_serial", True, False, 0.5),
                        ("graph_always", True, True, 0.0))

            def record(label, t, st, host_ns, info):
                return record_round(r, label, t, st, host_ns, info, args.steps, floors[B], h2d)

            def run_lookaheads(rnd):
                for name, next_ids in (lookaheads or {}).items():  # (eager steps on the CPU: a check of the script)
                    handles, routers = lookahead_routers(model, name, next_ids, E, stride)
                    try:
                        for b, router in zip(blocks, routers):
                            b.experts.set_next_router(router)
                        cache.reset_stats()
                        host_ns, h2d_now = probes()
                        t, logits = run(model, B, args.steps, graph=cuda, on_timing=cache.reset_stats)
                        st, info = cache.stats(), dict(LAST_RUN, h2d_gbs=h2d_now)
                        if args.profile_steps and S < E and rnd == args.rounds - 1:
                            tag = f"{key}_S{S}_B{B}_{switch.active}_{name}"
                            print(profile_offloaded(model, B, args.profile_steps, cuda, Path(args.out), tag), flush=True)
                    finally:
                        for b in blocks:
                            b.experts.set_next_router(None)
                        for h in handles:
                            h.remove()
                    label = f"graph_{name}"
                    if record(label, t, st, host_ns, info):
                        r[f"{label}_prefetch_precision"] = st["prefetch_precision"]
                        r[f"{label}_prefetch_recall"] = st["prefetch_recall"]
                        r[f"{label}_same_steps"] = steps_before_parting(eager_logits, logits)

            def probes():
                return probe_host(dev, probe)
            for rnd, pol in itertools.product(range(args.rounds), policies):  # rounds interleave variants and policies
                switch.active, r = pol, by_policy[pol]
                for label, graph, ahead, min_kept in variants[:4 if cuda else 1]:
                    if rnd and not graph:
                        continue  # eager steps: once (their logits are the reference)
                    cache.reset_stats()
                    host_ns, h2d_now = probes()
                    t, logits = run(model, B, args.steps, graph=graph, run_ahead=ahead,
                                    on_timing=cache.reset_stats, min_kept=min_kept)
                    record(label, t, cache.stats(), host_ns, dict(LAST_RUN, h2d_gbs=h2d_now))
                    if graph:
                        r[f"{label}_same_steps"] = steps_before_parting(eager_logits, logits)
                    else:
                        eager_logits = logits
                run_lookaheads(rnd)
            for pol in policies:
                rows.append(by_policy[pol])
                print(json.dumps(by_policy[pol]), flush=True)
                if args.profile_steps and S < E:  # where the misses are
                    switch.active = pol
                    tag = f"{key}_S{S}_B{B}_{pol}"
                    print(profile_offloaded(model, B, args.profile_steps, cuda, Path(args.out), tag), flush=True)
        del cache
    return rows


def oracle_step_ms(spec, B: int, prompt_len: int, steps: int, slots: int, expert_bytes: float, rate: float,
                   compute_ms: float) -> tuple[float, float]:
    """Issue 5's oracle bound for run()'s timed steps: Belady's misses over the routing those steps take (rows
    0..B-1 step by step; the prompt, as single-token steps, and the two untimed steps warm the cache), every copy
    hidden behind the compute (each layer's share of ``compute_ms``, the resident graph step), copies only: the
    CPU measured no help at batch 1 (BENCHMARKS 3b, 3h, 3n). ``expert_bytes``: what one miss moves (packed or
    not), ``rate``: bytes/s. Returns (ms a step, Belady's hit ratio) (offload.simulator.oracle_bound)."""
    import math

    import numpy as np

    from offload.cost_model import CostModel
    from offload.simulator import oracle_bound
    from placement.trace_routing import trace_keys
    from routing.trace import RoutingTrace
    ids = np.asarray(spec.expert_ids)
    pos, rows = np.divmod(np.arange((prompt_len + 2 + steps) * B), B)  # step-major: position p of every row
    trace = RoutingTrace(ids[:, trace_keys(rows, pos, spec.stride, ids.shape[1])], spec.num_experts)
    cost = CostModel(copy_bytes_per_s=rate, cpu_base_s=math.inf, cpu_per_token_s=0.0)
    o = oracle_bound(trace, slots, cost=cost, expert_bytes=int(expert_bytes),
                     layer_compute_s=compute_ms / 1e3 / ids.shape[0], tokens_per_step=B, warmup_steps=prompt_len + 2)
    return o["time_per_step_s"] * 1e3, o["hit_ratio"]


def run_device_driven(model: MoEForCausalLM, key: str, args, store, floors: dict, h2d: float, probe,
                      lookaheads: dict | None = None, stride: int = 0, oracle: dict | None = None) -> list[dict]:
    """The offloaded rows with OffloadConfig(driver='device') (offload/device_cache.py): the GPU plans hits,
    misses and victims itself and reads missed experts from the pinned store with a kernel; no host sync, so
    a decode step is one CUDA graph (DecodeGraphs). One cache per policy over the same store, each kept
    warm across rounds (its blocks' experts swapped in for its rounds); eager steps once, graph steps every
    round, each policy keeping its fastest (device_graph_all: every round's ms, host ns, copy rate, MB).
    ``lookaheads`` (as run_offloaded's): each adds graph steps whose layers prefetch those guesses of the next
    layer's experts on a side stream (device_graph_<name>)."""
    from offload import OffloadConfig
    from offload.apply import install
    dev = model.device
    cuda = dev.type == "cuda"
    blocks = model.moe_blocks()
    E, K = model.config.num_experts, model.config.num_experts_per_tok
    rows = []
    for S in [int(v) for v in args.offload_slots.split(",")]:
        policies = args.offload_policy.split(",")
        caches, mods = {}, {}
        for p in policies:
            # prefetch_k = top-k, as the host rows: the guesses rows prefetch as many guesses as each holds
            # (--lookahead-k); before s29 these rows took OffloadConfig's default, half of them
            cfg = OffloadConfig(slots_per_layer=S, device=str(dev), calibrate=False, policy=p, driver="device",
                                lfu_half_life=args.lfu_half_life if p == "lfu" else None, prefetch_k=K)
            caches[p] = install(blocks, store, cfg, device=dev, top_k=K, slots=S, backend="triton" if cuda else "torch")
            mods[p] = [b.experts for b in blocks]
        for B in [int(b) for b in args.batch.split(",")]:
            name = f"{MODELS[key][0]} offloaded {S}/{E} device" + (" packed" if args.pack_experts else "")
            by_policy = {p: dict(model=name, B=B, slots=S, layers=len(model.layers),
                                 floor_ms=floors[B], driver="device",
                                 policy=p + (f"-hl{caches[p].lfu_half_life:g}" if caches[p].lfu_half_life else ""),
                                 routing="rec" if args.trace else "trace" if args.trace_routing else "model",
                                 h2d_gbs=h2d / 1e9) for p in policies}
            for row in by_policy.values():
                row.update((oracle or {}).get((S, B), {}))
            for rnd, p in itertools.product(range(args.rounds), policies):
                for b, m in zip(blocks, mods[p]):
                    b.experts = m
                cache, r = caches[p], by_policy[p]
                runs = [(label, graph, None, None) for label, graph in
                        (("device_eager", False), ("device_graph", True))[0 if rnd == 0 else 1:]]
                runs += [(f"device_graph_{name}", True, name, ids) for name, ids in (lookaheads or {}).items()]
                for label, graph, guess_name, next_ids in runs:
                    if graph and not cuda and guess_name is None:
                        continue
                    handles = []
                    if guess_name is not None:  # (eager steps on the CPU: a check of the script)
                        handles, routers = lookahead_routers(model, guess_name, next_ids, E, stride)
                        for m, router in zip(mods[p], routers):
                            m.set_next_router(router)
                    host_ns, h2d_now = probe_host(dev, probe)
                    cache.reset_stats()
                    try:
                        t, logits = run(model, B, args.steps, graph=graph and cuda, on_timing=cache.reset_stats)
                    finally:
                        for m in mods[p]:
                            m.set_next_router(None)
                        for h in handles:
                            h.remove()
                    st = cache.stats()
                    if record_round(r, label, t, st, host_ns, dict(LAST_RUN, h2d_gbs=h2d_now), args.steps, floors[B], h2d):
                        if guess_name is not None:
                            r[f"{label}_prefetch_precision"] = st["prefetch_precision"]
                            r[f"{label}_prefetch_recall"] = st["prefetch_recall"]
                    if guess_name is not None:
                        continue
                    if graph:
                        r["device_graph_same_steps"] = steps_before_parting(r["_eager_logits"], logits)
                    else:
                        r["_eager_logits"] = logits
            for p in policies:
                by_policy[p].pop("_eager_logits", None)
                rows.append(by_policy[p])
                print(json.dumps(by_policy[p]), flush=True)
        for b in blocks:
            b.experts = None
        del caches, mods
        if cuda:
            torch.cuda.empty_cache()
    return rows


def measure_bandwidth(dev) -> float:
    if dev.type != "cuda":
        return float("nan")
    import triton.testing
    a = torch.randn(1 << 29, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / triton.testing.do_bench(lambda: b.copy_(a), return_mode="median") * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen3,mixtral")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--peers", default="", help="comma list: transformers (its decode of the same shapes)")
    ap.add_argument("--layers", type=int, default=0, help="run this many decoder layers (0: the published depth)")
    ap.add_argument("--offload-slots", default="",
                    help="comma list of expert slots per layer: also decode with the experts offloaded to pinned "
                         "host memory and that many cached on the GPU (eager steps vs graph pieces)")
    ap.add_argument("--decode-attention", default="triton",
                    help="comma list of triton,sdpa: how decode steps attend (moe.attention.DECODE_ATTENTION)")
    ap.add_argument("--prompt-len", default="32", help="comma list of prompt lengths (the context decoded over)")
    ap.add_argument("--offload-policy", default="lru",
                    help="eviction of --offload-slots: lru or lfu, or a comma list (one cache; the policy that "
                         "decides is switched between rounds, a row each)")
    ap.add_argument("--pack-experts", action="store_true",
                    help="offloaded rows: keep the experts packed to 12 bits a weight in host memory, decoded on the "
                         "device after each copy (OffloadConfig.pack_experts; bfloat16)")
    ap.add_argument("--lfu-half-life", type=float, default=None,
                    help="with --offload-policy lfu: use counts halve over this many steps (default 23, "
                         "OffloadConfig's; inf: counted over the whole run)")
    ap.add_argument("--offload-driver", default="host",
                    help="offloaded rows: 'host' (the routing read back at every layer, copies by the copy engine, "
                         "graph pieces), 'device' (OffloadConfig(driver='device'): the GPU decides and reads missed "
                         "experts from host memory itself, one CUDA graph a step) or both, comma-separated")
    ap.add_argument("--rounds", type=int, default=1,
                    help="offloaded rows: run every graph variant this many times, interleaved, and keep each one's "
                         "fastest (the host's speed drifts within a process: host_speed_ns)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="offloaded rows with fewer slots than experts: this many more steps under torch.profiler "
                         "(graph pieces on a GPU, eager on the CPU; the prefetch rows too), the tables printed and "
                         "written as profile_*.txt, the timelines as profile_*.json")
    ap.add_argument("--trace-routing", action="store_true",
                    help="route by a synthetic trace (offload.py's), not by the random routers (see above)")
    ap.add_argument("--locality", type=float, default=0.5, help="temporal locality of --trace-routing")
    ap.add_argument("--affinity", type=float, default=0.6, help="inter-layer affinity of --trace-routing")
    ap.add_argument("--trace", default="",
                    help="route by this recorded trace (moe predictor record's NAME.npz) instead of a synthetic one")
    ap.add_argument("--lookahead", default="",
                    help="with --trace: a file of each layer's guesses of the next layer's experts for its tokens "
                         "(benchmarks/lookahead_ids.py); offloaded rows add pieces that prefetch them (graph_lookahead). "
                         "Any trace routing also adds graph_oracle: the guesses are the trace's own next layer")
    ap.add_argument("--lookahead-k", default="",
                    help="comma list: prefetch only each token's first k guesses of --lookahead (its most confident), "
                         "one row each (default: all of them)")
    ap.add_argument("--lookahead-pays", default="", choices=["", "attention"],
                    help="with --lookahead: also a row (lookahead+C) that prefetches all of the file's guesses while "
                         "each layer computes point C live, prefetch='attention''s work, its answer dropped: the "
                         "recorded guesses' quality at C's real cost on the step")
    ap.add_argument("--eager-bucket", type=int, default=0,
                    help="also time eager resident steps with the attention width rounded up to this (0: not)")
    args = ap.parse_args(argv)
    if args.trace and args.trace_routing:
        ap.error("--trace (a recorded trace) and --trace-routing (a synthetic one) exclude each other")
    if args.lookahead and not args.trace:
        ap.error("--lookahead holds guesses for the tokens of a recorded trace: give that trace with --trace")
    if args.lookahead_pays and not args.lookahead:
        ap.error("--lookahead-pays adds a row to the guesses of --lookahead: give the guesses file")
    if args.lookahead_k and not args.lookahead:
        ap.error("--lookahead-k picks among the guesses of --lookahead: give the guesses file")
    pols = args.offload_policy.split(",")
    if not pols or any(p not in ("lru", "lfu") for p in pols) or len(set(pols)) != len(pols):
        ap.error(f"--offload-policy {args.offload_policy!r}: give lru, lfu or both, comma-separated, each once")
    drv = args.offload_driver.split(",")
    if not drv or any(d not in ("host", "device") for d in drv) or len(set(drv)) != len(drv):
        ap.error(f"--offload-driver {args.offload_driver!r}: give host, device or both, comma-separated")
    if args.lfu_half_life is not None and "lfu" not in pols:
        ap.error("--lfu-half-life applies to --offload-policy lfu")
    dev = torch.device(args.device)
    bw = measure_bandwidth(dev)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write); {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}")
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import kernels.decode_attention as kda
    import moe.attention
    kernel_calls = [0]
    real_kernel = kda.decode_attention

    def counted(*a, **k):  # so a row says whether the kernel ran at all (graph replays are not counted)
        kernel_calls[0] += 1
        return real_kernel(*a, **k)
    kda.decode_attention = counted
    cells = [(P, B, att) for P in (int(p) for p in args.prompt_len.split(","))
             for B in (int(b) for b in args.batch.split(",")) for att in args.decode_attention.split(",")]
    for key in args.models.split(","):
        model = build(key, args.device, args.layers, bf16=args.pack_experts)
        lookaheads, spec = {}, None
        longest = max(int(p) for p in args.prompt_len.split(",")) + args.steps + 16
        if args.trace:
            _, spec, nxt = install_recorded_routing(model, args.trace, args.lookahead or None, longest)
            if nxt is not None:
                for k in [int(v) for v in args.lookahead_k.split(",")] if args.lookahead_k else [nxt.shape[2]]:
                    lookaheads["lookahead" if k == nxt.shape[2] else f"lookahead{k}"] = nxt[:, :, :k]
                if args.lookahead_pays == "attention":
                    lookaheads["lookahead+C"] = nxt
        elif args.trace_routing:
            _, spec = install_synthetic_routing(model, key, max(int(b) for b in args.batch.split(",")), longest,
                                                args.locality, args.affinity)
        if spec is not None:  # a perfect one-ahead guess: the trace's own next layer (the bound of this prefetch)
            import numpy as np
            ids = np.asarray(spec.expert_ids)
            lookaheads["oracle"] = np.concatenate([ids[1:], np.full_like(ids[:1], -1)])
        for P, B, att in cells:
            moe.attention.DECODE_ATTENTION = att
            kernel_calls[0] = 0
            t_eager, l_eager = run(model, B, args.steps, graph=False, prompt_len=P)
            r = dict(model=MODELS[key][0], B=B, prompt=P, attention=att, eager_ms=t_eager * 1e3,
                     floor_ms=floor_bytes(model, B, P + args.steps) / bw * 1e3)
            if args.eager_bucket:
                r["eager_bucketed_ms"] = run(model, B, args.steps, graph=False, bucket=args.eager_bucket,
                                             prompt_len=P)[0] * 1e3
            if dev.type == "cuda":
                t_graph, l_graph = run(model, B, args.steps, graph=True, prompt_len=P)
                t_again, l_again = run(model, B, args.steps, graph=True, prompt_len=P)
                r["graph_ms"] = min(t_graph, t_again) * 1e3
                r["repeat"] = all(torch.equal(a, b) for a, b in zip(l_graph, l_again))
                # greedy paths can part once a near-tie flips; compare the steps before they part
                same = steps_before_parting(l_eager, l_graph)
                r["steps_compared"] = same
                r["logit_rel_diff"] = max(((a - b).norm() / a.norm()).item() for a, b in zip(l_eager[:same], l_graph[:same])) if same else float("nan")
            r["kernel_calls"] = kernel_calls[0]
            rows.append(r)
            print(json.dumps(r), flush=True)
        moe.attention.DECODE_ATTENTION = args.decode_attention.split(",")[0]
        if args.offload_slots:
            # the resident step by batch (graph, else eager), at the offloaded runs' 32-token prompt where measured
            resident = {}
            for r in sorted((r for r in rows if r.get("model") == MODELS[key][0] and "prompt" in r),
                            key=lambda r: r["prompt"] == 32):
                resident[r["B"]] = r.get("graph_ms", r["eager_ms"])
            rows += run_offloaded(model, key, args, bw, lookaheads, spec.stride if spec is not None else 0, spec,
                                  resident)
        cfg, dtype = model.config, model.dtype
        del model
        gc.collect()  # graphs and their pools hold the memory until collected
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if "transformers" in args.peers.split(","):
            mine = [r for r in rows if r["model"] == MODELS[key][0]]
            for P in sorted({r["prompt"] for r in mine}):
                hf_s = run_transformers(cfg, sorted({r["B"] for r in mine if r["prompt"] == P}), args.steps,
                                        args.device, dtype, prompt_len=P)
                for r in mine:
                    if r["prompt"] == P:
                        r["transformers_ms"] = hf_s[r["B"]] * 1e3
                        print(json.dumps(r), flush=True)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    kda.decode_attention = real_kernel
    with open(out / "decode_results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    off = [r for r in rows if "graph_serial_ms" in r]
    if off:
        print(f"\n## offloaded decode, ms per step (hit ratio and MB copied: the timed decode steps; floor = resident "
              f"floor + those MB at the measured host -> GPU rate; py ns: the host's Python speed before the serial "
              f"variant, host_speed_ns; gc ms: the collector's pauses per serial step)\n{'model':28s} {'B':>3s} {'policy':>6s} "
              f"{'routing':>7s} {'eager':>8s} {'serial':>8s} {'always':>8s} {'run-ahead':>9s} {'hit':>5s} "
              f"{'MB/step':>8s} {'floor':>7s} {'ahead/floor':>11s} {'py ns':>6s} {'gc ms':>6s}")
        for r in off:
            fl = r["graph_copy_floor_ms"]
            print(f"{r['model']:28s} {r['B']:3d} {r['policy']:>6s} {r['routing']:>7s} {r['eager_ms']:8.3f} "
                  f"{r['graph_serial_ms']:8.3f} {r['graph_always_ms']:8.3f} {r['graph_ms']:9.3f} {r['graph_hit']:5.2f} "
                  f"{r['graph_mb_per_step']:8.1f} {fl:7.2f} {r['graph_ms'] / fl:11.2f} {r['graph_serial_host_ns']:6.0f} "
                  f"{r['graph_serial_gc_ms']:6.2f}")
        for r in off:
            if "oracle_ms" in r:
                best = min(r[k] for k in ("graph_serial_ms", "graph_always_ms", "graph_ms"))
                print(f"  {r['model']} {r['policy']}: oracle bound {r['oracle_ms']:.2f} ms at Belady's hit "
                      f"{r['oracle_hit']:.2f}; the best column is {r['oracle_ms'] / best:.0%} of it")
        pre = [(r, k[len("graph_"):-len("_ms")]) for r in off for k in r
               if k.startswith(("graph_lookahead", "graph_oracle")) and k.endswith("_ms")
               and k[:-len("_ms")] + "_hit" in r]
        if pre:
            print(f"\n## offloaded decode with next-layer prefetch (serial pieces; each layer copies its guess of the next "
                  f"layer's experts)\n{'model':28s} {'B':>3s} {'policy':>6s} {'guess':>9s} {'ms':>8s} {'hit':>5s} "
                  f"{'MB/step':>8s} {'floor':>7s} {'ms/floor':>8s} {'precision':>9s} {'recall':>6s} {'vs serial':>9s} "
                  f"{'py ns':>6s}")
            for r, n in pre:
                g = f"graph_{n}"
                print(f"{r['model']:28s} {r['B']:3d} {r['policy']:>6s} {n:>9s} {r[g + '_ms']:8.3f} {r[g + '_hit']:5.2f} "
                      f"{r[g + '_mb_per_step']:8.1f} {r[g + '_copy_floor_ms']:7.2f} "
                      f"{r[g + '_ms'] / r[g + '_copy_floor_ms']:8.2f} {r[g + '_prefetch_precision']:9.2f} "
                      f"{r[g + '_prefetch_recall']:6.2f} {r[g + '_ms'] / r['graph_serial_ms']:9.2f} {r[g + '_host_ns']:6.0f}")
    dd = [r for r in rows if r.get("driver") == "device"]
    if dd:
        print(f"\n## offloaded decode decided on the device (driver='device': one CUDA graph a step, misses read from "
              f"host memory by a kernel; oracle: issue 5's bound, Belady + every copy hidden, oracle_step_ms)\n"
              f"{'model':41s} {'B':>3s} {'policy':>8s} {'routing':>7s} {'eager':>8s} "
              f"{'graph':>8s} {'hit':>5s} {'MB/step':>8s} {'floor':>7s} {'graph/floor':>11s} {'py ns':>6s} "
              f"{'oracle':>7s} {'o. hit':>6s} {'of oracle':>9s}")
        for r in dd:
            g = r.get("device_graph_ms", float("nan"))
            fl = r.get("device_graph_copy_floor_ms", r["device_eager_copy_floor_ms"])
            print(f"{r['model']:41s} {r['B']:3d} {r['policy']:>8s} {r['routing']:>7s} {r['device_eager_ms']:8.3f} "
                  f"{g:8.3f} {r.get('device_graph_hit', r['device_eager_hit']):5.2f} "
                  f"{r.get('device_graph_mb_per_step', r['device_eager_mb_per_step']):8.1f} {fl:7.2f} {g / fl:11.2f} "
                  f"{r.get('device_graph_host_ns', float('nan')):6.0f} {r.get('oracle_ms', float('nan')):7.2f} "
                  f"{r.get('oracle_hit', float('nan')):6.2f} {r.get('oracle_ms', float('nan')) / g:9.0%}")
            for k in [k for k in r if k.startswith("device_graph_") and k.endswith("_prefetch_precision")]:
                n = k[:-len("_prefetch_precision")]
                print(f"{'  + prefetch of ' + n[len('device_graph_'):]:41s} {'':3s} {'':8s} {'':7s} {'':8s} "
                      f"{r[n + '_ms']:8.3f} {r[n + '_hit']:5.2f} {r[n + '_mb_per_step']:8.1f} {r[n + '_copy_floor_ms']:7.2f} "
                      f"{r[n + '_ms'] / r[n + '_copy_floor_ms']:11.2f} {r[n + '_host_ns']:6.0f}  precision "
                      f"{r[k]:.2f} recall {r[n + '_prefetch_recall']:.2f} vs no prefetch {r[n + '_ms'] / g:.2f}")
    print(f"\n## resident decode, ms per step (tokens/s = B / step); bf16, triton experts\n"
          f"{'model':16s} {'B':>3s} {'prompt':>6s} {'attn':>6s} {'floor':>8s} {'eager':>8s} {'graph':>8s} {'hf':>8s} "
          f"{'eager/graph':>11s} {'hf/graph':>8s} {'graph/floor':>11s} {'tok/s graph':>11s} {'repeat':>6s} {'kernel':>6s}")
    for r in rows:
        if "prompt" not in r:
            continue
        g, hf = r.get("graph_ms", float("nan")), r.get("transformers_ms", float("nan"))
        print(f"{r['model']:16s} {r['B']:3d} {r['prompt']:6d} {r['attention']:>6s} {r['floor_ms']:8.3f} "
              f"{r['eager_ms']:8.3f} {g:8.3f} {hf:8.3f} {r['eager_ms'] / g:11.2f} {hf / g:8.2f} "
              f"{g / r['floor_ms']:11.2f} {r['B'] / g * 1e3:11.0f} {str(r.get('repeat', '-')):>6s} {r['kernel_calls']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
