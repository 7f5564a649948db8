"""Triton grouped GEMMs over the block layout of ``kernels.align`` (forward and backward of SwiGLU experts).

Shape legend: T = tokens, D = hidden, I = expert ffn size, J = 2I (gate rows then up rows),
E = experts, K = experts per token, P = T*K pairs, S = padded sorted rows.

Four kernels (five launchers):

    moe_up        h_SI = silu(x[tok] @ Wg[e]^T) * (x[tok] @ Wu[e]^T); rows gathered straight from the
                  unsorted x_TD, gate and up tiles computed side by side so SiLU*up is an epilogue;
                  optionally also keeps the pre-activations gu_SJ for the backward pass.
    moe_gemm      C = A @ B[e]^T with A rows either gathered by token or in sorted order, C rows either
                  sorted or scattered to pair order, optionally scaled by each pair's routing weight:
                  the down projection (h_SI -> out_PD) and, in the backward pass, dgu_SJ -> dx_PD
                  (B read through strides, so w2 / w13 are never transposed in memory).
    moe_swiglu_bwd  the same kernel for dh = dy[tok] @ Wd[e], with the SwiGLU backward and
                  d(routing weight) fused into its epilogue (no [S, I] fp32 intermediates).
    moe_wgrad     C[e] = sum over expert e's rows of A[row]^T B[row]: the weight gradients dW2, dW13.
    moe_sum       y_TD = sum_k out_PD[t*K + k] over the slots whose id is a real expert: a second small
                  kernel instead of atomics, so the result is deterministic.

Every GEMM accumulates in fp32. Blocks past ``num_padded`` exit at once, so the grid can be sized
from an upper bound (no host sync) and experts with no tokens cost nothing. Under the Triton
interpreter tiles are cast to fp32 before ``tl.dot`` (the interpreter multiplies bf16 wrongly).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .align import AlignedRouting
from .launch_config import GemmConfig


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs are the test precision: keep them exact instead of tf32
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _block_ids(pid, num_n, num_m, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks share each weight tile while it sits in L2."""
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size
    pid_n = (pid % group) // size
    return pid_m, pid_n


@triton.jit
def _block_rows(pid_m, sorted_pair_ptr, block_expert_ptr, num_padded_ptr, E, P,
                PAIR_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(skip, expert, padded row ids, pair of each row) of row block pid_m.

    PAIR_BLOCKS (one token): block b holds pair b alone and block_expert is the raw ids, so no
    alignment launch is needed; a token's experts are distinct, so no weight streams twice.
    """
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if PAIR_BLOCKS:
        skip = (e < 0) | (e >= E)
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, P)
    else:
        skip = pid_m * BLOCK_M >= tl.load(num_padded_ptr)
        pair = tl.load(sorted_pair_ptr + offs_m)
    return skip, e, offs_m, pair


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _moe_up_kernel(x_ptr, w_ptr, h_ptr, gu_ptr, sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
                   D, I, E, P, stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs,
                   TOP_K, PAIR_BLOCKS: tl.constexpr, SAVE_PREACT: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(I, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    pid_m, pid_n = _block_ids(pid, num_n, num_m, GROUP_M)
    skip, e, offs_m, pair = _block_rows(pid_m, sorted_pair_ptr, block_expert_ptr, num_padded_ptr, E, P,
                                        PAIR_BLOCKS, BLOCK_M)
    if skip:
        return
    valid = pair < P
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wj + offs_k[:, None] * stride_wd
    u_ptrs = g_ptrs + I * stride_wj
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        mask_k = offs_k < D - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if CAST_F32:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, u, acc_u, input_precision=PREC)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wd
        u_ptrs += BLOCK_K * stride_wd
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    rows = offs_m.to(tl.int64)[:, None]
    tl.store(h_ptr + rows * stride_hs + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask_n[None, :])
    if SAVE_PREACT:
        gp = gu_ptr + rows * stride_gs + offs_n[None, :]
        tl.store(gp, acc_g.to(gu_ptr.dtype.element_ty), mask=mask_n[None, :])
        tl.store(gp + I, acc_u.to(gu_ptr.dtype.element_ty), mask=mask_n[None, :])


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, weight_ptr, sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
                     gu_ptr, dw_ptr, N, KD, E, P, stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs,
                     TOP_K, PAIR_BLOCKS: tl.constexpr, A_GATHER: tl.constexpr, C_SCATTER: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, SWIGLU_BWD: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    pid_m, pid_n = _block_ids(pid, num_n, num_m, GROUP_M)
    skip, e, offs_m, pair = _block_rows(pid_m, sorted_pair_ptr, block_expert_ptr, num_padded_ptr, E, P,
                                        PAIR_BLOCKS, BLOCK_M)
    if skip:
        return
    valid = pair < P
    if A_GATHER:
        a_rows = (pair // TOP_K).to(tl.int64)
    else:
        a_rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None].to(tl.int64) * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(KD, BLOCK_K)):
        mask_k = offs_k < KD - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if CAST_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    if MUL_WEIGHT:
        w = tl.load(weight_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    if SWIGLU_BWD:
        # acc = dh (the gradient of act = silu(g) * u, before the routing weight). Emit
        # d(weight) partial sums per N tile (summed on the host side: no atomics), and dgu.
        rows = offs_m.to(tl.int64)[:, None]
        gp = gu_ptr + rows * stride_gs + offs_n[None, :]
        g = tl.load(gp, mask=mask_n[None, :], other=0.0).to(tl.float32)
        u = tl.load(gp + N, mask=mask_n[None, :], other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.store(dw_ptr + offs_m.to(tl.int64) * num_n + pid_n, tl.sum(acc * silu * u, axis=1))
        w = tl.load(weight_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        da = acc * w[:, None]
        cp = c_ptr + rows * stride_cm + offs_n[None, :]
        tl.store(cp, (da * u * sig * (1.0 + g * (1.0 - sig))).to(c_ptr.dtype.element_ty), mask=mask_n[None, :])
        tl.store(cp + N, (da * silu).to(c_ptr.dtype.element_ty), mask=mask_n[None, :])
    elif C_SCATTER:
        c_ptrs = c_ptr + pair.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])
    else:
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_n[None, :])


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
    start = tl.load(expert_start_ptr + e)
    end = tl.load(expert_start_ptr + e + 1)
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_a = offs_a < NA
    mask_b = offs_b < NB
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


@triton.jit
def _moe_sum_kernel(out_ptr, ids_ptr, y_ptr, D, E, stride_op, stride_yt,
                    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        e = tl.load(ids_ptr + t * TOP_K + k)
        # dropped slots (-1, or not an expert here) were never written: read nothing for them
        real = (e >= 0) & (e < E)
        acc += tl.load(out_ptr + (t * TOP_K + k) * stride_op + offs, mask=mask & real, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# launchers (host side: shapes and grids only, never a device value)

def _grid(al: AlignedRouting, n: int, cfg: GemmConfig) -> tuple[int]:
    return (al.max_blocks * triton.cdiv(n, cfg.block_n),)


def moe_up(x_TD, w13_EJD, al: AlignedRouting, cfg: GemmConfig, save_preact: bool):
    """h_SI = silu(gate) * up per sorted row; also gu_SJ (gate, up pre-activations) when asked."""
    E, J, D = w13_EJD.shape
    I = J // 2
    S = al.num_rows
    h = torch.empty(S, I, dtype=x_TD.dtype, device=x_TD.device)
    gu = torch.empty(S, J, dtype=x_TD.dtype, device=x_TD.device) if save_preact else h
    _moe_up_kernel[_grid(al, I, cfg)](
        x_TD, w13_EJD, h, gu, al.sorted_pair_S, al.block_expert_B, al.num_padded_1,
        D, I, E, al.num_pairs, x_TD.stride(0), w13_EJD.stride(0), w13_EJD.stride(1), w13_EJD.stride(2),
        h.stride(0), gu.stride(0),
        TOP_K=al.top_k, PAIR_BLOCKS=al.pair_blocks, SAVE_PREACT=save_preact, CAST_F32=_interpreted(), PREC=_precision(x_TD.dtype),
        BLOCK_M=al.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return h, (gu if save_preact else None)


def moe_gemm(a, b_E, b_strides, n: int, kd: int, al: AlignedRouting, cfg: GemmConfig, *, a_gather: bool,
             c_scatter: bool, weight_P=None, out_dtype=None):
    """C = A @ B[e]^T over the block layout; B[e][n, k] = b_E[e, ...] read through b_strides (e, n, k)."""
    rows = al.num_pairs if c_scatter else al.num_rows
    c = torch.empty(rows, n, dtype=out_dtype or a.dtype, device=a.device)
    if a.stride(-1) != 1:
        a = a.contiguous()
    _moe_gemm_kernel[_grid(al, n, cfg)](
        a, b_E, c, weight_P if weight_P is not None else c, al.sorted_pair_S, al.block_expert_B, al.num_padded_1,
        c, c, n, kd, b_E.shape[0], al.num_pairs, a.stride(0), b_strides[0], b_strides[1], b_strides[2], c.stride(0), 0,
        TOP_K=al.top_k, PAIR_BLOCKS=al.pair_blocks, A_GATHER=a_gather, C_SCATTER=c_scatter, MUL_WEIGHT=weight_P is not None, SWIGLU_BWD=False,
        CAST_F32=_interpreted(), PREC=_precision(a.dtype),
        BLOCK_M=al.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return c


def moe_swiglu_bwd(dy_TD, w2_EDI, gu_SJ, weight_P, al: AlignedRouting, cfg: GemmConfig):
    """dh = dy[tok] @ W2[e] with the SwiGLU backward as its epilogue.

    Returns dgu_SJ (gradient of the gate and up pre-activations, routing weight applied; zero on
    padding rows) and dweight_S (fp32: d y / d routing weight of each sorted row's pair).
    """
    E, D, I = w2_EDI.shape
    S = al.num_rows
    num_n = triton.cdiv(I, cfg.block_n)
    dgu = torch.empty(S, 2 * I, dtype=dy_TD.dtype, device=dy_TD.device)
    dw_part = torch.empty(S, num_n, dtype=torch.float32, device=dy_TD.device)
    _moe_gemm_kernel[_grid(al, I, cfg)](
        dy_TD, w2_EDI, dgu, weight_P, al.sorted_pair_S, al.block_expert_B, al.num_padded_1,
        gu_SJ, dw_part, I, D, E, al.num_pairs, dy_TD.stride(0), w2_EDI.stride(0), w2_EDI.stride(2), w2_EDI.stride(1),
        dgu.stride(0), gu_SJ.stride(0),
        TOP_K=al.top_k, PAIR_BLOCKS=al.pair_blocks, A_GATHER=True, C_SCATTER=False, MUL_WEIGHT=False, SWIGLU_BWD=True,
        CAST_F32=_interpreted(), PREC=_precision(dy_TD.dtype),
        BLOCK_M=al.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # rows past num_padded were never written: their partial sums are garbage, but they map to no pair
    return dgu, dw_part.sum(dim=1)


def moe_wgrad(a, b, num_experts: int, al: AlignedRouting, *, a_gather: bool, b_gather: bool, a_scale_P=None,
              out_dtype=None):
    """C_EAB[e] = A[rows of e]^T @ B[rows of e] (rows of padding contribute zero)."""
    if _interpreted():
        block_a, block_b, block_m, num_warps = 32, 32, 16, 1
    else:
        block_a, block_b, block_m, num_warps = 128, 128, 64, 8
    if al.pair_blocks:
        raise ValueError("weight gradients need the sorted layout; align with allow_pair_blocks=False")
    na, nb = a.shape[1], b.shape[1]
    c = torch.empty(num_experts, na, nb, dtype=out_dtype or b.dtype, device=b.device)
    grid = (triton.cdiv(na, block_a) * triton.cdiv(nb, block_b), num_experts)
    _moe_wgrad_kernel[grid](
        a, b, c, a_scale_P if a_scale_P is not None else c, al.sorted_pair_S, al.expert_start_E1,
        na, nb, al.num_pairs, a.stride(0), b.stride(0), c.stride(0), c.stride(1),
        TOP_K=al.top_k, A_GATHER=a_gather, B_GATHER=b_gather, A_SCALE=a_scale_P is not None,
        CAST_F32=_interpreted(), PREC=_precision(b.dtype),
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_M=block_m, num_warps=num_warps, num_stages=3)
    return c


def moe_sum(out_PD, topk_ids_TK, num_experts: int, out_dtype):
    """y_TD = per-token sum of its real slots' rows of out_PD (fp32 sum, one write)."""
    T, K = topk_ids_TK.shape
    D = out_PD.shape[1]
    y = torch.empty(T, D, dtype=out_dtype, device=out_PD.device)
    if T == 0:
        return y
    ids = topk_ids_TK if topk_ids_TK.is_contiguous() else topk_ids_TK.contiguous()
    block_d = min(1024, triton.next_power_of_2(D))
    _moe_sum_kernel[(T, triton.cdiv(D, block_d))](out_PD, ids, y, D, num_experts, out_PD.stride(0), y.stride(0),
                                                  TOP_K=K, BLOCK_D=block_d, num_warps=4)
    return y
