"""Expert offloading decided on the device: no host round trip per layer (``OffloadConfig(driver='device')``).

The host-driven cache (``offload/cache.py``) reads each layer's routing back to the host, decides hits,
misses and victims there and issues the copies. At batch 1 that host work, ~0.3 ms a layer on the H200
machine's CPU (BENCHMARKS 3n, 3o), costs about what the copies of fine-grained experts do, and the
GPU waits through it at every layer. Here the GPU does all of it, in order on the compute stream:

    per MoE layer, fixed shapes, no host sync (a whole decode step is one CUDA graph):
      ids_TK ─► plan: tensor ops over the layer's [E] and [S] tables: the hits; each missed expert takes
                 the slot of the policy's victim among the slots whose experts this step does not use
                 (LRU: the oldest use; LFU: the fewest uses, decayed with a half-life, then the oldest)
             ─► fill: one kernel reads the admitted misses straight from the pinned host store (zero-copy,
                 over PCIe: a kernel reading host memory moved 50.8 GB/s on the H200, the copy engine
                 55.2, BENCHMARKS 3p) into their slots
             ─► the experts kernel on the slot pool, the ids mapped to slots

A step whose distinct experts outnumber the slots runs in ``rounds`` (known from the shapes alone:
ceil(min(T*K, E) / S)): each round plans the experts still pending, fills and computes them, so a
cache of one slot per layer, or one smaller than top-k, gives the same outputs. Rounds with nothing
pending cost a few small launches.

The host store is read by the GPU itself, so it must be pinned host memory (``HostExpertStore`` with
pin=True, as ``apply_offload`` builds it on a GPU). On a CPU "device" the same plan runs and the fill
is a tensor copy (tests); under ``TRITON_INTERPRET=1`` the fill kernel runs there too.

What this path does not do (``OffloadConfig`` refuses the combinations with the reason): prefetch,
CPU fallback, packed experts, expert slices, the predictor and Belady policies, a disk store.

Shape legend: T = tokens, K = experts per token, N = T*K, E = experts, S = slots per layer,
J = 2*I, D = hidden, M = min(E, S) fills a round at most.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import nn

from kernels import get_backend
from kernels.grouped_gemm import _interpreted

from .policies import resolve_lfu_half_life

POLICIES = ("lru", "lfu")
FILL_BLOCK = 8192  # elements a fill program moves per turn (s25-a: 8192 reached the link's 50.8 GB/s from 16 programs)
FILL_PROGRAMS = 256  # programs of a fill launch, shared by its experts (s25-a: 32-264 all read 50.7-51.0 GB/s)


@triton.jit
def _fill_kernel(src13_ptr, src2_ptr, dst13_ptr, dst2_ptr, fill_e_ptr, fill_s_ptr, N13, N2,
                 BLOCK: tl.constexpr):
    """Program (j, c): expert fill_e[j] (-1: nothing) of the host store into slot fill_s[j], chunk c of
    every num_programs(1) chunks of BLOCK elements, w13 then w2. The store is pinned host memory: the
    loads travel over PCIe."""
    j = tl.program_id(0)
    c = tl.program_id(1)
    nc = tl.num_programs(1)
    e = tl.load(fill_e_ptr + j).to(tl.int64)
    if e >= 0:
        s = tl.load(fill_s_ptr + j).to(tl.int64)
        for start in tl.range(c * BLOCK, N13, nc * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < N13
            tl.store(dst13_ptr + s * N13 + offs, tl.load(src13_ptr + e * N13 + offs, mask=m), mask=m)
        for start in tl.range(c * BLOCK, N2, nc * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < N2
            tl.store(dst2_ptr + s * N2 + offs, tl.load(src2_ptr + e * N2 + offs, mask=m), mask=m)


def fill_slots(src13: torch.Tensor, src2: torch.Tensor, dst13: torch.Tensor, dst2: torch.Tensor,
               fill_e: torch.Tensor, fill_s: torch.Tensor, use_kernel: bool | None = None) -> None:
    """dst13[fill_s[j]] = src13[fill_e[j]] (and w2) for every j with fill_e[j] >= 0; no host sync with
    the kernel. src: [E, ...] (host), dst: [S, ...] (device), both contiguous; fill_e, fill_s: int64 [M]
    on dst's device. use_kernel None: the kernel on a GPU and under the Triton interpreter."""
    if use_kernel is None:
        use_kernel = dst13.device.type == "cuda" or _interpreted()
    if not use_kernel:  # plain reference: a host loop (the CPU "device")
        for e, s in zip(fill_e.tolist(), fill_s.tolist()):
            if e >= 0:
                dst13[s].copy_(src13[e])
                dst2[s].copy_(src2[e])
        return
    for t in (src13, src2, dst13, dst2):
        if not t.is_contiguous():
            raise ValueError("fill_slots needs contiguous store and pool tensors")
    M = fill_e.shape[0]
    n13, n2 = src13[0].numel(), src2[0].numel()
    chunks = max(1, min(FILL_PROGRAMS // max(M, 1), triton.cdiv(max(n13, n2), FILL_BLOCK)))
    _fill_kernel[(M, chunks)](src13, src2, dst13, dst2, fill_e, fill_s, n13, n2,
                              BLOCK=FILL_BLOCK, num_warps=8)


class DeviceExpertCache:
    """S slots per MoE layer on the device, with the tables and the policy's state there too.

    slot_of [L, E+1] (the slot of each resident expert, -1 elsewhere; entry E is always -1, so an id of
    -1 maps to -1), expert_in [L, S+1] (entry S: where writes for nobody go), last_use [L, S+1] (the
    layer's step count at each slot's last use), freq [L, E] (LFU: decayed uses), clock [L] and the
    counters [L, 3] (hits, misses, fills) live on the device; stats() reads them back."""

    def __init__(self, store, slots_per_layer: int, policy: str = "lru", device: str | torch.device = "cpu",
                 lfu_half_life: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"driver='device' decides with policy 'lru' or 'lfu', got {policy!r}: the "
                             f"{policy} policy decides on the host (use driver='host')")
        if slots_per_layer < 1:
            raise ValueError(f"slots_per_layer must be >= 1, got {slots_per_layer}")
        if getattr(store, "slices", 1) != 1 or not hasattr(store, "layers"):
            raise ValueError("driver='device' reads whole experts from a host memory store (HostExpertStore, "
                             f"expert_slices=1), got {type(store).__name__}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not all(w.is_pinned() for lyr in store.layers for w in lyr):
            raise ValueError("driver='device' reads the experts from host memory on the GPU itself, so the store "
                             "must be pinned: HostExpertStore.from_blocks(..., pin=True)")
        self.store, self.policy = store, policy
        L, E, S = store.num_layers, store.num_experts, slots_per_layer
        self.num_layers, self.num_experts, self.slots = L, E, S
        self.M = min(E, S)
        half = resolve_lfu_half_life(lfu_half_life) if policy == "lfu" else None
        self.lfu_half_life = half
        self.decay = 1.0 if half is None else 0.5 ** (1.0 / half)
        dev, dt = self.device, store.dtype
        self.pool_w13 = [torch.empty((S, *store.w13_shape), dtype=dt, device=dev) for _ in range(L)]
        self.pool_w2 = [torch.empty((S, *store.w2_shape), dtype=dt, device=dev) for _ in range(L)]
        self.slot_of = torch.full((L, E + 1), -1, dtype=torch.int64, device=dev)
        self.expert_in = torch.full((L, S + 1), -1, dtype=torch.int64, device=dev)
        self.last_use = torch.zeros((L, S + 1), dtype=torch.int64, device=dev)
        self.freq = torch.zeros((L, E), dtype=torch.float64, device=dev)  # float64 as the host's: the same ties
        self.clock = torch.zeros((L,), dtype=torch.int64, device=dev)
        self.counters = torch.zeros((L, 3), dtype=torch.int64, device=dev)
        self._arange_E = torch.arange(E, dtype=torch.int64, device=dev)
        self._inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
        self.expert_bytes = store.expert_bytes

    # --- the plan of one round at one layer ---------------------------------------------------
    def plan(self, layer: int, ids_N: torch.Tensor, rnd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slots for the experts ids_N [N] (int64, -1 = none) at ``layer``: returns (slot ids [N], -1 where
        the expert found no slot this round; fill_e [M], fill_s [M]: the experts to read into which slots,
        -1 = none). rnd: the round of the step at this layer; round 0 counts hits and misses, ticks the clock
        and counts LFU uses, later rounds plan what the earlier ones left. All on the device, no host sync."""
        E, S, M = self.num_experts, self.slots, self.M
        slot_of, expert_in = self.slot_of[layer], self.expert_in[layer]
        valid = ids_N >= 0
        idx = torch.where(valid, ids_N, E)
        routed = torch.zeros(E + 1, dtype=torch.bool, device=ids_N.device).index_fill_(0, idx, True)[:E]
        resident = slot_of[:E] >= 0
        miss = routed & ~resident
        if rnd == 0:
            self.clock[layer] += 1
            self.counters[layer, 0] += (routed & resident).sum()
            self.counters[layer, 1] += miss.sum()
            if self.policy == "lfu":
                f = self.freq[layer]
                f.mul_(self.decay).add_(routed.to(f.dtype))
        held = expert_in[:S]
        busy = (held >= 0) & routed[held.clamp(min=0)]  # slots this round computes from: not victims
        # the order in which slots give way: empty ones first, then by the policy; busy ones never
        recency = self.last_use[layer, :S].to(torch.float64)
        order = torch.argsort(torch.where(held < 0, -self._inf, recency), stable=True)
        if self.policy == "lfu":  # fewest uses first, ties by the oldest use (the order above, kept by stability)
            f = torch.where(held < 0, -self._inf, self.freq[layer][held.clamp(min=0)])
            order = order[torch.argsort(f[order], stable=True)]
        order = order[torch.argsort(busy[order].to(torch.int8), stable=True)]
        free = S - busy.sum()
        rank = torch.cumsum(miss.to(torch.int64), 0) - 1  # [E]: each missed expert's place among the misses
        admit = miss & (rank < free)
        target = order[rank.clamp(0, S - 1)]  # [E]: the slot an admitted expert takes
        old = expert_in[target]
        slot_of.index_fill_(0, torch.where(admit & (old >= 0), old, E), -1)  # the victims leave (entry E stays -1)
        slot_of[:E] = torch.where(admit, target, slot_of[:E])
        expert_in.scatter_(0, torch.where(admit, target, S), torch.where(admit, self._arange_E, -1))
        expert_in[S:].fill_(-1)  # (an index assignment would copy from the host: not in a CUDA graph)
        slot_N = slot_of[idx]
        # recency as the host cache counts it (one tick per expert used, offload/policies.py): this round's
        # experts after every earlier round's, its hits before its misses, each in ascending id
        stamp_E = (self.clock[layer] * (E + 1) + rnd) * (2 * E + 2) + torch.where(miss, E, 0) + self._arange_E
        used = torch.where(slot_N >= 0, slot_N, S)
        self.last_use[layer].scatter_(0, used, stamp_E[idx.clamp(max=E - 1)])  # (entry S: nobody's)
        # the fill list: admitted misses in rank order, M at most (M = min(E, S) >= free)
        pos = torch.where(admit, rank, M)
        fill_e = torch.full((M + 1,), -1, dtype=torch.int64, device=ids_N.device)
        fill_s = torch.full((M + 1,), -1, dtype=torch.int64, device=ids_N.device)
        fill_e.scatter_(0, pos, torch.where(admit, self._arange_E, -1))
        fill_s.scatter_(0, pos, torch.where(admit, target, -1))
        fill_e[M:].fill_(-1)
        self.counters[layer, 2] += admit.sum()
        return slot_N, fill_e[:M], fill_s[:M]

    def rounds(self, tokens: int, top_k: int) -> int:
        """Rounds a step of ``tokens`` tokens needs at most: its distinct experts over the slots."""
        return -(-min(tokens * top_k, self.num_experts) // self.slots)

    def fill(self, layer: int, fill_e: torch.Tensor, fill_s: torch.Tensor) -> None:
        w13, w2 = self.store.layers[layer]
        fill_slots(w13, w2, self.pool_w13[layer], self.pool_w2[layer], fill_e, fill_s)

    def pool(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool_w13[layer], self.pool_w2[layer]

    # --- what users read ------------------------------------------------------------------------
    def resident(self, layer: int) -> list[int]:
        return [e for e in self.expert_in[layer, :self.slots].tolist() if e >= 0]

    def reset_stats(self) -> None:
        self.counters.zero_()

    def stats(self) -> dict:
        hits, misses, fills = (int(v) for v in self.counters.sum(0).tolist())
        acc = hits + misses
        return dict(hits=hits, misses=misses, hit_ratio=hits / acc if acc else 0.0, copies=fills,
                    bytes_copied=fills * self.expert_bytes, evictions=0, prefetches=0, useful_prefetches=0,
                    prefetch_precision=0.0, prefetch_recall=0.0, cpu_computed=0)

    def describe(self) -> str:
        c = self.stats()
        acc = c["hits"] + c["misses"]
        return (f"offload (decided on the device): {self.slots} of {self.num_experts} experts per layer on "
                f"{self.device.type}, {self.policy}, read from pinned host memory by the GPU; {acc} expert uses, "
                f"{100 * c['hit_ratio']:.1f}% hits, {c['copies']} fills ({c['bytes_copied'] / 1e6:.1f} MB)")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool_w13 + self.pool_w2)


class DeviceOffloadedExperts(nn.Module):
    """Drop-in for block.experts over a DeviceExpertCache: forward(x_TD, topk_ids_TK, topk_weights_TK) ->
    y_TD with no host sync (``capturable``: decode steps capture as one CUDA graph, moe/cuda_graph.py)."""

    capturable = True

    def __init__(self, layer: int, cache: DeviceExpertCache, top_k: int, backend: str = "torch"):
        super().__init__()
        self.layer, self.cache, self.top_k, self.backend = layer, cache, top_k, backend
        self.num_experts = cache.num_experts

    def extra_repr(self) -> str:
        return f"layer={self.layer}, slots={self.cache.slots}, experts={self.num_experts}, driver=device"

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        cache, layer = self.cache, self.layer
        T, K = topk_ids_TK.shape
        pending = topk_ids_TK.reshape(-1).to(torch.int64)
        kernel = get_backend(self.backend)
        pool13, pool2 = cache.pool(layer)
        y_TD = None
        for r in range(cache.rounds(T, K)):
            slot_N, fill_e, fill_s = cache.plan(layer, pending, r)
            cache.fill(layer, fill_e, fill_s)
            part = kernel(x_TD, pool13, pool2, slot_N.view(T, K), topk_weights_TK)
            y_TD = part if y_TD is None else y_TD + part
            pending = torch.where(slot_N >= 0, -1, pending)  # what found no slot waits for the next round
        return y_TD
