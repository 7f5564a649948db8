"""Gating: from router logits to the top-k experts of each token and their weights.

Shape legend: T = tokens, D = hidden size, E = experts, K = experts per token, G = expert groups.

    softmax_topk            Mixtral (renormalise), Qwen2/3-MoE and OLMoE (renormalise if norm_topk_prob)
    group_limited_greedy    DeepSeek-V2: softmax scores; keep the topk_group groups with the highest
                            max score, then top-k inside them; weights = scores * routed_scaling_factor
    noaux_tc                DeepSeek-V3: sigmoid scores; the correction bias only steers selection
                            (groups ranked by the sum of their top-2 biased scores, then top-k of the
                            biased scores in the kept groups); weights are the unbiased scores,
                            optionally renormalised, times routed_scaling_factor

All functions return ``(topk_ids_TK int64, topk_weights_TK float32)`` and compute in float32.
``Router`` is the nn.Module the model calls; forward hooks on it may read or replace its output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


def softmax_topk(logits_TE: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    w_TK, ids_TK = torch.topk(probs_TE, k, dim=-1)
    if renormalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return ids_TK, w_TK


def _group_mask(group_scores_TG: torch.Tensor, topk_group: int, experts_per_group: int) -> torch.Tensor:
    """Boolean [T, E]: the experts of each token's topk_group best groups."""
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_TG.scatter_(1, torch.topk(group_scores_TG, topk_group, dim=-1, sorted=False)[1], True)
    return keep_TG.repeat_interleave(experts_per_group, dim=1)


def greedy_topk(logits_TE: torch.Tensor, k: int, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 'greedy': top-k of the softmax scores, no renormalisation, scaled."""
    scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    w_TK, ids_TK = torch.topk(scores_TE, k, dim=-1, sorted=False)
    return ids_TK, w_TK * scaling


def group_limited_greedy(logits_TE: torch.Tensor, k: int, n_group: int, topk_group: int,
                         scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: groups ranked by their best softmax score; top-k inside the kept groups."""
    T, E = logits_TE.shape
    scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    group_TG = scores_TE.view(T, n_group, E // n_group).amax(dim=-1)
    keep_TE = _group_mask(group_TG, topk_group, E // n_group)
    w_TK, ids_TK = torch.topk(scores_TE.masked_fill(~keep_TE, 0.0), k, dim=-1, sorted=False)
    return ids_TK, w_TK * scaling


def noaux_tc(logits_TE: torch.Tensor, k: int, n_group: int, topk_group: int, bias_E: torch.Tensor | None,
             renormalize: bool, scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: sigmoid scores, bias-corrected group-limited selection, weights from unbiased scores."""
    T, E = logits_TE.shape
    scores_TE = torch.sigmoid(logits_TE.float())
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    group_TG = choice_TE.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    keep_TE = _group_mask(group_TG, topk_group, E // n_group)
    ids_TK = torch.topk(choice_TE.masked_fill(~keep_TE, float("-inf")), k, dim=-1, sorted=False)[1]
    w_TK = scores_TE.gather(1, ids_TK)
    if renormalize:
        w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return ids_TK, w_TK * scaling


class Router(nn.Module):
    """Linear router + gating function of one MoE layer.

    forward(x_TD) -> (topk_ids_TK int64, topk_weights_TK float32, router_logits_TE float32)
    ``weight`` is [E, D] (Hugging Face ``mlp.gate.weight``); DeepSeek-V3 also has the buffer
    ``e_score_correction_bias`` [E].
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, scoring_func: str = "softmax",
                 topk_method: str = "greedy", norm_topk_prob: bool = False, n_group: int | None = None,
                 topk_group: int | None = None, routed_scaling_factor: float = 1.0, deepseek: bool = False,
                 correction_bias: bool = False, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        if topk_method in ("group_limited_greedy", "noaux_tc") and (not n_group or not topk_group):
            raise ValueError(f"topk_method {topk_method!r} needs n_group and topk_group")
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring_func, self.topk_method = scoring_func, topk_method
        self.norm_topk_prob, self.n_group, self.topk_group = norm_topk_prob, n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.deepseek = deepseek
        # DeepSeek keeps its router in float32 (as transformers does); the others use the model dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, device=device,
                                               dtype=torch.float32 if deepseek else dtype))
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device,
                                                                        dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    @classmethod
    def from_config(cls, cfg, dtype=None, device=None) -> "Router":
        ds = cfg.model_type.startswith("deepseek")
        return cls(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, scoring_func=cfg.scoring_func,
                   topk_method=cfg.topk_method, norm_topk_prob=cfg.norm_topk_prob or cfg.model_type == "mixtral",
                   n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                   deepseek=ds, correction_bias=cfg.topk_method == "noaux_tc", dtype=dtype, device=device)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD.to(self.weight.dtype), self.weight).float()

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._fused(x_TD):
            # inference on a GPU: the cast, softmax, top-k and renormalisation in one Triton kernel
            # (kernels/router.py; the lower id first among equal probabilities)
            from kernels.router import softmax_topk as fused_softmax_topk
            return fused_softmax_topk(F.linear(x_TD.to(self.weight.dtype), self.weight), self.top_k,
                                      self.norm_topk_prob)
        logits_TE = self.logits(x_TD)
        k = self.top_k
        if self.topk_method == "noaux_tc":
            ids, w = noaux_tc(logits_TE, k, self.n_group, self.topk_group, self.e_score_correction_bias,
                              self.norm_topk_prob, self.routed_scaling_factor)
        elif self.topk_method == "group_limited_greedy":
            ids, w = group_limited_greedy(logits_TE, k, self.n_group, self.topk_group, self.routed_scaling_factor)
        elif self.deepseek:
            # transformers' DeepSeek-V2 'greedy' ignores norm_topk_prob; so do we, to give the same output
            ids, w = greedy_topk(logits_TE, k, self.routed_scaling_factor)
        else:
            ids, w = softmax_topk(logits_TE, k, self.norm_topk_prob)
        return ids.long(), w.float(), logits_TE

    def _fused(self, x_TD: torch.Tensor) -> bool:
        """Whether forward takes the one-kernel softmax top-k: the plain softmax gating (not DeepSeek's),
        on CUDA, with no gradient asked for."""
        return (kernels.inference_on_cuda(x_TD, self.weight) and not self.deepseek
                and self.topk_method not in ("noaux_tc", "group_limited_greedy"))

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, method={self.topk_method}, "
                f"scoring={self.scoring_func}, norm_topk_prob={self.norm_topk_prob}")
