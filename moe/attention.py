"""Self-attention of the decoder: grouped-query attention (Mixtral, Qwen2/3-MoE, OLMoE) and
DeepSeek's multi-head latent attention (MLA) in its plain decompressed form.

Shape legend: B = batch rows, T = new tokens, S = key slots (cache slots, or T without a cache),
D = hidden size, H = query heads, G = key/value heads, d = head size, R = rotary dims,
C = kv_lora_rank (MLA latent), Dn / Dv = MLA no-rope key / value head size.

Both kinds take the same arguments: hidden states, cos/sin of each token's absolute position,
a boolean mask [B, 1, T, S] (True = may attend) and an optional KV cache; or, for a packed step of rows
feeding different token counts (``PackedStep``, in the mask's place), the packed tokens [1, N, D]. The KV cache stores
keys and values already expanded to heads (for MLA: decompressed K [B, H, S, Dn+R] and
V [B, H, S, Dv]), so a decoding step does no per-slot recomputation.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .config import MoEConfig
from .kv_cache import KVCache, PackedStep
from .layers import RMSNorm, apply_rope, apply_rope_halves, mla_softmax_scale


# how a decode step (one new token per row) attends on CUDA at inference: "triton" =
# kernels.decode_attention (the same bits on every run, and whatever else is in the batch), "sdpa" =
# torch's SDPA (cuDNN on the H200, not repeatable run to run: BENCHMARKS 6e). MOEFLOW_DECODE_ATTENTION
# sets it at import; benchmarks/decode.py switches it to time both.
DECODE_ATTENTION = os.environ.get("MOEFLOW_DECODE_ATTENTION", "triton")
if DECODE_ATTENTION not in ("triton", "sdpa"):
    raise ValueError(f"MOEFLOW_DECODE_ATTENTION must be 'triton' or 'sdpa', got {DECODE_ATTENTION!r}")

# how a packed step (PackedStep: rows feeding different token counts) attends: "auto" = in one launch over the
# whole step where every attention module can (kernels.packed_attention: grouped-query attention at inference on
# CUDA, a cache of the activations' dtype), else part by part; "always" = the one launch off CUDA too (the Triton
# interpreter: tests); "never" = part by part (each part a [rows, T] call of its own; benchmarks time both).
PACKED_ATTENTION = os.environ.get("MOEFLOW_PACKED_ATTENTION", "auto")
if PACKED_ATTENTION not in ("auto", "always", "never"):
    raise ValueError(f"MOEFLOW_PACKED_ATTENTION must be 'auto', 'always' or 'never', got {PACKED_ATTENTION!r}")


def _packs_in_one_launch(module: nn.Module, head_sizes: tuple[int, ...], dtype: torch.dtype, cache: KVCache,
                         device: torch.device) -> bool:
    """Whether an attention module can run a packed step in one launch (kernels.packed_attention; PACKED_ATTENTION):
    on CUDA (or where asked), at inference (no gradient asked of its parameters), on a KVCache of the activations'
    dtype, with key and value heads the kernel takes."""
    if PACKED_ATTENTION == "never" or (PACKED_ATTENTION == "auto" and device.type != "cuda"):
        return False
    from kernels.decode_attention import MAX_HEAD
    return (not (torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()))
            and isinstance(cache, KVCache) and cache.dtype == dtype and max(head_sizes) <= MAX_HEAD)


def attend(q_BHTd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor, mask_B1TS: torch.Tensor,
           scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v, with G key/value heads shared by H/G query heads each."""
    if DECODE_ATTENTION == "triton" and q_BHTd.shape[2] == 1 and kernels.inference_on_cuda(q_BHTd, k_BGSd, v_BGSd):
        from kernels.decode_attention import decode_attention, supports
        if supports(q_BHTd, k_BGSd, v_BGSd, mask_B1TS):
            return decode_attention(q_BHTd, k_BGSd, v_BGSd, mask_B1TS, scale)
    gqa = q_BHTd.shape[1] != k_BGSd.shape[1]
    return F.scaled_dot_product_attention(q_BHTd, k_BGSd, v_BGSd, attn_mask=mask_B1TS, scale=scale,
                                          enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query attention with optional q/k RMSNorm ('full': over the whole projection, OLMoE;
    'head': per head, Qwen3-MoE) and optional clipping of q/k/v (OLMoE clip_qkv)."""

    def __init__(self, cfg: MoEConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        H, G, d, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, d
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(D, H * d, bias=cfg.qkv_bias, **kw)
        self.k_proj = nn.Linear(D, G * d, bias=cfg.qkv_bias, **kw)
        self.v_proj = nn.Linear(D, G * d, bias=cfg.qkv_bias, **kw)
        self.o_proj = nn.Linear(H * d, D, bias=cfg.o_bias, **kw)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "full":
            self.q_norm = RMSNorm(H * d, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(G * d, cfg.rms_norm_eps, **kw)
        elif cfg.qk_norm == "head":
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        self.clip_qkv = cfg.clip_qkv
        self.scale = d ** -0.5

    def _fused_qkv(self, x_BTD: torch.Tensor) -> bool:
        """Whether forward computes q, k and v in one launch: inference on CUDA, at most
        kernels.proj.MAX_ROWS tokens (decode), no projection biases, weights of x's dtype."""
        if not kernels.inference_on_cuda(x_BTD, self.q_proj.weight):
            return False
        from kernels.proj import MAX_ROWS
        return (x_BTD.shape[0] * x_BTD.shape[1] <= MAX_ROWS
                and all(m.bias is None and m.weight.dtype == x_BTD.dtype
                        for m in (self.q_proj, self.k_proj, self.v_proj)))

    def _fused_prep(self, q: torch.Tensor, cache: KVCache | None) -> bool:
        """Whether forward prepares q/k/v in one kernel: inference on CUDA with a cache of the same
        dtype, per-head or no q/k norm, no clipping, an even head size."""
        # a KVCache itself: wrappers of it (placement's recorder of the new keys) go through update()
        return (kernels.inference_on_cuda(q, self.q_proj.weight) and isinstance(cache, KVCache)
                and cache.dtype == q.dtype and self.qk_norm in ("none", "head") and self.clip_qkv is None
                and self.head_dim % 2 == 0)

    def packs(self, dtype: torch.dtype, cache: KVCache, device: torch.device) -> bool:
        """Whether a packed step's attention can run in one launch here (_packs_in_one_launch), with an even head
        size (the prep kernel's rotation)."""
        return self.head_dim % 2 == 0 and _packs_in_one_launch(self, (self.head_dim,), dtype, cache, device)

    def packed_heads(self) -> tuple[int, int]:
        """(query heads, key/value heads) as the cache holds them: what a packed step's query blocks are cut for."""
        return self.num_heads, self.num_kv_heads

    def _forward_packed(self, x_1ND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: PackedStep,
                        cache: KVCache) -> torch.Tensor:
        """A packed step in one pass (the model checked ``packs``): the projections over the N tokens at once, the
        q/k preparation and the cache writes in one kernel (each token to its own row), attention in one launch."""
        from kernels.attn_prep import prepare_qkv_rows
        from kernels.packed_attention import packed_attention
        N = x_1ND.shape[1]
        H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
        x_ND = x_1ND[0]
        if self._fused_qkv(x_1ND):
            from kernels.proj import multi_linear
            q, k, v = multi_linear(x_ND, [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        else:
            q, k, v = self.q_proj(x_ND), self.k_proj(x_ND), self.v_proj(x_ND)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        k_all, v_all = cache.buffers(self.layer_idx, G, d, d)
        qw, kw = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm == "head" else (None, None)
        q_HNd = prepare_qkv_rows(q, k, v, cos[0], sin[0], qw, kw, self.q_norm.eps if qw is not None else 0.0,
                                 k_all, v_all, step.row_N, step.slot_N, H, G)
        out_NHd = packed_attention(q_HNd, k_all, v_all, step.table, self.scale)
        return self.o_proj(out_NHd.view(1, N, H * d))

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask_B1TS: torch.Tensor,
                cache: KVCache | None = None, num_slots: int = 0) -> torch.Tensor:
        if isinstance(mask_B1TS, PackedStep):  # a packed step (x is [1, N, D]): in one pass, or part by part
            return mask_B1TS.attend(self, x_BTD, cos, sin, cache)
        B, T, _ = x_BTD.shape
        if self._fused_qkv(x_BTD):
            # a decode step on a GPU: the three GEMVs in one Triton launch (kernels/proj.py)
            from kernels.proj import multi_linear
            q, k, v = (t.view(B, T, -1) for t in multi_linear(
                x_BTD.reshape(B * T, -1), [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        else:
            q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self._fused_prep(q, cache):
            # inference on a GPU: per-head q/k norms, rotations and the cache write in one Triton
            # kernel (kernels/attn_prep.py) instead of ~12 small ones
            from kernels.attn_prep import prepare_qkv
            H, G, d = self.num_heads, self.num_kv_heads, self.head_dim
            k_all, v_all = cache.buffers(self.layer_idx, G, d, d)
            qw, kw = (self.q_norm.weight, self.k_norm.weight) if self.qk_norm == "head" else (None, None)
            q_BHTd = prepare_qkv(q, k, v, cos, sin, qw, kw, self.q_norm.eps if qw is not None else 0.0,
                                 k_all, v_all, cache.new_slots(T), H, G)
            out_BHTd = attend(q_BHTd, k_all[:, :, :num_slots], v_all[:, :, :num_slots], mask_B1TS, self.scale)
            return self.o_proj(out_BHTd.transpose(1, 2).reshape(B, T, -1))
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q_BHTd = apply_rope_halves(q.transpose(1, 2), cos, sin)
        k_BGTd = apply_rope_halves(k.transpose(1, 2), cos, sin)
        v_BGTd = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k_BGTd, v_BGTd = cache.update(self.layer_idx, k_BGTd, v_BGTd, num_slots)
        out_BHTd = attend(q_BHTd, k_BGTd.to(q_BHTd.dtype), v_BGTd.to(q_BHTd.dtype), mask_B1TS, self.scale)
        return self.o_proj(out_BHTd.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention, decompressed: the latent c = norm(W_kva x) is
    expanded by kv_b_proj into per-head no-rope keys and values; one shared rotary key per token."""

    def __init__(self, cfg: MoEConfig, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        H, D = cfg.num_attention_heads, cfg.hidden_size
        self.num_heads = H
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        qk = self.nope + self.rope
        kw = dict(dtype=dtype, device=device)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False, **kw)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.o_bias, **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, **kw)  # transformers uses the default eps here
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False, **kw)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.rope, bias=cfg.o_bias, **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, **kw)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False, **kw)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=cfg.o_bias, **kw)
        self.interleave = cfg.rope_interleave
        self.scale = mla_softmax_scale(cfg)

    def packs(self, dtype: torch.dtype, cache: KVCache, device: torch.device) -> bool:
        """Whether a packed step's attention can run in one launch here (_packs_in_one_launch; the cache holds every
        head's decompressed keys and values, so each query head is its own key/value head)."""
        return _packs_in_one_launch(self, (self.nope + self.rope, self.v_dim), dtype, cache, device)

    def packed_heads(self) -> tuple[int, int]:
        return self.num_heads, self.num_heads

    def _forward_packed(self, x_1ND: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: PackedStep,
                        cache: KVCache) -> torch.Tensor:
        """A packed step in one pass (the model checked ``packs``): the projections over the N tokens at once, each
        token's keys and values written into its own cache row, attention in one launch."""
        from kernels.packed_attention import packed_attention
        N = x_1ND.shape[1]
        q_1HNd, k_1HNd, v_1HNe = self._qkv(x_1ND, cos, sin)
        k_all, v_all = cache.buffers(self.layer_idx, self.num_heads, k_1HNd.shape[-1], v_1HNe.shape[-1])
        k_all[step.row_N, :, step.slot_N] = k_1HNd[0].transpose(0, 1).to(k_all.dtype)
        v_all[step.row_N, :, step.slot_N] = v_1HNe[0].transpose(0, 1).to(v_all.dtype)
        out_NHe = packed_attention(q_1HNd[0], k_all, v_all, step.table, self.scale)
        return self.o_proj(out_NHe.reshape(1, N, self.num_heads * self.v_dim))

    def _qkv(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, H, T, Dn+R] and the decompressed keys [B, H, T, Dn+R] and values [B, H, T, Dv] of new tokens."""
        B, T, _ = x_BTD.shape
        H = self.num_heads
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTq = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q_BHTq.split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope], dim=-1)
        kv_BHT = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v_BHTv = kv_BHT.split([self.nope, self.v_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        k_pe_B1TR = apply_rope(k_pe.view(B, 1, T, self.rope), cos, sin, self.interleave)
        q_BHTd = torch.cat([q_nope, q_pe], dim=-1)
        k_BHTd = torch.cat([k_nope, k_pe_B1TR.expand(B, H, T, self.rope)], dim=-1)
        return q_BHTd, k_BHTd, v_BHTv

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask_B1TS: torch.Tensor,
                cache: KVCache | None = None, num_slots: int = 0) -> torch.Tensor:
        if isinstance(mask_B1TS, PackedStep):  # a packed step (x is [1, N, D]): in one pass, or part by part
            return mask_B1TS.attend(self, x_BTD, cos, sin, cache)
        B, T, _ = x_BTD.shape
        H = self.num_heads
        q_BHTd, k_BHTd, v_BHTv = self._qkv(x_BTD, cos, sin)
        if cache is not None:
            k_BHTd, v_BHTv = cache.update(self.layer_idx, k_BHTd, v_BHTv, num_slots)
        out_BHTv = attend(q_BHTd, k_BHTd.to(q_BHTd.dtype), v_BHTv.to(q_BHTd.dtype), mask_B1TS, self.scale)
        return self.o_proj(out_BHTv.transpose(1, 2).reshape(B, T, H * self.v_dim))
