"""Eviction policies of the expert cache, as plug-ins.

A policy sees the accesses of each MoE layer and, when a slot must be freed, picks the victim
among the resident experts the cache may evict (those not in use by the current step).

    policy.bind(num_layers, num_experts)            reset, sized for a model
    policy.observe(layer, step, ids_NK)             the routing of one step at one layer (before ensure)
    policy.touch(layer, expert, clock)              an expert was used or inserted
    policy.evicted(layer, expert)
    policy.victim(layer, candidates, step) -> expert

`step` counts the forward calls of that layer (one model step = one step); `clock` is a global
access counter (recency). Shape legend: N = tokens of the step, K = experts per token,
L = MoE layers, E = experts per layer, S = steps.
"""
from __future__ import annotations

import bisect

import numpy as np


def count_ids(ids: np.ndarray) -> dict[int, int]:
    """{id: occurrences} over the ids >= 0, in ascending id order. A decode step has a handful of
    ids, where plain Python is ~10x cheaper than np.unique; a prefill's thousands go through numpy."""
    ids = np.asarray(ids)
    if ids.size <= 512:
        c: dict[int, int] = {}
        for e in ids.ravel().tolist():
            if e >= 0:
                c[e] = c.get(e, 0) + 1
        return dict(sorted(c.items()))
    flat = ids.reshape(-1)
    experts, n = np.unique(flat[flat >= 0], return_counts=True)
    return dict(zip(experts.tolist(), n.tolist()))


class Policy:
    name = "base"

    def bind(self, num_layers: int, num_experts: int) -> None:
        self.num_layers, self.num_experts = num_layers, num_experts
        self.last_use_LE = np.full((num_layers, num_experts), -1, dtype=np.int64)

    def observe(self, layer: int, step: int, ids_NK: np.ndarray) -> None:
        pass

    def touch(self, layer: int, expert: int, clock: int) -> None:
        self.last_use_LE[layer, expert] = clock

    def evicted(self, layer: int, expert: int) -> None:
        pass

    def victim(self, layer: int, candidates: list[int], step: int) -> int:
        raise NotImplementedError


class LRUPolicy(Policy):
    """Least recently used (mixtral-offloading's per-layer LRU)."""
    name = "lru"

    def victim(self, layer, candidates, step):
        return min(candidates, key=lambda e: (self.last_use_LE[layer, e], e))


LFU_HALF_LIFE = 23.0  # steps: the 'lfu' policy's half-life unless one is given (see LFUPolicy)


def resolve_lfu_half_life(value: float | None) -> float | None:
    """The half-life an 'lfu' policy is built with: LFU_HALF_LIFE for None, None (no decay: counted
    over the whole run) for math.inf, else the value."""
    if value is None:
        return LFU_HALF_LIFE
    return None if value == float("inf") else float(value)


class LFUPolicy(Policy):
    """Least frequently used; ties broken by recency. ``half_life`` (steps of a layer): each layer's
    counts halve over that many of its steps, so what the recent requests use outweighs what earlier
    ones did (None: counted over the whole run). On a trained 48-layer model's routing at 25% of the
    experts, one token a step, a half-life of 23 steps kept 0.744 of the accesses against 0.714 over
    the whole run and LRU's 0.684 (BENCHMARKS 3j)."""
    name = "lfu"

    def __init__(self, half_life: float | None = None):
        if half_life is not None and not half_life > 0:
            raise ValueError(f"half_life must be > 0 steps (or None: no decay), got {half_life}")
        self.half_life = half_life
        self._decay = 1.0 if half_life is None else 0.5 ** (1.0 / half_life)

    def bind(self, num_layers, num_experts):
        super().bind(num_layers, num_experts)
        self.count_LE = np.zeros((num_layers, num_experts), dtype=np.int64 if self.half_life is None else np.float64)

    def observe(self, layer, step, ids_NK):
        if self.half_life is not None:
            self.count_LE[layer] *= self._decay
        self.count_LE[layer, list(count_ids(ids_NK))] += 1

    def victim(self, layer, candidates, step):
        return min(candidates, key=lambda e: (self.count_LE[layer, e], self.last_use_LE[layer, e], e))


class PredictorPolicy(Policy):
    """Evict the expert least likely to be needed, by the routing predictor's probabilities.

    `lookahead` (prefetch.Lookahead) holds the latest predicted use probability of every
    (layer, expert); ties (e.g. before any prediction) fall back to LRU.
    """
    name = "predictor"

    def __init__(self, lookahead, slices: int = 1):
        self.lookahead, self.slices = lookahead, slices  # candidates are units of `slices` per expert

    def victim(self, layer, candidates, step):
        score_E, G = self.lookahead.score_LE[layer], self.slices
        return min(candidates, key=lambda u: (score_E[u // G], self.last_use_LE[layer, u], u))


class BeladyPolicy(Policy):
    """The offline optimum: evict the expert whose next use is farthest in the future.

    future[layer][step] is the set of experts that step uses (from a RoutingTrace, see
    `future_from_trace`); used by the simulator and for oracle runs over a known trace.
    """
    name = "belady"

    def __init__(self, future: list[list[np.ndarray]]):
        self.future = future
        self._uses: dict[tuple[int, int], list[int]] | None = None

    def bind(self, num_layers, num_experts):
        super().bind(num_layers, num_experts)
        if len(self.future) < num_layers:
            raise ValueError(f"the Belady future covers {len(self.future)} layers but the model has {num_layers} "
                             "MoE layers; record the trace on the same model")
        uses: dict[tuple[int, int], list[int]] = {}
        for layer in range(num_layers):
            for s, experts in enumerate(self.future[layer]):
                for e in experts:
                    uses.setdefault((layer, int(e)), []).append(s)
        self._uses = uses

    def next_use(self, layer: int, expert: int, step: int) -> float:
        steps = self._uses.get((layer, expert))
        if not steps:
            return float("inf")
        i = bisect.bisect_right(steps, step)  # strictly after the current step
        return steps[i] if i < len(steps) else float("inf")

    def victim(self, layer, candidates, step):
        return max(candidates, key=lambda e: (self.next_use(layer, e, step), -self.last_use_LE[layer, e], -e))


def future_from_trace(trace, tokens_per_step: int = 1) -> list[list[np.ndarray]]:
    """future[layer][step] = unique experts of that step's tokens (steps of `tokens_per_step` tokens)."""
    ids_LTK = trace.expert_ids
    L, T, _ = ids_LTK.shape
    out = []
    for layer in range(L):
        steps = []
        for s in range(0, T, tokens_per_step):
            chunk = ids_LTK[layer, s:s + tokens_per_step].reshape(-1)
            steps.append(np.unique(chunk[chunk >= 0]).astype(np.int64))
        out.append(steps)
    return out


def make_policy(name: str, *, lookahead=None, trace=None, tokens_per_step: int = 1, slices: int = 1,
                lfu_half_life: float | None = None) -> Policy:
    """A policy by name; 'predictor' needs a Lookahead, 'belady' a RoutingTrace (of the cache's
    units when slices > 1: offload.slices.unit_trace); 'lfu' takes ``lfu_half_life`` (None:
    LFU_HALF_LIFE; math.inf: counted over the whole run; see `resolve_lfu_half_life`)."""
    if lfu_half_life is not None and name != "lfu":
        raise ValueError(f"lfu_half_life applies to the 'lfu' policy, not {name!r}")
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy(resolve_lfu_half_life(lfu_half_life))
    if name == "predictor":
        if lookahead is None:
            raise ValueError("policy 'predictor' needs a Lookahead over a routing predictor")
        return PredictorPolicy(lookahead, slices)
    if name == "belady":
        if trace is None:
            raise ValueError("policy 'belady' needs trace=<RoutingTrace> (the future it evicts by)")
        return BeladyPolicy(future_from_trace(trace, tokens_per_step))
    raise ValueError(f"unknown policy {name!r}; choose lru, lfu, predictor or belady")
