"""Baseline placements the integer program is measured against.

Shape legend: L = MoE layers, E = experts per layer, P = ranks.

- ``round_robin``: expert e of every layer on rank e mod P (what plain expert parallelism does).
- ``greedy_affinity``: layer by layer, each expert goes to the rank where most of its
  predecessors' traffic already sits, heaviest experts first, respecting the per-rank capacity.
  Also the integer program's warm start.
- ``eplb``: load balancing as DeepSeek's EPLB does it: the hottest experts get extra copies
  (one extra slot per rank by default), then copies are packed onto ranks heaviest first,
  each to the least loaded rank with a free slot. Ignores affinity.
"""
from __future__ import annotations

import time

import numpy as np

from .affinity import AffinityStats
from .metrics import cross_counts
from .plan import PlacementPlan


def rank_capacity(num_experts: int, num_ranks: int, balance: str = "strict") -> tuple[int, int]:
    """(min, max) experts per rank per layer; raises ValueError when balance cannot hold."""
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    if balance not in ("strict", "relaxed"):
        raise ValueError(f"balance must be 'strict' or 'relaxed', got {balance!r}")
    if num_experts < num_ranks:
        raise ValueError(f"{num_experts} experts per layer cannot be spread over {num_ranks} ranks (every rank "
                         f"would need at least one); use at most {num_experts} ranks or replicate experts (eplb)")
    if balance == "strict":
        if num_experts % num_ranks:
            raise ValueError(f"balanced placement needs num_experts ({num_experts}) divisible by the number of "
                             f"ranks ({num_ranks}); pick a divisor of {num_experts} or balance='relaxed' "
                             "(moe place --balance relaxed)")
        return num_experts // num_ranks, num_experts // num_ranks
    return num_experts // num_ranks, -(-num_experts // num_ranks)


def _plan(assign: np.ndarray, num_ranks: int, num_nodes: int, method: str, stats: AffinityStats | None,
          t0: float, replicas=None, status: str = "heuristic") -> PlacementPlan:
    obj = {}
    if stats is not None:
        c, cn = cross_counts(assign, stats, num_ranks // num_nodes)
        obj = {"cross_pairs": c, "cross_node_pairs": cn, "total_pairs": int(stats.pair_counts.sum())}
    return PlacementPlan(assign.tolist(), num_ranks, num_nodes, replicas=replicas, method=method, objective=obj,
                         solve_time_s=time.perf_counter() - t0, solver_status=status)


def round_robin(num_layers: int, num_experts: int, num_ranks: int, num_nodes: int = 1,
                stats: AffinityStats | None = None) -> PlacementPlan:
    t0 = time.perf_counter()
    rank_capacity(num_experts, num_ranks, "relaxed")
    assign = np.tile(np.arange(num_experts) % num_ranks, (num_layers, 1))
    return _plan(assign, num_ranks, num_nodes, "round_robin", stats, t0)


def greedy_assignment(stats: AffinityStats, num_ranks: int, balance: str = "strict",
                      first_layer: np.ndarray | None = None) -> np.ndarray:
    """[L, E] greedy affinity chain (see module doc); ranks are interchangeable, so layer 0 is
    load-balanced packing (heaviest first to the least loaded rank) unless ``first_layer`` is given."""
    L, E, P = stats.num_layers, stats.num_experts, num_ranks
    lo, hi = rank_capacity(E, P, balance)
    assign = np.empty((L, E), dtype=np.int64)
    if first_layer is None:
        assign[0] = _pack_by_load(stats.load[0], P, hi)
    else:
        assign[0] = first_layer
    for l in range(1, L):
        n = stats.pair_counts[l - 1]  # [E_prev, E]
        # affinity of expert j to rank p: traffic from predecessors already placed on p
        aff = np.zeros((E, P), dtype=np.float64)
        np.add.at(aff.T, assign[l - 1], n)  # aff[j, p] = sum_i n[i, j] [assign[i] = p]
        free = np.full(P, hi, dtype=np.int64)
        # ranks still owed experts to reach their minimum
        need = np.full(P, lo, dtype=np.int64)
        order = np.argsort(-(aff.max(1) * 2 - aff.sum(1)), kind="stable")  # most decided first
        remaining = E
        for j in order:
            must = need.clip(min=0).sum() >= remaining  # only ranks below minimum may take it
            ok = (free > 0) & ((need > 0) if must else True)
            score = np.where(ok, aff[j], -np.inf)
            p = int(np.argmax(score + 1e-9 * free))  # ties: the emptier rank
            assign[l, j] = p
            free[p] -= 1
            need[p] -= 1
            remaining -= 1
    return assign


def _pack_by_load(load_E: np.ndarray, num_ranks: int, cap: int) -> np.ndarray:
    out = np.empty(len(load_E), dtype=np.int64)
    tot = np.zeros(num_ranks)
    cnt = np.zeros(num_ranks, dtype=np.int64)
    for e in np.argsort(-load_E, kind="stable"):
        cand = np.where(cnt < cap, tot, np.inf)
        p = int(np.argmin(cand))
        out[e] = p
        tot[p] += load_E[e]
        cnt[p] += 1
    return out


def greedy_affinity(stats: AffinityStats, num_ranks: int, num_nodes: int = 1,
                    balance: str = "strict") -> PlacementPlan:
    t0 = time.perf_counter()
    return _plan(greedy_assignment(stats, num_ranks, balance), num_ranks, num_nodes, "greedy_affinity", stats, t0)


def eplb(stats: AffinityStats, num_ranks: int, num_nodes: int = 1, extra_slots_per_rank: int = 1) -> PlacementPlan:
    """Balanced packing with replicated hot experts (each rank gets E/P + extra slots)."""
    t0 = time.perf_counter()
    L, E, P = stats.num_layers, stats.num_experts, num_ranks
    if extra_slots_per_rank < 0:
        raise ValueError(f"extra_slots_per_rank must be >= 0, got {extra_slots_per_rank}")
    rank_capacity(E, P, "relaxed")
    slots = -(-E // P) + extra_slots_per_rank
    n_copies_total = min(slots * P, E * P)
    assign = np.empty((L, E), dtype=np.int64)
    replicas = []
    for l in range(L):
        load = stats.load[l].astype(np.float64)
        copies = np.ones(E, dtype=np.int64)
        # give the next copy to the expert whose per-copy load is largest (EPLB's rule)
        for _ in range(n_copies_total - E):
            cand = np.where(copies < P, load / copies, -1.0)
            e = int(np.argmax(cand))
            if cand[e] <= 0:
                break
            copies[e] += 1
        items = [(load[e] / copies[e], e) for e in range(E) for _ in range(copies[e])]
        items.sort(key=lambda t: (-t[0], t[1]))
        tot = np.zeros(P)
        cnt = np.zeros(P, dtype=np.int64)
        where: dict[int, list[int]] = {}
        for w, e in items:
            taken = where.get(e, [])
            cand = np.where((cnt < slots) & ~np.isin(np.arange(P), taken), tot, np.inf)
            p = int(np.argmin(cand))
            if not np.isfinite(cand[p]):
                # every rank with a free slot already holds this expert: drop the extra copy
                # (a first copy always fits: there are at least as many slots as copies)
                continue
            where.setdefault(e, []).append(p)
            tot[p] += w
            cnt[p] += 1
        for e in range(E):
            assign[l, e] = where[e][0]
        replicas.append({e: tuple(r[1:]) for e, r in where.items() if len(r) > 1})
    return _plan(assign, P, num_nodes, "eplb", stats, t0, replicas=replicas)
