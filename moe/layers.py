"""Building blocks of the decoder: RMSNorm, rotary embedding, dense SwiGLU MLP, the expert module
and the sparse MoE block.

Shape legend: B = batch rows, T = tokens per row, N = B*T flattened tokens, D = hidden size,
E = experts, I = expert ffn size, J = 2*I, K = experts per token, R = rotary dims.

MoE block data flow (one layer):

    x_BTD -> x_ND -> router(x_ND) -> (topk_ids_NK, topk_weights_NK, logits_NE)
                 -> experts(x_ND, topk_ids_NK, topk_weights_NK)   (kernels backend seam)
                 (+ shared_experts(x_ND) [* sigmoid(shared_expert_gate(x_ND))])  -> y_BTD
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from routing.gating import Router

from .config import MoEConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 and cast back before the weight, as the Hugging Face models do.
        # Inference on a GPU: one Triton kernel (kernels/norm.py); else F.rms_norm (that
        # normalisation, x * rsqrt(mean(x^2) + eps), in one kernel instead of pow, mean, add, rsqrt
        # and mul) with the cast and the weight: a decode step runs 4-5 norms per layer
        if kernels.inference_on_cuda(x, self.weight):
            from kernels.norm import rms_norm  # Triton is only imported where a GPU runs
            return rms_norm(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """Dense SwiGLU MLP (dense layers and shared experts): down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --- rotary embedding -------------------------------------------------------------------------
def rope_inv_freq(cfg: MoEConfig, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin scale (yarn's attention factor; 1 otherwise)."""
    rp = cfg.rope_parameters
    dim, base = cfg.rope_dim, float(rp["rope_theta"])
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim
    inv_freq = 1.0 / (base ** exponents)
    kind = rp["rope_type"]
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / float(rp["factor"]), 1.0
    # yarn: interpolate low frequencies, keep high ones, ramp in between (YaRN, Peng et al. 2023)
    orig = rp["original_max_position_embeddings"]
    factor = rp.get("factor") or cfg.max_position_embeddings / orig
    mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
    attn_factor = rp.get("attention_factor")
    if attn_factor is None:
        attn_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                       if mscale and mscale_all else yarn_mscale(factor))
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, float(attn_factor)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(cfg: MoEConfig) -> float:
    """DeepSeek's softmax scale: 1/sqrt(qk head dim), times mscale^2 under a scaled rope (yarn)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rp = cfg.rope_parameters
    if rp["rope_type"] != "default" and rp.get("mscale_all_dim"):
        m = yarn_mscale(rp["factor"], rp["mscale_all_dim"])
        scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin [B, T, R/2] of absolute positions [B, T] (each row has its own positions)."""

    def __init__(self, cfg: MoEConfig, device=None):
        super().__init__()
        self.cfg = cfg
        inv_freq, self.scale = rope_inv_freq(cfg, device=device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) would round the frequencies; recompute them in float32 on the new device
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = rope_inv_freq(self.cfg, device=self.inv_freq.device)[0]
        return self

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions_BT[..., None].float() * self.inv_freq
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)


class _RopeTables(threading.local):
    """The half-split rotation as two full-width tables, kept for the cos/sin of the current forward.

    x rotated = x * [cos, cos] + [x2, x1] * [-sin, sin] (x1, x2 the halves): the same products and
    sums as apply_rope's, so the same numbers, in 4 kernels per call instead of 7, the tables made
    once per forward for every layer (the first call with new cos/sin tensors builds them; the held
    references make the identity check safe). One per thread: forwards in two threads never read
    each other's tables."""
    cos = sin = cos_full = sin_signed = None


_rope_tables = _RopeTables()


def apply_rope_halves(x_BHTR: torch.Tensor, cos_BTr: torch.Tensor, sin_BTr: torch.Tensor) -> torch.Tensor:
    """apply_rope(x, cos, sin, interleave=False), with the tables shared by the layers of a forward."""
    t = _rope_tables
    if t.cos is not cos_BTr or t.sin is not sin_BTr:
        t.cos, t.sin = cos_BTr, sin_BTr
        t.cos_full = torch.cat([cos_BTr, cos_BTr], dim=-1)[:, None]
        t.sin_signed = torch.cat([-sin_BTr, sin_BTr], dim=-1)[:, None]
    half = x_BHTR.shape[-1] // 2
    swapped = torch.cat([x_BHTR[..., half:], x_BHTR[..., :half]], dim=-1)
    return x_BHTR * t.cos_full + swapped * t.sin_signed


def apply_rope(x_BHTR: torch.Tensor, cos_BTr: torch.Tensor, sin_BTr: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x by its positions. interleave=False: pairs (i, i+R/2) (Llama/Mixtral/Qwen layout).
    interleave=True: pairs (2i, 2i+1) (DeepSeek's layout); the result is written de-interleaved
    (evens' rotation, then odds'), as transformers does: q and k share the permutation, so q.k is
    the same as with the interleaved result."""
    cos, sin = cos_BTr[:, None], sin_BTr[:, None]
    if interleave:
        a, b = x_BHTR[..., 0::2], x_BHTR[..., 1::2]
    else:
        half = x_BHTR.shape[-1] // 2
        a, b = x_BHTR[..., :half], x_BHTR[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


# --- experts ------------------------------------------------------------------------------------
class Experts(nn.Module):
    """The routed experts of one MoE layer: w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I].

    forward goes through the kernels backend named by ``self.backend``; offload/ and placement/
    replace this module with their own of the same forward signature.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "torch",
                 dtype=None, device=None):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype,
                                            device=device))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device))
        kernels.get_backend(backend)  # fail at construction on an unknown name
        self.backend = backend

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        return kernels.get_backend(self.backend)(x_TD, self.w13, self.w2, topk_ids_TK, topk_weights_TK)

    def extra_repr(self) -> str:
        E, J, D = self.w13.shape
        return f"experts={E}, hidden={D}, ffn={J // 2}, backend={self.backend!r}"


class SparseMoEBlock(nn.Module):
    """Router + routed experts (+ shared experts). ``layer_idx``: decoder layer; ``moe_index``: 0..n_moe-1."""

    def __init__(self, cfg: MoEConfig, layer_idx: int, moe_index: int, backend: str = "torch", dtype=None,
                 device=None):
        super().__init__()
        self.layer_idx, self.moe_index = layer_idx, moe_index
        self.router = Router.from_config(cfg, dtype=dtype, device=device)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, backend, dtype, device)
        self.shared_experts: MLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if cfg.model_type == "qwen2_moe" and cfg.shared_expert_intermediate_size:
            self.shared_experts = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, dtype, device)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, device=device)
        elif cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, device)

    def forward(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
        x_ND, topk_ids_NK, topk_weights_NK = self.route(x_BTD, valid_BT)
        return self.combine(x_BTD, x_ND, self.experts(x_ND, topk_ids_NK, topk_weights_NK))

    def route(self, x_BTD: torch.Tensor, valid_BT: torch.Tensor | None = None):
        """(x_ND, topk_ids_NK, topk_weights_NK): the routed experts' inputs. forward = route, experts,
        combine; moe.cuda_graph's piecewise decode runs the experts (host-deciding) between the two."""
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        topk_ids_NK, topk_weights_NK, _ = self.router(x_ND)
        if valid_BT is not None:
            # padding and idle batch rows take no expert (-1 contributes zero): no expert math and,
            # when offloading, no expert fetched for them. The router still sees every row, so
            # trace recorders keep their [B*T] shape and filter by the valid mask themselves.
            topk_ids_NK = torch.where(valid_BT.reshape(-1, 1), topk_ids_NK, -1)  # one kernel (not ~ and fill)
        return x_ND, topk_ids_NK, topk_weights_NK

    def combine(self, x_BTD: torch.Tensor, x_ND: torch.Tensor, y_ND: torch.Tensor) -> torch.Tensor:
        """The block's output [B, T, D]: the routed experts' y_ND plus the shared experts' part."""
        if self.shared_experts is not None:
            shared_ND = self.shared_experts(x_ND)
            if self.shared_expert_gate is not None:
                shared_ND = torch.sigmoid(self.shared_expert_gate(x_ND)) * shared_ND
            y_ND = y_ND + shared_ND
        return y_ND.reshape(x_BTD.shape)
