"""Softmax top-k routing in one Triton kernel, for inference on CUDA tensors (the routers of Mixtral,
Qwen2/3-MoE and OLMoE at decode).

    logits_TE (float32) = cast(router GEMM output)
    probs  = softmax(logits_TE)                     in float32
    ids_TK, w_TK = the k largest probs, largest first (ties: the lower expert id first)
    w_TK  /= sum(w_TK)                              if renormalize

``softmax_topk_reference`` is the same in torch ops (``routing.gating.softmax_topk`` on the cast
logits): a cast, softmax, top-k, sum and divide, five or six kernels per MoE layer; at decode of
Qwen3-30B-A3B shapes they were ~11 us of a ~120 us layer step replayed from a CUDA graph. Here one
program per token reads its E logits once. The float32 logits are written too (the router's third
output, which trace recorders and the next-layer-gate prefetch read). E up to MAX_EXPERTS, k up to
MAX_K; otherwise the reference runs. No backward (inference only).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import Launcher
from .launch_config import next_pow2

MAX_EXPERTS = 1024
MAX_K = 32


@triton.jit
def _softmax_topk_kernel(logits_ptr, out_ptr, ids_ptr, w_ptr, E, stride_l, K: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, RENORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    x = tl.load(logits_ptr + t * stride_l + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * E + offs, x, mask=mask)
    x = tl.where(mask, x, float("-inf"))
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    # probabilities not yet taken; padding is never taken; NaN (a broken row: every entry is then
    # NaN) ranks above any number as in torch.topk, so the ids stay in range and the weights NaN
    left = tl.where(mask, tl.where(p != p, 2.0, p), -1.0)
    offs_k = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    w = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for j in tl.static_range(K):
        best = tl.max(left, axis=0)
        pick = tl.min(tl.where(left == best, offs, BLOCK_E), axis=0)  # the lowest id among equals
        ids = tl.where(offs_k == j, pick.to(tl.int64), ids)
        w = tl.where(offs_k == j, tl.where(best > 1.5, float("nan"), best), w)
        left = tl.where(offs == pick, -1.0, left)
    if RENORM:
        w = w / tl.sum(w, axis=0)
    kmask = offs_k < K
    tl.store(ids_ptr + t * K + offs_k, ids, mask=kmask)
    tl.store(w_ptr + t * K + offs_k, w, mask=kmask)


_softmax_topk = Launcher(_softmax_topk_kernel)  # launched without per-call binding (kernels/launch.py)


def softmax_topk_reference(logits_TE: torch.Tensor, k: int, renormalize: bool):
    """(ids_TK int64, w_TK float32, logits_TE float32) in torch ops (routing.gating.softmax_topk)."""
    logits = logits_TE.float()
    w, ids = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w, logits


@functools.lru_cache(maxsize=64)
def _launch(E: int, k: int) -> dict:
    block = next_pow2(E)
    return dict(BLOCK_E=block, BLOCK_K=next_pow2(k), num_warps=max(1, min(4, block // 256)))


def softmax_topk(logits_TE: torch.Tensor, k: int, renormalize: bool):
    """(ids_TK int64, w_TK float32, logits_TE float32) of the router logits [T, E] (any float dtype)."""
    if logits_TE.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits_TE.shape)}")
    T, E = logits_TE.shape
    if not 1 <= k <= E:
        raise ValueError(f"top-k of {k} out of {E} experts")
    if E > MAX_EXPERTS or k > MAX_K:
        return softmax_topk_reference(logits_TE, k, renormalize)
    x = logits_TE if logits_TE.stride(-1) == 1 else logits_TE.contiguous()
    dev = logits_TE.device
    out = torch.empty(T, E, dtype=torch.float32, device=dev)
    ids = torch.empty(T, k, dtype=torch.int64, device=dev)
    w = torch.empty(T, k, dtype=torch.float32, device=dev)
    if T:
        _softmax_topk[(T,)](x, out, ids, w, E, x.stride(0), K=k, RENORM=renormalize, **_launch(E, k))
    return ids, w, out
