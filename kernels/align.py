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
decode-sized inputs (one launch instead of a dozen small torch ops), a three-launch parallel counting
sort for mid and large inputs, and plain torch ops (``align_reference``, which the tests hold the
other two to) for the largest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch_config import cdiv, next_pow2

# The single-program kernel compares every pair with every expert on one SM: past this many
# (pairs x experts) it is slower than the three-launch parallel counting sort (measured on the
# H200, session 9: 384 pairs x 64 experts 20.0 us in one program against 13.4 us parallel, 512 x 64
# 24.6 against 13.2; at 96 x 64 and 1024 x 8 the single program wins, 11.0 against 13.9, 10.5 / 11.9).
SINGLE_ALIGN_MAX_WORK = 8192
# The parallel sort's middle step is one program over [chunks, experts]; past this much work
# (chunks x experts) torch's radix sort takes over. Chunks grow as sqrt(pairs), so only very many
# pairs or experts reach it (H200, session 9: 65536 tokens x top-8 of 128 experts, 512 chunks, 172 us
# parallel against 339 us in torch).
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
def _padded_runs(counts, experts, expert_start_ptr, num_padded_ptr, E, BLOCK_M: tl.constexpr):
    """Each expert's run padded to BLOCK_M rows: (first row, end row) per expert and the rows used,
    also stored as expert_start (E + 1 entries) and num_padded."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    total = tl.sum(padded, axis=0)
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
    pad_start, pad_end, total = _padded_runs(counts, experts, expert_start_ptr, num_padded_ptr, E, BLOCK_M)
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
    _align_kernel[(1,)](ids, sorted_pair, block_expert, num_padded, expert_start, P, E, S, S // block_m,
                        BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk, num_warps=4 if e_p2 * chunk <= 4096 else 8)
    return AlignedRouting(sorted_pair, block_expert, num_padded, expert_start, P, K, block_m)


@triton.jit(do_not_specialize=["P", "S", "FILL"])
def _count_kernel(ids_ptr, counts_ptr, sorted_pair_ptr, P, E, S, FILL,
                  E_P2: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, FILL_BLOCK: tl.constexpr):
    """Program g: tokens per expert within pairs [g*CHUNK, (g+1)*CHUNK), SUB at a time; also marks its
    stripe of rows as padding."""
    g = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    sub = tl.arange(0, SUB)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for s0 in range(0, CHUNK, SUB):
        offs = g * CHUNK + s0 + sub
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
        hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < E)
        counts += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(counts_ptr + g * E_P2 + experts, counts)
    fill = tl.arange(0, FILL_BLOCK)
    for f0 in range(0, FILL, FILL_BLOCK):
        rows = g * FILL + f0 + fill
        tl.store(sorted_pair_ptr + rows, tl.zeros([FILL_BLOCK], dtype=tl.int32) + P, mask=(f0 + fill < FILL) & (rows < S))


@triton.jit(do_not_specialize=["G"])
def _offsets_kernel(counts_ptr, offsets_ptr, num_padded_ptr, expert_start_ptr, G, E,
                    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, GC: tl.constexpr):
    """One program: padded runs per expert and each chunk's first row per expert (a scan down the chunks)."""
    experts = tl.arange(0, E_P2)
    rows = tl.arange(0, GC)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for g0 in range(0, G, GC):
        c = tl.load(counts_ptr + (g0 + rows)[:, None] * E_P2 + experts[None, :], mask=(g0 + rows)[:, None] < G, other=0)
        counts += tl.sum(c, axis=0)
    pad_start, pad_end, total = _padded_runs(counts, experts, expert_start_ptr, num_padded_ptr, E, BLOCK_M)
    running = pad_start
    for g0 in range(0, G, GC):
        m = (g0 + rows)[:, None] < G
        c = tl.load(counts_ptr + (g0 + rows)[:, None] * E_P2 + experts[None, :], mask=m, other=0)
        tl.store(offsets_ptr + (g0 + rows)[:, None] * E_P2 + experts[None, :],
                 tl.cumsum(c, axis=0) - c + running[None, :], mask=m)
        running += tl.sum(c, axis=0)


@triton.jit(do_not_specialize=["P", "NUM_BLOCKS", "BPG"])
def _scatter_kernel(ids_ptr, offsets_ptr, sorted_pair_ptr, expert_start_ptr, block_expert_ptr, P, E, NUM_BLOCKS, BPG,
                    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
                    BSUB: tl.constexpr):
    """Program g: each of its pairs goes to its chunk's first row of its expert + its rank in the chunk;
    then the expert of blocks [g*BPG, (g+1)*BPG)."""
    g = tl.program_id(0)
    experts = tl.arange(0, E_P2)
    sub = tl.arange(0, SUB)
    base = tl.load(offsets_ptr + g * E_P2 + experts)
    for s0 in range(0, CHUNK, SUB):
        offs = g * CHUNK + s0 + sub
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
        hit = ((ids[:, None] == experts[None, :]) & (experts[None, :] < E)).to(tl.int32)
        dest = tl.sum(hit * (tl.cumsum(hit, axis=0) - hit + base[None, :]), axis=1)
        tl.store(sorted_pair_ptr + dest, offs, mask=tl.sum(hit, axis=1) > 0)
        base += tl.sum(hit, axis=0)
    # block -> expert: the number of experts whose padded run ends at or before the block's first row
    pad_end = tl.load(expert_start_ptr + 1 + experts, mask=experts < E, other=0)
    total = tl.load(expert_start_ptr + E)
    brows = tl.arange(0, BSUB)
    for b0 in range(0, BPG, BSUB):
        b = g * BPG + b0 + brows
        row = b * BLOCK_M
        after = (pad_end[None, :] <= row[:, None]) & (experts[None, :] < E)
        e = tl.sum(after.to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(row < total, e, -1), mask=(b0 + brows < BPG) & (b < NUM_BLOCKS))


def _parallel_tiles(num_pairs: int, e_p2: int, programs: int | None = None) -> tuple[int, int]:
    """(pairs per program, pairs per inner step); the step's [step, experts] one-hot fits registers.

    Each program walks its chunk in steps and the one-program scan walks the [chunks, experts] counts
    (a latency-bound loop on one SM), so chunks of about sqrt(pairs) keep both short. Measured on the
    H200 (session 9, run k23; programs per call swept 64-512): sqrt gives the best or within 3 us of
    it from 512 to 65536 tokens on all four shapes; the former one program per 32 pairs cost 93 us at
    Qwen3-30B-A3B 4096 tokens (1024 x 128 counts to scan) against 37 us now.
    """
    p = max(num_pairs, 1)
    sub = max(16, min(4096 // e_p2, next_pow2(p)))
    chunk = next_pow2(cdiv(p, programs)) if programs else next_pow2(math.isqrt(p))
    return max(sub, chunk), sub


def align_parallel(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int,
                   programs: int | None = None) -> AlignedRouting:
    """The same layout as ``align_reference`` from three Triton launches: a parallel counting sort.

    Chunks of pairs are counted per expert in parallel, one program turns the [chunks, experts]
    counts into each chunk's first row per expert (exclusive scan down the chunks), and the chunks
    scatter their pairs in parallel and fill their share of the block -> expert map; stable, like
    the reference. ``programs``: about how many chunks (default: chunks of about sqrt(pairs)).
    """
    ids, P, K, S, (sorted_pair, block_expert, num_padded, expert_start) = _prepare(topk_ids_TK, num_experts, block_m)
    E, dev = num_experts, topk_ids_TK.device
    e_p2 = next_pow2(max(E, 2))
    chunk, sub = _parallel_tiles(P, e_p2, programs)
    G = cdiv(max(P, 1), chunk)
    num_blocks = S // block_m
    bpg = cdiv(num_blocks, G)
    counts = torch.empty(G, e_p2, dtype=torch.int32, device=dev)
    offsets = torch.empty(G, e_p2, dtype=torch.int32, device=dev)
    fill = cdiv(S, G)
    warps = 4 if sub * e_p2 <= 4096 else 8
    _count_kernel[(G,)](ids, counts, sorted_pair, P, E, S, fill, E_P2=e_p2, CHUNK=chunk, SUB=sub,
                        FILL_BLOCK=min(1024, next_pow2(fill)), num_warps=warps)
    _offsets_kernel[(1,)](counts, offsets, num_padded, expert_start, G, E,
                          BLOCK_M=block_m, E_P2=e_p2, GC=max(1, min(64, 8192 // e_p2)), num_warps=8)
    _scatter_kernel[(G,)](ids, offsets, sorted_pair, expert_start, block_expert, P, E, num_blocks, bpg,
                          BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk, SUB=sub,
                          BSUB=max(1, min(next_pow2(bpg), 4096 // e_p2)), num_warps=warps)
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
    to PARALLEL_ALIGN_MAX_WORK: the three-launch parallel counting sort; beyond: torch's sort.
    """
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    if allow_pair_blocks and topk_ids_TK.shape[0] == 1:
        return align_pair_blocks(topk_ids_TK, block_m)
    P, e_p2 = topk_ids_TK.numel(), next_pow2(max(num_experts, 2))
    if P * e_p2 <= SINGLE_ALIGN_MAX_WORK:
        return align_triton(topk_ids_TK, num_experts, block_m)
    if cdiv(P, _parallel_tiles(P, e_p2)[0]) * e_p2 <= PARALLEL_ALIGN_MAX_WORK:
        return align_parallel(topk_ids_TK, num_experts, block_m)
    return align_reference(topk_ids_TK, num_experts, block_m)
