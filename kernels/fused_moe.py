"""Fused MoE expert computation on Triton: the ``"triton"`` backend of ``kernels.get_backend``.

    router ─► topk_ids_TK, topk_weights_TK
       │
       ▼
    align_tokens        pairs sorted by expert, padded to BLOCK_M, block → expert      (align.py)
       ▼
    moe_up              h_SI = silu(x[tok] Wg[e]ᵀ) · (x[tok] Wu[e]ᵀ), x gathered unsorted (grouped_gemm.py)
       ▼
    moe_gemm (down)     out_PD[pair] = w[pair] · h_SI Wd[e]ᵀ, scattered to pair order
       ▼
    moe_sum             y_TD = Σ_k out_PD[t·K + k] over real slots                       (no atomics)

Shape legend: T = tokens, D = hidden, I = expert ffn size, J = 2I, E = experts, K = experts per
token, P = T·K pairs, S = padded sorted rows.

One-token inference calls whose config has a ``fused`` entry (the tuned H200 files, and the default
for one token) run instead ``fused_decode.moe_decode1``: up and down projections in one grid, the
down projection split over the ffn dimension into partial rows, then a fixed-order sum (two
launches instead of three, no [K, I] intermediate in memory, bitwise repeatable).

Nothing on the forward path reads a device value on the host, so a decode step can be captured in
a CUDA graph. The launch configuration is picked by token count (tuned files, else a heuristic):
few tokens get the decode tiles (narrow N, so the whole GPU streams the weights), and from 2 to 64
tokens the three forward kernels are chained by programmatic dependent launch (Hopper+).

The backward pass (``torch.autograd.Function``) reuses the same layout and kernels:
    dh_SI   = dy[tok] Wd[e]                         moe_swiglu_bwd (moe_gemm, w2 read transposed through
    dw[p]   = Σ_i dh · act,   da = w · dh            strides), whose epilogue also computes d(weight)
    dgu_SJ  = SwiGLU backward of da                  and dgu: no [S, I] fp32 intermediates
    dx_TD   = Σ_k (dgu Wgu[e])[t·K + k]              moe_gemm + moe_sum
    dW2[e]  = Σ_rows (w · dy[tok])ᵀ act              moe_wgrad_kmajor over transposed copies
    dW13[e] = Σ_rows dguᵀ x[tok]                     (sorted_rows_t: one tiled transposing pass each)
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings

import torch
from triton.runtime.errors import OutOfResources

from .align import AlignedRouting, align_tokens
from .fused_decode import moe_decode1
from .grouped_gemm import moe_gemm, moe_sum, moe_swiglu_bwd, moe_up, pdl_ok, tma_ok
from .wgrad import moe_wgrad, moe_wgrad_kmajor, sorted_rows_t, wgrad_tile
from .launch_config import MoEConfig, pick_config
from .reference import check_moe_inputs

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FUSED_TOO_BIG: set = set()  # (device, FusedDecodeConfig) whose tiles a GPU refused


def _fused_tiles(cfg, element_size: int):
    """The one-token tiles for the input's element size. The configs are tuned for 2-byte weights; in float32 the up
    projection's pipelined tiles take twice the shared memory (the default (64, 256, 256, 8, 3) asked 288 KB of the
    H200's 227 in s31-a, and the call fell back to three kernels), so 4-byte inputs step half as far along D."""
    return cfg if element_size <= 2 else dataclasses.replace(cfg, block_d=max(16, cfg.block_d // 2))
# Programmatic dependent launch for 2..64 tokens: 1-2% faster on the H200 at 8 and 64 tokens for every
# shape; at one token it was slower for Qwen3-30B-A3B (+1 us) and Mixtral (+11 us: the down GEMM's
# early programs take slots the up GEMM's second wave needs), so one token launches plainly.
PDL_MIN_TOKENS, PDL_MAX_TOKENS = 2, 64


@functools.lru_cache(maxsize=16)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def config_for(x_TD: torch.Tensor, w13_EJD: torch.Tensor, top_k: int) -> MoEConfig:
    E, J, D = w13_EJD.shape
    name = _device_name(x_TD.device.index or 0) if x_TD.is_cuda else None
    return pick_config(x_TD.shape[0], top_k, E, J // 2, D, name)


def _check_device(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK) -> None:
    if x_TD.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton backend supports {SUPPORTED_DTYPES}, got x of dtype {x_TD.dtype}; "
                         f"use backend='torch' for other dtypes")
    if w13_EJD.dtype != x_TD.dtype or w2_EDI.dtype != x_TD.dtype:
        raise ValueError(f"x ({x_TD.dtype}), w13 ({w13_EJD.dtype}) and w2 ({w2_EDI.dtype}) must share one dtype")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64, torch.int16):
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids_TK.dtype}")
    devs = {t.device for t in (x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK)}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devs))}")
    if not x_TD.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for the slow CPU "
                         "interpreter); use backend='torch' on the CPU")


def _forward(x_TD, w13_EJD, w2_EDI, topk_ids_TK, w_P, cfg: MoEConfig, save: bool):
    E, J, D = w13_EJD.shape
    al = align_tokens(topk_ids_TK, E, cfg.block_m, allow_pair_blocks=not save)
    # decode-sized calls chain up -> down -> sum by programmatic dependent launch: each kernel's
    # programs are resident and waiting when its predecessor drains (three launches' ramps overlap)
    pdl = PDL_MIN_TOKENS <= x_TD.shape[0] <= PDL_MAX_TOKENS and pdl_ok(x_TD)
    h_SI, gu_SJ = moe_up(x_TD, w13_EJD, al, cfg.up, save_preact=save, pdl=pdl)
    out_PD = moe_gemm(h_SI, w2_EDI, (w2_EDI.stride(0), w2_EDI.stride(1), w2_EDI.stride(2)), D, J // 2, al,
                      cfg.down, a_gather=False, c_scatter=True, weight_P=w_P, pdl=pdl)
    y_TD = moe_sum(out_PD, topk_ids_TK, E, x_TD.dtype, pdl=pdl)
    return y_TD, al, h_SI, gu_SJ


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK, cfg: MoEConfig):
        w_P = topk_weights_TK.reshape(-1).contiguous()
        y_TD, al, h_SI, gu_SJ = _forward(x_TD, w13_EJD, w2_EDI, topk_ids_TK, w_P, cfg, save=True)
        ctx.save_for_backward(x_TD, w13_EJD, w2_EDI, topk_ids_TK, w_P, h_SI, gu_SJ)
        ctx.al, ctx.cfg, ctx.w_dtype = al, cfg, topk_weights_TK.dtype
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w13_EJD, w2_EDI, topk_ids_TK, w_P, h_SI, gu_SJ = ctx.saved_tensors
        al: AlignedRouting = ctx.al
        cfg: MoEConfig = ctx.cfg
        need_x, need_w13, need_w2, _, need_w, _ = ctx.needs_input_grad
        E, J, D = w13_EJD.shape
        I = J // 2
        T, K = topk_ids_TK.shape
        P = al.num_pairs
        dy_TD = dy_TD.to(x_TD.dtype).contiguous()
        # dh = dy[tok] @ W2[e], with the SwiGLU backward and d(routing weight) in its epilogue
        bwd_up, bwd_down = cfg.backward
        dgu_SJ, dw_S = moe_swiglu_bwd(dy_TD, w2_EDI, gu_SJ, w_P, al, bwd_up)
        grads = [None] * 6
        if need_w:
            # padding rows hold pair = P: they land in the extra slot, which is dropped
            dw_pad = torch.zeros(P + 1, dtype=torch.float32, device=dy_TD.device)
            dw_pad.scatter_(0, al.sorted_pair_S.long(), dw_S)
            grads[4] = dw_pad[:P].view(T, K).to(ctx.w_dtype)
        if need_x:
            # dx = dgu @ W13[e]: B[e][n=d, k=j] = w13[e, j, d]
            dx_PD = moe_gemm(dgu_SJ, w13_EJD, (w13_EJD.stride(0), w13_EJD.stride(2), w13_EJD.stride(1)), D, J,
                             al, bwd_down, a_gather=False, c_scatter=True)
            grads[0] = moe_sum(dx_PD, topk_ids_TK, E, x_TD.dtype)
        grads[1], grads[2] = _weight_grads(x_TD, dy_TD, h_SI, dgu_SJ, w_P, al, E, need_w13, need_w2)
        return tuple(grads)


# Where the transposed-operand weight-gradient path pays (fwd+bwd on the H200, session 4, BENCHMARKS 1):
# from 256 rows per expert, or at any row count for big expert matrices (Mixtral: from 4 rows). Below,
# gathering rows in place wins by up to 0.5 ms (the transposes and short TMA row loops do not pay).
KMAJOR_MIN_ROWS = 256
KMAJOR_MIN_ELEMS = 1 << 24   # ffn x hidden of one expert matrix


def _weight_grads(x_TD, dy_TD, h_SI, dgu_SJ, w_P, al: AlignedRouting, E: int, need_w13: bool, need_w2: bool):
    """(dW13, dW2). Where TMA can load them (Hopper or newer) and it pays (see KMAJOR_MIN_*), the
    operands are first transposed so that each expert's rows, the reduction, are contiguous: one tiled
    pass each, then the matrix units stream both operands by TMA (on the H200 the weight-gradient
    kernels alone run 2-3x faster than gathering rows through pointers). Elsewhere the rows are
    gathered in place (moe_wgrad)."""
    I, D = h_SI.shape[1], x_TD.shape[1]
    big = al.num_pairs / E >= KMAJOR_MIN_ROWS or I * D >= KMAJOR_MIN_ELEMS
    if not (big and tma_ok(h_SI)):
        return (moe_wgrad(dgu_SJ, x_TD, E, al, a_gather=False, b_gather=True) if need_w13 else None,
                moe_wgrad(dy_TD, h_SI, E, al, a_gather=True, b_gather=False, a_scale_P=w_P) if need_w2 else None)
    tile = wgrad_tile(al.num_pairs / E, al.block_m)
    dw13 = dw2 = None
    if need_w2:
        dw2 = moe_wgrad_kmajor(sorted_rows_t(dy_TD, al, w_P), sorted_rows_t(h_SI, al, gather=False), E, al,
                               tile=tile, tma=True)
    if need_w13:
        dw13 = moe_wgrad_kmajor(sorted_rows_t(dgu_SJ, al, gather=False), sorted_rows_t(x_TD, al), E, al,
                                tile=tile, tma=True)
    return dw13, dw2


def fused_moe(x_TD: torch.Tensor, w13_EJD: torch.Tensor, w2_EDI: torch.Tensor, topk_ids_TK: torch.Tensor,
              topk_weights_TK: torch.Tensor, config: MoEConfig | None = None) -> torch.Tensor:
    """y_TD = Σ_k w[t,k] · SwiGLU expert ids[t,k] (x_t); ids of -1 (or outside [0, E)) contribute zero.

    Same function as ``kernels.moe_experts_reference``; differentiable in x, w13, w2 and the weights.
    """
    check_moe_inputs(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK)
    _check_device(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK)
    T, K = topk_ids_TK.shape
    if T == 0 or K == 0:
        return torch.zeros_like(x_TD)
    if x_TD.stride(-1) != 1:
        x_TD = x_TD.contiguous()
    if w13_EJD.stride(-1) != 1 or w2_EDI.stride(-1) != 1:
        raise ValueError("w13 and w2 must be contiguous in their last dimension; call .contiguous() on them")
    cfg = config or config_for(x_TD, w13_EJD, K)
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, w13_EJD, w2_EDI, topk_weights_TK))
    if needs_grad:
        return _FusedMoE.apply(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK, cfg)
    fused = _fused_tiles(cfg.fused, x_TD.element_size()) if T == 1 and cfg.fused is not None else None
    if fused is not None and not (_FUSED_TOO_BIG and (x_TD.device, fused) in _FUSED_TOO_BIG):
        try:  # two launches instead of three (fused_decode.py)
            return moe_decode1(x_TD, w13_EJD, w2_EDI, topk_ids_TK, topk_weights_TK, fused)
        except OutOfResources as exc:
            # the tiles were tuned on the H200 (228 KB of shared memory per SM); a GPU with less
            # refuses them at compile time, before anything runs: use the three kernels from now on
            _FUSED_TOO_BIG.add((x_TD.device, fused))
            warnings.warn(f"one-token fused MoE tiles {fused} do not fit this GPU ({exc}); using the "
                          f"three-kernel path for one-token calls", RuntimeWarning, stacklevel=2)
    w_P = topk_weights_TK.reshape(-1)
    if not w_P.is_contiguous():
        w_P = w_P.contiguous()
    return _forward(x_TD, w13_EJD, w2_EDI, topk_ids_TK, w_P, cfg, save=False)[0]
