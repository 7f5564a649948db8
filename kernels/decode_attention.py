"""Attention of one new token per row over its KV cache (a decode step), repeatable bit for bit.

    out[b, h] = softmax(q[b, h] . K[b, g]^T * scale, masked) . V[b, g]      g = h // (H / G)

Why our own kernel: torch's SDPA picks cuDNN for our decode attention on the H200 (an additive mask,
grouped heads, bf16), and cuDNN's result is not repeatable from run to run (BENCHMARKS 6e: 29-173 of
296 calls differed between identical runs). Greedy decoding in bf16 could then part after a near tie,
and expert-parallel ranks drifted apart. Here every result is summed in one fixed order:

- The slots are cut into chunks of ``CHUNK`` (256) slots, each chunk one program per (row, kv head),
  its ``H / G`` query heads as the rows of one tile: an online softmax over blocks of ``BLOCK_S`` slots
  (masked slots are not read; a block whose slots are all masked adds exactly nothing).
- A second kernel merges the chunks of each (row, head) in chunk order. With one chunk the first
  kernel writes the output itself (the merge of one chunk is the identity, bit for bit).

The chunking depends on nothing but the slot count, so a row's output is also the same whatever
else is in the batch and however many masked slots follow its own (the KV cache rounds the slots
read up to 256, ``moe.kv_cache.SLOT_BUCKET``): chunks past a row's length are all masked and add
exactly zero. The plain reference is torch's SDPA (``decode_attention_reference``).

Shape legend: B rows, H query heads, G key/value heads, S slots, d key head size, e value head size
(MLA: keys 192 = 128 + 64 rotary, values 128). Inference only (no backward).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import Launcher
from .launch_config import next_pow2

CHUNK = 256  # slots per program: fixed, so the summation order never depends on the batch
BLOCK_S = 128  # slots per step of a program's online softmax
# launch options of the chunk kernel: one fixed choice (another BLOCK_S changes the bits). Swept on the
# H200 with CUDA-graph timing over 7 decode cells (run s18-e, BENCHMARKS 9d): BLOCK_S 64 / 128 x
# 2 / 4 / 8 warps x 2 / 3 stages; this one was within 1.04x of each cell's best (geomean).
LAUNCH = dict(num_warps=4, STAGES=2)
MAX_HEAD = 256  # largest key / value head size taken
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def softmax_step(sc, v, m_i, l_i, acc, scale, CAST_F32: tl.constexpr, PREC: tl.constexpr, LOG2: tl.constexpr):
    """One block of an online softmax: scores sc [rows, slots] (-inf where masked) taken times ``scale``, values v
    [slots, e]; the running max m_i, sum l_i and unnormalised output acc, updated. LOG2: m_i in units of log2 and exp2
    (``scale`` holds log2(e)), so each probability is one fused multiply-add and an exp2 (kernels.packed_attention);
    else exp (here: scale 1.0, the scores scaled by the caller). A block with nothing seen (so far) adds exactly
    nothing."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1) * scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: p and alpha stay 0
    if LOG2:
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc * scale - m_safe[:, None])
    else:
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(sc * scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if CAST_F32:
        pv = tl.dot(p, v.to(tl.float32), input_precision=PREC)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, m_ptr, out_ptr, part_ptr, ml_ptr,
                  G, R, S, d, e, scale, n_chunks,
                  s_qb, s_qh, s_kb, s_kg, s_ks, s_vb, s_vg, s_vs, s_mb, s_ms, s_ob, s_oh,
                  CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_E: tl.constexpr, SINGLE: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                  STAGES: tl.constexpr, ADDITIVE: tl.constexpr):
    bg = tl.program_id(0).to(tl.int64)  # (row, kv head)
    c = tl.program_id(1)  # chunk
    b = bg // G
    g = bg % G
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    offs_s = tl.arange(0, BLOCK_S)
    rmask = offs_r < R
    heads = g * R + offs_r  # the query heads of this kv head
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                mask=rmask[:, None] & (offs_d[None, :] < d), other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_E], tl.float32)
    s0 = c * CHUNK
    for blk in tl.range(0, CHUNK, BLOCK_S, num_stages=STAGES):
        s = s0 + blk + offs_s
        inb = s < S
        if ADDITIVE:  # a float mask added to the scores; -inf = masked
            madd = tl.load(m_ptr + b * s_mb + s * s_ms, mask=inb, other=float("-inf")).to(tl.float32)
            seen = (madd != float("-inf")) & inb
        else:
            seen = (tl.load(m_ptr + b * s_mb + s * s_ms, mask=inb, other=0) != 0) & inb
        # masked slots are not read; a block with every slot masked adds exactly nothing (alpha 1, p 0)
        k = tl.load(k_ptr + b * s_kb + g * s_kg + s[:, None] * s_ks + offs_d[None, :],
                    mask=seen[:, None] & (offs_d[None, :] < d), other=0.0)
        v = tl.load(v_ptr + b * s_vb + g * s_vg + s[:, None] * s_vs + offs_e[None, :],
                    mask=seen[:, None] & (offs_e[None, :] < e), other=0.0)
        if CAST_F32:
            k = k.to(tl.float32)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # [BLOCK_R, BLOCK_S], float32
        if ADDITIVE:
            sc += madd[None, :]
        sc = tl.where(seen[None, :], sc, float("-inf"))
        m_i, l_i, acc = softmax_step(sc, v, m_i, l_i, acc, 1.0, CAST_F32, PREC, False)
    if SINGLE:  # one chunk: the output itself (what the merge of one chunk gives, bit for bit)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + offs_e[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (offs_e[None, :] < e))
    else:  # chunk c's running max, sum and unnormalised output of each of its heads
        row = (b * (G * R) + heads).to(tl.int64) * n_chunks + c
        tl.store(part_ptr + row[:, None] * BLOCK_E + offs_e[None, :], acc, mask=rmask[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=rmask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=rmask)


@triton.jit
def _merge_kernel(part_ptr, ml_ptr, out_ptr, H, e, n_chunks, s_ob, s_oh, BLOCK_E: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)  # (row, query head)
    b = bh // H
    h = bh % H
    offs_e = tl.arange(0, BLOCK_E)
    m = tl.full([1], float("-inf"), tl.float32)
    for c in range(n_chunks):  # the overall max first, then the sums, both in chunk order
        m = tl.maximum(m, tl.load(ml_ptr + (bh * n_chunks + c) * 2 + tl.zeros([1], tl.int64)))
    m = tl.where(m == float("-inf"), 0.0, m)  # every slot masked: the sums stay 0
    acc = tl.zeros([BLOCK_E], tl.float32)
    l = tl.zeros([1], tl.float32)
    for c in range(n_chunks):
        r = bh * n_chunks + c
        w = tl.exp(tl.load(ml_ptr + r * 2 + tl.zeros([1], tl.int64)) - m)  # a chunk with nothing seen: 0
        l += w * tl.load(ml_ptr + r * 2 + 1 + tl.zeros([1], tl.int64))
        acc += w * tl.load(part_ptr + r * BLOCK_E + offs_e)
    o = acc / tl.where(l > 0, l, 1.0)
    tl.store(out_ptr + b * s_ob + h * s_oh + offs_e, o.to(out_ptr.dtype.element_ty), mask=offs_e < e)


_chunk = Launcher(_chunk_kernel)
_merge = Launcher(_merge_kernel)


def decode_attention_reference(q_BH1d, k_BGSd, v_BGSe, mask_B11S, scale: float) -> torch.Tensor:
    """torch's SDPA of the same (the model's attention without this kernel)."""
    gqa = q_BH1d.shape[1] != k_BGSd.shape[1]
    return F.scaled_dot_product_attention(q_BH1d, k_BGSd, v_BGSe, attn_mask=mask_B11S, scale=scale, enable_gqa=gqa)


def supports(q_BHTd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSe: torch.Tensor, mask_B1TS: torch.Tensor) -> bool:
    """Whether decode_attention takes these: one new token per row, H a multiple of G, head sizes up to
    MAX_HEAD, a boolean or floating (additive) mask, unit stride along each head's row."""
    B, H, T, d = q_BHTd.shape
    G, e = k_BGSd.shape[1], v_BGSe.shape[-1]
    return (T == 1 and H % G == 0 and d <= MAX_HEAD and e <= MAX_HEAD
            and (mask_B1TS.dtype == torch.bool or mask_B1TS.dtype.is_floating_point)
            and q_BHTd.dtype == k_BGSd.dtype == v_BGSe.dtype
            and all(t.stride(-1) == 1 for t in (q_BHTd, k_BGSd, v_BGSe)))


def decode_attention(q_BH1d: torch.Tensor, k_BGSd: torch.Tensor, v_BGSe: torch.Tensor, mask_B11S: torch.Tensor,
                     scale: float, chunk: int = CHUNK) -> torch.Tensor:
    """out [B, H, 1, e] (see the module docstring). q [B, H, 1, d]; k [B, G, S, d] and v [B, G, S, e] may be
    views of a larger cache (any strides, rows of unit stride); mask [B, 1, 1, S] bool, True = may attend,
    or floating, added to the scores, -inf = masked (the model's additive mask on CUDA); broadcast dims
    of stride 0 are fine. A row with every slot masked gives zeros. ``chunk`` (a
    multiple of BLOCK_S) is for the tests; every caller should keep the default."""
    if not supports(q_BH1d, k_BGSd, v_BGSe, mask_B11S):
        raise ValueError(f"decode_attention takes one token per row, H a multiple of G, heads <= {MAX_HEAD}, "
                         f"one dtype and a bool or float mask: got q {tuple(q_BH1d.shape)} {q_BH1d.dtype}, k "
                         f"{tuple(k_BGSd.shape)} {k_BGSd.dtype}, v {tuple(v_BGSe.shape)}, mask {mask_B11S.dtype}")
    B, H, _, d = q_BH1d.shape
    G, S, e = k_BGSd.shape[1], k_BGSd.shape[2], v_BGSe.shape[-1]
    if chunk % BLOCK_S:
        raise ValueError(f"chunk ({chunk}) must be a multiple of {BLOCK_S}")
    mask = mask_B11S.expand(B, 1, 1, S)
    if mask.stride(-1) not in (0, 1):
        mask = mask.contiguous()
    additive = mask.dtype != torch.bool
    if not additive:
        mask = mask.view(torch.uint8) if mask.stride(-1) == 1 else mask.to(torch.uint8)
    out = torch.empty(B, H, 1, e, dtype=q_BH1d.dtype, device=q_BH1d.device)
    if B == 0 or S == 0:
        return out.zero_()
    R = H // G
    n_chunks = triton.cdiv(S, chunk)
    BLOCK_E = max(16, next_pow2(e))
    fp32 = q_BH1d.dtype == torch.float32
    meta = dict(CHUNK=chunk, BLOCK_S=BLOCK_S, BLOCK_R=max(16, next_pow2(R)), BLOCK_D=max(16, next_pow2(d)),
                BLOCK_E=BLOCK_E, CAST_F32=_INTERPRETED and not fp32, PREC="ieee" if fp32 else "tf32", **LAUNCH)
    single = n_chunks == 1
    if single:
        part = ml = out  # not written
    else:
        part = torch.empty(B * H * n_chunks, BLOCK_E, dtype=torch.float32, device=q_BH1d.device)
        ml = torch.empty(B * H * n_chunks, 2, dtype=torch.float32, device=q_BH1d.device)
    _chunk[(B * G, n_chunks)](
        q_BH1d, k_BGSd, v_BGSe, mask, out, part, ml, G, R, S, d, e, float(scale), n_chunks,
        q_BH1d.stride(0), q_BH1d.stride(1), *k_BGSd.stride()[:3], *v_BGSe.stride()[:3],
        mask.stride(0), mask.stride(3), out.stride(0), out.stride(1), SINGLE=single, ADDITIVE=additive, **meta)
    if not single:
        _merge[(B * H,)](part, ml, out, H, e, n_chunks, out.stride(0), out.stride(1), BLOCK_E=BLOCK_E, num_warps=1)
    return out
