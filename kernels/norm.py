"""RMSNorm in one Triton kernel, for inference on CUDA tensors (the model's norms at decode).

    y = weight * cast(x * rsqrt(mean(x^2) + eps))      normalised in float32, cast back to x's dtype
                                                       before the weight, as the Hugging Face models do

``rms_norm_reference`` is the same in torch ops (F.rms_norm, a cast, a multiply: four kernels on a
bfloat16 input). A decode step of Qwen3-30B-A3B shapes runs four norms a layer (input,
post-attention, q and k per head), so the three kernels saved per norm are ~12 launches a layer,
each a few microseconds of a CUDA-graph replay. No backward: the model uses it only when no
gradient is asked for. One program per row of the last dimension (up to 16384 wide).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import Launcher
from .launch_config import next_pow2

MAX_WIDTH = 16384


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    xn = (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)  # the cast back before the weight
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)


_rms_norm = Launcher(_rms_norm_kernel)  # launched without per-call binding (kernels/launch.py)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _launch(N: int) -> dict:
    block = next_pow2(N)
    return dict(BLOCK=block, num_warps=max(1, min(8, block // 256)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * rms-normalised x over the last dimension (see the module docstring)."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"weight must be [{N}] (the last dimension of x), got {tuple(weight.shape)}")
    if N > MAX_WIDTH:
        return rms_norm_reference(x, weight, eps)
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm[(x2.shape[0],)](x2, weight, y, N, x2.stride(0), y.stride(0), eps, **_launch(N))
    return y.view(*x.shape[:-1], N)
