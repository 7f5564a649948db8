"""Affinity-aware replicas: extra copies of experts where the tokens that need them already are.

EPLB replicates hot experts and places the copies by load alone. In the context-coherent mode
(placement/metrics.py) a token reaches layer l on its *home* rank, and a replicated expert is
taken on the home when a copy is there. So a copy of expert e on rank r keeps local every token
that arrives on r and uses e: ``add_affinity_replicas`` gives every rank ``extra_slots`` more
experts per layer, chosen layer by layer from the tokens' actual homes on the trace:

    gain[r, e] = weighted hops (metrics.hop_cost) saved on the moves into and out of this layer
                 when the tokens homed on r that use e run it on r (e not yet on r); the moves
                 out are judged against the next layer's primaries, so a copy that pulls
                 tokens away from their next experts counts against itself

Copies on different ranks (or of different experts) keep different tokens local, so the gains
are independent within a layer and each rank simply takes its ``extra_slots`` largest with a
positive gain; the tokens' homes at the next layer are then simulated with those copies in place.
Such copies serve only the tokens homed on them (the plan's ``copy_choice`` "home"): spreading the
others over them, as EPLB's copies do, made near-perfect plans worse. On the trained 64-expert
trace (BENCHMARKS 6) one copy per rank takes the ILP plan from 50.1% to 58.3% fewer cross-rank
moves than round robin at 8 ranks, but leaves its token-load imbalance (3.6x the mean on the
busiest rank): these copies sit where the hot experts' tokens already are. ``copies="load"``
chooses what to copy by load instead (EPLB's rule), places it by the same gain and spreads the
other tokens over the copies ("spread"): with 2 copies per rank the imbalance falls to 2.6x at
47.7% fewer moves.

Shape legend: L = MoE layers, T = tokens, K = experts per token, E = experts, P = ranks.
"""
from __future__ import annotations

import time

import numpy as np

from routing.trace import RoutingTrace

from .metrics import _new_home, _slot_ranks, origin_ranks
from .plan import PlacementPlan


COPY_MODES = ("affinity", "load")


def add_affinity_replicas(plan: PlacementPlan, trace: RoutingTrace, extra_slots: int = 1,
                          copies: str = "affinity") -> PlacementPlan:
    """``plan`` with ``extra_slots`` copies per rank and layer (its own replicas, if any, are
    replaced). Every rank then holds E / P + extra_slots experts a layer: the memory of
    ``extra_slots`` more experts per rank.

    copies="affinity": each rank copies the experts that keep the most moves local (the gain).
    copies="load": what to copy is EPLB's choice (the largest token load per copy next), each copy
    placed on the free slot with the largest gain: fewer cross-rank moves given up for balance
    (tokens not homed on any copy are spread over the copies)."""
    t0 = time.perf_counter()
    L, T, K = trace.expert_ids.shape
    plan.check_compatible(L, trace.num_experts)
    P, E = plan.num_ranks, plan.num_experts
    if extra_slots < 0:
        raise ValueError(f"extra_slots must be >= 0, got {extra_slots}")
    if copies not in COPY_MODES:
        raise ValueError(f"copies must be one of {COPY_MODES}, got {copies!r}")
    if extra_slots > E - -(-E // P):
        raise ValueError(f"extra_slots ({extra_slots}) leaves no expert to copy: a rank holds "
                         f"{-(-E // P)} of {E} experts already")
    if T == 0:
        raise ValueError("the trace holds no tokens; record routing over some prompts first")
    ids = trace.expert_ids.astype(np.int64)
    w = trace.weights if trace.weights is not None else np.ones(ids.shape, np.float32)
    assign = np.asarray(plan.assignment)
    replicas: list[dict[int, tuple[int, ...]]] = []
    home = origin_ranks(trace, P)
    G = plan.ranks_per_node
    # affinity copies serve the tokens homed on them; hot-expert copies also take a share of the rest
    choice = "home" if copies == "affinity" else "spread"

    def cost(a, b):  # weighted hops between ranks (metrics.hop_cost): 0 same rank, 1 same node, 2 other
        return np.where(a < 0, 0.0, np.where(a == b, 0.0, np.where(a // G == b // G, 1.0, 2.0)))

    prev = None  # [T, K] slot ranks at the layer before (as the simulation ran them)
    for l in range(L):
        valid = ids[l] >= 0
        e_TK = np.where(valid, ids[l], 0)
        # gain[r, e]: the weighted hops saved on the metric's K x K slot pairs (each 1/K² of a
        # token's move) when the slots of tokens homed on r that use e run on r instead of e's
        # primary: the pairs from the layer before, and those into the next layer (whose slots
        # are estimated at their primaries), so a copy that pulls a token away from its next
        # experts counts against itself
        prim = assign[l][e_TK]
        h = home[:, None]
        d = np.zeros(prim.shape)
        if prev is not None:
            d += (cost(prev[:, :, None], prim[:, None, :]) - cost(prev[:, :, None], h[:, :, None])).sum(1)
        if l + 1 < L:
            nxt = np.where(ids[l + 1] >= 0, assign[l + 1][np.where(ids[l + 1] >= 0, ids[l + 1], 0)], -1)
            d += (cost(nxt[:, None, :], prim[:, :, None]) - cost(nxt[:, None, :], h[:, :, None])).sum(2)
        flat = (h * E + e_TK)[valid]
        gain = np.bincount(flat, weights=d[valid], minlength=P * E).reshape(P, E) / float(K * K)
        gain[assign[l], np.arange(E)] = -np.inf  # a rank never copies its own primary
        layer_reps: dict[int, list[int]] = {}
        if extra_slots and copies == "load":
            # EPLB's choice of what to copy (the largest load per copy next), placed where its
            # tokens are (the free slot with the largest gain)
            load = np.bincount(e_TK[valid], minlength=E).astype(np.float64)
            n_copies = np.ones(E)
            free = np.full(P, extra_slots)
            held = np.zeros((P, E), bool)  # [P, E] which rank holds which expert (primaries, then copies)
            held[assign[l], np.arange(E)] = True
            for _ in range(P * extra_slots):
                ok = (free[:, None] > 0) & ~held
                cand = np.where(ok.any(0), load / n_copies, -1.0)
                e = int(np.argmax(cand))
                if cand[e] <= 0:
                    break
                r = int(np.argmax(np.where(ok[:, e], gain[:, e], -np.inf)))
                layer_reps.setdefault(e, []).append(r)
                held[r, e] = True
                n_copies[e] += 1
                free[r] -= 1
        elif extra_slots:
            for r in range(P):
                top = np.argsort(-gain[r], kind="stable")[:extra_slots]
                for e in top:
                    if gain[r, e] > 0:
                        layer_reps.setdefault(int(e), []).append(r)
        replicas.append({e: tuple(sorted(rs)) for e, rs in layer_reps.items()})
        # the homes at the next layer, with this layer's copies in place (as evaluate() moves them)
        part = PlacementPlan(assign[l:l + 1].tolist(), P, plan.num_nodes, replicas=(replicas[-1],),
                             copy_choice=choice)
        r_TK = _slot_ranks(part, 0, ids[l], home)
        home = _new_home(r_TK, np.where(valid, w[l], 0.0), home)
        prev = r_TK
    meta = dict(plan.meta, replicated_from=plan.method, extra_slots=extra_slots, copies=copies)
    return PlacementPlan(plan.assignment, P, plan.num_nodes, replicas=tuple(replicas), copy_choice=choice,
                         method=f"{plan.method}+{'rep' if copies == 'affinity' else 'load'}{extra_slots}",
                         objective=dict(plan.objective),
                         solve_time_s=plan.solve_time_s + time.perf_counter() - t0,
                         solver_status=plan.solver_status, meta=meta)
