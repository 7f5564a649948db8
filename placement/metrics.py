"""Figures of a placement plan on a routing trace: cross-rank transitions and bytes moved.

Shape legend: L = MoE layers, T = tokens, K = experts per token, E = experts, P = ranks.

The communication model (the runtime in placement/runtime.py moves exactly these messages):

- Every token has an *origin* rank (data-parallel sharding: its request id mod P, or its
  index mod P when the trace has no request ids).
- Standard expert parallelism (two all-to-alls per layer): at every MoE layer the token is
  sent from its origin to each distinct rank holding one of its K experts (dispatch) and one
  partial sum comes back from each (combine). Copies sent to the origin itself are free.
- Context-coherent (ExFlow; one all-to-all per layer for top-1): every rank keeps the whole
  context, so the token need not return. It is dispatched from its current *home* to the
  ranks of its experts; its new home is the rank carrying most of its routing weight; the
  other ranks send their partial sums there (for top-1 nothing: the token stays where its
  expert ran). At the first layer the home is the origin.
- A replicated expert is taken on the token's home when a copy is there; otherwise, by the
  plan's ``copy_choice``, "spread": one copy chosen by token index (spreads load) among the copies
  on the home's node, or among all when the node has none (session 5: spreading over all copies
  sent tokens across nodes past a copy beside them), or "home": the primary (copies placed by
  affinity serve the tokens homed on them only).

``cross_fraction`` is ExFlow's figure: of every token's consecutive-layer move (K x K slot
pairs at weight 1/K², so mass 1 per token and transition), the part whose two experts ran on
different ranks. ``hop_cost`` weighs a cross-node move 2 and a cross-GPU move inside a node 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from routing.trace import RoutingTrace

from .affinity import AffinityStats
from .plan import PlacementPlan


@dataclass(frozen=True)
class PlanFigures:
    cross_fraction: float  # of consecutive-layer token moves, the part crossing ranks
    cross_node_fraction: float  # ... crossing nodes
    hop_cost: float  # mean weighted hops per token move (cross-node 2, cross-GPU 1)
    cc_bytes_per_token: float  # context-coherent: bytes one token moves over all layers
    ep_bytes_per_token: float  # standard EP (dispatch + combine from the origin rank)
    cc_messages_per_token: float  # number of (token, rank) messages, context-coherent
    ep_messages_per_token: float
    load_imbalance: float  # max rank load / mean rank load, averaged over layers (1 = even)

    def as_dict(self) -> dict:
        return asdict(self)


def origin_ranks(trace: RoutingTrace, num_ranks: int) -> np.ndarray:
    """[T] the data-parallel rank each token starts on."""
    if trace.request_ids is not None:
        return (trace.request_ids.astype(np.int64) % num_ranks)
    return np.arange(trace.num_tokens, dtype=np.int64) % num_ranks


def _copies_table(plan: PlacementPlan, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """[E, C] ranks of every copy of each expert (-1 padded), [E] number of copies."""
    copies = [plan.ranks_of(layer, e) for e in range(plan.num_experts)]
    C = max(len(c) for c in copies)
    tab = np.full((plan.num_experts, C), -1, dtype=np.int64)
    for e, c in enumerate(copies):
        tab[e, :len(c)] = c
    return tab, np.array([len(c) for c in copies], dtype=np.int64)


def _slot_ranks(plan: PlacementPlan, layer: int, ids_TK: np.ndarray, home_T: np.ndarray) -> np.ndarray:
    """[T, K] the rank each slot runs on (-1 for id -1)."""
    valid = ids_TK >= 0
    e = np.where(valid, ids_TK, 0)
    if plan.replicas is None or not plan.replicas[layer]:
        r = plan.assignment_array()[layer][e]
    else:
        tab, _ = _copies_table(plan, layer)
        cand = tab[e]  # [T, K, C]
        at_home = (cand == home_T[:, None, None]).any(-1)
        if plan.copy_choice == "home":  # the primary (copy 0) for tokens with no copy at home
            other = cand[..., 0]
        else:
            G = plan.ranks_per_node
            have = cand >= 0
            near = have & (cand // G == (home_T // G)[:, None, None])
            pool = np.where(near.any(-1, keepdims=True), near, have)
            j = np.arange(len(home_T))[:, None] % pool.sum(-1)  # [T, K]: the j-th copy of the pool
            other = (cand * (pool & (np.cumsum(pool, -1) - 1 == j[..., None]))).sum(-1)
        r = np.where(at_home, home_T[:, None], other)
    return np.where(valid, r, -1)


def _distinct(r_TK: np.ndarray) -> np.ndarray:
    """[T] number of distinct ranks (ignoring -1) per token."""
    s = np.sort(r_TK, axis=1)
    first = (s >= 0) & np.concatenate([np.ones((len(s), 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    return first.sum(1)


def _contains(r_TK: np.ndarray, x_T: np.ndarray) -> np.ndarray:
    return (r_TK == x_T[:, None]).any(1)


def _new_home(r_TK: np.ndarray, w_TK: np.ndarray, home_T: np.ndarray) -> np.ndarray:
    """The rank carrying most routing weight (ties: the earlier slot); unchanged if no slot."""
    valid = r_TK >= 0
    same = (r_TK[:, :, None] == r_TK[:, None, :]) & valid[:, None, :]
    score = np.where(valid, (same * w_TK[:, None, :]).sum(2), -1.0)
    best = np.argmax(score, axis=1)
    h = r_TK[np.arange(len(r_TK)), best]
    return np.where(valid.any(1), h, home_T)


def evaluate(plan: PlacementPlan, trace: RoutingTrace, hidden_size: int = 4096,
             dtype_bytes: int = 2) -> PlanFigures:
    """Simulate the plan on the trace token by token (the reference for ``cross_fraction_fast``)."""
    if hidden_size <= 0 or dtype_bytes <= 0:
        raise ValueError(f"hidden_size ({hidden_size}) and dtype_bytes ({dtype_bytes}) must be positive")
    L, T, K = trace.expert_ids.shape
    plan.check_compatible(L, trace.num_experts)
    if T == 0:
        raise ValueError("the trace holds no tokens")
    P, G = plan.num_ranks, plan.ranks_per_node
    ids = trace.expert_ids.astype(np.int64)
    w = trace.weights if trace.weights is not None else np.ones(ids.shape, np.float32)
    origin = origin_ranks(trace, P)
    home = origin.copy()
    cc_msgs = ep_msgs = 0.0
    cross = cross_node = mass = 0.0
    imbalance = []
    prev = None
    for l in range(L):
        r_cc = _slot_ranks(plan, l, ids[l], home)
        r_ep = _slot_ranks(plan, l, ids[l], origin)
        n_cc, n_ep = _distinct(r_cc), _distinct(r_ep)
        ep_msgs += 2.0 * (n_ep - _contains(r_ep, origin)).sum()
        new_home = _new_home(r_cc, np.where(ids[l] >= 0, w[l], 0.0), home)
        cc_msgs += (n_cc - _contains(r_cc, home)).sum() + (n_cc - _contains(r_cc, new_home)).sum()
        home = new_home
        load = np.bincount(r_cc[r_cc >= 0], minlength=P)
        if load.sum():
            imbalance.append(load.max() / load.mean())
        if prev is not None:
            a, b = prev[:, :, None], r_cc[:, None, :]
            ok = (a >= 0) & (b >= 0)
            mass += ok.sum()
            cross += (ok & (a != b)).sum()
            cross_node += (ok & (a // G != b // G)).sum()
        prev = r_cc
    mass = max(mass, 1.0)
    per_tok = hidden_size * dtype_bytes / T
    return PlanFigures(
        cross_fraction=float(cross / mass), cross_node_fraction=float(cross_node / mass),
        hop_cost=float((cross + cross_node) / mass),  # a cross-node move counts once more
        cc_bytes_per_token=float(cc_msgs * per_tok), ep_bytes_per_token=float(ep_msgs * per_tok),
        cc_messages_per_token=float(cc_msgs / T), ep_messages_per_token=float(ep_msgs / T),
        load_imbalance=float(np.mean(imbalance)) if imbalance else 1.0)


def cross_counts(assignment_LE: np.ndarray, stats: AffinityStats, ranks_per_node: int | None = None) -> tuple[int, int]:
    """(slot pairs crossing ranks, slot pairs crossing nodes) from the aggregated counts.

    Equals ``evaluate``'s cross figures times the pair total for plans without replicas; this
    is what the integer program optimises.
    """
    a = np.asarray(assignment_LE, dtype=np.int64)
    n = stats.pair_counts
    diff = a[:-1, :, None] != a[1:, None, :]  # [L-1, E, E]
    cross = int((n * diff).sum())
    if ranks_per_node is None:
        return cross, 0
    dn = (a[:-1, :, None] // ranks_per_node) != (a[1:, None, :] // ranks_per_node)
    return cross, int((n * dn).sum())


def cross_fraction_fast(plan: PlacementPlan, stats: AffinityStats) -> float:
    if plan.replicas:
        raise ValueError("cross_fraction_fast ignores replicas; use evaluate(plan, trace) for plans with replicas")
    plan.check_compatible(stats.num_layers, stats.num_experts)
    c, _ = cross_counts(plan.assignment_array(), stats)
    return c / max(int(stats.pair_counts.sum()), 1)
