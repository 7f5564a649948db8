"""The new tokens' queries, keys and values made ready for attention in one Triton kernel: per-head
RMSNorm of q and k (Qwen3-MoE; or none), the half-split rotary embedding, and the keys and values
written into the KV cache at their slots. For inference on CUDA tensors (the grouped-query attention
of Mixtral, Qwen2/3-MoE at decode and prefill).

    q_BHTd = rope(norm_q(q))                           returned, [B, H, T, d]
    k_cache[b, g, slot[b, t]] = rope(norm_k(k))        written in place
    v_cache[b, g, slot[b, t]] = v

``prepare_qkv_reference`` is the same in torch ops as the model runs them elsewhere: the norm as
kernels.norm computes it, then ``x * [cos, cos] + [x2, x1] * [-sin, sin]`` with each product and
the sum rounded to the activation dtype (as torch's elementwise ops round them), then the cache's
scatter. There that is ~12 kernels a layer (two norms, a cat and three elementwise ops per rotation,
two scatters); at decode of Qwen3-30B-A3B shapes they were ~20 us of a ~115 us layer step. Here one
program per (token, head) does its row: query heads write the output, key/value heads write the
cache. No backward (inference only). Shape legend: B batch rows, T new tokens, H query heads,
G key/value heads, d head size, S cache slots.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import Launcher
from .launch_config import next_pow2


@triton.jit
def _rope_half(x1, x2, c, s, DT: tl.constexpr):
    """The rotation of the two halves, each product and the sum rounded to DT as torch rounds them."""
    a1 = (x1 * c).to(DT).to(tl.float32)
    b1 = (x2 * -s).to(DT).to(tl.float32)
    a2 = (x2 * c).to(DT).to(tl.float32)
    b2 = (x1 * s).to(DT).to(tl.float32)
    return (a1 + b1).to(DT), (a2 + b2).to(DT)


@triton.jit
def _norm_halves(x1, x2, w_ptr, offs, mask, d, eps, DT: tl.constexpr):
    """kernels.norm's RMSNorm of the row [x1, x2] (normalised in float32, cast, times the weight)."""
    r = 1.0 / tl.sqrt_rn((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / d + eps)
    w1 = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + d // 2 + offs, mask=mask, other=0.0).to(tl.float32)
    y1 = (w1 * (x1 * r).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    y2 = (w2 * (x2 * r).to(DT).to(tl.float32)).to(DT).to(tl.float32)
    return y1, y2


@triton.jit
def _head(row, w_ptr, offs, mask, d, eps, c, s, NORM: tl.constexpr, DT: tl.constexpr):
    """One head's row of q or k: normalised (NORM) and rotated, as its two halves."""
    x1 = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + d // 2 + offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = _norm_halves(x1, x2, w_ptr, offs, mask, d, eps, DT)
    return _rope_half(x1, x2, c, s, DT)


# T: the step's tokens (a packed step's N), not specialised (Triton would compile a variant each for T = 1 and for T a
# multiple of 16, which a serving replica's first steps met after its warm-up, s33-b)
@triton.jit(do_not_specialize=["T"])
def _prep_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr, row_ptr,
                 T, H, G, d, eps, s_qt, s_kt, s_vt, s_ct, s_kcb, s_kcg, s_kcs, s_vcb, s_vcg, s_vcs,
                 NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)  # token (b, t) = (bt // T, bt % T)
    h = tl.program_id(1)
    DT = qo_ptr.dtype.element_ty
    half = d // 2
    offs = tl.arange(0, BLOCK)
    mask = offs < half
    c = tl.load(cos_ptr + bt * s_ct + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + bt * s_ct + offs, mask=mask, other=0.0).to(tl.float32)
    b = bt // T
    t = bt % T
    if h < H:
        o1, o2 = _head(q_ptr + bt * s_qt + h * d, qw_ptr, offs, mask, d, eps, c, s, NORM, DT)
        out = qo_ptr + ((b * H + h) * T + t) * d
        tl.store(out + offs, o1, mask=mask)
        tl.store(out + half + offs, o2, mask=mask)
    else:
        g = h - H
        slot = tl.load(slot_ptr + bt).to(tl.int64)
        if ROWS:  # a packed step: each token's own cache row
            b = tl.load(row_ptr + bt).to(tl.int64)
        o1, o2 = _head(k_ptr + bt * s_kt + g * d, kw_ptr, offs, mask, d, eps, c, s, NORM, DT)
        kc = kc_ptr + b * s_kcb + g * s_kcg + slot * s_kcs
        tl.store(kc + offs, o1.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(kc + half + offs, o2.to(kc_ptr.dtype.element_ty), mask=mask)
        vrow = v_ptr + bt * s_vt + g * d
        vc = vc_ptr + b * s_vcb + g * s_vcg + slot * s_vcs
        v1 = tl.load(vrow + offs, mask=mask, other=0.0)
        v2 = tl.load(vrow + half + offs, mask=mask, other=0.0)
        tl.store(vc + offs, v1.to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc + half + offs, v2.to(vc_ptr.dtype.element_ty), mask=mask)


_prep = Launcher(_prep_kernel)  # launched without per-call binding (kernels/launch.py)


def _rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cat([cos, cos], dim=-1) + swapped * torch.cat([-sin, sin], dim=-1)


def prepare_qkv_reference(q_BTX, k_BTY, v_BTY, cos_BTr, sin_BTr, q_weight, k_weight, eps, k_cache, v_cache,
                          slot_BT, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """The same in torch ops (see the module docstring); writes the cache, returns q [B, H, T, d]."""
    from .norm import rms_norm_reference

    B, T, _ = q_BTX.shape
    d = q_BTX.shape[-1] // num_heads
    q = q_BTX.reshape(B, T, num_heads, d)
    k = k_BTY.reshape(B, T, num_kv_heads, d)
    if q_weight is not None:
        q, k = rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps)
    cos, sin = cos_BTr[:, None], sin_BTr[:, None]
    q = _rope_reference(q.transpose(1, 2), cos, sin)
    k = _rope_reference(k.transpose(1, 2), cos, sin)
    v = v_BTY.reshape(B, T, num_kv_heads, d).transpose(1, 2)
    idx = slot_BT[:, None, :, None].expand(B, num_kv_heads, T, d)
    k_cache.scatter_(2, idx, k.to(k_cache.dtype))
    v_cache.scatter_(2, idx, v.to(v_cache.dtype))
    return q.contiguous()


@functools.lru_cache(maxsize=64)
def _launch(d: int) -> dict:
    return dict(BLOCK=next_pow2(max(d // 2, 1)), num_warps=1)


def prepare_qkv(q_BTX, k_BTY, v_BTY, cos_BTr, sin_BTr, q_weight, k_weight, eps, k_cache, v_cache, slot_BT,
                num_heads: int, num_kv_heads: int, row_BT: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, d] ready for attention; the new keys and values written into k_cache / v_cache
    [B, G, S, d] at slot_BT. q/k/v: the projections [B, T, H*d] / [B, T, G*d] (rows may be strided,
    each row contiguous); q_weight / k_weight: the per-head norm weights [d], or None for no norm.
    row_BT: each token's cache row instead of its batch row (a packed step: prepare_qkv_rows); the caches are
    then [rows, G, S, d]."""
    B, T, X = q_BTX.shape
    H, G = num_heads, num_kv_heads
    d = X // H
    if X != H * d or d % 2 or k_BTY.shape != (B, T, G * d) or v_BTY.shape != (B, T, G * d):
        raise ValueError(f"q {tuple(q_BTX.shape)}, k {tuple(k_BTY.shape)}, v {tuple(v_BTY.shape)} do not split into "
                         f"{H} query and {G} key/value heads of one even size")
    if cos_BTr.shape != (B, T, d // 2) or sin_BTr.shape != cos_BTr.shape:
        raise ValueError(f"cos/sin must be [{B}, {T}, {d // 2}], got {tuple(cos_BTr.shape)}")
    if row_BT is not None and (row_BT.shape != (B, T) or slot_BT.shape != (B, T)):
        raise ValueError(f"rows/slots must both be [{B}, {T}], got {tuple(row_BT.shape)} and {tuple(slot_BT.shape)}")
    if (q_weight is None) != (k_weight is None):
        raise ValueError("give both q and k norm weights or neither")
    rows = "rows" if row_BT is not None else B
    if (k_cache.shape[1] != G or k_cache.shape[3] != d or v_cache.shape != k_cache.shape
            or (row_BT is None and k_cache.shape[0] != B)):
        raise ValueError(f"caches must be [{rows}, {G}, S, {d}], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    ts = [t if t.stride(-1) == 1 and t.stride(0) == T * t.stride(1) else t.contiguous()
          for t in (q_BTX, k_BTY, v_BTY, cos_BTr, sin_BTr)]
    q, k, v, cos, sin = ts
    slots = slot_BT.contiguous()
    out = torch.empty(B, H, T, d, dtype=q.dtype, device=q.device)
    norm = q_weight is not None
    if B * T:
        _prep[(B * T, H + G)](
            q, k, v, cos, sin, q_weight if norm else q, k_weight if norm else q, out, k_cache, v_cache, slots,
            slots if row_BT is None else row_BT.contiguous(), T, H, G, d, eps, q.stride(1), k.stride(1), v.stride(1),
            cos.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], NORM=norm, ROWS=row_BT is not None,
            **_launch(d))
    return out


def prepare_qkv_rows(q_NX, k_NY, v_NY, cos_Nr, sin_Nr, q_weight, k_weight, eps, k_cache, v_cache, row_N, slot_N,
                     num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """prepare_qkv for a packed step's tokens (moe.kv_cache.PackedStep): token n's keys and values go to cache row
    row_N[n] at slot slot_N[n]; returns q [H, N, d]. q/k/v: [N, H*d] / [N, G*d]; cos/sin [N, d/2]; caches
    [rows, G, S, d]."""
    return prepare_qkv(q_NX[None], k_NY[None], v_NY[None], cos_Nr[None], sin_Nr[None], q_weight, k_weight, eps,
                       k_cache, v_cache, slot_N[None], num_heads, num_kv_heads, row_BT=row_N[None])[0]
