"""Attention of a packed step in one launch: cache rows that feed different numbers of new tokens.

A packed step (``moe.kv_cache.PackedStep``) holds its new tokens one after another, [N]: token n belongs to
cache row ``row[n]`` at position ``pos[n]``, and it sees that row's slots 0 .. pos[n] (and, in a sliding-window
layer, only the last ``window`` of them). Run part by part, each part is a [rows, T] attention call of its own,
and every part costs host time in every layer (~0.5 ms a part and a layer on the H200 machine, BENCHMARKS 3u):
that is why the engine packed only steps that save thousands of padded tokens a part. Here the whole step is one
launch over a table of query blocks:

    block b: row[b], first token tok[b] (an index into N), count cnt[b] <= TB, first position pos[b]
             (its tokens are tok[b] .. tok[b] + cnt[b] - 1 at positions pos[b] .. pos[b] + cnt[b] - 1)
    program (b, g): the block's tokens x the H/G query heads of key/value head g as the rows of one tile
             (token j, head i at tile row j * R + i, R = next_pow2(H/G), TB = BLOCK_M / R), an online softmax
             over the row's slots in blocks of BLOCK_N, keys and values read from the cache as they lie.

The grouped query heads share each key tile, so a one-token row (decoding) reads its keys once per key/value head,
not once per query head. Masked slots are never read past the block's last position; a key block with every slot
masked adds exactly nothing (the online softmax step is decode_attention's ``softmax_step``), and a row's tokens are
cut into blocks from its own first token, so a token's result does not depend on what else the step holds: the same
bits whatever is packed beside it (tested).
No mask tensor: what a query sees follows from its position (the KV cache's rule: query i of a row sees slots <=
lengths + i; padding tokens past max_len see slots < max_len, never the spare slot).

``packed_attention_reference`` computes the same with torch's SDPA, a row's run of tokens at a time. Inference only.
Shape legend: N packed tokens, H query heads, G key/value heads, d key and e value head size, S cache slots.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .decode_attention import softmax_step
from .launch import Launcher
from .launch_config import next_pow2

BLOCK_M = 64  # tile rows: TB tokens x R query heads of one key/value head
BLOCK_N = 64  # slots per step of the online softmax
MAX_HEAD = 256


@triton.jit(do_not_specialize=["s_qh"])  # (N x d: a stride that changes with the step, not a variant each)
def _packed_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, brow_ptr, btok_ptr, bcnt_ptr, bpos_ptr,
                             HG, d, e, max_len, window, scale,
                             s_qh, s_qn, s_kb, s_kg, s_ks, s_vb, s_vg, s_vs, s_on, s_oh,
                             R: tl.constexpr, TB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_E: tl.constexpr,
                             WINDOWED: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr):
    blk = tl.program_id(0)
    g = tl.program_id(1)
    row = tl.load(brow_ptr + blk).to(tl.int64)
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
    # slots [lo, hi): what the block's last token sees (below max_len: padding past the end sees no spare slot)
    hi = tl.minimum(pos0 + cnt, max_len)
    lo = 0
    if WINDOWED:
        lo = tl.maximum(pos0 - window + 1, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full([TB * R], float("-inf"), tl.float32)
    l_i = tl.zeros([TB * R], tl.float32)
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < e
    acc = tl.zeros([TB * R, BLOCK_E], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = k_ptr + row * s_kb + g * s_kg
    v_base = v_ptr + row * s_vb + g * s_vg
    for s0 in range(lo, hi, BLOCK_N):
        s = s0 + offs_n
        inb = s < hi
        k = tl.load(k_base + s[:, None].to(tl.int64) * s_ks + offs_d[None, :], mask=inb[:, None] & dmask[None, :],
                    other=0.0)
        v = tl.load(v_base + s[:, None].to(tl.int64) * s_vs + offs_e[None, :], mask=inb[:, None] & emask[None, :],
                    other=0.0)
        if CAST_F32:
            k = k.to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [TB*R, BLOCK_N]
        seen = inb[None, :] & (s[None, :] <= pos[:, None])
        if WINDOWED:
            seen = seen & (s[None, :] > pos[:, None] - window)
        m_i, l_i, acc = softmax_step(tl.where(seen, sc, float("-inf")), v, m_i, l_i, acc, CAST_F32, PREC)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None] * s_on + head[:, None].to(tl.int64) * s_oh + offs_e[None, :],
             o.to(o_ptr.dtype.element_ty), mask=live[:, None] & emask[None, :])


_attend = Launcher(_packed_attention_kernel)  # launched without per-call binding (kernels/launch.py)


def group_rows(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(R, TB): tile rows per token (the query heads of one key/value head, to a power of two) and tokens per block."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not share {num_kv_heads} key/value heads evenly")
    r = next_pow2(num_heads // num_kv_heads)
    return r, max(1, BLOCK_M // r)


def block_table(rows, starts, counts, positions, tokens_per_block: int, device) -> tuple[torch.Tensor, ...]:
    """The query blocks of a packed step: each run of tokens (a row's tokens in the step: row r, its first token's
    index into N, how many, its first position) cut into blocks of at most ``tokens_per_block``; four int32 tensors
    on ``device`` (row, first token, count, first position), made with one copy."""
    rows, starts, counts, positions = (np.asarray(a, dtype=np.int64) for a in (rows, starts, counts, positions))
    nb = -(-counts // tokens_per_block)
    run = np.repeat(np.arange(len(rows)), nb)
    off = (np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)) * tokens_per_block
    table = np.stack([rows[run], starts[run] + off, np.minimum(counts[run] - off, tokens_per_block),
                      positions[run] + off]).astype(np.int32)
    return rows_to_device(table, device)


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


def packed_attention(q_HNd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table, scale: float,
                     max_len: int, window: int = 0, out_NHd: torch.Tensor | None = None) -> torch.Tensor:
    """out [N, H, e]: each packed token's attention over its row of the cache (see the module docstring).

    q_HNd: the queries [H, N, d] (rows may be strided, each contiguous); k_cache [rows, G, S, d], v_cache [rows, G,
    S, e] (MLA: keys 192 = 128 + 64 rotary, values 128);
    table: block_table(...) for the tokens per block of group_rows(H, G); max_len: slots a row holds (the spare
    slot past it is never read); window: a sliding window (0: none)."""
    H, N, d = q_HNd.shape
    G = k_cache.shape[1]
    e = v_cache.shape[3]
    if max(d, e) > MAX_HEAD or k_cache.shape[3] != d or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"packed attention takes key and value heads of at most {MAX_HEAD}: q {tuple(q_HNd.shape)}, "
                         f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    R, TB = group_rows(H, G)
    out = out_NHd if out_NHd is not None else torch.empty(N, H, e, dtype=q_HNd.dtype, device=q_HNd.device)
    brow, btok, bcnt, bpos = table
    nb = brow.shape[0]
    if nb and N:
        interpreted = _interpreted()
        _attend[(nb, G)](q_HNd, k_cache, v_cache, out, brow, btok, bcnt, bpos, H // G, d, e, max_len, int(window),
                         scale, q_HNd.stride(0), q_HNd.stride(1), *k_cache.stride()[:3],
                         *v_cache.stride()[:3], out.stride(0), out.stride(1), **_launch(R, TB, d, e, bool(window),
                                                                                        q_HNd.dtype, interpreted))
    return out


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=64)
def _launch(R: int, TB: int, d: int, e: int, windowed: bool, dtype: torch.dtype, interpreted: bool) -> dict:
    return dict(R=R, TB=TB, BLOCK_N=BLOCK_N, BLOCK_D=max(16, next_pow2(d)), BLOCK_E=max(16, next_pow2(e)),
                WINDOWED=windowed,
                CAST_F32=interpreted or dtype == torch.float32, PREC="ieee" if dtype == torch.float32 else "tf32",
                num_warps=4, num_stages=2)


def packed_attention_reference(q_HNd, k_cache, v_cache, table, scale: float, max_len: int,
                               window: int = 0) -> torch.Tensor:
    """The same with torch's SDPA, one block at a time (the plain reference the kernel is tested against)."""
    H, N, d = q_HNd.shape
    G = k_cache.shape[1]
    out = torch.zeros(N, H, v_cache.shape[3], dtype=q_HNd.dtype, device=q_HNd.device)
    for r, t0, c, p0 in zip(*(t.tolist() for t in table)):
        hi = min(p0 + c, max_len)
        q = q_HNd[:, t0:t0 + c][None]  # [1, H, c, d]
        k, v = k_cache[r:r + 1, :, :hi], v_cache[r:r + 1, :, :hi]
        pos = torch.arange(p0, p0 + c, device=q.device)
        s = torch.arange(hi, device=q.device)
        mask = s[None, :] <= pos[:, None]
        if window:
            mask &= s[None, :] > pos[:, None] - window
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[None, None], scale=scale,
                                           enable_gqa=H != G)
        out[t0:t0 + c] = o[0].transpose(0, 1)
    return out


__all__ = ["packed_attention", "packed_attention_reference", "block_table", "rows_to_device", "group_rows", "BLOCK_M",
           "BLOCK_N"]
