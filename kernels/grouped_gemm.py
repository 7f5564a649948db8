"""Triton grouped GEMMs over the block layout of ``kernels.align`` (forward and backward of SwiGLU experts).

Shape legend: T = tokens, D = hidden, I = expert ffn size, J = 2I (gate rows then up rows),
E = experts, K = experts per token, P = T*K pairs, S = padded sorted rows.

Four kernels (five launchers; the weight gradients are in ``kernels.wgrad``):

    moe_up        h_SI = silu(x[tok] @ Wg[e]^T) * (x[tok] @ Wu[e]^T); rows gathered straight from the
                  unsorted x_TD, gate and up tiles computed side by side so SiLU*up is an epilogue;
                  optionally also keeps the pre-activations gu_SJ for the backward pass.
    moe_gemm      C = A @ B[e]^T with A rows either gathered by token or in sorted order, C rows either
                  sorted or scattered to pair order, optionally scaled by each pair's routing weight:
                  the down projection (h_SI -> out_PD) and, in the backward pass, dgu_SJ -> dx_PD
                  (B read through strides, so w2 / w13 are never transposed in memory).
    moe_swiglu_bwd  the same kernel for dh = dy[tok] @ Wd[e], with the SwiGLU backward and
                  d(routing weight) fused into its epilogue (no [S, I] fp32 intermediates).
    moe_sum       y_TD = sum_k out_PD[t*K + k] over the slots whose id is a real expert: a second small
                  kernel instead of atomics, so the result is deterministic.

Weight tiles of moe_up / moe_gemm come by TMA descriptor where the launch config says so
(``GemmConfig.tma``; Hopper or newer, 16-byte aligned strides), else by pointer loads. So may the A
rows (``GemmConfig.a_tma``): moe_gemm reads A by TMA when it lies in sorted order, and moe_up first
gathers x into sorted order (``gather_sorted_rows``, one memory-bound pass) and then streams it by
TMA instead of gathering rows through pointers. With ``GemmConfig.tail`` an expert's last row block,
when its real rows fit, runs as a half or quarter tile (the padding's MMA work is skipped; skipped
padding rows of outputs that later kernels read whole are written as zeros). Decode-sized forward
calls may chain up -> down -> sum by programmatic dependent launch (``pdl``).

With ``GemmConfig.persistent`` moe_up / moe_gemm (not the SwiGLU backward), when their weight tiles
come by TMA, run on a persistent grid:
``persistent`` programs per SM, each walking tiles of the used row blocks (counted on the device) in
one ``tl.range(..., flatten=True)`` loop nest, so the K loop's pipeline runs on into the next tile
while this one's epilogue stores. Its up GEMM loads a gate tile and the matching up tile as one
[2, BLOCK_N, BLOCK_K] TMA box and keeps one [BLOCK_M, 2 * BLOCK_N] accumulator: with two accumulators
reset at every tile ptxas serialized the flattened loop's MMAs. (H200, session 10: the whole forward
4-19% faster at 4096 and 16384 tokens; the flattening is what pays, NOTES-kernels 16.)

Every GEMM accumulates in fp32. Blocks past ``num_padded`` exit at once, so the grid can be sized
from an upper bound (no host sync) and experts with no tokens cost nothing. Under the Triton
interpreter tiles are cast to fp32 before ``tl.dot`` (the interpreter multiplies bf16 wrongly).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .align import AlignedRouting
from .launch import Launcher
from .launch_config import GemmConfig, cdiv, next_pow2

try:  # programmatic dependent launch (Hopper+): the next kernel's programs start while this one drains
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: decode launches stay plain
    gdc_launch_dependents = gdc_wait = None


# Triton decides at @triton.jit time (this module's import) whether the kernels are interpreted; the
# same variable read once here (a read per call cost ~1.5 us, several times per MoE call, on the host path)
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreted() -> bool:
    return _INTERPRETED


@functools.lru_cache(maxsize=16)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def tma_ok(t: torch.Tensor) -> bool:
    """TMA descriptors possible for kernels on t's device (Hopper or newer), or the interpreter's emulation."""
    return _interpreted() or (t.is_cuda and _capability_major(t.device.index or 0) >= 9)


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


@triton.jit
def _program_block(N, sorted_pair_ptr, block_expert_ptr, num_padded_ptr, E, P, PDL: tl.constexpr,
                   PAIR_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The grouped GEMMs' prologue: with PDL, let the next kernel's programs launch; this program's
    (row block, N tile) in grouped order, and the block's rows (skip: past the used blocks)."""
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.num_programs(0) // num_n
    pid_m, pid_n = _block_ids(pid, num_n, num_m, GROUP_M)
    skip, e, offs_m, pair = _block_rows(pid_m, sorted_pair_ptr, block_expert_ptr, num_padded_ptr, E, P,
                                        PAIR_BLOCKS, BLOCK_M)
    return skip, e, offs_m, pair, pid_m, pid_n, num_n


@triton.jit
def _tail_level(pair, P, BLOCK_M: tl.constexpr, TAIL: tl.constexpr):
    """How many times this block's row tile may be halved: an expert's last block holds its real rows
    as a prefix and padding after them, so at most BLOCK_M/2 (level 1) or BLOCK_M/4 (level 2, with
    TAIL >= 2) real rows need only that many rows of MMA work. (Mixtral at 512 tokens has ~128 rows
    per expert: about half its experts spill a few rows into a second 128-row block.)"""
    real = tl.sum((pair < P).to(tl.int32), axis=0)
    level = (real <= BLOCK_M // 2).to(tl.int32)
    if TAIL >= 2:
        level += (real <= BLOCK_M // 4).to(tl.int32)
    return level


@triton.jit
def _sub_rows(pid_m, sorted_pair_ptr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """The first ROWS padded rows of row block pid_m and their pairs."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, ROWS)
    return offs_m, tl.load(sorted_pair_ptr + offs_m)


@triton.jit
def _zero_rows(ptr, pid_m, stride, offs_n, mask_n, FROM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Zeros in rows [FROM, BLOCK_M) of row block pid_m (the padding a halved tile skipped), so that
    a kernel that reads whole padded rows (the weight gradients' transposes) sees zeros as before."""
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    keep = tl.arange(0, BLOCK_M) >= FROM
    tl.store(ptr + offs.to(tl.int64)[:, None] * stride + offs_n[None, :],
             tl.zeros((BLOCK_M, BLOCK_N), dtype=ptr.dtype.element_ty), mask=keep[:, None] & mask_n[None, :])


@triton.jit
def _up_tile(x_ptr, w_ptr, w_desc, a_desc, h_ptr, gu_ptr, offs_m, pair, e, pid_n, D, I, P,
             stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs, TOP_K,
             SAVE_PREACT: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr, W_DESC: tl.constexpr,
             A_DESC: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """h (and gate/up pre-activations) of ROWS sorted rows x one N tile of expert e. A_DESC: the
    rows come by TMA from x already gathered into sorted order (a_desc: tiles [ROWS, BLOCK_K])."""
    valid = pair < P
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    g_ptrs = w_ptr + e * stride_we + offs_n[None, :].to(tl.int64) * stride_wj + offs_k[:, None] * stride_wd
    u_ptrs = g_ptrs + I * stride_wj
    acc_g = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    row0 = tl.min(offs_m, axis=0).to(tl.int32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        mask_k = offs_k < D - k * BLOCK_K
        if A_DESC:  # padding rows were gathered as zeros
            a = a_desc.load([row0, k * BLOCK_K])
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
        if W_DESC:
            # TMA tiles of w13[e] (out-of-range rows and columns read as zero; a gate tile that runs
            # past I reads up rows, whose columns are never stored)
            n0 = (pid_n * BLOCK_N).to(tl.int32)
            g = w_desc.load([e.to(tl.int32), n0, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
            u = w_desc.load([e.to(tl.int32), n0 + I, k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
        else:
            g = tl.load(g_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if CAST_F32:
            a, g, u = a.to(tl.float32), g.to(tl.float32), u.to(tl.float32)
        acc_g = tl.dot(a, g, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, u, acc_u, input_precision=PREC)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wd
        u_ptrs += BLOCK_K * stride_wd
    _up_epilogue(h_ptr, gu_ptr, acc_g, acc_u, offs_m, offs_n, mask_n, I, stride_hs, stride_gs, SAVE_PREACT)


@triton.jit
def _up_epilogue(h_ptr, gu_ptr, acc_g, acc_u, offs_m, offs_n, mask_n, I, stride_hs, stride_gs,
                 SAVE_PREACT: tl.constexpr):
    """h = silu(gate) * up of a tile's rows (and the pre-activations when kept)."""
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    rows = offs_m.to(tl.int64)[:, None]
    tl.store(h_ptr + rows * stride_hs + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask_n[None, :])
    if SAVE_PREACT:
        gp = gu_ptr + rows * stride_gs + offs_n[None, :]
        tl.store(gp, acc_g.to(gu_ptr.dtype.element_ty), mask=mask_n[None, :])
        tl.store(gp + I, acc_u.to(gu_ptr.dtype.element_ty), mask=mask_n[None, :])


@triton.jit
def _up_tile_joint(x_ptr, w_desc, a_desc, h_ptr, gu_ptr, offs_m, pair, e, pid_n, D, I, P, stride_xt, stride_hs,
                   stride_gs, TOP_K, SAVE_PREACT: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                   A_DESC: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_up_tile with gate and up in one accumulator: w_desc views w13 as [E, 2, I, D] and its tiles
    [1, 2, BLOCK_N, BLOCK_K] hold a gate tile and the matching up tile, so each K step is one
    [ROWS, 2 * BLOCK_N] MMA. (Two accumulators reset at every tile of a flattened persistent loop
    made ptxas serialize the MMAs; one does not.)"""
    valid = pair < P
    tok = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xt + offs_k[None, :]
    acc = tl.zeros((ROWS, 2 * BLOCK_N), dtype=tl.float32)
    row0 = tl.min(offs_m, axis=0).to(tl.int32)
    n0 = (pid_n * BLOCK_N).to(tl.int32)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        if A_DESC:
            a = a_desc.load([row0, k * BLOCK_K])
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k < D - k * BLOCK_K)[None, :], other=0.0)
        b = w_desc.load([e.to(tl.int32), 0, n0, k * BLOCK_K]).reshape(2 * BLOCK_N, BLOCK_K).T
        if CAST_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
    acc_g, acc_u = acc.reshape(ROWS, 2, BLOCK_N).permute(0, 2, 1).split()
    _up_epilogue(h_ptr, gu_ptr, acc_g, acc_u, offs_m, offs_n, offs_n < I, I, stride_hs, stride_gs, SAVE_PREACT)


@triton.jit
def _up_tail(x_ptr, w_ptr, w_desc, a_desc, h_ptr, gu_ptr, sorted_pair_ptr, pid_m, e, pid_n, D, I, P,
             stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs, TOP_K,
             SAVE_PREACT: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr, W_DESC: tl.constexpr,
             A_DESC: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """_up_tile over the first ROWS rows of a block whose real rows all lie there; the skipped
    padding rows of the saved outputs are zeroed (the backward pass transposes whole padded rows)."""
    offs_m, pair = _sub_rows(pid_m, sorted_pair_ptr, BLOCK_M, ROWS)
    _up_tile(x_ptr, w_ptr, w_desc, a_desc, h_ptr, gu_ptr, offs_m, pair, e, pid_n, D, I, P,
             stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs, TOP_K,
             SAVE_PREACT, CAST_F32, PREC, W_DESC, A_DESC, ROWS, BLOCK_N, BLOCK_K)
    if SAVE_PREACT:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < I
        _zero_rows(h_ptr, pid_m, stride_hs, offs_n, mask_n, ROWS, BLOCK_M, BLOCK_N)
        _zero_rows(gu_ptr, pid_m, stride_gs, offs_n, mask_n, ROWS, BLOCK_M, BLOCK_N)
        _zero_rows(gu_ptr + I, pid_m, stride_gs, offs_n, mask_n, ROWS, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _moe_up_kernel(x_ptr, w_ptr, w_desc, a_desc, a_desc2, a_desc4, h_ptr, gu_ptr, sorted_pair_ptr, block_expert_ptr,
                   num_padded_ptr, D, I, E, P, stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs,
                   TOP_K, PAIR_BLOCKS: tl.constexpr, SAVE_PREACT: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                   W_DESC: tl.constexpr, A_DESC: tl.constexpr, PDL: tl.constexpr, TAIL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # (with PDL: the down GEMM's programs launch now; they wait for this grid before reading h)
    skip, e, offs_m, pair, pid_m, pid_n, num_n = _program_block(I, sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
                                                                E, P, PDL, PAIR_BLOCKS, BLOCK_M, BLOCK_N, GROUP_M)
    if skip:
        return
    # (TAIL is 0 with PAIR_BLOCKS: the launcher clears it.) The tail branches sit under a
    # compile-time test so that without TAIL they are not compiled at all (their descriptors are None)
    if TAIL == 0:
        _up_tile(x_ptr, w_ptr, w_desc, a_desc, h_ptr, gu_ptr, offs_m, pair, e, pid_n, D, I, P,
                 stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs, TOP_K,
                 SAVE_PREACT, CAST_F32, PREC, W_DESC, A_DESC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        level = _tail_level(pair, P, BLOCK_M, TAIL)
        if level == 0:
            _up_tile(x_ptr, w_ptr, w_desc, a_desc, h_ptr, gu_ptr, offs_m, pair, e, pid_n, D, I, P,
                     stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs, TOP_K,
                     SAVE_PREACT, CAST_F32, PREC, W_DESC, A_DESC, BLOCK_M, BLOCK_N, BLOCK_K)
        elif TAIL == 1:
            _up_tail(x_ptr, w_ptr, w_desc, a_desc2, h_ptr, gu_ptr, sorted_pair_ptr, pid_m, e, pid_n, D, I, P,
                     stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs, TOP_K,
                     SAVE_PREACT, CAST_F32, PREC, W_DESC, A_DESC, BLOCK_M // 2, BLOCK_M, BLOCK_N, BLOCK_K)
        elif level == 1:
            _up_tail(x_ptr, w_ptr, w_desc, a_desc2, h_ptr, gu_ptr, sorted_pair_ptr, pid_m, e, pid_n, D, I, P,
                     stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs, TOP_K,
                     SAVE_PREACT, CAST_F32, PREC, W_DESC, A_DESC, BLOCK_M // 2, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _up_tail(x_ptr, w_ptr, w_desc, a_desc4, h_ptr, gu_ptr, sorted_pair_ptr, pid_m, e, pid_n, D, I, P,
                     stride_xt, stride_we, stride_wj, stride_wd, stride_hs, stride_gs, TOP_K,
                     SAVE_PREACT, CAST_F32, PREC, W_DESC, A_DESC, BLOCK_M // 4, BLOCK_M, BLOCK_N, BLOCK_K)


_moe_up = Launcher(_moe_up_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit
def _gemm_tile(a_ptr, b_ptr, b_desc, a_desc, c_ptr, weight_ptr, gu_ptr, dw_ptr, offs_m, pair, e, pid_n, num_n, N, KD, P,
               stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs, TOP_K,
               A_GATHER: tl.constexpr, C_SCATTER: tl.constexpr, MUL_WEIGHT: tl.constexpr, SWIGLU_BWD: tl.constexpr,
               CAST_F32: tl.constexpr, PREC: tl.constexpr, W_DESC: tl.constexpr, A_DESC: tl.constexpr,
               ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C of ROWS sorted rows x one N tile of expert e, with the kernel's epilogue. A_DESC: A is in
    sorted row order and comes by TMA (a_desc: tiles [ROWS, BLOCK_K]; padding rows hold zeros)."""
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
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    row0 = tl.min(offs_m, axis=0).to(tl.int32)
    for k in range(0, tl.cdiv(KD, BLOCK_K)):
        mask_k = offs_k < KD - k * BLOCK_K
        if A_DESC:
            a = a_desc.load([row0, k * BLOCK_K])
        else:
            a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
        if W_DESC:  # TMA tile of B[e] = b[e, n, k] (k contiguous); out-of-range reads are zero
            b = b_desc.load([e.to(tl.int32), (pid_n * BLOCK_N).to(tl.int32), k * BLOCK_K]).reshape(BLOCK_N, BLOCK_K).T
        else:
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


@triton.jit
def _gemm_tail(a_ptr, b_ptr, b_desc, a_desc, c_ptr, weight_ptr, gu_ptr, dw_ptr, sorted_pair_ptr, pid_m, e, pid_n, num_n,
               N, KD, P, stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs, TOP_K,
               A_GATHER: tl.constexpr, C_SCATTER: tl.constexpr, MUL_WEIGHT: tl.constexpr, SWIGLU_BWD: tl.constexpr,
               CAST_F32: tl.constexpr, PREC: tl.constexpr, W_DESC: tl.constexpr, A_DESC: tl.constexpr,
               ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """_gemm_tile over the first ROWS rows of a block whose real rows all lie there; rows written in
    sorted order get zeros in the skipped padding rows, as the whole tile would have written."""
    offs_m, pair = _sub_rows(pid_m, sorted_pair_ptr, BLOCK_M, ROWS)
    _gemm_tile(a_ptr, b_ptr, b_desc, a_desc, c_ptr, weight_ptr, gu_ptr, dw_ptr, offs_m, pair, e, pid_n, num_n, N, KD, P,
               stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs, TOP_K,
               A_GATHER, C_SCATTER, MUL_WEIGHT, SWIGLU_BWD, CAST_F32, PREC, W_DESC, A_DESC, ROWS, BLOCK_N, BLOCK_K)
    if not C_SCATTER:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        _zero_rows(c_ptr, pid_m, stride_cm, offs_n, mask_n, ROWS, BLOCK_M, BLOCK_N)
        if SWIGLU_BWD:
            _zero_rows(c_ptr + N, pid_m, stride_cm, offs_n, mask_n, ROWS, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _moe_gemm_kernel(a_ptr, b_ptr, b_desc, a_desc, a_desc2, a_desc4, c_ptr, weight_ptr, sorted_pair_ptr, block_expert_ptr,
                     num_padded_ptr, gu_ptr, dw_ptr, N, KD, E, P, stride_am, stride_be, stride_bn, stride_bk, stride_cm,
                     stride_gs, TOP_K, PAIR_BLOCKS: tl.constexpr, A_GATHER: tl.constexpr, C_SCATTER: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, SWIGLU_BWD: tl.constexpr, CAST_F32: tl.constexpr, PREC: tl.constexpr,
                     W_DESC: tl.constexpr, A_DESC: tl.constexpr, PDL: tl.constexpr, TAIL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # (with PDL: moe_sum's programs launch now; this grid itself waits below before reading A)
    skip, e, offs_m, pair, pid_m, pid_n, num_n = _program_block(N, sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
                                                                E, P, PDL, PAIR_BLOCKS, BLOCK_M, BLOCK_N, GROUP_M)
    if skip:
        return
    if PDL:  # launched early (programmatic dependent launch): wait for the kernel that wrote A
        gdc_wait()
    if TAIL == 0:  # (see _moe_up_kernel)
        _gemm_tile(a_ptr, b_ptr, b_desc, a_desc, c_ptr, weight_ptr, gu_ptr, dw_ptr, offs_m, pair, e, pid_n, num_n, N, KD,
                   P, stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs, TOP_K,
                   A_GATHER, C_SCATTER, MUL_WEIGHT, SWIGLU_BWD, CAST_F32, PREC, W_DESC, A_DESC, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        level = _tail_level(pair, P, BLOCK_M, TAIL)
        if level == 0:
            _gemm_tile(a_ptr, b_ptr, b_desc, a_desc, c_ptr, weight_ptr, gu_ptr, dw_ptr, offs_m, pair, e, pid_n, num_n, N, KD,
                       P, stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs, TOP_K,
                       A_GATHER, C_SCATTER, MUL_WEIGHT, SWIGLU_BWD, CAST_F32, PREC, W_DESC, A_DESC, BLOCK_M, BLOCK_N, BLOCK_K)
        elif TAIL == 1:
            _gemm_tail(a_ptr, b_ptr, b_desc, a_desc2, c_ptr, weight_ptr, gu_ptr, dw_ptr, sorted_pair_ptr, pid_m, e, pid_n,
                       num_n, N, KD, P, stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs, TOP_K,
                       A_GATHER, C_SCATTER, MUL_WEIGHT, SWIGLU_BWD, CAST_F32, PREC, W_DESC, A_DESC,
                       BLOCK_M // 2, BLOCK_M, BLOCK_N, BLOCK_K)
        elif level == 1:
            _gemm_tail(a_ptr, b_ptr, b_desc, a_desc2, c_ptr, weight_ptr, gu_ptr, dw_ptr, sorted_pair_ptr, pid_m, e, pid_n,
                       num_n, N, KD, P, stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs, TOP_K,
                       A_GATHER, C_SCATTER, MUL_WEIGHT, SWIGLU_BWD, CAST_F32, PREC, W_DESC, A_DESC,
                       BLOCK_M // 2, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _gemm_tail(a_ptr, b_ptr, b_desc, a_desc4, c_ptr, weight_ptr, gu_ptr, dw_ptr, sorted_pair_ptr, pid_m, e, pid_n,
                       num_n, N, KD, P, stride_am, stride_be, stride_bn, stride_bk, stride_cm, stride_gs, TOP_K,
                       A_GATHER, C_SCATTER, MUL_WEIGHT, SWIGLU_BWD, CAST_F32, PREC, W_DESC, A_DESC,
                       BLOCK_M // 4, BLOCK_M, BLOCK_N, BLOCK_K)


_moe_gemm = Launcher(_moe_gemm_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit
def _tile_rows(tile, num_n, num_m, sorted_pair_ptr, block_expert_ptr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """A persistent program's tile: (row block, N tile) in grouped order over the used blocks, the
    block's expert, padded row ids and pairs."""
    pid_m, pid_n = _block_ids(tile, num_n, num_m, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    return pid_n, e, offs_m, tl.load(sorted_pair_ptr + offs_m)


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _moe_up_persistent_kernel(x_ptr, w_desc, a_desc, h_ptr, gu_ptr, sorted_pair_ptr, block_expert_ptr, num_padded_ptr,
                              D, I, P, stride_xt, stride_hs, stride_gs, TOP_K, SAVE_PREACT: tl.constexpr,
                              CAST_F32: tl.constexpr, PREC: tl.constexpr, A_DESC: tl.constexpr, PDL: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_M: tl.constexpr):
    """_moe_up_kernel on a persistent grid (GemmConfig.persistent): program p runs tiles p, p + G,
    p + 2G, ... of the used row blocks (counted on the device: no host sync), in one loop nest that
    the compiler flattens, so the K loop's pipeline runs on into the next tile across the epilogue.
    w_desc is the [E, 2, I, D] view of w13 (_up_tile_joint)."""
    if PDL:
        gdc_launch_dependents()
    num_n = tl.cdiv(I, BLOCK_N)
    num_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=True):
        pid_n, e, offs_m, pair = _tile_rows(tile, num_n, num_m, sorted_pair_ptr, block_expert_ptr, BLOCK_M, GROUP_M)
        _up_tile_joint(x_ptr, w_desc, a_desc, h_ptr, gu_ptr, offs_m, pair, e, pid_n, D, I, P, stride_xt, stride_hs,
                       stride_gs, TOP_K, SAVE_PREACT, CAST_F32, PREC, A_DESC, BLOCK_M, BLOCK_N, BLOCK_K)


_moe_up_persistent = Launcher(_moe_up_persistent_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _moe_gemm_persistent_kernel(a_ptr, b_desc, a_desc, c_ptr, weight_ptr, sorted_pair_ptr, block_expert_ptr,
                                num_padded_ptr, N, KD, P, stride_am, stride_cm, TOP_K, A_GATHER: tl.constexpr,
                                C_SCATTER: tl.constexpr, MUL_WEIGHT: tl.constexpr, CAST_F32: tl.constexpr,
                                PREC: tl.constexpr, A_DESC: tl.constexpr, PDL: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr):
    """_moe_gemm_kernel (not its SwiGLU-backward form) on a persistent grid, B by TMA: see
    _moe_up_persistent_kernel."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(tl.load(num_padded_ptr), BLOCK_M)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=True):
        pid_n, e, offs_m, pair = _tile_rows(tile, num_n, num_m, sorted_pair_ptr, block_expert_ptr, BLOCK_M, GROUP_M)
        # (b_ptr and its strides are unused with W_DESC: c_ptr and zeros stand in)
        _gemm_tile(a_ptr, c_ptr, b_desc, a_desc, c_ptr, weight_ptr, c_ptr, c_ptr, offs_m, pair, e, pid_n, num_n, N, KD,
                   P, stride_am, 0, 0, 0, stride_cm, 0, TOP_K,
                   A_GATHER, C_SCATTER, MUL_WEIGHT, False, CAST_F32, PREC, True, A_DESC, BLOCK_M, BLOCK_N, BLOCK_K)


_moe_gemm_persistent = Launcher(_moe_gemm_persistent_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit(do_not_specialize=["P", "TOP_K"])
def _gather_rows_kernel(src_ptr, dst_ptr, pair_ptr, num_padded_ptr, N, P, stride_src, stride_dst, TOP_K,
                        BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst[m] = src[token of sorted row m's pair] for the used rows m < num_padded; zero on padding."""
    if tl.program_id(0) * BLOCK_S >= tl.load(num_padded_ptr):
        return
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    pair = tl.load(pair_ptr + offs_s)
    real = pair < P
    rows = tl.where(real, pair // TOP_K, 0).to(tl.int64)
    v = tl.load(src_ptr + rows[:, None] * stride_src + offs_n[None, :], mask=real[:, None] & mask_n[None, :], other=0.0)
    tl.store(dst_ptr + offs_s.to(tl.int64)[:, None] * stride_dst + offs_n[None, :], v, mask=mask_n[None, :])


_gather_rows = Launcher(_gather_rows_kernel)  # launched without per-call binding (kernels/launch.py)


@triton.jit
def _moe_sum_kernel(out_ptr, ids_ptr, y_ptr, D, E, stride_op, stride_yt,
                    TOP_K: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # launched early: wait for the down GEMM's rows
        gdc_wait()
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


_moe_sum = Launcher(_moe_sum_kernel)  # launched without per-call binding (kernels/launch.py)


# ----------------------------------------------------------------------------------------------
# launchers (host side: shapes and grids only, never a device value)

def pdl_ok(t: torch.Tensor) -> bool:
    """Programmatic dependent launch possible for kernels on t's device (Hopper or newer, compiled)."""
    return gdc_wait is not None and not _interpreted() and t.is_cuda and _capability_major(t.device.index or 0) >= 9


def _pdl(flag: bool) -> dict:
    return {"launch_pdl": True} if flag else {}


def _grid(al: AlignedRouting, n: int, cfg: GemmConfig) -> tuple[int]:
    return (al.max_blocks * cdiv(n, cfg.block_n),)


INTERPRETED_PERSISTENT_PROGRAMS = 3  # under the interpreter: few programs, each walking several tiles


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _persistent_grid(al: AlignedRouting, n: int, cfg: GemmConfig, t: torch.Tensor, w_tma: bool) -> tuple[int] | None:
    """The persistent grid (GemmConfig.persistent programs per SM, never more than the tiles) when the
    config asks for one and the call allows: sorted row blocks (one-pair blocks keep a program each)
    and the weight tiles by TMA (w_tma). Without TMA, e.g. the backward's dx GEMM reading w13
    transposed through pointers, the flattened loop measured 1.5-1.65x slower than per-tile programs
    (H200, session 10, run s10-7): those calls keep the per-tile grid."""
    if not cfg.persistent or al.pair_blocks or not w_tma:
        return None
    sms = INTERPRETED_PERSISTENT_PROGRAMS if _interpreted() else _sm_count(t.device.index or 0)
    return (min(cfg.persistent * sms, _grid(al, n, cfg)[0]),)


def _tail(al: AlignedRouting, cfg: GemmConfig) -> int:
    """Halvings of an expert's last row block the kernel may choose (GemmConfig.tail), never below
    16-row tiles (the smallest MMA tile) and never for one-pair blocks."""
    t = 0 if al.pair_blocks else cfg.tail
    while t and al.block_m >> t < 16:
        t -= 1
    return t


def _weight_tma(w_E, cfg: GemmConfig) -> bool:
    """Whether weight tiles of w_E [E, N, K] may come by TMA: the config asks for it and the GPU and
    layout allow it (Hopper or newer, or the interpreter; K contiguous, 16-byte aligned base and
    strides); else the kernel loads them through pointers."""
    if not cfg.tma or not tma_ok(w_E):
        return False
    es = w_E.element_size()
    return not (w_E.stride(2) != 1 or w_E.data_ptr() % 16 or (w_E.stride(0) * es) % 16 or (w_E.stride(1) * es) % 16
                or cfg.block_k * es < 16)


def _tile_desc(w_E, cfg: GemmConfig):
    """The TMA descriptor over w_E [E, N, K], tiles [1, block_n, block_k] (_weight_tma has said yes).
    Made per call, never cached: a descriptor holds its tensor, and a cache would keep freed models'
    weights alive (seen: a second model could not be built after the first was deleted)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(w_E, list(w_E.shape), list(w_E.stride()), [1, cfg.block_n, cfg.block_k])


def _weight_desc(w_E, cfg: GemmConfig):
    """A TMA descriptor over w_E's weight tiles where _weight_tma allows, else None."""
    return _tile_desc(w_E, cfg) if _weight_tma(w_E, cfg) else None


def _joint_desc(w13_EJD, cfg: GemmConfig):
    """w13 [E, 2I, D] (gate rows, then up rows) viewed as [E, 2, I, D], tiles [1, 2, block_n, block_k]:
    a gate tile and its up tile in one load (_weight_tma has checked the layout)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    E, J, D = w13_EJD.shape
    s0, s1, s2 = w13_EJD.stride()
    return TensorDescriptor(w13_EJD, [E, 2, J // 2, D], [s0, (J // 2) * s1, s1, s2], [1, 2, cfg.block_n, cfg.block_k])


def _rows_by_tma(t: torch.Tensor, row_elems: int, al: AlignedRouting, cfg: GemmConfig) -> bool:
    """Whether A rows of row_elems elements of t's dtype may come by TMA: the config asks
    (GemmConfig.a_tma), the layout is sorted rows (not one pair per block), the GPU has TMA, and a
    row and a K step are 16-byte multiples."""
    es = t.element_size()
    return (cfg.a_tma and not al.pair_blocks and tma_ok(t) and (row_elems * es) % 16 == 0
            and cfg.block_k * es >= 16)


def _row_descs(a_SK, al: AlignedRouting, cfg: GemmConfig, tail: int):
    """TMA descriptors over A rows in sorted order [S, K] (tiles of the row block, and of its half and
    quarter for tail tiles) when _rows_by_tma allows and the tensor's layout does (rows contiguous,
    16-byte aligned); else None and the kernel loads A through pointers."""
    if (not _rows_by_tma(a_SK, a_SK.stride(0), al, cfg) or a_SK.stride(1) != 1 or a_SK.data_ptr() % 16):
        return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    def make(rows):
        return TensorDescriptor(a_SK, list(a_SK.shape), list(a_SK.stride()), [rows, cfg.block_k])
    return (make(al.block_m), make(al.block_m // 2) if tail >= 1 else None,
            make(al.block_m // 4) if tail >= 2 else None)


def gather_sorted_rows(x_TD, al: AlignedRouting):
    """[S, D]: row m = x[token of sorted row m's pair], zero on padding rows (rows past the used ones
    are left unwritten: no kernel reads them). One memory-bound pass that lets the up GEMM stream
    its A tiles by TMA instead of gathering rows through pointers."""
    S, (T, D) = al.num_rows, x_TD.shape
    out = torch.empty(S, D, dtype=x_TD.dtype, device=x_TD.device)
    bs, bn = (16, 16) if _interpreted() else (min(32, al.block_m), 256)
    _gather_rows[(cdiv(S, bs), cdiv(D, bn))](
        x_TD, out, al.sorted_pair_S, al.num_padded_1, D, al.num_pairs, x_TD.stride(0), out.stride(0), al.top_k,
        BLOCK_S=bs, BLOCK_N=bn, num_warps=4)
    return out


def moe_up(x_TD, w13_EJD, al: AlignedRouting, cfg: GemmConfig, save_preact: bool, pdl: bool = False):
    """h_SI = silu(gate) * up per sorted row; also gu_SJ (gate, up pre-activations) when asked."""
    E, J, D = w13_EJD.shape
    I = J // 2
    S = al.num_rows
    h = torch.empty(S, I, dtype=x_TD.dtype, device=x_TD.device)
    gu = torch.empty(S, J, dtype=x_TD.dtype, device=x_TD.device) if save_preact else h
    w_tma = _weight_tma(w13_EJD, cfg)
    tail = _tail(al, cfg)
    a_descs = None
    if _rows_by_tma(x_TD, D, al, cfg):  # (else no gathered copy: the kernel gathers x through pointers)
        a_descs = _row_descs(gather_sorted_rows(x_TD, al), al, cfg, tail)
    grid = _persistent_grid(al, I, cfg, x_TD, w_tma)
    if grid is not None:  # (its own view of w13: gate and up tiles in one box)
        _moe_up_persistent[grid](
            x_TD, _joint_desc(w13_EJD, cfg), (a_descs or (None,))[0], h, gu, al.sorted_pair_S, al.block_expert_B, al.num_padded_1,
            D, I, al.num_pairs, x_TD.stride(0), h.stride(0), gu.stride(0),
            TOP_K=al.top_k, SAVE_PREACT=save_preact, CAST_F32=_interpreted(), PREC=_precision(x_TD.dtype),
            A_DESC=a_descs is not None, PDL=pdl,
            BLOCK_M=al.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return h, (gu if save_preact else None)
    desc = _tile_desc(w13_EJD, cfg) if w_tma else None
    _moe_up[_grid(al, I, cfg)](
        x_TD, w13_EJD, desc, *(a_descs or (None, None, None)), h, gu, al.sorted_pair_S, al.block_expert_B,
        al.num_padded_1,
        D, I, E, al.num_pairs, x_TD.stride(0), w13_EJD.stride(0), w13_EJD.stride(1), w13_EJD.stride(2),
        h.stride(0), gu.stride(0),
        TOP_K=al.top_k, PAIR_BLOCKS=al.pair_blocks, SAVE_PREACT=save_preact, CAST_F32=_interpreted(), PREC=_precision(x_TD.dtype),
        W_DESC=desc is not None, A_DESC=a_descs is not None, PDL=pdl, TAIL=tail,
        BLOCK_M=al.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return h, (gu if save_preact else None)


def moe_gemm(a, b_E, b_strides, n: int, kd: int, al: AlignedRouting, cfg: GemmConfig, *, a_gather: bool,
             c_scatter: bool, weight_P=None, out_dtype=None, pdl: bool = False):
    """C = A @ B[e]^T over the block layout; B[e][n, k] = b_E[e, ...] read through b_strides (e, n, k)."""
    rows = al.num_pairs if c_scatter else al.num_rows
    c = torch.empty(rows, n, dtype=out_dtype or a.dtype, device=a.device)
    if a.stride(-1) != 1:
        a = a.contiguous()
    # TMA only for B in its natural layout (k contiguous): the backward's transposed reads of w13 by
    # TMA measured no faster than pointer loads on the H200 (session 4, k4 run)
    natural = tuple(b_strides) == tuple(b_E.stride()) and tuple(b_E.shape[1:]) == (n, kd)
    desc = _weight_desc(b_E, cfg) if natural else None
    tail = _tail(al, cfg)
    a_descs = None if a_gather else _row_descs(a, al, cfg, tail)
    grid = _persistent_grid(al, n, cfg, a, desc is not None)
    if grid is not None:
        _moe_gemm_persistent[grid](
            a, desc, (a_descs or (None,))[0], c, weight_P if weight_P is not None else c, al.sorted_pair_S,
            al.block_expert_B, al.num_padded_1,
            n, kd, al.num_pairs, a.stride(0), c.stride(0),
            TOP_K=al.top_k, A_GATHER=a_gather, C_SCATTER=c_scatter, MUL_WEIGHT=weight_P is not None,
            CAST_F32=_interpreted(), PREC=_precision(a.dtype), A_DESC=a_descs is not None,
            PDL=pdl, BLOCK_M=al.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_pdl(pdl))
        return c
    _moe_gemm[_grid(al, n, cfg)](
        a, b_E, desc, *(a_descs or (None, None, None)), c, weight_P if weight_P is not None else c, al.sorted_pair_S,
        al.block_expert_B, al.num_padded_1,
        c, c, n, kd, b_E.shape[0], al.num_pairs, a.stride(0), b_strides[0], b_strides[1], b_strides[2], c.stride(0), 0,
        TOP_K=al.top_k, PAIR_BLOCKS=al.pair_blocks, A_GATHER=a_gather, C_SCATTER=c_scatter, MUL_WEIGHT=weight_P is not None, SWIGLU_BWD=False,
        CAST_F32=_interpreted(), PREC=_precision(a.dtype), W_DESC=desc is not None, A_DESC=a_descs is not None, PDL=pdl,
        TAIL=tail,
        BLOCK_M=al.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_pdl(pdl))
    return c


def moe_swiglu_bwd(dy_TD, w2_EDI, gu_SJ, weight_P, al: AlignedRouting, cfg: GemmConfig):
    """dh = dy[tok] @ W2[e] with the SwiGLU backward as its epilogue.

    Returns dgu_SJ (gradient of the gate and up pre-activations, routing weight applied; zero on
    padding rows) and dweight_S (fp32: d y / d routing weight of each sorted row's pair).
    """
    E, D, I = w2_EDI.shape
    S = al.num_rows
    num_n = cdiv(I, cfg.block_n)
    dgu = torch.empty(S, 2 * I, dtype=dy_TD.dtype, device=dy_TD.device)
    dw_part = torch.empty(S, num_n, dtype=torch.float32, device=dy_TD.device)
    _moe_gemm[_grid(al, I, cfg)](
        dy_TD, w2_EDI, None, None, None, None, dgu, weight_P, al.sorted_pair_S, al.block_expert_B, al.num_padded_1,
        gu_SJ, dw_part, I, D, E, al.num_pairs, dy_TD.stride(0), w2_EDI.stride(0), w2_EDI.stride(2), w2_EDI.stride(1),
        dgu.stride(0), gu_SJ.stride(0),
        TOP_K=al.top_k, PAIR_BLOCKS=al.pair_blocks, A_GATHER=True, C_SCATTER=False, MUL_WEIGHT=False, SWIGLU_BWD=True,
        CAST_F32=_interpreted(), PREC=_precision(dy_TD.dtype), W_DESC=False, A_DESC=False, PDL=False,
        TAIL=_tail(al, cfg),
        BLOCK_M=al.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # rows past num_padded were never written: their partial sums are garbage, but they map to no pair
    return dgu, dw_part.sum(dim=1)


def moe_sum(out_PD, topk_ids_TK, num_experts: int, out_dtype, pdl: bool = False):
    """y_TD = per-token sum of its real slots' rows of out_PD (fp32 sum, one write)."""
    T, K = topk_ids_TK.shape
    D = out_PD.shape[1]
    y = torch.empty(T, D, dtype=out_dtype, device=out_PD.device)
    if T == 0:
        return y
    ids = topk_ids_TK if topk_ids_TK.is_contiguous() else topk_ids_TK.contiguous()
    block_d = min(1024, next_pow2(D))
    _moe_sum[(T, cdiv(D, block_d))](out_PD, ids, y, D, num_experts, out_PD.stride(0), y.stride(0),
                                    TOP_K=K, BLOCK_D=block_d, PDL=pdl, num_warps=4, **_pdl(pdl))
    return y
