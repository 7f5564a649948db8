"""Several projections of the same few rows in one Triton launch: the q, k and v projections of a
decode step (grouped-query attention) at inference on CUDA.

    y_i = x @ w_i^T      for each weight w_i [N_i, K] (nn.Linear's layout), x [M, K], M <= MAX_ROWS

At a decode step each projection is a GEMV, latency-bound: on the H200, cuBLAS took 5-9 us for each
of Qwen3-30B-A3B's k and v projections (2 MB each; a split-K GEMV and its reduction) and ~5.4 us
for q (16 MB). Here the programs of all the projections form one grid (program p takes BLOCK_N
output columns of one projection), so the weights stream together: one launch and one ramp.
The tile is BLOCK_M = 16 rows of x (the rows past M read as zero) so the loads pipeline through the
matrix unit, as in kernels/fused_decode.py. ``multi_linear_reference`` is F.linear per weight.
No backward (inference only).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .grouped_gemm import _interpreted, _precision
from .launch import Launcher
from .launch_config import cdiv, next_pow2

MAX_ROWS = 16
MAX_WEIGHTS = 3


@triton.jit
def _multi_gemv_kernel(x_ptr, w0_ptr, w1_ptr, w2_ptr, y0_ptr, y1_ptr, y2_ptr, M, K, N0, N1, N2, P0, P1,
                       stride_xm, stride_w0, stride_w1, stride_w2, stride_y0, stride_y1, stride_y2,
                       CAST_F32: tl.constexpr, PREC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    # which projection and which of its column blocks (P0, P1: programs of the first two)
    if pid < P0:
        w_ptr, y_ptr, N, sw, sy, n0 = w0_ptr, y0_ptr, N0, stride_w0, stride_y0, pid * BLOCK_N
    elif pid < P0 + P1:
        w_ptr, y_ptr, N, sw, sy, n0 = w1_ptr, y1_ptr, N1, stride_w1, stride_y1, (pid - P0) * BLOCK_N
    else:
        w_ptr, y_ptr, N, sw, sy, n0 = w2_ptr, y2_ptr, N2, stride_w2, stride_y2, (pid - P0 - P1) * BLOCK_N
    rows = tl.arange(0, 16)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = rows < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * sw + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: w^T
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if CAST_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + rows[:, None] * sy + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_multi_gemv = Launcher(_multi_gemv_kernel)  # launched without per-call binding (kernels/launch.py)


def multi_linear_reference(x_MK: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [F.linear(x_MK, w) for w in weights]


@functools.lru_cache(maxsize=64)
def _launch(K: int, dtype: torch.dtype, interpreted: bool) -> dict:
    # the best of 17 tiles on the H200 at Qwen3-30B-A3B and Mixtral shapes, 1-16 rows (BENCHMARKS 9,
    # session 7): 32 output columns a program, K in steps of 256, 2 warps, 4 stages
    return dict(CAST_F32=interpreted, PREC=_precision(dtype),
                BLOCK_N=32, BLOCK_K=min(256, max(16, next_pow2(K))) if interpreted else 256,
                num_warps=2, num_stages=1 if interpreted else 4)


def multi_linear(x_MK: torch.Tensor, weights: list[torch.Tensor], block_n: int | None = None,
                 block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None
                 ) -> list[torch.Tensor]:
    """[x @ w^T for w in weights] for x [M, K] with M <= MAX_ROWS (1 to 3 weights [N_i, K]); other
    shapes fall back to F.linear. The keyword arguments override the launch (for tuning)."""
    M, K = x_MK.shape
    if not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"1 to {MAX_WEIGHTS} weights, got {len(weights)}")
    for w in weights:
        if w.dim() != 2 or w.shape[1] != K or w.dtype != x_MK.dtype:
            raise ValueError(f"each weight must be [N, {K}] of {x_MK.dtype}, got {tuple(w.shape)} {w.dtype}")
    if M > MAX_ROWS or M == 0:
        return multi_linear_reference(x_MK, weights)
    x = x_MK if x_MK.stride(-1) == 1 else x_MK.contiguous()
    ws = [w if w.stride(-1) == 1 else w.contiguous() for w in weights]
    ys = [torch.empty(M, w.shape[0], dtype=x.dtype, device=x.device) for w in ws]
    cfg = dict(_launch(K, x.dtype, _interpreted()))
    for key, v in (("BLOCK_N", block_n), ("BLOCK_K", block_k), ("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None:
            cfg[key] = v
    ws3, ys3 = ws + [ws[-1]] * (3 - len(ws)), ys + [ys[-1]] * (3 - len(ys))
    P = [cdiv(w.shape[0], cfg["BLOCK_N"]) for w in ws] + [0] * (3 - len(ws))
    _multi_gemv[(sum(P),)](x, *ws3, *ys3, M, K, *(w.shape[0] for w in ws3), P[0], P[1],
                           x.stride(0), *(w.stride(0) for w in ws3), *(y.stride(0) for y in ys3), **cfg)
    return ys
