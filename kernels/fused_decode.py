"""One-token MoE forward in two chained launches: the decode step of one sequence.

At one token the expert math is pure weight streaming (K experts' w13 and w2 rows, each read
once). The three-kernel path (up GEMM -> down GEMM -> top-k sum) pays three launch ramps and
drains, ~10 us on the H200 against 18-24 us of streaming for the fine-grained shapes (Qwen3-30B-A3B,
OLMoE). Here the up and down projections share one grid:

    program (k, c):  e = ids[k];  i in chunk c of the ffn dimension (BLOCK_I rows)
        g, u   = w13[e, i, :] . x,  w13[e, I + i, :] . x          (over D, fp32 accumulation)
        h      = silu(g) * u                                      (BLOCK_I values, on chip)
        part[k * C + c, :] = weight[k] * w2[e, :, i] . h          (fp32: a split-K over I)
    then a small kernel sums the K * C partial rows of each column in a fixed order and writes y
    (chained by programmatic dependent launch where the GPU has it: its programs are waiting when
    the first kernel drains).

The [K, I] intermediate never leaves the SM; nothing reads a device value on the host (CUDA graph
capturable); the result is bitwise the same from run to run (a first version summed the partial
rows with fp32 atomics: 0.5-1 us faster, but its run-to-run rounding differences, amplified over 32
layers of a random-weight Mixtral, made eager and graph-replayed decode part after 4 steps).
Shape legend as in fused_moe.py; C = cdiv(I, BLOCK_I).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .grouped_gemm import _interpreted, _pdl, _precision, gdc_launch_dependents, gdc_wait, pdl_ok
from .launch import Launcher
from .launch_config import FusedDecodeConfig, cdiv, next_pow2


@triton.jit
def _moe_decode1_kernel(x_ptr, w13_ptr, w2_ptr, ids_ptr, wt_ptr, part_ptr,
                        D, I, E, stride_we, stride_wj, stride_2e, stride_2d,
                        CAST_F32: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    if PDL:  # the sum kernel's programs may launch now; they wait for this whole grid
        gdc_launch_dependents()
    # matrix-unit tiles of 16 rows of which row 0 is the token (the others read as zero): the
    # loads pipeline as in the grouped GEMMs, which a plain GEMV formulation did not (1.4-1.6x slower)
    pid = tl.program_id(0)
    num_c = tl.cdiv(I, BLOCK_I)
    k = pid // num_c
    c = pid % num_c
    e = tl.load(ids_ptr + k).to(tl.int64)
    if (e >= 0) & (e < E):  # -1 (dropped / another rank's) and out-of-range ids: no partial row
        rows = tl.arange(0, 16)
        row0 = rows == 0
        offs_i = c * BLOCK_I + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        offs_d = tl.arange(0, BLOCK_D)
        a_ptrs = x_ptr + rows[:, None] * 0 + offs_d[None, :]
        g_ptrs = w13_ptr + e * stride_we + offs_i.to(tl.int64)[None, :] * stride_wj + offs_d[:, None]
        u_ptrs = g_ptrs + I * stride_wj
        acc_g = tl.zeros((16, BLOCK_I), dtype=tl.float32)
        acc_u = tl.zeros((16, BLOCK_I), dtype=tl.float32)
        for d0 in range(0, tl.cdiv(D, BLOCK_D)):
            mask_d = offs_d < D - d0 * BLOCK_D
            a = tl.load(a_ptrs, mask=row0[:, None] & mask_d[None, :], other=0.0)
            gt = tl.load(g_ptrs, mask=mask_d[:, None] & mask_i[None, :], other=0.0)
            ut = tl.load(u_ptrs, mask=mask_d[:, None] & mask_i[None, :], other=0.0)
            if CAST_F32:
                a, gt, ut = a.to(tl.float32), gt.to(tl.float32), ut.to(tl.float32)
            acc_g = tl.dot(a, gt, acc_g, input_precision=PREC)
            acc_u = tl.dot(a, ut, acc_u, input_precision=PREC)
            a_ptrs += BLOCK_D
            g_ptrs += BLOCK_D
            u_ptrs += BLOCK_D
        # h rounded to the input dtype, as the three-kernel path stores it; the routing weight is
        # applied to the down output in fp32, as there
        h = (acc_g * tl.sigmoid(acc_g) * acc_u).to(x_ptr.dtype.element_ty)
        wk = tl.load(wt_ptr + k).to(tl.float32)
        offs_d2 = tl.arange(0, BLOCK_D2)
        b_ptrs = w2_ptr + e * stride_2e + offs_d2.to(tl.int64)[None, :] * stride_2d + offs_i[:, None]
        p_ptrs = part_ptr + pid.to(tl.int64) * D + offs_d2
        for d0 in range(0, tl.cdiv(D, BLOCK_D2)):
            mask_d2 = offs_d2 < D - d0 * BLOCK_D2
            b = tl.load(b_ptrs, mask=mask_i[:, None] & mask_d2[None, :], other=0.0)
            hh = h
            if CAST_F32:
                hh, b = h.to(tl.float32), b.to(tl.float32)
            # row 0 of the tile is the token's partial output
            out = tl.sum(tl.where(row0[:, None], tl.dot(hh, b, input_precision=PREC), 0.0), axis=0) * wk
            tl.store(p_ptrs, out, mask=mask_d2)
            b_ptrs += BLOCK_D2 * stride_2d
            p_ptrs += BLOCK_D2


_moe_decode1 = Launcher(_moe_decode1_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit
def _moe_decode1_sum_kernel(part_ptr, ids_ptr, y_ptr, D, E, NROWS, NUM_C,
                            PDL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """y[cols] = sum of the partial rows of real experts, chunk by chunk of BLOCK_R rows: a fixed order."""
    if PDL:  # launched early: wait for every partial row
        gdc_wait()
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < D
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for r0 in range(0, NROWS, BLOCK_R):
        r = r0 + offs_r
        e = tl.load(ids_ptr + r // NUM_C, mask=r < NROWS, other=-1)
        real = (e >= 0) & (e < E)  # rows of dropped slots were never written
        v = tl.load(part_ptr + r.to(tl.int64)[:, None] * D + offs_s[None, :], mask=real[:, None] & mask_s[None, :],
                    other=0.0)
        acc += tl.sum(v, axis=0)
    tl.store(y_ptr + offs_s, acc.to(y_ptr.dtype.element_ty), mask=mask_s)


_moe_decode1_sum = Launcher(_moe_decode1_sum_kernel)  # launched without per-call binding (kernels/launch.py)


@functools.lru_cache(maxsize=256)
def _plan(device: torch.device, dtype: torch.dtype, I: int, K: int, D: int, cfg: FusedDecodeConfig,
          interpreted: bool) -> tuple:
    """Everything about the two launches that depends only on shapes and config, computed once.
    A one-token call is host-bound on a slow host (Python glue measured at ~80 us a call on the H200
    machine's CPU before this cache, against ~25 us of GPU work), so the per-call path keeps to
    the launches."""
    num_c = cdiv(I, cfg.block_i)
    rows = K * num_c
    pdl = not interpreted and pdl_ok(torch.empty(0, device=device))
    # the sum: BLOCK_R x BLOCK_S = 8192 values a program (one round of loads for most shapes)
    block_r = min(256, next_pow2(rows))
    block_s = 16 if interpreted else max(16, min(256, 8192 // block_r))
    up = dict(CAST_F32=interpreted, PREC=_precision(dtype), PDL=pdl,
              BLOCK_I=cfg.block_i, BLOCK_D=cfg.block_d, BLOCK_D2=cfg.block_d2,
              num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_pdl(pdl))
    down = dict(PDL=pdl, BLOCK_R=block_r, BLOCK_S=block_s, num_warps=1 if interpreted else 8, **_pdl(pdl))
    return num_c, rows, (rows,), (cdiv(D, block_s),), up, down


def moe_decode1(x_1D: torch.Tensor, w13_EJD: torch.Tensor, w2_EDI: torch.Tensor, topk_ids_1K: torch.Tensor,
                topk_weights_1K: torch.Tensor, cfg: FusedDecodeConfig) -> torch.Tensor:
    """y_1D of one token (no autograd; see the module docstring)."""
    E, J, D = w13_EJD.shape
    I = J // 2
    K = topk_ids_1K.shape[1]
    if x_1D.shape[0] != 1:
        raise ValueError(f"moe_decode1 takes one token, got {x_1D.shape[0]}")
    s13, s2 = w13_EJD.stride(), w2_EDI.stride()
    if s13[2] != 1 or s2[2] != 1:
        raise ValueError("w13 and w2 must be contiguous in their last dimension")
    x = x_1D.view(-1) if x_1D.is_contiguous() else x_1D.reshape(-1).contiguous()
    ids = topk_ids_1K.view(-1) if topk_ids_1K.is_contiguous() else topk_ids_1K.reshape(-1).contiguous()
    wts = topk_weights_1K.view(-1) if topk_weights_1K.is_contiguous() else topk_weights_1K.reshape(-1).contiguous()
    dev = x_1D.device
    num_c, rows, grid1, grid2, up, down = _plan(dev, x_1D.dtype, I, K, D, cfg, _interpreted())
    part = torch.empty(rows, D, dtype=torch.float32, device=dev)
    y = torch.empty(1, D, dtype=x_1D.dtype, device=dev)
    _moe_decode1[grid1](x, w13_EJD, w2_EDI, ids, wts, part, D, I, E, s13[0], s13[1], s2[0], s2[1], **up)
    _moe_decode1_sum[grid2](part, ids, y, D, E, rows, num_c, **down)
    return y
