"""Expert offloading decided on the device: no host round trip per layer (``OffloadConfig(driver='device')``).

The host-driven cache (``offload/cache.py``) reads each layer's routing back to the host, decides hits,
misses and victims there and issues the copies. At batch 1 that host work, ~0.3 ms a layer on the H200
machine's CPU (BENCHMARKS 3n, 3o), costs about what the copies of fine-grained experts do, and the
GPU waits through it at every layer. Here the GPU does all of it, in order on the compute stream:

    per MoE layer, fixed shapes, no host sync (a whole decode step is one CUDA graph):
      ids_TK ─► plan: one program over the layer's [E] and [S] tables (``_plan_kernel``; ``plan_torch`` is
                 its plain reference, ~70 small launches): the hits; each missed expert takes the slot of
                 the policy's victim among the slots whose experts this step does not use (LRU: the
                 oldest use; LFU: the fewest uses, decayed with a half-life, then the oldest), exactly as
                 the host cache decides (the same ticks of recency, the same ties)
             ─► fill: one kernel reads the admitted misses straight from the pinned host store (zero-copy,
                 over PCIe: a kernel reading host memory moved 50.8 GB/s on the H200, the copy engine
                 55.2, BENCHMARKS 3p) into their slots; from a packed store (12 bits a weight,
                 kernels/unpack.py) it decodes on the way, so a quarter fewer bytes cross the link
             ─► the experts kernel on the slot pool, the ids mapped to slots

A step whose distinct experts outnumber the slots runs in ``rounds`` (known from the shapes alone:
ceil(min(T*K, E) / S)): each round plans the experts still pending, fills and computes them, so a
cache of one slot per layer, or one smaller than top-k, gives the same outputs. Rounds with nothing
pending cost a few small launches.

The host store is read by the GPU itself, so it must be pinned host memory (``HostExpertStore`` or
``PackedHostExpertStore`` with pin=True, as ``apply_offload`` builds them on a GPU); pinned memory is
addressed by the GPU where the host addresses it (unified addressing), which the packed fill uses to
reach every buffer of the store's arena from one anchor. On a CPU "device" the plan is plan_torch and
the fill plain copies (tests); under ``TRITON_INTERPRET=1`` the kernels run there too.

Next-layer prefetch (a next router's guesses, ``set_next_router``): the guess is computed first in the layer's
forward, on the compute stream, then planned and filled on a side stream that the next layer joins. What this
path does not do (``OffloadConfig`` refuses the combinations with the reason): the predictor's prefetch, CPU
fallback, expert slices, the predictor and Belady policies, a disk store.

``OffloadConfig(driver='auto')``, the default, takes this path on a GPU with the triton experts where it measured
faster than the host path (``apply.resolve_driver``: experts up to 64 MiB whose decode step's top-k fit the slots
in one round, or that only this path packs; BENCHMARKS 3q); copy-bound steps keep the host path, whose copy engine
reads faster.

Shape legend: T = tokens, K = experts per token, N = T*K, E = experts, S = slots per layer,
J = 2*I, D = hidden, M = min(E, S) fills a round at most.
"""
from __future__ import annotations

import math
from contextlib import nullcontext as _nullcontext

import torch
import triton
import triton.language as tl
from torch import nn

from kernels import get_backend
from kernels.grouped_gemm import _interpreted
from kernels.launch import Launcher
from kernels.unpack import BLOCK as UNPACK_BLOCK
from kernels.unpack import ESC_TILE, decode_block
from kernels.unpack import layout as unpack_layout

from .cache import prefetch_phrase
from .policies import resolve_lfu_half_life
from .prefetch import guess_count, release_router, router_guess

POLICIES = ("lru", "lfu")
FILL_BLOCK = 8192  # elements a fill program moves per turn (s25-a: 8192 reached the link's 50.8 GB/s from 16 programs)
FILL_PROGRAMS = 256  # programs of a fill launch, shared by its experts (s25-a: 32-264 all read 50.7-51.0 GB/s)
# a prefetch's fill runs beside the compute, on about one program an SM: 48 in all, shared by the fill list's
# 16 entries of which 1-4 were used, left ~12 programs decoding and made the step 1.9-3.5x slower (s25-e)
PREFETCH_PROGRAMS = 132


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


@triton.jit
def _plan_kernel(ids_ptr, slot_of_ptr, expert_in_ptr, last_use_ptr, freq_ptr, decay_ptr, clock_ptr, counters_ptr,
                 fresh_ptr, slot_out_ptr, fill_e_ptr, fill_s_ptr, N, E, S, M, rnd,
                 FIRST: tl.constexpr, PREFETCH: tl.constexpr, LFU: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr,
                 BS: tl.constexpr):
    """DeviceExpertCache.plan_torch in one program (one layer, one round): the same decisions, one launch
    instead of ~70 small ones. Membership and gathers over the [E] and [S] tables are [BE, BN], [BS, BE]
    and [BS, BS] comparison tiles (no gather from registers in Triton)."""
    e_ar = tl.arange(0, BE)
    s_ar = tl.arange(0, BS)
    e_ok = e_ar < E
    s_ok = s_ar < S
    routed_i = tl.zeros([BE], dtype=tl.int32)
    for n0 in range(0, N, BN):
        n_ar = n0 + tl.arange(0, BN)
        ids = tl.load(ids_ptr + n_ar, mask=n_ar < N, other=-1).to(tl.int32)
        routed_i = tl.maximum(routed_i, tl.max((ids[None, :] == e_ar[:, None]).to(tl.int32), axis=1))
    routed = routed_i > 0
    slot_of = tl.load(slot_of_ptr + e_ar, mask=e_ok, other=-1).to(tl.int32)
    resident = slot_of >= 0
    miss = routed & (slot_of < 0)
    clock = tl.load(clock_ptr)
    if FIRST:
        clock += 1
        tl.store(clock_ptr, clock)
        tl.store(counters_ptr, tl.load(counters_ptr) + tl.sum((routed & resident).to(tl.int64), 0))
        tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + tl.sum(miss.to(tl.int64), 0))
    held = tl.load(expert_in_ptr + s_ar, mask=s_ok, other=-1).to(tl.int32)
    match_se = held[:, None] == e_ar[None, :]  # [BS, BE]
    busy = tl.max((match_se & routed[None, :]).to(tl.int32), axis=1) > 0
    cand = s_ok & ~busy
    fresh = tl.load(fresh_ptr + s_ar, mask=s_ok, other=0)
    if not PREFETCH:  # the prefetched experts this step uses
        tl.store(counters_ptr + 4, tl.load(counters_ptr + 4) + tl.sum(((fresh != 0) & busy).to(tl.int64), 0))
        fresh = tl.where(busy, 0, fresh)
    rec = tl.load(last_use_ptr + s_ar, mask=s_ok, other=0)
    key = tl.where(held < 0, -1, rec)  # empty slots first (every stamp is > 0)
    # t goes before s: a smaller key, or the same key and a lower slot (the torch plan's stable sorts)
    before = (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (s_ar[None, :] < s_ar[:, None]))
    if LFU:
        f = tl.load(freq_ptr + e_ar, mask=e_ok, other=0.0)
        if FIRST:
            f = f * tl.load(decay_ptr) + routed.to(tl.float64)
            tl.store(freq_ptr + e_ar, f, mask=e_ok)
        fs = tl.sum(tl.where(match_se, f[None, :], 0.0), axis=1)
        fs = tl.where(held < 0, -float("inf"), fs)
        before = (fs[None, :] < fs[:, None]) | ((fs[None, :] == fs[:, None]) & before)
    rank_s = tl.sum((before & cand[None, :]).to(tl.int32), axis=1)  # [BS]: place among the candidates
    free = tl.sum(cand.to(tl.int32), 0)
    mrank = tl.cumsum(miss.to(tl.int32), 0) - 1  # [BE]: place among the misses
    admit = miss & (mrank < free)
    tmatch = (rank_s[None, :] == mrank[:, None]) & cand[None, :] & admit[:, None]  # [BE, BS]
    target = tl.sum(tl.where(tmatch, s_ar[None, :], 0), axis=1)  # [BE]
    targeted = tl.max(tmatch.to(tl.int32), axis=0) > 0  # [BS]
    entering = tl.sum(tl.where(tmatch, e_ar[:, None], 0), axis=0)  # [BS]
    evicted = tl.max((match_se & targeted[:, None]).to(tl.int32), axis=0) > 0  # [BE]
    slot_new = tl.where(admit, target, tl.where(evicted, -1, slot_of))
    held_new = tl.where(targeted, entering, held)
    if PREFETCH:
        tl.store(fresh_ptr + s_ar, tl.where(targeted, 1, fresh), mask=s_ok)
    else:
        tl.store(fresh_ptr + s_ar, tl.where(targeted, 0, fresh), mask=s_ok)
    tl.store(counters_ptr + 5, tl.load(counters_ptr + 5) + tl.sum((targeted & (held >= 0)).to(tl.int64), 0))
    tl.store(slot_of_ptr + e_ar, slot_new.to(tl.int64), mask=e_ok)
    tl.store(expert_in_ptr + s_ar, held_new.to(tl.int64), mask=s_ok)
    if PREFETCH:
        stamp = (clock * (E + 1) + E) * (2 * E + 2) + tl.where(miss, E, 0) + e_ar
    else:
        stamp = (clock * (E + 1) + rnd) * (2 * E + 2) + tl.where(miss, E, 0) + e_ar
    use = (held_new[:, None] == e_ar[None, :]) & routed[None, :]  # [BS, BE]
    used = tl.max(use.to(tl.int32), axis=1) > 0
    tl.store(last_use_ptr + s_ar, tl.where(used, tl.sum(tl.where(use, stamp[None, :], 0), axis=1), rec), mask=s_ok)
    fmatch = (mrank[None, :] == s_ar[:, None]) & admit[None, :]  # [BS (fill place), BE]
    has = tl.max(fmatch.to(tl.int32), axis=1) > 0
    fe = tl.where(has, tl.sum(tl.where(fmatch, e_ar[None, :], 0), axis=1), -1)
    fsl = tl.where(has, tl.sum(tl.where(fmatch, target[None, :], 0), axis=1), -1)
    tl.store(fill_e_ptr + s_ar, fe.to(tl.int64), mask=s_ar < M)
    tl.store(fill_s_ptr + s_ar, fsl.to(tl.int64), mask=s_ar < M)
    tl.store(counters_ptr + 2, tl.load(counters_ptr + 2) + tl.sum(admit.to(tl.int64), 0))
    if PREFETCH:
        tl.store(counters_ptr + 3, tl.load(counters_ptr + 3) + tl.sum(admit.to(tl.int64), 0))
    for n0 in range(0, N, BN):
        n_ar = n0 + tl.arange(0, BN)
        ids = tl.load(ids_ptr + n_ar, mask=n_ar < N, other=-1).to(tl.int32)
        sm = ids[None, :] == e_ar[:, None]  # [BE, BN]
        found = tl.max(sm.to(tl.int32), axis=0) > 0
        sl = tl.sum(tl.where(sm, slot_new[:, None], 0), axis=0)
        tl.store(slot_out_ptr + n_ar, tl.where(found, sl, -1).to(tl.int64), mask=n_ar < N)


_plan = Launcher(_plan_kernel)  # launched without per-call binding (kernels/launch.py)


def plan_kernel_fits(num_experts: int, slots: int) -> bool:
    """Whether the one-program plan kernel takes these tables (its comparison tiles stay <= 64k entries)."""
    be, bs = triton.next_power_of_2(num_experts), triton.next_power_of_2(slots)
    return be * bs <= 65536 and bs * bs <= 65536 and be <= 1024


_fill = Launcher(_fill_kernel)


@triton.jit
def _fill_packed_kernel(anchor_ptr, offs_ptr, size_ptr, dst13_ptr, dst2_ptr, fill_e_ptr, fill_s_ptr, bytes_ptr,
                        N1, N, OFF_LOW, OFF_META, OFF_ESC, BLOCK: tl.constexpr, ESC: tl.constexpr):
    """Program (b, j): blocks b, b + G, ... (G = num_programs(0)) of expert fill_e[j]'s packed buffer
    (kernels/unpack.py's layout, at anchor + offs[e] in pinned host memory, read over PCIe) decoded into slot
    fill_s[j]: 1.5 bytes a weight cross the link instead of 2. dst13 / dst2: the slot pools as int16."""
    b0 = tl.program_id(0)
    j = tl.program_id(1)
    e = tl.load(fill_e_ptr + j)
    if e >= 0:
        s = tl.load(fill_s_ptr + j).to(tl.int64)
        p = anchor_ptr + tl.load(offs_ptr + e)
        if b0 == 0:
            tl.atomic_add(bytes_ptr, tl.load(size_ptr + e))
        meta = (p + OFF_META).to(tl.pointer_type(tl.int32))
        esc = (p + OFF_ESC).to(tl.pointer_type(tl.int32))
        for blk in range(b0, tl.cdiv(N, BLOCK), tl.num_programs(0)):
            decode_block(p, p + OFF_LOW, meta, esc, dst13_ptr + s * N1, dst2_ptr + s * (N - N1), blk, N1, N, BLOCK,
                         ESC)


_fill_packed = Launcher(_fill_packed_kernel)


class PackedSource:
    """A layer-indexed view of a PackedHostExpertStore for the packed fill: one anchor tensor and, per
    (layer, expert), the byte offset of its packed buffer from the anchor (int64 on the device) and its
    size. Every buffer sits in pinned host memory, which the GPU addresses where the host does (unified
    addressing), so an offset reaches across the arena's chunks."""

    def __init__(self, store, device: torch.device):
        self.anchor = store.layers[0][0][0]
        a = self.anchor.data_ptr()
        self.offsets = torch.tensor([[buf.data_ptr() - a for buf, _, _ in layer] for layer in store.layers],
                                    dtype=torch.int64, device=device)
        self.sizes = torch.tensor([[buf.numel() for buf, _, _ in layer] for layer in store.layers],
                                  dtype=torch.int64, device=device)
        n1, n2 = math.prod(store.w13_shape), math.prod(store.w2_shape)
        self.n1, self.n = n1, n1 + n2
        self.off_low, self.off_meta, self.off_esc, _ = unpack_layout(self.n, 0)


def fill_slots_packed(src: PackedSource, layer: int, dst13: torch.Tensor, dst2: torch.Tensor, fill_e: torch.Tensor,
                      fill_s: torch.Tensor, bytes_out: torch.Tensor, programs: int | None = None) -> None:
    """The packed experts fill_e[j] (-1: none) of ``layer`` decoded into slots fill_s[j] of the bfloat16 pools, in
    one launch with no host sync; bytes_out (int64 [1]) grows by the packed bytes read. programs: at most this
    many programs in all (None: one per block of every expert: the most in flight)."""
    M = fill_e.shape[0]
    blocks = triton.cdiv(src.n, UNPACK_BLOCK)
    if programs is not None:
        blocks = max(1, min(blocks, programs // max(M, 1)))
    _fill_packed[(blocks, M)](
        src.anchor, src.offsets[layer], src.sizes[layer], dst13.view(torch.int16), dst2.view(torch.int16), fill_e,
        fill_s, bytes_out, src.n1, src.n, src.off_low, src.off_meta, src.off_esc, BLOCK=UNPACK_BLOCK, ESC=ESC_TILE,
        num_warps=8)


def fill_slots(src13: torch.Tensor, src2: torch.Tensor, dst13: torch.Tensor, dst2: torch.Tensor,
               fill_e: torch.Tensor, fill_s: torch.Tensor, use_kernel: bool | None = None,
               programs: int = 0) -> None:
    """dst13[fill_s[j]] = src13[fill_e[j]] (and w2) for every j with fill_e[j] >= 0; no host sync with
    the kernel. src: [E, ...] (host), dst: [S, ...] (device), both contiguous; fill_e, fill_s: int64 [M]
    on dst's device. use_kernel None: the kernel on a GPU and under the Triton interpreter. programs: at most
    this many programs in all (0: FILL_PROGRAMS)."""
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
    chunks = max(1, min((programs or FILL_PROGRAMS) // max(M, 1), triton.cdiv(max(n13, n2), FILL_BLOCK)))
    _fill[(M, chunks)](src13, src2, dst13, dst2, fill_e, fill_s, n13, n2, BLOCK=FILL_BLOCK, num_warps=8)


class DeviceExpertCache:
    """S slots per MoE layer on the device, with the tables and the policy's state there too.

    slot_of [L, E+1] (the slot of each resident expert, -1 elsewhere; entry E is always -1, so an id of
    -1 maps to -1), expert_in [L, S+1] (entry S: where writes for nobody go), last_use [L, S+1] (a recency
    stamp of each slot's last use: the layer's step, then the round, hits before misses, then the id, as the
    host cache's ticks order them), freq [L, E] (LFU: decayed uses), clock [L] (the layer's steps), fresh
    [L, S+1] (1: a prefetched expert not used since) and counters [L, 6] (hits, misses, fills, prefetched
    fills, prefetches used, evictions) live on the device; stats() reads them back. A CUDA-graph capture runs
    its step once eagerly first (DecodeGraphs' warm-up), so each captured bucket counts one step twice."""

    def __init__(self, store, slots_per_layer: int, policy: str = "lru", device: str | torch.device = "cpu",
                 lfu_half_life: float | None = None):
        if policy not in POLICIES:
            raise ValueError(f"driver='device' decides with policy 'lru' or 'lfu', got {policy!r}: the "
                             f"{policy} policy decides on the host (use driver='host')")
        if slots_per_layer < 1:
            raise ValueError(f"slots_per_layer must be >= 1, got {slots_per_layer}")
        from .store import HostExpertStore, PackedHostExpertStore
        if not isinstance(store, (HostExpertStore, PackedHostExpertStore)) or getattr(store, "slices", 1) != 1:
            raise ValueError("driver='device' reads whole experts from host memory (HostExpertStore with "
                             f"expert_slices=1, or PackedHostExpertStore), got {type(store).__name__}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not store.pinned:
            raise ValueError("driver='device' reads the experts from host memory on the GPU itself, so the store "
                             "must be pinned: build it with pin=True")
        packed = isinstance(store, PackedHostExpertStore)
        self.packed = PackedSource(store, self.device) if packed else None
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
        # hits, misses, fills, prefetched fills, prefetches used, evictions
        self.counters = torch.zeros((L, 6), dtype=torch.int64, device=dev)
        self.fresh = torch.zeros((L, S + 1), dtype=torch.int64, device=dev)  # 1: prefetched, not used since
        self._arange_E = torch.arange(E, dtype=torch.int64, device=dev)
        self._inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
        self.expert_bytes = store.expert_bytes
        self._decay_t = torch.tensor([self.decay], dtype=torch.float64, device=dev)
        # the plan kernel on a GPU (one launch a layer instead of ~70: 6.7 ms a 48-layer step, s25-b) and under the
        # interpreter (the CPU tests); plan_torch elsewhere, and for tables too large for its tiles
        self._kernel = (dev.type == "cuda" or _interpreted()) and plan_kernel_fits(E, S)
        self._fill_kernel = dev.type == "cuda" or _interpreted()
        self._packed_bytes = torch.zeros(1, dtype=torch.int64, device=dev)  # what packed fills read
        self._side, self._events, self._joins = None, {}, {}  # prefetch: its stream, an event per layer, the waits

    # --- the plan of one round at one layer ---------------------------------------------------
    def plan(self, layer: int, ids_N: torch.Tensor, rnd: int,
             prefetch: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """plan_torch's decisions in one launch of the plan kernel (on a GPU, and under the Triton interpreter),
        where its tables fit it (plan_kernel_fits); else plan_torch."""
        if not self._kernel:
            return self.plan_torch(layer, ids_N, rnd, prefetch)
        N, E, S = ids_N.shape[0], self.num_experts, self.slots
        M = self.fill_len(N)
        dev = ids_N.device
        slot_N = torch.empty(N, dtype=torch.int64, device=dev)
        fill_e = torch.empty(M, dtype=torch.int64, device=dev)
        fill_s = torch.empty(M, dtype=torch.int64, device=dev)
        _plan[(1,)](ids_N, self.slot_of[layer], self.expert_in[layer], self.last_use[layer], self.freq[layer],
                    self._decay_t, self.clock[layer:layer + 1], self.counters[layer], self.fresh[layer], slot_N,
                    fill_e, fill_s, N, E, S, M, rnd, FIRST=rnd == 0 and not prefetch, PREFETCH=prefetch,
                    LFU=self.policy == "lfu",
                    BN=min(64, triton.next_power_of_2(max(N, 1))), BE=triton.next_power_of_2(E),
                    BS=triton.next_power_of_2(S), num_warps=4,
                    enable_fp_fusion=False)  # LFU's f * decay + use rounded twice, as plan_torch and the host cache
        return slot_N, fill_e, fill_s

    def plan_torch(self, layer: int, ids_N: torch.Tensor, rnd: int,
                   prefetch: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Slots for the experts ids_N [N] (int64, -1 = none) at ``layer``: returns (slot ids [N], -1 where
        the expert found no slot this round; fill_e [M], fill_s [M]: the experts to read into which slots,
        -1 = none; fill_len(N) long, the admitted ones first). rnd: the round of the step at this layer; round 0 counts hits and misses, ticks the clock
        and counts LFU uses, later rounds plan what the earlier ones left. All on the device, no host sync.

        prefetch: ids_N are guesses of the layer's next experts (the previous layer's, ``set_next_router``):
        nothing is counted as a use, the clock stands, the admitted ones are marked fresh; a demand plan
        counts the fresh slots it hits as useful prefetches and clears them."""
        E, S, M = self.num_experts, self.slots, self.fill_len(ids_N.shape[0])
        slot_of, expert_in = self.slot_of[layer], self.expert_in[layer]
        valid = ids_N >= 0
        idx = torch.where(valid, ids_N, E)
        routed = torch.zeros(E + 1, dtype=torch.bool, device=ids_N.device).index_fill_(0, idx, True)[:E]
        resident = slot_of[:E] >= 0
        miss = routed & ~resident
        if rnd == 0 and not prefetch:
            self.clock[layer] += 1
            self.counters[layer, 0] += (routed & resident).sum()
            self.counters[layer, 1] += miss.sum()
            if self.policy == "lfu":
                f = self.freq[layer]
                f.mul_(self.decay).add_(routed.to(f.dtype))
        held = expert_in[:S]
        busy = (held >= 0) & routed[held.clamp(min=0)]  # slots this round computes from: not victims
        fresh = self.fresh[layer]
        if not prefetch:  # the prefetched experts this step uses
            self.counters[layer, 4] += (fresh[:S].bool() & busy).sum()
            fresh[:S].masked_fill_(busy, 0)
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
        stamp_E = (self.clock[layer] * (E + 1) + (E if prefetch else rnd)) * (2 * E + 2) + torch.where(miss, E, 0) \
            + self._arange_E  # (a prefetch: after this step's rounds, before the next step's)
        used = torch.where(slot_N >= 0, slot_N, S)
        self.last_use[layer].scatter_(0, used, stamp_E[idx.clamp(max=E - 1)])  # (entry S: nobody's)
        # the fill list: admitted misses in rank order (at most min(free, distinct ids) <= fill_len)
        pos = torch.where(admit, rank, M)
        fill_e = torch.full((M + 1,), -1, dtype=torch.int64, device=ids_N.device)
        fill_s = torch.full((M + 1,), -1, dtype=torch.int64, device=ids_N.device)
        fill_e.scatter_(0, pos, torch.where(admit, self._arange_E, -1))
        fill_s.scatter_(0, pos, torch.where(admit, target, -1))
        fill_e[M:].fill_(-1)
        fresh.scatter_(0, torch.where(admit, target, S), torch.full_like(target, int(prefetch)))
        self.counters[layer, 2] += admit.sum()
        self.counters[layer, 5] += (admit & (old >= 0)).sum()
        if prefetch:
            self.counters[layer, 3] += admit.sum()
        return slot_N, fill_e[:M], fill_s[:M]

    def fill_len(self, n_ids: int) -> int:
        """Entries of a plan's fill list for n_ids ids: as many experts as can be admitted at most (min(E, S),
        and no more than the ids), so that a fill's programs go to entries that can be used (s25-e: programs
        spread over mostly empty entries made a prefetch 2-3.5x slower)."""
        return min(self.M, n_ids)

    def side_stream(self):
        """The stream prefetches run on (one per cache, made on first use); None off a GPU (inline there)."""
        if self.device.type != "cuda":
            return None
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def prefetched(self, layer: int, stream, keep: tuple) -> None:
        """A prefetch into ``layer`` was queued on ``stream``: ``layer``'s next forward waits for it (join);
        ``keep`` holds the tensors it reads and writes until then (the caching allocator must not hand them out
        while the side stream still works on them)."""
        ev = self._events.get(layer)
        if ev is None:
            ev = self._events[layer] = torch.cuda.Event()
        ev.record(stream)
        self._joins[layer] = (ev, keep)

    def join(self, layer: int) -> None:
        """The current stream waits for a prefetch queued into ``layer``, if any."""
        pending = self._joins.pop(layer, None)
        if pending is not None:
            torch.cuda.current_stream(self.device).wait_event(pending[0])

    def rounds(self, tokens: int, top_k: int) -> int:
        """Rounds a step of ``tokens`` tokens needs at most: its distinct experts over the slots."""
        return -(-min(tokens * top_k, self.num_experts) // self.slots)

    def fill(self, layer: int, fill_e: torch.Tensor, fill_s: torch.Tensor, programs: int | None = None) -> None:
        """The planned experts into their slots: read from host memory by a kernel (decoded on the way when the
        store is packed), or on a CPU "device" by plain copies. programs: at most this many (a prefetch beside
        the compute: PREFETCH_PROGRAMS); None: as many as help."""
        dst13, dst2 = self.pool_w13[layer], self.pool_w2[layer]
        if not fill_e.shape[0]:
            return  # (a plan of no ids)
        if self.packed is None:
            w13, w2 = self.store.layers[layer]
            fill_slots(w13, w2, dst13, dst2, fill_e, fill_s, use_kernel=self._fill_kernel, programs=programs or 0)
        elif self._fill_kernel:
            fill_slots_packed(self.packed, layer, dst13, dst2, fill_e, fill_s, self._packed_bytes, programs)
        else:
            from kernels.unpack import unpack_bf16_reference
            for e, s in zip(fill_e.tolist(), fill_s.tolist()):
                if e >= 0:
                    buf, base, n_esc = self.store.packed(layer, e)
                    unpack_bf16_reference(buf, base, n_esc, dst13[s], dst2[s])
                    self._packed_bytes += buf.numel()

    def pool(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool_w13[layer], self.pool_w2[layer]

    # --- what users read ------------------------------------------------------------------------
    def resident(self, layer: int) -> list[int]:
        return [e for e in self.expert_in[layer, :self.slots].tolist() if e >= 0]

    def reset_stats(self) -> None:
        self.counters.zero_()
        self._packed_bytes.zero_()

    def stats(self) -> dict:
        hits, misses, fills, pre, useful, evictions = (int(v) for v in self.counters.sum(0).tolist())
        acc = hits + misses
        moved = int(self._packed_bytes) if self.packed is not None else fills * self.expert_bytes
        return dict(hits=hits, misses=misses, hit_ratio=hits / acc if acc else 0.0, copies=fills, bytes_copied=moved,
                    evictions=evictions, prefetches=pre, useful_prefetches=useful,
                    prefetch_precision=useful / pre if pre else 0.0,
                    prefetch_recall=useful / (useful + misses) if useful + misses else 0.0, cpu_computed=0)

    def describe(self) -> str:
        c = self.stats()
        acc = c["hits"] + c["misses"]
        return (f"offload (decided on the device): {self.slots} of {self.num_experts} experts per layer on "
                f"{self.device.type}, {self.policy}, read from pinned host memory by the GPU"
                f"{' packed to 12 bits a weight' if self.packed is not None else ''}; {acc} expert uses, "
                f"{100 * c['hit_ratio']:.1f}% hits, {c['copies']} fills ({c['bytes_copied'] / 1e6:.1f} MB)"
                + prefetch_phrase(c))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool_w13 + self.pool_w2)


class DeviceOffloadedExperts(nn.Module):
    """Drop-in for block.experts over a DeviceExpertCache: forward(x_TD, topk_ids_TK, topk_weights_TK) ->
    y_TD with no host sync (``capturable``: decode steps capture as one CUDA graph, moe/cuda_graph.py)."""

    capturable = True

    def __init__(self, layer: int, cache: DeviceExpertCache, top_k: int, backend: str = "torch",
                 next_router: nn.Module | None = None, prefetch_k: int = 0, guess_source: str = ""):
        super().__init__()
        self.layer, self.cache, self.top_k, self.backend = layer, cache, top_k, backend
        self.num_experts = cache.num_experts
        self._next_router = [next_router]  # a list: not registered as a child module (it belongs to layer l+1)
        self.guess_k = guess_count(prefetch_k, top_k, guess_source)  # (guess_source: OffloadConfig.prefetch)

    def set_next_router(self, router: nn.Module | None) -> None:
        """What guesses layer l+1's experts from this layer's input (forward(x_TD) -> (_, _, logits_TE): layer
        l+1's router, a probe, placement.trace_routing.TraceLookahead); its guesses are computed first in this
        layer's forward, then planned and read into layer l+1's slots on a side stream, beside this layer's compute
        and the next layer's attention. None: no prefetch."""
        release_router(self._next_router[0], router)
        self._next_router = [router]

    def _early_guess(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """The next router's guess of layer l+1's experts, computed on the compute stream at the top of forward(),
        before this layer joins the prefetch into its own slots: the compute stream works on it while that prefetch
        still fills, and the side stream's prefetch of the guess starts as soon as this layer's demand fill is
        done. Computed after the demand fill instead (on the side stream, or on the compute stream), the guess held
        that prefetch back by its time every layer. OLMoE widths x 48 layers at 25% (B = 1, LFU, one H200,
        BENCHMARKS 7n): point C's guess 52.8 ms a step after the fill, 48.9 first (s29-h / s29-i); recorded guesses
        50.2 on the side stream, 48.5 first (s30-b). It also keeps every guess on the compute stream, in order,
        which prefetch='attention' needs (offload.prefetch.AttentionRouter writes the next layer's KV-cache
        slots). None: no next router, or the last layer."""
        router = self._next_router[0]
        if router is None or self.layer + 1 >= self.cache.num_layers:
            return None
        with torch.no_grad():
            return router_guess(router, x_TD, self.guess_k).reshape(-1).to(torch.int64)

    def _prefetch_next(self, x_TD: torch.Tensor, guess: torch.Tensor | None) -> None:
        """Plan and fill ``guess`` (_early_guess's: layer l+1's experts) into layer l+1's slots on the side stream,
        after this layer's demand fill (the link is busy until then), beside its compute."""
        cache, nxt = self.cache, self.layer + 1
        if guess is None:
            return
        with torch.no_grad():
            side = cache.side_stream()
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(x_TD.device))
            with torch.cuda.stream(side) if side is not None else _nullcontext():
                slot_N, fill_e, fill_s = cache.plan(nxt, guess, 0, prefetch=True)
                cache.fill(nxt, fill_e, fill_s, programs=PREFETCH_PROGRAMS)
                if side is not None:
                    cache.prefetched(nxt, side, (x_TD, guess, slot_N, fill_e, fill_s))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, slots={self.cache.slots}, experts={self.num_experts}, driver=device"

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        cache, layer = self.cache, self.layer
        guess = self._early_guess(x_TD)
        cache.join(layer)  # a prefetch into this layer's slots (the previous layer's guesses) lands first
        T, K = topk_ids_TK.shape
        pending = topk_ids_TK.reshape(-1).to(torch.int64)
        kernel = get_backend(self.backend)
        pool13, pool2 = cache.pool(layer)
        y_TD = None
        for r in range(cache.rounds(T, K)):
            slot_N, fill_e, fill_s = cache.plan(layer, pending, r)
            cache.fill(layer, fill_e, fill_s)
            if r == 0:
                self._prefetch_next(x_TD, guess)
            part = kernel(x_TD, pool13, pool2, slot_N.view(T, K), topk_weights_TK)
            y_TD = part if y_TD is None else y_TD + part
            pending = torch.where(slot_N >= 0, -1, pending)  # what found no slot waits for the next round
        return y_TD
