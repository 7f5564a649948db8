"""Attention of a packed step in one launch: cache rows that feed different numbers of new tokens.

A packed step (``moe.kv_cache.PackedStep``) holds its new tokens one after another, [N]: token n belongs to
cache row ``row[n]`` at position ``pos[n]``, and it sees that row's slots 0 .. pos[n] (and, in a sliding-window
layer, only the last ``window`` of them). Run part by part, each part is a [rows, T] attention call of its own,
and every part costs host time in every layer (~0.5 ms a part and a layer on the H200 machine, BENCHMARKS 3u):
that is why the engine packed only steps that save thousands of padded tokens a part. Here the whole step is one
launch over a table of query blocks:

    block b: row[b], first token tok[b] (an index into N), count cnt[b] <= TB, first position pos[b]
             (its tokens are tok[b] .. tok[b] + cnt[b] - 1 at positions pos[b] .. pos[b] + cnt[b] - 1)
    piece p of block b: its slots [lo, hi), the block's cut at multiples of SPLIT (a long context's decoding row
             is many pieces, run in parallel; a block within one SPLIT is one)
    program (p, g): the block's tokens x the H/G query heads of key/value head g as the rows of one tile
             (token j, head i at tile row j * R + i, R = next_pow2(H/G), TB = BLOCK_M / R), an online softmax
             over the piece's slots in blocks of BLOCK_N, keys and values read from the cache as they lie; a
             block's only piece writes the output, else a second kernel merges its pieces in order.

The grouped query heads share each key tile, so a one-token row (decoding) reads its keys once per key/value head,
not once per query head. A one-token block fills only R of a tile's BLOCK_M rows; where its context reaches
``single_from_slots(R)`` slots (16384 at Qwen3's 8 query heads a key/value head, fewer for fewer) such blocks go to a
table of their own, launched with tiles of 16 rows (``PackedTable.single``): at 32768 slots a 64-row tile made seven
decoding rows 1.4x the decode kernel, 16 rows made them level with it (H200, s34-c); below the threshold the second
launch costs more than the smaller tiles save (s35-a). A long run over a long context (a prompt of thousands of tokens,
or a chunk of one) goes to a third table (``PackedTable.wide``): tiles of 128 rows, 8 warps, keys and values read by
TMA, 2-2.6x faster than 64-row tiles on the H200 (s36-b) and level with or faster than cuDNN's and FlashAttention-2's
kernels there (WIDE_ROWS).

Key steps below a block's first position are seen by every row of its tile: they run without a mask or bounds check,
the rest masked. Slots are never read past the block's last position; a key step with every slot masked adds exactly
nothing (the online softmax step, in units of log2), and a row's tokens are cut into blocks from
its own first token, its slots into pieces at fixed multiples and its table chosen by itself, so a token's result does
not depend on what else the step holds: the same bits whatever is packed beside it (tested).

The engine packs every step of several tokens a row where the model attends this way (a lone prompt's prefill is one
part): nothing here is planned per length, where torch's SDPA (cuDNN on the H200) plans a graph for each length it
has not met, 37 ms to 0.95 s the first time (BENCHMARKS 3y).
No mask tensor: what a query sees follows from its position (the KV cache's rule: query i of a row sees slots <=
lengths + i; padding tokens past max_len see slots < max_len, never the spare slot).

``packed_attention_reference`` computes the same with torch's SDPA, a row's run of tokens at a time. Inference only.
Shape legend: N packed tokens, H query heads, G key/value heads, d key and e value head size, S cache slots.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .decode_attention import MAX_HEAD, softmax_step
from .grouped_gemm import _interpreted, _precision, tma_ok
from .launch import Launcher
from .launch_config import next_pow2

BLOCK_M = 64  # tile rows: TB tokens x R query heads of one key/value head
BLOCK_N = 64  # slots per step of the online softmax
# slots one program walks: a block's slots are cut at multiples of SPLIT, each piece a program of its own, and
# the pieces merged in order. One program per block walked a decoding row's whole context: at 8192 and 32768
# slots 2.4-7x slower than the parts' decode attention (H200, s33-f: 0.31 / 1.23 ms against 0.12 / 0.18 a layer)
SPLIT = 1024
# one-token blocks of at least single_from_slots(R) slots run in a launch of their own with tiles of SINGLE_ROWS rows.
# Such a block fills R of a 64-row tile's rows, so with fewer query heads a key/value head the small tiles pay for
# their second launch (~0.02 ms) sooner. 7 decoding rows beside a 32-token chunk, ms a layer, one table -> the
# one-token table (H200, eager): Qwen3's heads (R 8, 4 key/value heads) 0.242 -> 0.175 at 32768 slots (s34-c),
# 0.118 -> 0.090 at 16384 (s35-b), 1.2-1.5x slower at 4096-12288 (s35-a); Mixtral's (R 4, 8) 0.145 -> 0.119 at 10240,
# 0.110 -> 0.115 at 8192 (s35-a/b); OLMoE's (R 1, 16) 0.143 -> 0.122 at 5632, 0.106 -> 0.130 at 4096 (s35-a/b); 16
# heads on 8 (R 2) 0.101 -> 0.126 at 7168, 0.109 -> 0.123 at 9216, 0.162 -> 0.140 at 14336 (s35-b). Runs a few
# tenths of a ms long move by 10-20% between runs, so these are the thresholds the runs agree on, not a fit.
SINGLE_FROM = 16384  # R >= 8, and the most slots any R asks
SINGLE_FROM_BY_R = {1: 5632, 2: 12288, 4: 10240}
SINGLE_ROWS = 16  # the smallest tile a dot takes
# a long run over a long context (a prompt's prefill, a chunk of one) takes a table of its own, tiles of WIDE_M rows
# (two warp groups, keys and values by TMA, a deeper pipeline): a run of at least WIDE_MIN_TOKENS tokens whose tokens x
# R x key/value heads reach WIDE_ROWS (so it makes UNCUT_PROGRAMS programs even in the wide tiles: never cut) and whose
# last token sees WIDE_FROM_SLOTS slots or more. H200, s36-b (a lone run of P tokens at a context, ms a layer, 64-row
# tiles -> the wide table): Qwen3's heads 2048 at 16384 2.23 -> 1.01, 8192 at 0 2.06 -> 1.03; OLMoE's 1.17 -> 0.54 and
# 1.16 -> 0.58; DeepSeek-V2-Lite's (192-wide keys, 64-slot key steps) 2.02 -> 0.77 (BENCHMARKS 3aa). Short contexts
# stay in the main table: there the wide tiles save the GPU 3-20 us a layer (s36-d, CUDA graphs: 1024 and 2048 tokens
# at 0) and cost the host ~30 us a launch eagerly (s36-b: Triton encodes the two tensor maps at every launch)
WIDE_M = 128
WIDE_ROWS = 256 * WIDE_M  # (UNCUT_PROGRAMS tiles of WIDE_M rows)
WIDE_FROM_SLOTS = 4096
WIDE_MIN_TOKENS = 2  # (a one-token run is never wide; every_variant raises it to give the main table a run too)
# each table's (key step, warps, stages, keys and values by TMA) by its tile rows: the one-token table's SINGLE_ROWS, the
# main table's BLOCK_M, the wide table's WIDE_M; fit_shared narrows the key step, then the stages, where the heads'
# size and the dtype would pass the shared memory (DeepSeek-V2-Lite's 192-wide keys: 64-slot steps; float32 caches).
# s36-b: the main table at 3 stages 10-15% faster than at 2 for runs of 512-1024 tokens, level for decoding rows
TILE_LAUNCH = {SINGLE_ROWS: (64, 4, 2, False), BLOCK_M: (64, 4, 3, False), WIDE_M: (128, 8, 3, True)}
# a run of at least this many (block, key/value head) programs is not cut in pieces: it fills the GPU as it is, and its
# pieces would need merges and a scratch of partial results growing with the run and its context (~0.6 GB a layer for
# a lone 8192-token prompt at Qwen3's heads, ~9 GB at 32768). s34-e (Qwen3 heads, 4 key/value heads): a 512-token run
# (256 programs) 9-14% faster uncut at 8192 and 30000 slots, level at 2048 tokens from 0; a 64-token run (32 programs)
# at 30000 slots 5x slower uncut
UNCUT_PROGRAMS = 256


@triton.jit
def _key_step(q, k_base, v_base, k_desc, v_desc, row32, g, s0, offs_n, s_ks, s_vs, offs_d, offs_e, dmask, emask, hi,
              pos, window, qk_scale, m_i, l_i, acc, MASKED: tl.constexpr, WINDOWED: tl.constexpr,
              CAST_F32: tl.constexpr, PREC: tl.constexpr, KV_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """One key step of the online softmax over slots s0 .. s0 + BLOCK_N: MASKED checks each slot against the piece's
    end and each row's position (and window); unmasked, every slot is below every row's position and inside the
    piece, and KV_TMA reads the keys and values through tensor descriptors (never past a real slot: no zero fill is
    relied on)."""
    s = s0 + offs_n
    if MASKED:
        inb = s < hi
        kmask = inb[:, None] & dmask[None, :]
        vmask = inb[:, None] & emask[None, :]
    else:
        kmask = dmask[None, :]
        vmask = emask[None, :]
    if KV_TMA and not MASKED:
        k = k_desc.load([row32, g, s0, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([row32, g, s0, 0]).reshape(BLOCK_N, BLOCK_E)
    else:
        k = tl.load(k_base + s[:, None].to(tl.int64) * s_ks + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + s[:, None].to(tl.int64) * s_vs + offs_e[None, :], mask=vmask, other=0.0)
    if CAST_F32:
        k = k.to(tl.float32)
    sc = tl.dot(q, tl.trans(k), input_precision=PREC)  # [TB*R, BLOCK_N], unscaled
    if MASKED:
        seen = inb[None, :] & (s[None, :] <= pos[:, None])
        if WINDOWED:
            seen = seen & (s[None, :] > pos[:, None] - window)
        sc = tl.where(seen, sc, float("-inf"))
    # (the online softmax in units of log2: s36-b, 30% faster on long runs than scaling the scores and taking exp)
    return softmax_step(sc, v, m_i, l_i, acc, qk_scale, CAST_F32, PREC, True)


@triton.jit(do_not_specialize=["s_qh"])  # (N x d: a stride that changes with the step, not a variant each)
def _packed_attention_kernel(q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, part_ptr, ml_ptr,
                             brow_ptr, btok_ptr, bcnt_ptr, bpos_ptr, iblk_ptr, ilo_ptr, ihi_ptr, ione_ptr,
                             HG, d, e, window, scale,
                             s_qh, s_qn, s_kb, s_kg, s_ks, s_vb, s_vg, s_vs, s_on, s_oh,
                             R: tl.constexpr, TB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_E: tl.constexpr,
                             WINDOWED: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                             KV_TMA: tl.constexpr):
    item = tl.program_id(0)  # a piece of a block: its slots [lo, hi)
    g = tl.program_id(1)
    G = tl.num_programs(1)
    blk = tl.load(iblk_ptr + item)
    lo = tl.load(ilo_ptr + item)
    hi = tl.load(ihi_ptr + item)
    row32 = tl.load(brow_ptr + blk)
    row = row32.to(tl.int64)
    tok0 = tl.load(btok_ptr + blk)
    cnt = tl.load(bcnt_ptr + blk)
    pos0 = tl.load(bpos_ptr + blk)
    m_offs = tl.arange(0, TB * R)
    j = m_offs // R  # the token of each tile row
    i = m_offs % R  # its query head within the group
    live = (j < cnt) & (i < HG)
    head = g * HG + i
    tok = (tok0 + j).to(tl.int64)
    pos = pos0 + j
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    q = tl.load(q_ptr + head[:, None].to(tl.int64) * s_qh + tok[:, None] * s_qn + offs_d[None, :],
                mask=live[:, None] & dmask[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    m_i = tl.full([TB * R], float("-inf"), tl.float32)
    l_i = tl.zeros([TB * R], tl.float32)
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < e
    acc = tl.zeros([TB * R, BLOCK_E], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + row * s_kb + g * s_kg
    v_base = v_ptr + row * s_vb + g * s_vg
    # whole key steps below the block's first position (and no window): every row sees them, so no mask is built and
    # no slot is checked against the piece's end (the same values as the masked steps below; a long prompt's blocks
    # and a decoding row spend most of their steps here)
    full = lo
    if not WINDOWED:
        full = lo + (tl.minimum(pos0 + 1, hi) - lo) // BLOCK_N * BLOCK_N
    qk_scale = scale * 1.4426950408889634  # (x log2(e): the online softmax in units of log2)
    for s0 in range(lo, full, BLOCK_N):
        m_i, l_i, acc = _key_step(q, k_base, v_base, k_desc, v_desc, row32, g, s0, offs_n, s_ks, s_vs, offs_d, offs_e,
                                  dmask, emask, hi, pos, window, qk_scale, m_i, l_i, acc, False, WINDOWED, CAST_F32,
                                  PREC, KV_TMA, BLOCK_N, BLOCK_D, BLOCK_E)
    for s0 in range(full, hi, BLOCK_N):
        m_i, l_i, acc = _key_step(q, k_base, v_base, k_desc, v_desc, row32, g, s0, offs_n, s_ks, s_vs, offs_d, offs_e,
                                  dmask, emask, hi, pos, window, qk_scale, m_i, l_i, acc, True, WINDOWED, CAST_F32,
                                  PREC, KV_TMA, BLOCK_N, BLOCK_D, BLOCK_E)
    if tl.load(ione_ptr + item) != 0:  # the block's only piece: the output itself
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + tok[:, None] * s_on + head[:, None].to(tl.int64) * s_oh + offs_e[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=live[:, None] & emask[None, :])
    else:  # the piece's running max, sum and unnormalised output of each tile row, for _merge_kernel
        r = (item * G + g).to(tl.int64) * (TB * R) + m_offs
        tl.store(part_ptr + r[:, None] * BLOCK_E + offs_e[None, :], acc)
        tl.store(ml_ptr + r * 2, m_i)
        tl.store(ml_ptr + r * 2 + 1, l_i)


@triton.jit
def _merge_kernel(part_ptr, ml_ptr, o_ptr, btok_ptr, bcnt_ptr, mblk_ptr, mfirst_ptr, mcount_ptr, HG, e, s_on, s_oh,
                  R: tl.constexpr, TB: tl.constexpr, BLOCK_E: tl.constexpr):
    """A block cut in pieces: the pieces' outputs merged in piece order (a fixed order: the same bits every run)."""
    mb = tl.program_id(0)
    g = tl.program_id(1)
    G = tl.num_programs(1)
    blk = tl.load(mblk_ptr + mb)
    first = tl.load(mfirst_ptr + mb)
    count = tl.load(mcount_ptr + mb)
    m_offs = tl.arange(0, TB * R)
    j = m_offs // R
    i = m_offs % R
    live = (j < tl.load(bcnt_ptr + blk)) & (i < HG)
    tok = (tl.load(btok_ptr + blk) + j).to(tl.int64)
    head = g * HG + i
    offs_e = tl.arange(0, BLOCK_E)
    m = tl.full([TB * R], float("-inf"), tl.float32)
    for c in range(count):  # the overall max first, then the sums, both in piece order
        r = ((first + c) * G + g).to(tl.int64) * (TB * R) + m_offs
        m = tl.maximum(m, tl.load(ml_ptr + r * 2))
    m = tl.where(m == float("-inf"), 0.0, m)  # nothing seen in any piece: the sums stay 0
    acc = tl.zeros([TB * R, BLOCK_E], tl.float32)
    l = tl.zeros([TB * R], tl.float32)
    for c in range(count):
        r = ((first + c) * G + g).to(tl.int64) * (TB * R) + m_offs
        w = tl.exp2(tl.load(ml_ptr + r * 2) - m)  # (the pieces' maxima in units of log2)
        l += w * tl.load(ml_ptr + r * 2 + 1)
        acc += w[:, None] * tl.load(part_ptr + r[:, None] * BLOCK_E + offs_e[None, :])
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None] * s_on + head[:, None].to(tl.int64) * s_oh + offs_e[None, :],
             o.to(o_ptr.dtype.element_ty), mask=live[:, None] & (offs_e[None, :] < e))


_attend = Launcher(_packed_attention_kernel)  # launched without per-call binding (kernels/launch.py)
_merge = Launcher(_merge_kernel)


def group_rows(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(R, TB): tile rows per token (the query heads of one key/value head, to a power of two) and tokens per block."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} key/value heads evenly")
    r = next_pow2(num_heads // num_kv_heads)
    return r, max(1, BLOCK_M // r)


@dataclass(frozen=True)
class PackedTable:
    """What packed_attention walks for one step and one window: the query blocks (row, first token, count, first
    position), their pieces (block, slots [lo, hi), whether the block's only piece) and the blocks cut in pieces
    (block, first piece, pieces), as int32 device tensors; the cache's max_len, the window (0: none) and the tokens
    a block holds at most. ``single``: the one-token blocks of long contexts, a table of its own launched with
    tiles of SINGLE_ROWS rows; ``wide``: the blocks of long runs, tiles of WIDE_M rows (None: none)."""
    blocks: tuple
    items: tuple
    merges: tuple
    max_len: int
    window: int
    tokens_per_block: int = 0
    single: "PackedTable | None" = None
    cut_pieces: int = 0  # pieces of blocks cut in several: the table's first items
    wide: "PackedTable | None" = None

    @property
    def tables(self) -> tuple:
        """This table and its one-token and wide tables, those that exist."""
        return tuple(t for t in (self, self.single, self.wide) if t is not None)

    @property
    def num_items(self) -> int:
        return self.items[0].shape[0]

    @property
    def num_merges(self) -> int:
        return self.merges[0].shape[0]


def single_from_slots(R: int) -> int:
    """Slots from which a one-token run takes the one-token table, for R tile rows a token (see SINGLE_FROM)."""
    return min(SINGLE_FROM, SINGLE_FROM_BY_R.get(int(R), SINGLE_FROM))


def _uncut(blocks, kv_heads: int):
    """Whether a run of ``blocks`` query blocks (an int or an array) is never cut in pieces: its programs fill the GPU
    (UNCUT_PROGRAMS)."""
    return blocks * max(1, int(kv_heads)) >= UNCUT_PROGRAMS


def wide_tokens_per_block(tokens_per_block: int) -> int:
    """Tokens a block of the wide table holds (tiles of WIDE_M rows; tokens_per_block is the main table's)."""
    return tokens_per_block * WIDE_M // BLOCK_M


def single_tokens_per_block(tokens_per_block: int) -> int:
    """Tokens a block of the one-token table holds: its tiles are SINGLE_ROWS rows (of R = BLOCK_M / tokens_per_block
    rows a token), so a one-token block fills R of them, not R of BLOCK_M."""
    return max(1, tokens_per_block * SINGLE_ROWS // BLOCK_M)


def _partial_row_bytes(v_head_dim: int) -> int:
    """A tile row's partial result kept for the merge: its unnormalised output (fp32, BLOCK_E wide), max and sum."""
    return max(16, next_pow2(v_head_dim)) * 4 + 8


def _scratch_rows(table: PackedTable, G: int, R: int, TB: int) -> int:
    """Tile rows of partial results packed_attention keeps for one table: its cut pieces' (they come first)."""
    return table.cut_pieces * G * TB * R if table.num_merges else 0


def scratch_bytes_bound(num_heads: int, num_kv_heads: int, v_head_dim: int, tokens: int, slots: int) -> int:
    """Bytes of partial results packed_attention keeps (until the merge) for one run of ``tokens`` tokens over at most
    ``slots`` cache slots: an upper bound, whatever its positions; 0 for a run that is never cut (UNCUT_PROGRAMS) or
    whose slots fit one piece. What a step's activation bound adds for it (offload.apply)."""
    R, TB = group_rows(num_heads, num_kv_heads)
    G = num_kv_heads
    per_row = _partial_row_bytes(v_head_dim)

    def pieces(n: int) -> int:
        return -(-max(int(n), 0) // SPLIT)
    if tokens <= 0 or pieces(slots) <= 1:
        return 0
    if tokens == 1:  # a one-token block: a whole tile of the main table, or SINGLE_ROWS of the one-token table
        tb1 = single_tokens_per_block(TB)
        if tb1 >= TB:
            return G * per_row * TB * R * pieces(slots)
        at = single_from_slots(R)
        main = TB * R * pieces(min(slots, at - 1))
        single = tb1 * R * pieces(slots) if slots >= at else 0
        return G * per_row * max(main, single)
    blocks = -(-int(tokens) // TB)
    if _uncut(blocks, G):
        return 0
    return blocks * G * TB * R * per_row * pieces(slots)


def scratch_bytes(table: PackedTable, num_heads: int, num_kv_heads: int, v_head_dim: int) -> int:
    """Bytes of partial results packed_attention allocates for ``table`` (both of its tables)."""
    R, TB = group_rows(num_heads, num_kv_heads)
    return sum(_scratch_rows(t, num_kv_heads, R, t.tokens_per_block or TB)
               for t in table.tables) * _partial_row_bytes(v_head_dim)


def _host_table(rows, starts, counts, positions, tokens_per_block: int, max_len: int, window: int, split):
    """The three host arrays of one table ([4, blocks], [4, pieces], [3, merges]; see block_table); ``split``: the
    slots of each run's pieces (an array, a run each). The pieces of blocks cut in several come first, so that the
    scratch their partial results need is as many rows as they are (a long prompt's uncut blocks need none)."""
    nb = -(-counts // tokens_per_block)
    run = np.repeat(np.arange(len(rows)), nb)
    off = (np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)) * tokens_per_block
    cnt = np.minimum(counts[run] - off, tokens_per_block)
    pos = positions[run] + off
    hi = np.minimum(pos + cnt, max_len)
    lo = np.maximum(pos - window + 1, 0) // BLOCK_N * BLOCK_N if window else np.zeros_like(pos)
    lo = np.minimum(lo, hi)
    sp = np.asarray(split, dtype=np.int64)[run]
    first_piece, last_piece = lo // sp, np.maximum(hi - 1, lo) // sp
    pieces = last_piece - first_piece + 1
    # blocks cut in pieces first (each block's pieces together), then the whole blocks, those of most slots first (a
    # long prompt's last blocks run longest: started last they would make the launch's tail)
    order = np.lexsort((np.where(pieces == 1, -hi, 0), pieces == 1))
    p_o = pieces[order]
    blk = np.repeat(order, p_o)
    c = first_piece[blk] + np.arange(int(p_o.sum())) - np.repeat(np.cumsum(p_o) - p_o, p_o)
    ilo, ihi = np.maximum(c * sp[blk], lo[blk]), np.minimum((c + 1) * sp[blk], hi[blk])
    first = np.cumsum(p_o) - p_o
    cut = np.flatnonzero(p_o > 1)
    return [np.stack([rows[run], starts[run] + off, cnt, pos]), np.stack([blk, ilo, ihi, pieces[blk] == 1]),
            np.stack([order[cut], first[cut], p_o[cut]])]


def block_table(rows, starts, counts, positions, tokens_per_block: int, device, max_len: int, window: int = 0,
                split: int | None = None, single_from: int | None = None, kv_heads: int = 1) -> PackedTable:
    """The query blocks of a packed step: each run of tokens (a row's tokens in the step: row r, its first token's
    index into N, how many, its first position) cut into blocks of at most ``tokens_per_block``; each block's slots
    (from 0, or the window's first rounded down to BLOCK_N, to its last token's position + 1, below max_len) cut at
    multiples of ``split`` (default SPLIT) into pieces, unless the run's blocks x ``kv_heads`` make UNCUT_PROGRAMS
    programs or more (such a run fills the GPU without pieces; its pieces would cost merges and a scratch of partial
    results that grows with the run and its context). A run of one token whose slots number ``single_from`` (default
    single_from_slots(R), R = BLOCK_M / tokens_per_block) or more goes to ``single``, blocks of
    single_tokens_per_block(tokens_per_block) tokens. A run of at least WIDE_MIN_TOKENS tokens whose tokens x R x
    ``kv_heads`` reach WIDE_ROWS and whose last token sees WIDE_FROM_SLOTS slots or more goes to ``wide``, blocks of
    wide_tokens_per_block(tokens_per_block) tokens (tiles of WIDE_M rows). Whether a run is cut and which table it takes follow from the run alone, so a token's result still
    does not depend on its neighbours. Made on the host, copied in one go."""
    split = SPLIT if split is None else int(split)
    R = max(1, BLOCK_M // tokens_per_block)
    single_from = single_from_slots(R) if single_from is None else int(single_from)
    rows, starts, counts, positions = (np.asarray(a, dtype=np.int64) for a in (rows, starts, counts, positions))
    tb1, tbw = single_tokens_per_block(tokens_per_block), wide_tokens_per_block(tokens_per_block)
    seen = np.minimum(positions + 1, max_len) - (np.maximum(positions - window + 1, 0) if window else 0)
    one = (counts == 1) & (seen >= single_from) if tb1 < tokens_per_block else np.zeros(len(rows), dtype=bool)
    wide = ((counts >= max(2, WIDE_MIN_TOKENS)) & (counts * R * max(1, int(kv_heads)) >= WIDE_ROWS)
            & (np.minimum(positions + counts, max_len) >= WIDE_FROM_SLOTS))
    if tokens_per_block * R != BLOCK_M:  # tiles of more than BLOCK_M rows already (over 64 query heads a key head)
        wide[:] = False
    tb_run = np.where(wide, tbw, tokens_per_block)
    uncut = _uncut(-(-counts // tb_run), kv_heads)
    splits = np.where(uncut, max(int(max_len), 1) + 1, split)
    groups = [("main", ~one & ~wide, tokens_per_block), ("single", one, tb1), ("wide", wide, tbw)]
    groups = groups[:1] + [g for g in groups[1:] if g[1].any()]
    hosts = [_host_table(rows[m], starts[m], counts[m], positions[m], tb, max_len, window, splits[m])
             for _, m, tb in groups]
    # one copy: every table's three arrays side by side, each padded to a multiple of 4 columns so that every row of
    # each starts 16-byte aligned (rows_to_device)
    host = [h for tables in hosts for h in tables]
    widths = [h.shape[1] for h in host]
    spans = [-(-max(w, 1) // 4) * 4 for w in widths]
    flat = rows_to_device(np.concatenate([np.pad(h, ((0, 4 - h.shape[0]), (0, span - w)))
                                          for h, w, span in zip(host, widths, spans)], axis=1).astype(np.int32), device)
    parts, at = [], 0
    for h, w, span in zip(host, widths, spans):
        parts.append(tuple(t[at:at + w] for t in flat[:h.shape[0]]))
        at += span
    cuts = [int(h[2][2].sum()) for h in hosts]  # each table's pieces of blocks cut in several
    extra = {name: PackedTable(*parts[3 * i:3 * i + 3], int(max_len), int(window), tb, None, cuts[i])
             for i, (name, _, tb) in enumerate(groups) if i}
    return PackedTable(*parts[:3], int(max_len), int(window), tokens_per_block, extra.get("single"), cuts[0],
                       extra.get("wide"))


@contextlib.contextmanager
def every_variant(split: int = 1):
    """Within it block_table cuts every block's slots every ``split``, gives every one-token run the one-token table
    and every run of 3 tokens or more the wide table (runs of 2 the main table), so a short step launches every
    kernel variant that long contexts take (the attention with all three tile sizes, the merges of all three), which a
    serving warm-up wants compiled before its first request. Not for real
    steps: the cuts change the bits; and it sets module constants, so it holds for every thread of the process."""
    global SPLIT, SINGLE_FROM, UNCUT_PROGRAMS, WIDE_ROWS, WIDE_FROM_SLOTS, WIDE_MIN_TOKENS
    saved = SPLIT, SINGLE_FROM, UNCUT_PROGRAMS, WIDE_ROWS, WIDE_FROM_SLOTS, WIDE_MIN_TOKENS
    SPLIT, SINGLE_FROM, UNCUT_PROGRAMS, WIDE_ROWS, WIDE_FROM_SLOTS, WIDE_MIN_TOKENS = int(split), 1, 1 << 62, 0, 0, 3
    try:
        yield
    finally:
        SPLIT, SINGLE_FROM, UNCUT_PROGRAMS, WIDE_ROWS, WIDE_FROM_SLOTS, WIDE_MIN_TOKENS = saved


def rows_to_device(host: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    """The rows of a small [k, n] host array as k device tensors, in one copy, each starting 16-byte aligned (the
    rows padded to a multiple of 16 bytes): Triton compiles a kernel variant per pointer alignment, and rows of an
    unpadded [k, n] block are aligned or not by n, so a serving replica's first steps compiled kernels its warm-up
    had (s33-b)."""
    k, n = host.shape
    per = max(1, 16 // host.dtype.itemsize)
    padded = np.zeros((k, -(-max(n, 1) // per) * per), dtype=host.dtype)
    padded[:, :n] = host
    return tuple(t[:n] for t in torch.from_numpy(padded).to(device).unbind(0))


def packed_attention(q_HNd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: PackedTable,
                     scale: float) -> torch.Tensor:
    """out [N, H, e]: each packed token's attention over its row of the cache (see the module docstring).

    q_HNd: the queries [H, N, d] (rows may be strided, each contiguous); k_cache [rows, G, S, d], v_cache [rows, G,
    S, e] (MLA: keys 192 = 128 + 64 rotary, values 128); table: block_table(...) for the tokens per block of
    group_rows(H, G), the cache's max_len (the spare slot past it is never read) and the layer's window."""
    H, N, d = q_HNd.shape
    G = k_cache.shape[1]
    e = v_cache.shape[3]
    if max(d, e) > MAX_HEAD or k_cache.shape[3] != d or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"packed attention takes key and value heads of at most {MAX_HEAD}: q {tuple(q_HNd.shape)}, "
                         f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    R, TB = group_rows(H, G)
    out = torch.empty(N, H, e, dtype=q_HNd.dtype, device=q_HNd.device)
    if not N:
        return out
    for t in table.tables:
        if not t.num_items:
            continue
        tb = t.tokens_per_block or TB
        if tb * R > (WIDE_M if t is table.wide else BLOCK_M):
            raise ValueError(f"a table of {tb} tokens a block for {H} query heads on {G} key/value heads: made for "
                             f"other heads (block_table's tokens_per_block is group_rows(H, G)[1] = {TB})")
        _attend_table(q_HNd, k_cache, v_cache, out, t, R, tb, scale)
    return out


def _attend_table(q_HNd, k_cache, v_cache, out, table: PackedTable, R: int, TB: int, scale: float) -> None:
    H, N, d = q_HNd.shape
    G = k_cache.shape[1]
    e = v_cache.shape[3]
    ni, nm = table.num_items, table.num_merges
    tma = tma_ok(k_cache) and _tma_layout(k_cache) and _tma_layout(v_cache)
    launch = _launch(R, TB, d, e, bool(table.window), q_HNd.dtype, _interpreted(), tma)
    BE = launch["BLOCK_E"]
    # the pieces of blocks cut in pieces write here: they come first in the table (block_table), so as many rows as
    # they are (a merge's last piece is the highest index, its first + count - 1)
    rows = max(1, _scratch_rows(table, G, R, TB))
    part = torch.empty(rows, BE, dtype=torch.float32, device=q_HNd.device)
    ml = torch.empty(rows, 2, dtype=torch.float32, device=q_HNd.device)
    k_desc = v_desc = None
    if launch["KV_TMA"]:
        from triton.tools.tensor_descriptor import TensorDescriptor
        k_desc, v_desc = (TensorDescriptor(c, list(c.shape), list(c.stride()), [1, 1, launch["BLOCK_N"], b])
                          for c, b in ((k_cache, launch["BLOCK_D"]), (v_cache, BE)))
    _attend[(ni, G)](q_HNd, k_cache, v_cache, k_desc, v_desc, out, part, ml, *table.blocks, *table.items, H // G, d, e,
                     table.window, scale, q_HNd.stride(0), q_HNd.stride(1), *k_cache.stride()[:3],
                     *v_cache.stride()[:3], out.stride(0), out.stride(1), **launch)
    if nm:
        _merge[(nm, G)](part, ml, out, table.blocks[1], table.blocks[2], *table.merges, H // G, e, out.stride(0),
                        out.stride(1), R=R, TB=TB, BLOCK_E=BE, num_warps=4)


def _tma_layout(t: torch.Tensor) -> bool:
    """Whether a cache tensor can back a TMA descriptor: unit last stride, 16-byte aligned base and strides."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]))


SHARED_BYTES = 232448  # shared memory a program may take on the H200 (227 KiB)


def shared_bytes(rows: int, bn: int, stages: int, BD: int, BE: int, elem: int) -> int:
    """An upper estimate of the attention kernel's shared memory: its query tile, ``stages`` key and value tiles of
    ``bn`` slots, and 2 KiB for barriers (sm_90 compiles under Triton 3.6: 114688 for Qwen3's main table, 230400 for
    its wide table, 214016 for DeepSeek-V2-Lite's wide table at 64-slot steps)."""
    return (rows * BD + stages * bn * (BD + BE)) * elem + 2048


def fit_shared(rows: int, bn: int, stages: int, BD: int, BE: int, elem: int) -> tuple[int, int]:
    """(key step, stages) within SHARED_BYTES: the key step down to 64 slots first, then the stages down to 2, then
    the key step again (wide heads, float32 caches; a config that does not fit fails to launch)."""
    while shared_bytes(rows, bn, stages, BD, BE, elem) > SHARED_BYTES:
        if bn > 64:
            bn //= 2
        elif stages > 2:
            stages -= 1
        elif bn > 16:
            bn //= 2
        else:
            break
    return bn, stages


@functools.lru_cache(maxsize=64)
def _launch(R: int, TB: int, d: int, e: int, windowed: bool, dtype: torch.dtype, interpreted: bool, tma: bool) -> dict:
    """The attention kernel's constexprs and launch options for a table of TB tokens a block: its tile rows TB x R
    pick the key step, warps, stages and whether keys and values come by TMA (TILE_LAUNCH; ``tma``: the caches
    allow descriptors)."""
    bn, warps, stages, by_tma = TILE_LAUNCH.get(TB * R, TILE_LAUNCH[BLOCK_M])
    BD, BE = max(16, next_pow2(d)), max(16, next_pow2(e))
    bn, stages = fit_shared(TB * R, bn, stages, BD, BE, torch.empty((), dtype=dtype).element_size())
    return dict(R=R, TB=TB, BLOCK_N=bn, BLOCK_D=BD, BLOCK_E=BE, WINDOWED=windowed,
                CAST_F32=interpreted or dtype == torch.float32, PREC=_precision(dtype), KV_TMA=bool(by_tma and tma),
                num_warps=warps, num_stages=stages)


def packed_attention_reference(q_HNd, k_cache, v_cache, table: PackedTable, scale: float) -> torch.Tensor:
    """The same with torch's SDPA, one block at a time (the plain reference the kernel is tested against)."""
    H, N, d = q_HNd.shape
    G = k_cache.shape[1]
    out = torch.zeros(N, H, v_cache.shape[3], dtype=q_HNd.dtype, device=q_HNd.device)
    blocks = [b.tolist() for b in table.blocks]
    for t in table.tables[1:]:
        blocks = [a + b.tolist() for a, b in zip(blocks, t.blocks)]
    for r, t0, c, p0 in zip(*blocks):
        hi = min(p0 + c, table.max_len)
        q = q_HNd[:, t0:t0 + c][None]  # [1, H, c, d]
        k, v = k_cache[r:r + 1, :, :hi], v_cache[r:r + 1, :, :hi]
        pos = torch.arange(p0, p0 + c, device=q.device)
        s = torch.arange(hi, device=q.device)
        mask = s[None, :] <= pos[:, None]
        if table.window:
            mask &= s[None, :] > pos[:, None] - table.window
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[None, None], scale=scale,
                                           enable_gqa=H != G)
        out[t0:t0 + c] = o[0].transpose(0, 1)
    return out


__all__ = ["packed_attention", "packed_attention_reference", "block_table", "PackedTable", "rows_to_device",
           "group_rows", "single_tokens_per_block", "single_from_slots", "every_variant", "BLOCK_M", "BLOCK_N", "SPLIT",
           "SINGLE_FROM", "SINGLE_FROM_BY_R", "SINGLE_ROWS", "UNCUT_PROGRAMS", "scratch_bytes", "scratch_bytes_bound"]
