"""Token alignment: (token, slot) pairs sorted by expert, each expert's run padded to the block size.

The grouped GEMMs process one block of BLOCK_M rows at a time, all rows of a block belonging to
one expert. This module builds that layout on the device with no host synchronisation (no
``.item()``, ``.tolist()``, no data-dependent shapes), so a decode step can be captured in a CUDA
graph: every output has a size that depends only on (pairs, experts, BLOCK_M).

Shape legend: T = tokens, K = experts per token, P = T*K pairs (pair p = token p // K, slot p % K),
E = experts, S = padded rows (an upper bound, ``max_padded_rows``), B = S / BLOCK_M blocks.

    sorted_pair_S     pair held by each padded row; ``P`` (a sentinel) marks padding
    block_expert_B    expert of each block; -1 for blocks past the last used one
    num_padded_1      rows actually used (a one-element device tensor)
    expert_start_E1   first padded row of each expert (E + 1 entries; the last = num_padded)

Ids of -1 (expert not on this rank) and ids outside [0, E) are dropped: they get no row, so they
contribute zero. Three implementations compute the same layout: a single-program Triton kernel for
decode-sized inputs (one launch instead of a dozen small torch ops), a two-launch parallel sort for
mid and large inputs, and plain torch ops (``align_reference``, which the tests hold the
other two to) for the largest.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import Launcher
from .launch_config import cdiv, next_pow2

# The single-program kernel compares every pair with every expert on one SM: past this many
# (pairs x experts) it is slower than the parallel sort (measured on the H200, session 9, against the
# three-launch form of the parallel sort: 384 pairs x 64 experts 20.0 us in one program against 13.4 us
# parallel, 512 x 64 24.6 against 13.2; at 96 x 64 and 1024 x 8 the single program wins, 11.0 against
# 13.9, 10.5 / 11.9).
SINGLE_ALIGN_MAX_WORK = 8192
# Every program of the parallel sort sums the [chunks, experts] counts; past this many (chunks x
# experts), or MAX_CHUNKS chunks, torch's radix sort takes over.
PARALLEL_ALIGN_MAX_WORK = 131072


@dataclass(frozen=True)
class AlignedRouting:
    """The block layout shared by every grouped GEMM of one MoE call (forward and backward)."""
    sorted_pair_S: torch.Tensor      # int32
    block_expert_B: torch.Tensor     # int32
    num_padded_1: torch.Tensor       # int32 [1]
    expert_start_E1: torch.Tensor    # int32 [E + 1]
    num_pairs: int
    top_k: int
    block_m: int
    pair_blocks: bool = False        # one pair per block (one token): the raw ids are the block map

    @property
    def max_blocks(self) -> int:
        return self.block_expert_B.shape[0]

    @property
    def num_rows(self) -> int:
        return self.max_blocks * self.block_m


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on padded rows: every used expert wastes at most block_m - 1 rows."""
    blocks = cdiv(num_pairs, block_m) + min(num_experts, num_pairs)
    return max(blocks, 1) * block_m


def align_reference(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Sort-based alignment with plain torch ops (no host sync); the reference and the large-P path."""
    T, K = topk_ids_TK.shape
    P, E, dev = T * K, num_experts, topk_ids_TK.device
    S = max_padded_rows(P, E, block_m)
    flat = topk_ids_TK.reshape(-1).long()
    key = torch.where((flat < 0) | (flat >= E), torch.full_like(flat, E), flat)  # dropped -> bucket E
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    sorted_key, order = torch.sort(key, stable=True)
    padded = (counts[:E] + block_m - 1) // block_m * block_m
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    raw_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(P, device=dev) - raw_start[sorted_key]
    real = sorted_key < E
    dest = torch.where(real, pad_start[sorted_key.clamp(max=E - 1)] + rank, torch.full_like(rank, S))
    sorted_pair = torch.full((S + 1,), P, dtype=torch.long, device=dev)
    sorted_pair.scatter_(0, dest, order)
    first_row = torch.arange(S // block_m, device=dev) * block_m
    block_expert = torch.searchsorted(pad_end, first_row, right=True)
    block_expert = torch.where(block_expert < E, block_expert, torch.full_like(block_expert, -1))
    expert_start = torch.cat([pad_start, pad_end[-1:]])
    return AlignedRouting(sorted_pair[:S].int(), block_expert.int(), pad_end[-1:].int(), expert_start.int(),
                          P, K, block_m)


@triton.jit
def _padded_runs(counts, experts, expert_start_ptr, num_padded_ptr, E, store, BLOCK_M: tl.constexpr):
    """Each expert's run padded to BLOCK_M rows: (first row, end row) per expert and the rows used,
    also stored as expert_start (E + 1 entries) and num_padded where ``store`` (one program of many
    that compute the same runs)."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    total = tl.sum(padded, axis=0)
    if store:
        tl.store(expert_start_ptr + experts, pad_start, mask=experts < E)
        tl.store(expert_start_ptr + E, total)
        tl.store(num_padded_ptr, total)
    return pad_start, pad_end, total


@triton.jit(do_not_specialize=["P", "S", "NUM_BLOCKS"])
def _align_kernel(ids_ptr, sorted_pair_ptr, block_expert_ptr, num_padded_ptr, expert_start_ptr,
                  P, E, S, NUM_BLOCKS,
                  BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr):
    """One program: counts, padded offsets, ranks within each expert, block -> expert map."""
    experts = tl.arange(0, E_P2)
    offs = tl.arange(0, CHUNK)
    # pass 0: every padded row starts as padding (sentinel P)
    for s0 in range(0, S, CHUNK):
        tl.store(sorted_pair_ptr + s0 + offs, tl.zeros([CHUNK], dtype=tl.int32) + P, mask=s0 + offs < S)
    # pass 1: tokens per expert, by a one-hot [CHUNK, E_P2] compare (E is small: <= a few hundred)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for p0 in range(0, P, CHUNK):
        ids = tl.load(ids_ptr + p0 + offs, mask=p0 + offs < P, other=-1).to(tl.int32)
        hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < E)
        counts += tl.sum(hit.to(tl.int32), axis=0)
    pad_start, pad_end, total = _padded_runs(counts, experts, expert_start_ptr, num_padded_ptr, E, True, BLOCK_M)
    # the sentinel stores above and the pair stores below hit the same addresses from other threads
    tl.debug_barrier()
    # pass 2: rank of each pair within its expert = earlier pairs of that expert (stable order)
    seen = tl.zeros([E_P2], dtype=tl.int32)
    for p0 in range(0, P, CHUNK):
        ids = tl.load(ids_ptr + p0 + offs, mask=p0 + offs < P, other=-1).to(tl.int32)
        hit = ((ids[:, None] == experts[None, :]) & (experts[None, :] < E)).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit + seen[None, :]
        dest = tl.sum(hit * (before + pad_start[None, :]), axis=1)
        real = tl.sum(hit, axis=1) > 0
        tl.store(sorted_pair_ptr + dest, p0 + offs, mask=real)
        seen += tl.sum(hit, axis=0)
    # block -> expert: the number of experts whose padded run ends at or before the block's first row
    for b0 in range(0, NUM_BLOCKS, CHUNK):
        row = (b0 + offs) * BLOCK_M
        after = (pad_end[None, :] <= row[:, None]) & (experts[None, :] < E)
        e = tl.sum(after.to(tl.int32), axis=1)
        e = tl.where(row < total, e, -1)
        tl.store(block_expert_ptr + b0 + offs, e, mask=b0 + offs < NUM_BLOCKS)


_align = Launcher(_align_kernel)  # launched without per-call binding (kernels/launch.py)


def _prepare(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int):
    """(ids flat and contiguous, pairs, top-k, padded-row bound, the layout's four output buffers) for the
    Triton alignments."""
    T, K = topk_ids_TK.shape
    P, dev = T * K, topk_ids_TK.device
    S = max_padded_rows(P, num_experts, block_m)
    ids = topk_ids_TK.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    buffers = (torch.empty(S, dtype=torch.int32, device=dev), torch.empty(S // block_m, dtype=torch.int32, device=dev),
               torch.empty(1, dtype=torch.int32, device=dev), torch.empty(num_experts + 1, dtype=torch.int32, device=dev))
    return ids, P, K, S, buffers


def align_triton(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """The same layout as ``align_reference`` from one single-program Triton launch."""
    ids, P, K, S, (sorted_pair, block_expert, num_padded, expert_start) = _prepare(topk_ids_TK, num_experts, block_m)
    E = num_experts
    e_p2 = next_pow2(max(E, 2))
    chunk = max(16, min(next_pow2(max(P, 1)), 8192 // e_p2 if e_p2 <= 512 else 16))
    _align[(1,)](ids, sorted_pair, block_expert, num_padded, expert_start, P, E, S, S // block_m,
                 BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk, num_warps=4 if e_p2 * chunk <= 4096 else 8)
    return AlignedRouting(sorted_pair, block_expert, num_padded, expert_start, P, K, block_m)


@triton.jit(do_not_specialize=["P", "S", "FILL"])
def _count_kernel(ids_ptr, counts_ptr, sorted_pair_ptr, P, E, S, FILL,
                  E_P2: tl.constexpr, CHUNK: tl.constexpr, FILL_BLOCK: tl.constexpr):
    """Program g: tokens per expert within pairs [g*CHUNK, (g+1)*CHUNK), one histogram; also marks its
    stripe of rows as padding."""
    g = tl.program_id(0)
    offs = g * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
    real = (ids >= 0) & (ids < E)
    tl.store(counts_ptr + g * E_P2 + tl.arange(0, E_P2), tl.histogram(tl.where(real, ids, 0), E_P2, mask=real))
    fill = tl.arange(0, FILL_BLOCK)
    for f0 in range(0, FILL, FILL_BLOCK):
        rows = g * FILL + f0 + fill
        tl.store(sorted_pair_ptr + rows, tl.zeros([FILL_BLOCK], dtype=tl.int32) + P, mask=(f0 + fill < FILL) & (rows < S))


_count = Launcher(_count_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit(do_not_specialize=["P", "G", "NUM_BLOCKS", "BPG"])
def _scatter_kernel(ids_ptr, counts_ptr, sorted_pair_ptr, expert_start_ptr, num_padded_ptr, block_expert_ptr,
                    P, E, G, NUM_BLOCKS, BPG, BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr,
                    GC: tl.constexpr, BSUB: tl.constexpr):
    """Program g: the experts' padded runs (all chunks' counts summed) and its chunk's first row per
    expert (the chunks before it summed), read from the [chunks, experts] counts; its pairs sorted by
    (expert, position) in registers, the k-th pair of expert e in the chunk to that first row of e + k
    (stable, like the reference); then the expert of blocks [g*BPG, (g+1)*BPG). Program 0 also stores
    expert_start and num_padded."""
    g = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    rows = tl.arange(0, GC)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    before = tl.zeros([E_P2], dtype=tl.int32)
    for g0 in range(0, G, GC):
        c = tl.load(counts_ptr + (g0 + rows)[:, None] * E_P2 + experts[None, :], mask=(g0 + rows)[:, None] < G, other=0)
        counts += tl.sum(c, axis=0)
        before += tl.sum(tl.where((g0 + rows)[:, None] < g, c, 0), axis=0)
    pad_start, pad_end, total = _padded_runs(counts, experts, expert_start_ptr, num_padded_ptr, E, g == 0, BLOCK_M)
    local = tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + g * CHUNK + local, mask=g * CHUNK + local < P, other=-1).to(tl.int32)
    real = (ids >= 0) & (ids < E)
    hist = tl.histogram(tl.where(real, ids, 0), E_P2, mask=real)
    # sorted position j holds the (j - lower[e])-th pair of its expert e, lower[e] = the chunk's pairs
    # of lower experts; dropped pairs sort last and are not stored
    key = tl.sort(tl.where(real, ids, E_P2) * CHUNK + local)
    e = key // CHUNK
    shift = pad_start + before - (tl.cumsum(hist, axis=0) - hist)
    dest = local + tl.gather(shift, tl.minimum(e, E_P2 - 1), 0)
    tl.store(sorted_pair_ptr + dest, g * CHUNK + key % CHUNK, mask=e < E_P2)
    # block -> expert: the number of experts whose padded run ends at or before the block's first row
    brows = tl.arange(0, BSUB)
    for b0 in range(0, BPG, BSUB):
        b = g * BPG + b0 + brows
        row = b * BLOCK_M
        after = (pad_end[None, :] <= row[:, None]) & (experts[None, :] < E)
        e_b = tl.sum(after.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(row < total, e_b, -1), mask=(b0 + brows < BPG) & (b < NUM_BLOCKS))


_scatter = Launcher(_scatter_kernel)  # launched without per-call binding (kernels/launch.py)


# the most pairs one program of the parallel sort holds (sorted in registers), and the most chunks
# (every scatter program reads all chunks' counts): past MAX_CHUNK x MAX_CHUNKS pairs, torch's sort
MAX_CHUNK, MAX_CHUNKS = 4096, 256
# the scatter programs read the [chunks, experts] counts at most COUNT_ROWS rows (and COUNT_CELLS
# values) a step (H200, run s11-e: 128 / 16384 against 64 / 8192: Qwen3-30B-A3B 4096 tokens 11.4 ->
# 10.6 us, 16384 19.5 -> 17.0, 32768 39.7 -> 30.5; equal elsewhere)
COUNT_ROWS, COUNT_CELLS = 128, 16384


def _parallel_tiles(num_pairs: int, programs: int | None = None) -> int:
    """Pairs per program of the parallel sort: about sqrt(pairs), more where that would make more
    than MAX_CHUNKS chunks (each program sums every chunk's counts), at most MAX_CHUNK.

    Session 9 (run k23, the one-hot counting sort before this one, programs per call swept 64-512):
    sqrt-sized chunks were the best or within 3 us of it from 512 to 65536 tokens on all four shapes.

    Session 32: "about sqrt(pairs)" is 2^ceil(log2(pairs) / 2), which changes only where the pairs pass a power of
    two (next_pow2(isqrt(pairs)) changed where they passed (2^j + 1)^2, e.g. Qwen3-30B-A3B at 529 tokens), so a
    serving replica's warm-up (steps of 2^k and 2^k + 1 tokens, moe.generate.warm_up_token_counts) meets every
    variant of these launches. It differs from before only for pairs in (4^j, (2^j + 1)^2); on the H200 (s33-a, the
    alignment alone, with _loop_tiles' first bounds) Mixtral's calls were within 4% of before either way.
    """
    p = max(num_pairs, 1)
    root = 1 << (((p - 1).bit_length() + 1) // 2)
    chunk = next_pow2(cdiv(p, programs)) if programs else max(root, next_pow2(cdiv(p, MAX_CHUNKS)))
    return max(16, min(MAX_CHUNK, chunk))


@functools.lru_cache(maxsize=1024)
def _fewest_chunks(chunk: int, e_p2: int) -> int:
    """The fewest chunks (programs) of any pair count that align_tokens sorts in parallel with this chunk: the count
    at the smallest such pair count (both rules of _parallel_tiles grow with the pairs, so a binary search finds
    where this chunk starts; align_tokens sorts only past SINGLE_ALIGN_MAX_WORK pairs x experts in parallel)."""
    lo, hi = 1, MAX_CHUNK * MAX_CHUNKS * 4
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if _parallel_tiles(mid) < chunk else (lo, mid)
    return cdiv(max(lo, SINGLE_ALIGN_MAX_WORK // e_p2 + 1), chunk)


@functools.lru_cache(maxsize=1024)
def _loop_tiles(chunk: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(FILL_BLOCK, BSUB): the tiles of the padding fill and the block-map loops of align_parallel, from bounds on
    what one program walks over every pair count that has this chunk, so they change only with (chunk, experts,
    block rows). From the walks themselves they changed at token counts that no power of two marks (the padded
    rows' "+ E"), and a serving warm-up's steps (2^k and 2^k + 1 tokens) missed variants of these launches
    (session 32). With G >= g_min programs of at most ``chunk`` pairs each:
        fill = cdiv(S, G) <= chunk + block_m (E + 1) / g_min + 1      (S <= P + block_m - 1 + block_m E)
        bpg  = cdiv(S / block_m, G) <= chunk / block_m + (E + 1) / g_min + 1
    Session 32's first bounds took G >= 1: up to 8x wider tiles than the walks, 4-19% slower alignment on
    the fine-grained shapes (H200, s33-a). These take the fewest chunks a chunk size can have, which gives
    the tiles of the walks themselves at the token counts of BENCHMARKS 1 (the loops mask what passes their
    count, so any tile gives the same layout)."""
    e_p2 = next_pow2(max(num_experts, 2))
    g_min = _fewest_chunks(chunk, e_p2)
    fill = chunk + cdiv(block_m * (num_experts + 1), g_min) + 1
    bpg = cdiv(chunk, block_m) + cdiv(num_experts + 1, g_min) + 1
    return min(1024, next_pow2(fill)), max(1, min(next_pow2(bpg), 4096 // e_p2))


def align_parallel(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int,
                   programs: int | None = None) -> AlignedRouting:
    """The same layout as ``align_reference`` from two Triton launches: a parallel sort.

    Chunks of pairs are counted per expert in parallel (a histogram each); then each chunk's program
    sums the [chunks, experts] counts into the experts' padded runs and its own first row per expert,
    sorts its pairs by expert in registers, scatters them and fills its share of the block -> expert
    map; stable, like the reference. ``programs``: about how many chunks (default: _parallel_tiles).

    H200, session 11 (run s11-e): the three-launch form before it (a one-hot counting sort with a
    one-program scan between) took 36.4 us at Qwen3-30B-A3B 4096 tokens and 70.0 at 16384.
    """
    ids, P, K, S, (sorted_pair, block_expert, num_padded, expert_start) = _prepare(topk_ids_TK, num_experts, block_m)
    E, dev = num_experts, topk_ids_TK.device
    e_p2 = next_pow2(max(E, 2))
    chunk = _parallel_tiles(P, programs)
    G = cdiv(max(P, 1), chunk)
    num_blocks = S // block_m
    bpg = cdiv(num_blocks, G)
    counts = torch.empty(G, e_p2, dtype=torch.int32, device=dev)
    fill = cdiv(S, G)
    warps = 4 if chunk <= 512 else 8
    fill_block, bsub = _loop_tiles(chunk, E, block_m) if programs is None else (
        min(1024, next_pow2(fill)), max(1, min(next_pow2(bpg), 4096 // e_p2)))
    _count[(G,)](ids, counts, sorted_pair, P, E, S, fill, E_P2=e_p2, CHUNK=chunk, FILL_BLOCK=fill_block,
                 num_warps=warps)
    _scatter[(G,)](ids, counts, sorted_pair, expert_start, num_padded, block_expert, P, E, G, num_blocks, bpg,
                   BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk,
                   GC=max(1, min(COUNT_ROWS, next_pow2(G), COUNT_CELLS // e_p2)), BSUB=bsub, num_warps=warps)
    return AlignedRouting(sorted_pair, block_expert, num_padded, expert_start, P, K, block_m)


def align_pair_blocks(topk_ids_TK: torch.Tensor, block_m: int) -> AlignedRouting:
    """One token: block b = pair b, its expert = the raw id (the kernels skip ids outside [0, E)).

    Nothing is launched; a token's K experts are distinct, so this is the sorted layout already.
    """
    ids = topk_ids_TK.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    return AlignedRouting(ids, ids, ids, ids, ids.shape[0], topk_ids_TK.shape[1], block_m, pair_blocks=True)


def align_tokens(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int,
                 allow_pair_blocks: bool = True) -> AlignedRouting:
    """The block layout, by the fastest implementation for this many pairs and experts.

    One token: no launch at all (``align_pair_blocks``; forward only, the weight gradients need
    expert_start). Few pairs x experts: one single-program launch (decode: every launch counts); up
    to MAX_CHUNKS chunks and PARALLEL_ALIGN_MAX_WORK: the two-launch parallel sort; beyond: torch's sort.
    """
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    if allow_pair_blocks and topk_ids_TK.shape[0] == 1:
        return align_pair_blocks(topk_ids_TK, block_m)
    P, e_p2 = topk_ids_TK.numel(), next_pow2(max(num_experts, 2))
    if P * e_p2 <= SINGLE_ALIGN_MAX_WORK:
        return align_triton(topk_ids_TK, num_experts, block_m)
    G = cdiv(P, _parallel_tiles(P))
    if G <= MAX_CHUNKS and G * e_p2 <= PARALLEL_ALIGN_MAX_WORK:
        return align_parallel(topk_ids_TK, num_experts, block_m)
    return align_reference(topk_ids_TK, num_experts, block_m)
