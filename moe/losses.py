"""Losses and routing rules used while training MoE layers.

    load_balancing_loss   Switch / GShard auxiliary loss  E * sum_e f_e * P_e
    router_z_loss         ST-MoE z-loss                   mean_t logsumexp(logits_t)^2
    update_correction_bias  DeepSeek-V3 auxiliary-loss-free balancing: the selection bias of
                          each expert moves by +-rate against the sign of its load error,
                          outside autograd
    jitter                Switch router jitter: the router's input times U(1-eps, 1+eps)
    capacity / apply_capacity  Tutel's capacity rule and token dropping
    RouterAuxCollector    applies all of the above to a whole model through hooks on the
                          routers of ``model.moe_blocks()``

Shape legend: T = tokens, E = experts, K = experts per token (top-k).

    router_logits_TE   raw router scores (float32)
    topk_ids_TK        chosen experts; -1 = no expert (dropped)
    load_E             assignments each expert received

Formulas (f_e and P_e are fractions, so a perfectly balanced router scores exactly 1.0):

    f_e = #{(t, k): topk_ids[t, k] = e} / (T * K)     fraction of assignments routed to e
    P_e = mean_t p_t[e]                               mean router probability of e
    load_balancing_loss = E * sum_e f_e * P_e

Hugging Face's ``load_balancing_loss_func`` sums the same product over the K slots without the
1/K, so its value is K times this one. Capacity (Tutel's adaptive rule), with
mean = T * K / E assignments per expert and needed = the largest load in the batch:

    f > 0   capacity = ceil(f * mean)                 fixed; assignments past it are dropped
    f = 0   capacity = needed                         dropless (the default)
    f < 0   capacity = min(needed, ceil(|f| * mean))  grows with the batch, capped at |f| * mean

Dropping keeps first choices before second choices (slot-major order, as GShard), and earlier
tokens before later ones within a slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SCORE_FUNCS = ("softmax", "sigmoid")


def router_probs(router_logits_TE: torch.Tensor, score_func: str = "softmax") -> torch.Tensor:
    """Per-token probability over experts: softmax, or sigmoid scores normalised to sum to 1
    (DeepSeek-V3's sequence-wise balance loss uses the normalised sigmoid scores)."""
    logits = router_logits_TE.float()
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sigmoid":
        s = logits.sigmoid()
        return s / s.sum(dim=-1, keepdim=True)
    raise ValueError(f"unknown score_func {score_func!r}; choose one of {SCORE_FUNCS}")


def expert_load(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments each expert received (ids of -1 are not counted); int64 [E].

    A scatter-add rather than bincount or boolean indexing: no device-to-host sync on a GPU.
    """
    ids = topk_ids_TK.reshape(-1).long()
    load = torch.zeros(num_experts, dtype=torch.long, device=ids.device)
    return load.scatter_add_(0, ids.clamp(min=0), (ids >= 0).long())


def load_balancing_loss(router_logits_TE: torch.Tensor, topk_ids_TK: torch.Tensor,
                        score_func: str = "softmax") -> torch.Tensor:
    """Switch/GShard load-balancing loss  E * sum_e f_e * P_e  (1.0 when perfectly balanced).

    Differentiable through P_e only (f_e counts discrete choices), as in Switch.
    """
    T, E = router_logits_TE.shape
    if topk_ids_TK.shape[0] != T:
        raise ValueError(f"router logits have {T} tokens but topk_ids has {topk_ids_TK.shape[0]}")
    if T == 0:
        return router_logits_TE.sum() * 0.0
    K = topk_ids_TK.shape[1]
    f_E = expert_load(topk_ids_TK, E).to(torch.float32) / (T * K)
    P_E = router_probs(router_logits_TE, score_func).mean(dim=0)
    return E * (f_E * P_E).sum()


def router_z_loss(router_logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    if router_logits_TE.shape[0] == 0:
        return router_logits_TE.sum() * 0.0
    return torch.logsumexp(router_logits_TE.float(), dim=-1).square().mean()


@torch.no_grad()
def update_correction_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3 auxiliary-loss-free balancing, in place: b_e += rate * sign(mean load - load_e).

    An overloaded expert's bias falls and an underloaded one's rises, so the biased top-k
    selection drifts toward balance; the bias only selects, it never weights the output, and no
    gradient flows through it.
    """
    if bias_E.shape != load_E.shape:
        raise ValueError(f"bias shape {tuple(bias_E.shape)} != load shape {tuple(load_E.shape)}")
    load = load_E.to(torch.float32)
    err = load.mean() - load
    bias_E.add_(rate * torch.sign(err).to(bias_E.dtype))
    return bias_E


def jitter(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Switch router jitter: x times noise drawn uniformly from [1 - eps, 1 + eps]."""
    if eps <= 0:
        return x
    noise = torch.rand(x.shape, device=x.device, dtype=torch.float32, generator=generator)
    return x * (1.0 - eps + 2.0 * eps * noise).to(x.dtype)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float, needed: int) -> int:
    """Tutel's capacity rule (see the module docstring); `needed` = largest expert load."""
    mean = num_tokens * top_k / num_experts
    if capacity_factor > 0:
        return max(1, math.ceil(capacity_factor * mean))
    if capacity_factor == 0:
        return needed
    return min(needed, max(1, math.ceil(-capacity_factor * mean)))


def apply_capacity(topk_ids_TK: torch.Tensor, num_experts: int, capacity_factor: float
                   ) -> tuple[torch.Tensor, int, int]:
    """Drop the assignments that overflow each expert's capacity.

    Returns (topk_ids_TK with dropped slots set to -1, number dropped, capacity). With
    capacity_factor == 0 nothing is dropped and the ids come back unchanged.
    """
    T, K = topk_ids_TK.shape
    load_E = expert_load(topk_ids_TK, num_experts)
    needed = int(load_E.max()) if T else 0
    cap = capacity(T, K, num_experts, capacity_factor, needed)
    if cap >= needed:
        return topk_ids_TK, 0, cap
    # rank of each assignment inside its expert, in slot-major order: a stable sort by expert id
    # keeps the slot-major order inside each expert's group
    flat = topk_ids_TK.t().reshape(-1).long()
    key = torch.where(flat < 0, torch.full_like(flat, num_experts), flat)  # -1 sorts last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    keep = (rank < cap) | (flat < 0)
    dropped = int((~keep).sum())
    kept = torch.where(keep, flat, torch.full_like(flat, -1)).view(K, T).t().to(topk_ids_TK.dtype)
    return kept.contiguous(), dropped, cap


def balance_stats(load_E: torch.Tensor) -> dict[str, float]:
    """max/mean load and coefficient of variation (std/mean) of one layer's expert load."""
    load = load_E.to(torch.float64)
    mean = load.mean()
    if mean <= 0:
        return {"max_over_mean": 0.0, "cv": 0.0}
    return {"max_over_mean": float(load.max() / mean), "cv": float(load.std(unbiased=False) / mean)}


@dataclass(frozen=True)
class BalanceConfig:
    """How routers are trained: aux-loss weights, aux-free bias rate, jitter, capacity."""
    lb_coef: float = 0.01  # weight of the load-balancing loss in the objective (0 = off)
    z_coef: float = 0.001  # weight of the router z-loss (0 = off)
    bias_rate: float = 0.0  # DeepSeek-V3 bias update speed (0 = off); needs e_score_correction_bias
    jitter_eps: float = 0.0  # router jitter noise (0 = off); applied in training mode only
    capacity_factor: float = 0.0  # Tutel rule: 0 dropless, >0 fixed, <0 adaptive capped at |f|
    score_func: str = "softmax"

    def __post_init__(self):
        for name in ("lb_coef", "z_coef", "bias_rate", "jitter_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.jitter_eps >= 1:
            raise ValueError(f"jitter_eps must be < 1 (noise is U(1-eps, 1+eps)), got {self.jitter_eps}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func {self.score_func!r} unknown; choose one of {SCORE_FUNCS}")


@dataclass
class MoEAux:
    """Auxiliary losses and statistics of one or more MoE layers for one forward pass."""
    lb_loss: torch.Tensor
    z_loss: torch.Tensor
    load_LE: torch.Tensor  # int64 [layers, E], on the routers' device
    dropped: int = 0
    capacity: int | None = None
    tokens: int = 0

    def loss(self, cfg: BalanceConfig) -> torch.Tensor:
        """The weighted auxiliary objective to add to the task loss."""
        return cfg.lb_coef * self.lb_loss + cfg.z_coef * self.z_loss

    def balance(self) -> dict[str, float]:
        """Load balance averaged over layers: max/mean load, coefficient of variation."""
        stats = [balance_stats(row) for row in self.load_LE.cpu()]
        if not stats:
            return {"max_over_mean": 0.0, "cv": 0.0}
        return {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}


@dataclass
class _Record:
    logits: list = field(default_factory=list)
    ids: list = field(default_factory=list)
    dropped: int = 0
    capacity: int | None = None
    tokens: int = 0


class RouterAuxCollector:
    """Hooks on the routers of ``model.moe_blocks()`` that turn a model's forward into aux losses.

    A forward pre-hook adds jitter to the router input (training mode only); a forward hook
    records (router_logits, topk_ids) and, when a capacity factor is set, returns the ids with
    dropped assignments set to -1 (the expert seam computes nothing for them). ``collect()``
    returns the MoEAux of everything since the last call; ``update_bias()`` runs the
    auxiliary-loss-free bias step on routers that carry ``e_score_correction_bias``.
    Use as a context manager, or call ``remove()``.
    """

    def __init__(self, model, cfg: BalanceConfig = BalanceConfig(), generator: torch.Generator | None = None):
        self.cfg = cfg
        self.generator = generator
        self.blocks = list(model.moe_blocks())
        if not self.blocks:
            raise ValueError("the model has no MoE blocks (model.moe_blocks() is empty); nothing to balance")
        self.records = [_Record() for _ in self.blocks]
        self.pending_load = [None] * len(self.blocks)
        self.handles = []
        for i, block in enumerate(self.blocks):
            self.handles.append(block.router.register_forward_pre_hook(self._pre_hook))
            self.handles.append(block.router.register_forward_hook(self._make_hook(i)))

    def _pre_hook(self, module, args):
        if self.cfg.jitter_eps > 0 and module.training and torch.is_grad_enabled():
            return (jitter(args[0], self.cfg.jitter_eps, self.generator),) + tuple(args[1:])
        return None

    def _make_hook(self, i: int):
        def hook(module, args, out):
            topk_ids, topk_weights, logits = out
            rec = self.records[i]
            replaced = None
            if self.cfg.capacity_factor != 0:
                ids, dropped, cap = apply_capacity(topk_ids, logits.shape[-1], self.cfg.capacity_factor)
                rec.dropped += dropped
                rec.capacity = cap
                if dropped:
                    replaced = (ids, topk_weights, logits)
            # the loss and the load statistics see the router's own choices, before any drop
            # (Switch: f_e is the fraction of tokens routed to e, not the fraction kept)
            rec.logits.append(logits)
            rec.ids.append(topk_ids.detach())
            rec.tokens += logits.shape[0]
            return replaced
        return hook

    def collect(self) -> MoEAux:
        """Aux losses (averaged over layers) and loads of everything recorded since the last call."""
        lbs, zs, loads = [], [], []
        dropped, cap, tokens = 0, None, 0
        for i, rec in enumerate(self.records):
            if not rec.logits:
                continue
            logits = torch.cat(rec.logits) if len(rec.logits) > 1 else rec.logits[0]
            ids = torch.cat(rec.ids) if len(rec.ids) > 1 else rec.ids[0]
            lbs.append(load_balancing_loss(logits, ids, self.cfg.score_func))
            zs.append(router_z_loss(logits))
            load = expert_load(ids, logits.shape[-1])
            loads.append(load)
            self.pending_load[i] = load if self.pending_load[i] is None else self.pending_load[i] + load
            dropped += rec.dropped
            cap = rec.capacity if rec.capacity is not None else cap
            tokens = max(tokens, rec.tokens)
            self.records[i] = _Record()
        if not lbs:
            raise RuntimeError("no router ran since the last collect(); call the model first")
        return MoEAux(torch.stack(lbs).mean(), torch.stack(zs).mean(), torch.stack(loads),
                      dropped, cap, tokens)

    def update_bias(self) -> int:
        """One aux-free bias step per router with e_score_correction_bias, from the loads collected
        since the last step. Returns how many routers were updated."""
        n = 0
        for i, block in enumerate(self.blocks):
            load = self.pending_load[i]
            self.pending_load[i] = None
            bias = getattr(block.router, "e_score_correction_bias", None)
            if self.cfg.bias_rate <= 0 or load is None or bias is None:
                continue
            update_correction_bias(bias.data, load.to(bias.device), self.cfg.bias_rate)
            n += 1
        return n

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
