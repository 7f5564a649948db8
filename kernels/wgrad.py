"""Triton weight-gradient kernels of the grouped SwiGLU experts (the backward of ``kernels.grouped_gemm``).

Shape legend as in ``kernels.grouped_gemm``: E = experts, P = pairs, S = padded sorted rows.

    moe_wgrad     C[e] = sum over expert e's rows of A[row]^T B[row]: the weight gradients dW2, dW13,
                  rows gathered in place (small calls, and GPUs without TMA).
    moe_wgrad_kmajor  the same over transposed operands At [X, S], Bt [Y, S] (the reduction contiguous),
                  both streamed by TMA: large calls.
    sorted_rows_t makes those operands in one tiled pass (gathering token rows and applying routing
                  weights on the way).

Which path a call takes is ``kernels.fused_moe``'s choice (``KMAJOR_MIN_ROWS``, measured on the H200).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import AlignedRouting
from .grouped_gemm import _block_ids, _interpreted, _precision, tma_ok
from .launch import Launcher
from .launch_config import cdiv


@triton.jit
def _wgrad_ranges(e, pid_a, pid_b, expert_start_ptr, NA, NB, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    """Expert e's padded row range and this program's output tile (offsets and masks)."""
    start = tl.load(expert_start_ptr + e)
    end = tl.load(expert_start_ptr + e + 1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    return start, end, offs_a, offs_b, offs_a < NA, offs_b < NB


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _moe_wgrad_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, sorted_pair_ptr, expert_start_ptr,
                      NA, NB, P, stride_am, stride_bm, stride_ce, stride_ca,
                      TOP_K, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr,
                      A_SCALE: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr):
    """C[e, i, j] = sum_{rows m of expert e} A[row_a(m), i] * B[row_b(m), j] (* scale of m's pair)."""
    e = tl.program_id(1)
    pid = tl.program_id(0)
    num_b = tl.cdiv(NB, BLOCK_B)
    pid_a = pid // num_b
    pid_b = pid % num_b
    start, end, offs_a, offs_b, mask_a, mask_b = _wgrad_ranges(e, pid_a, pid_b, expert_start_ptr, NA, NB,
                                                               BLOCK_A, BLOCK_B)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ptr + offs_m, mask=offs_m < end, other=P)
        valid = pair < P
        if A_GATHER:
            ra = (pair // TOP_K).to(tl.int64)
        else:
            ra = offs_m.to(tl.int64)
        if B_GATHER:
            rb = (pair // TOP_K).to(tl.int64)
        else:
            rb = offs_m.to(tl.int64)
        a = tl.load(a_ptr + ra[None, :] * stride_am + offs_a[:, None], mask=valid[None, :] & mask_a[:, None], other=0.0)
        b = tl.load(b_ptr + rb[:, None] * stride_bm + offs_b[None, :], mask=valid[:, None] & mask_b[None, :], other=0.0)
        if A_SCALE:
            s = tl.load(a_scale_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * s[None, :]).to(b.dtype)
        if CAST_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_a.to(tl.int64)[:, None] * stride_ca + offs_b[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_a[:, None] & mask_b[None, :])


_moe_wgrad = Launcher(_moe_wgrad_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit
def _moe_wgrad_kmajor_kernel(at_ptr, bt_ptr, c_ptr, at_desc, bt_desc, expert_start_ptr, NA, NB,
                             stride_at, stride_bt, stride_ce, stride_ca,
                             DESC: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                             BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr,
                             GROUP_A: tl.constexpr):
    """C[e, i, j] = sum over expert e's padded rows m of At[i, m] * Bt[j, m].

    Both operands come transposed ([NA, S] and [NB, S], the rows contiguous), so the reduction
    dimension is the contiguous one, as in the forward GEMMs; padding columns of At and Bt are zero.
    With DESC the tiles come by TMA, which needs every expert's run to be a multiple of BLOCK_M.
    """
    e = tl.program_id(1)
    pid = tl.program_id(0)
    num_a = tl.cdiv(NA, BLOCK_A)
    num_b = tl.cdiv(NB, BLOCK_B)
    pid_a, pid_b = _block_ids(pid, num_b, num_a, GROUP_A)
    start, end, offs_a, offs_b, mask_a, mask_b = _wgrad_ranges(e, pid_a, pid_b, expert_start_ptr, NA, NB,
                                                               BLOCK_A, BLOCK_B)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        if DESC:
            a = at_desc.load([pid_a * BLOCK_A, m0])
            b = bt_desc.load([pid_b * BLOCK_B, m0]).T
        else:
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            a = tl.load(at_ptr + offs_a.to(tl.int64)[:, None] * stride_at + offs_m[None, :],
                        mask=mask_a[:, None] & mask_m[None, :], other=0.0)
            b = tl.load(bt_ptr + offs_b.to(tl.int64)[None, :] * stride_bt + offs_m[:, None],
                        mask=mask_m[:, None] & mask_b[None, :], other=0.0)
        if CAST_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_a.to(tl.int64)[:, None] * stride_ca + offs_b[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_a[:, None] & mask_b[None, :])


_moe_wgrad_kmajor = Launcher(_moe_wgrad_kmajor_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _rows_to_columns_kernel(src_ptr, dst_ptr, pair_ptr, scale_ptr, num_padded_ptr, N, P, stride_src, stride_dst, TOP_K,
                            GATHER: tl.constexpr, SCALE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst[n, m] = src[row(m), n] (* scale[pair(m)]) for the used rows m < num_padded; row(m) = m, or
    the token of sorted row m's pair (zero for padding). Read along n, written along m: the tile is
    transposed on chip."""
    if tl.program_id(0) * BLOCK_S >= tl.load(num_padded_ptr):
        return
    # BLOCK_S divides the buffer's row count (a multiple of the row block): no mask along s, so the
    # transposed stores stay vectorised (a mask against a loaded bound made them scalar: ~1 TB/s)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if GATHER:
        pair = tl.load(pair_ptr + offs_s)
        real = pair < P
        rows = tl.where(real, pair // TOP_K, 0).to(tl.int64)
    else:
        real = offs_s >= 0
        rows = offs_s.to(tl.int64)
    v = tl.load(src_ptr + rows[:, None] * stride_src + offs_n[None, :], mask=real[:, None] & mask_n[None, :], other=0.0)
    if SCALE:
        f = tl.load(scale_ptr + pair, mask=real, other=0.0).to(tl.float32)
        v = (v.to(tl.float32) * f[:, None]).to(v.dtype)
    tl.store(dst_ptr + offs_n.to(tl.int64)[:, None] * stride_dst + offs_s[None, :], tl.trans(v),
             mask=mask_n[:, None])


_rows_to_columns = Launcher(_rows_to_columns_kernel)  # launched without per-call binding (kernels/launch.py)


# ----------------------------------------------------------------------------------------------
# launchers (host side: shapes and grids only, never a device value)

def _wgrad_tile_or_default(tile, al: AlignedRouting) -> tuple[int, int, int, int, int]:
    if al.pair_blocks:
        raise ValueError("weight gradients need the sorted layout; align with allow_pair_blocks=False")
    if tile is not None:
        return tile
    return (32, 32, 16, 1, 1) if _interpreted() else (128, 128, 64, 8, 3)


def moe_wgrad(a, b, num_experts: int, al: AlignedRouting, *, a_gather: bool, b_gather: bool, a_scale_P=None,
              out_dtype=None, tile: tuple[int, int, int, int, int] | None = None):
    """C_EAB[e] = A[rows of e]^T @ B[rows of e] (rows of padding contribute zero).

    tile = (block_a, block_b, block_m, num_warps, num_stages); None = the default for the device."""
    block_a, block_b, block_m, num_warps, num_stages = _wgrad_tile_or_default(tile, al)
    na, nb = a.shape[1], b.shape[1]
    c = torch.empty(num_experts, na, nb, dtype=out_dtype or b.dtype, device=b.device)
    grid = (cdiv(na, block_a) * cdiv(nb, block_b), num_experts)
    _moe_wgrad[grid](
        a, b, c, a_scale_P if a_scale_P is not None else c, al.sorted_pair_S, al.expert_start_E1,
        na, nb, al.num_pairs, a.stride(0), b.stride(0), c.stride(0), c.stride(1),
        TOP_K=al.top_k, A_GATHER=a_gather, B_GATHER=b_gather, A_SCALE=a_scale_P is not None,
        CAST_F32=_interpreted(), PREC=_precision(b.dtype),
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages)
    return c


def wgrad_tile(rows_per_expert: float, align_block_m: int) -> tuple[int, int, int, int, int]:
    """(block_a, block_b, block_m, warps, stages) of moe_wgrad_kmajor, measured on the H200 (k2 run,
    benchmarks/NOTES-kernels.md): 256x128 tiles once experts have thousands of rows, else 128x128
    with 4 warps; the row step never exceeds the alignment's row block (TMA needs whole steps)."""
    if _interpreted():
        return 16, 16, min(16, align_block_m), 1, 1
    if rows_per_expert >= 2048:
        return 256, 128, min(64, align_block_m), 8, 3
    return 128, 128, min(64, align_block_m), 4, 3


def moe_wgrad_kmajor(at_XS, bt_YS, num_experts: int, al: AlignedRouting, *, out_dtype=None,
                     tile: tuple[int, int, int, int, int] | None = None, tma: bool = False):
    """C_EXY[e] = At[:, rows of e] @ Bt[:, rows of e]^T, operands transposed ([X, S], [Y, S], zero on
    padding columns): the weight gradients with the row (reduction) dimension contiguous.

    tile = (block_a, block_b, block_m, num_warps, num_stages); None = the default for the device.
    tma: TMA tiles when the device, the strides and the row block allow it (else pointer loads)."""
    block_a, block_b, block_m, num_warps, num_stages = _wgrad_tile_or_default(tile, al)
    X, S = at_XS.shape
    Y = bt_YS.shape[0]
    if bt_YS.shape[1] != S or at_XS.stride(1) != 1 or bt_YS.stride(1) != 1:
        raise ValueError(f"operands must be [X, S] and [Y, S] with rows contiguous, got {tuple(at_XS.shape)}, "
                         f"{tuple(bt_YS.shape)}")
    c = torch.empty(num_experts, X, Y, dtype=out_dtype or bt_YS.dtype, device=bt_YS.device)
    a_desc = b_desc = None
    es = at_XS.element_size()
    if (tma and al.block_m % block_m == 0 and tma_ok(at_XS)
            and all(t.data_ptr() % 16 == 0 and (t.stride(0) * es) % 16 == 0 for t in (at_XS, bt_YS))):
        from triton.tools.tensor_descriptor import TensorDescriptor
        a_desc = TensorDescriptor(at_XS, [X, S], [at_XS.stride(0), 1], [block_a, block_m])
        b_desc = TensorDescriptor(bt_YS, [Y, S], [bt_YS.stride(0), 1], [block_b, block_m])
    grid = (cdiv(X, block_a) * cdiv(Y, block_b), num_experts)
    _moe_wgrad_kmajor[grid](
        at_XS, bt_YS, c, a_desc, b_desc, al.expert_start_E1, X, Y, at_XS.stride(0), bt_YS.stride(0),
        c.stride(0), c.stride(1), DESC=a_desc is not None, CAST_F32=_interpreted(), PREC=_precision(bt_YS.dtype),
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_M=block_m, GROUP_A=8, num_warps=num_warps, num_stages=num_stages)
    return c


def sorted_rows_t(src, al: AlignedRouting, scale_P=None, gather: bool = True):
    """[N, S] with column m = the src row of padded row m, transposed in one tiled pass.

    gather: src is per token [T, N] and row m takes src[token of m's pair] (* scale of the pair),
    zero on padding rows. Else src is already per sorted row [S, N] and is transposed as is. Columns
    past the used rows (num_padded) are left unwritten: no kernel reads them.
    """
    rows, N = src.shape
    S = al.num_rows
    out = torch.empty(N, S, dtype=src.dtype, device=src.device)
    if src.stride(1) != 1:
        src = src.contiguous()
    bs, bn = (16, 16) if _interpreted() else (min(64, al.block_m), 64)
    _rows_to_columns[(cdiv(S, bs), cdiv(N, bn))](
        src, out, al.sorted_pair_S, scale_P if scale_P is not None else out, al.num_padded_1,
        N, al.num_pairs, src.stride(0), out.stride(0), al.top_k,
        GATHER=gather, SCALE=scale_P is not None, BLOCK_S=bs, BLOCK_N=bn, num_warps=4)
    return out
