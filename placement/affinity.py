"""Inter-layer expert affinity (ExFlow): how often a token that used expert i at MoE layer l
uses expert j at layer l + 1, and how loaded each expert is.

Shape legend: L = MoE layers, T = tokens, K = experts per token, E = experts per layer.

    pair_counts  [L-1, E, E] int64   n[l, i, j] = number of (token, slot a, slot b) with
                                     expert i in slot a at layer l and j in slot b at l + 1
    load         [L, E]      int64   token-slots routed to each expert

Top-k: a token contributes all its K x K slot pairs to each layer transition, each with
weight 1/K² (``pair_weight``), so every token's move between two layers has mass 1 and the
fraction of that mass crossing ranks is ExFlow's figure (for K = 1 exactly theirs). The
integer program works on the integer counts: scaling does not change the optimum.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from routing.trace import RoutingTrace

_CHUNK = 1 << 16  # tokens per bincount chunk: bounds the [T, K, K] temporary to a few MB


@dataclass(frozen=True, eq=False)
class AffinityStats:
    pair_counts: np.ndarray  # [L-1, E, E] int64
    load: np.ndarray  # [L, E] int64
    num_tokens: int
    top_k: int

    def __post_init__(self):
        n, load = np.asarray(self.pair_counts), np.asarray(self.load)
        if load.ndim != 2 or n.ndim != 3 or n.shape != (load.shape[0] - 1, load.shape[1], load.shape[1]):
            raise ValueError(f"pair_counts {n.shape} must be [L-1, E, E] for load [L, E] = {load.shape}")
        if (n < 0).any() or (load < 0).any():
            raise ValueError("pair counts and loads must be non-negative")
        object.__setattr__(self, "pair_counts", n.astype(np.int64, copy=False))
        object.__setattr__(self, "load", load.astype(np.int64, copy=False))

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]

    @classmethod
    def from_trace(cls, trace: RoutingTrace) -> "AffinityStats":
        if not isinstance(trace, RoutingTrace):
            raise ValueError(f"expected a RoutingTrace, got {type(trace).__name__}; load one with RoutingTrace.load(path)")
        L, T, K = trace.expert_ids.shape
        if L < 2:
            raise ValueError(f"the trace has {L} MoE layer(s); affinity needs at least 2 consecutive MoE layers")
        if T == 0:
            raise ValueError("the trace holds no tokens; record routing over some prompts first")
        E = trace.num_experts
        ids = trace.expert_ids.astype(np.int64)
        load = np.zeros((L, E), dtype=np.int64)
        for l in range(L):
            v = ids[l][ids[l] >= 0]
            load[l] = np.bincount(v, minlength=E)
        if load.sum() == 0:
            raise ValueError("every expert id in the trace is -1 (no token was routed); nothing to place")
        pairs = np.zeros((L - 1, E, E), dtype=np.int64)
        for l in range(L - 1):
            for s in range(0, T, _CHUNK):
                a = ids[l, s:s + _CHUNK]  # [t, K]
                b = ids[l + 1, s:s + _CHUNK]
                flat = a[:, :, None] * E + b[:, None, :]  # [t, K, K]
                ok = (a[:, :, None] >= 0) & (b[:, None, :] >= 0)
                pairs[l] += np.bincount(flat[ok], minlength=E * E).reshape(E, E)
        return cls(pairs, load, T, K)

    # --- derived --------------------------------------------------------------------------
    def pair_weight(self) -> np.ndarray:
        """[L-1, E, E] float: pair counts in tokens (each slot pair is 1/K² of a token's move)."""
        return self.pair_counts / float(self.top_k ** 2)

    def conditional(self, layer: int) -> np.ndarray:
        """[E, E] P(expert j at layer+1 | expert i at layer); rows of unused experts are uniform."""
        n = self.pair_counts[layer].astype(np.float64)
        s = n.sum(1, keepdims=True)
        return np.where(s > 0, n / np.maximum(s, 1), 1.0 / self.num_experts)

    def concentration(self) -> float:
        """Mass of each expert's single most likely successor, averaged over pairs (1/E = no affinity)."""
        n = self.pair_counts.astype(np.float64)
        return float(n.max(2).sum() / max(n.sum(), 1))


def synthetic_affinity_trace(num_layers: int, num_experts: int, num_groups: int, num_tokens: int,
                             top_k: int = 1, stay: float = 0.9, seed: int = 0) -> tuple[RoutingTrace, np.ndarray]:
    """A trace with a planted affinity structure, for tests and benchmarks.

    At every layer the experts are split into ``num_groups`` equal groups (a random partition,
    different per layer). A token follows one group through the layers; at each transition it
    stays in the group with probability ``stay`` and otherwise jumps to a random group. Inside
    its group it takes ``top_k`` distinct experts, skewed (Zipf-like) so that loads differ.
    The best placement with ``num_groups`` ranks puts each layer's group g on one rank.

    Returns the trace and ``groups [L, E]`` (the planted group of each expert).
    """
    E, G = num_experts, num_groups
    if E % G or E // G < top_k:
        raise ValueError(f"num_experts ({E}) must split into {G} equal groups of at least top_k={top_k} experts")
    if not 0.0 <= stay <= 1.0:
        raise ValueError(f"stay must be a probability, got {stay}")
    rng = np.random.default_rng(seed)
    size = E // G
    members = np.stack([rng.permutation(E).reshape(G, size) for _ in range(num_layers)])  # [L, G, size]
    groups = np.empty((num_layers, E), dtype=np.int64)
    for l in range(num_layers):
        for g in range(G):
            groups[l, members[l, g]] = g
    pop = 1.0 / np.arange(1, size + 1) ** 0.8
    pop /= pop.sum()
    g_T = rng.integers(0, G, num_tokens)
    ids = np.empty((num_layers, num_tokens, top_k), dtype=np.int16)
    for l in range(num_layers):
        if l:
            jump = rng.random(num_tokens) > stay
            g_T = np.where(jump, rng.integers(0, G, num_tokens), g_T)
        # top_k distinct members per token via Gumbel top-k over the skewed popularity
        keys = np.log(pop)[None, :] + rng.gumbel(size=(num_tokens, size))
        pick = np.argsort(-keys, axis=1)[:, :top_k]  # [T, K] positions inside the group
        ids[l] = members[l][g_T[:, None], pick]
    req = (np.arange(num_tokens) // 64).astype(np.int32)
    pos = (np.arange(num_tokens) % 64).astype(np.int32)
    trace = RoutingTrace(ids, E, request_ids=req, positions=pos,
                         meta={"synthetic": "planted_affinity", "groups": G, "stay": stay, "seed": seed})
    return trace, groups
