"""Local search for the placement program: exact layer moves, random restarts, crossover.

Shape legend: L = MoE layers, n = experts per layer, P = parts (ranks), M = nodes.

The objective (ilp.py) couples only consecutive layers, and the experts of one layer never
interact with each other: with every other layer fixed, re-placing one layer is a transport
problem (experts -> parts with capacities lo..hi, profit = pair mass to the experts already on
that part in the layers below and above), solved exactly by a min-cost flow. Pairwise swaps of
two experts of a layer (Kernighan-Lin) are a subset of that move, so a layer at its flow optimum
admits no improving swap. Sweeping the layers until none improves is a coordinate descent whose
result depends strongly on where it starts: on the 64-expert trained trace a descent from the
greedy affinity chain stops ~4 points of round-robin traffic above descents from random
starts, because the greedy chain fixes layer 0 by load and every later layer follows it.

So the search runs many descents from random balanced starts (plus the given hint), keeps an
elite, and recombines elite pairs: the child takes one parent's layers below a cut and the
other's above, the latter with its parts renamed to match across the cut (parts are
interchangeable: a linear assignment on the [P, P] pair mass at the cut), then descends again.
Every candidate is judged by the caller's full objective (``score``: cross pairs, hop cost,
load and overfill terms), so the result is never worse than the best start.
"""
from __future__ import annotations

import time

import importlib

import numpy as np


def ortools_module(name: str):
    """An OR-Tools module (e.g. 'ortools.sat.python.cp_model'), imported on first use: plans,
    their JSON and the runtime work without OR-Tools (the GPU machines have none); only solving
    needs it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("solving a placement needs OR-Tools (pip install ortools); on a machine without "
                                  "it, load a plan solved elsewhere (PlacementPlan.load / TieredPlan.load)",
                                  name="ortools") from e


def assign_layer(aff_nP: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Experts -> parts maximising the total affinity, lo..hi per part (exact, min-cost flow)."""
    n, P = aff_nP.shape
    if n < P * lo or n > P * hi:
        raise ValueError(f"{n} experts cannot be put into {P} parts of {lo}..{hi}")
    f = ortools_module("ortools.graph.python.min_cost_flow").SimpleMinCostFlow()
    src, sink = n + P, n + P + 1
    big = int(np.abs(aff_nP).sum()) + 1  # filling a part up to `lo` outweighs any affinity
    parts = n + np.arange(P)
    tails = [np.full(n, src), np.repeat(np.arange(n), P), parts]
    heads = [np.arange(n), np.tile(parts, n), np.full(P, sink)]
    caps = [np.ones(n), np.ones(n * P), np.full(P, lo)]
    costs = [np.zeros(n), -aff_nP.reshape(-1), np.full(P, -big)]
    if hi > lo:  # the optional seats above the minimum, free
        tails.append(parts)
        heads.append(np.full(P, sink))
        caps.append(np.full(P, hi - lo))
        costs.append(np.zeros(P))
    arcs = f.add_arcs_with_capacity_and_unit_cost(
        np.concatenate(tails).astype(np.int32), np.concatenate(heads).astype(np.int32),
        np.concatenate(caps).astype(np.int64), np.concatenate(costs).astype(np.int64))
    f.set_node_supply(src, n)
    f.set_node_supply(sink, -n)
    if f.solve() != f.OPTIMAL:
        raise ValueError(f"{n} experts cannot be put into {P} parts of {lo}..{hi}")
    return f.flows(arcs[n:n + n * P]).reshape(n, P).argmax(1).astype(np.int64)


def layer_affinity(counts: np.ndarray, assign: np.ndarray, layer: int, parts: int, node_size: int = 0) -> np.ndarray:
    """[n, P] pair mass between each expert of ``layer`` and the experts on each part in the
    layers below and above; with nodes, plus the mass to the part's whole node (a cross-node
    move costs one more)."""
    L, n = assign.shape
    aff = np.zeros((n, parts), dtype=np.int64)
    eye = np.eye(parts, dtype=np.int64)
    if layer > 0:  # predecessors: aff[j, q] += counts[l-1][i, j] for i on q
        aff += counts[layer - 1].T @ eye[assign[layer - 1]]
    if layer < L - 1:  # successors: aff[i, q] += counts[l][i, k] for k on q
        aff += counts[layer] @ eye[assign[layer + 1]]
    if node_size:
        aff = aff + np.repeat(aff.reshape(n, -1, node_size).sum(2), node_size, axis=1)
    return aff


def descent(counts: np.ndarray, assign: np.ndarray, parts: int, lo: int, hi: int, score, deadline: float,
            node_size: int = 0, pairs_only: bool = False) -> tuple[np.ndarray, float]:
    """Re-place each layer exactly given its neighbours until no layer improves ``score``.

    pairs_only: the objective is the (hop-weighted) pair mass alone, so a move's change is its
    affinity gain and ``score`` is called once at the end, not per move."""
    assign = assign.copy()
    best = score(assign)
    L, n = assign.shape
    rows = np.arange(n)
    # a layer whose neighbours did not change since its last move is still at its optimum
    # (pairs_only; with load terms a neighbour's move can change what the score accepts)
    stale = np.ones(L, dtype=bool)
    while stale.any():
        for l in range(L):
            if not stale[l]:
                continue
            if time.perf_counter() > deadline:
                return assign, (score(assign) if pairs_only else best)
            stale[l] = False
            aff = layer_affinity(counts, assign, l, parts, node_size)
            new = assign_layer(aff, lo, hi)
            if pairs_only:
                moved = aff[rows, new].sum() > aff[rows, assign[l]].sum()
                if moved:
                    assign[l] = new
            elif np.array_equal(new, assign[l]):
                moved = False
            else:
                old = assign[l].copy()
                assign[l] = new
                sc = score(assign)
                moved = sc < best - 1e-9
                if moved:
                    best = sc
                else:
                    assign[l] = old
            if moved:
                stale[max(l - 1, 0)] = stale[min(l + 1, L - 1)] = True
                if not pairs_only:
                    stale[:] = True
                    stale[l] = False
    return assign, (score(assign) if pairs_only else best)


def _rename(C_PP: np.ndarray) -> np.ndarray:
    """Permutation pi of parts maximising sum_r C[r, pi[r]] (linear assignment, min-cost flow)."""
    return assign_layer(C_PP, 1, 1)


def crossover(counts: np.ndarray, A: np.ndarray, B: np.ndarray, cut: int, parts: int) -> np.ndarray:
    """A's layers below ``cut``, B's from ``cut`` on with B's parts renamed to keep the most pair
    mass on one part across the cut."""
    n = A.shape[1]
    C = np.zeros((parts, parts), dtype=np.int64)  # C[r, q]: B's part r at the cut -> A's part q below
    np.add.at(C, (np.tile(B[cut], n), np.repeat(A[cut - 1], n)), counts[cut - 1].reshape(-1))
    child = A.copy()
    child[cut:] = _rename(C)[B[cut:]]
    return child


def random_start(L: int, n: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """[L, n] balanced random assignment (floor(n/P) or ceil(n/P) experts per part)."""
    return np.stack([rng.permutation(n) % parts for _ in range(L)]).astype(np.int64)


def multi_start(counts: np.ndarray, hint: np.ndarray, parts: int, lo: int, hi: int, score, deadline: float,
                node_size: int = 0, seed: int = 0, elite: int = 8, pairs_only: bool = False,
                patience: int = 300) -> tuple[np.ndarray, float, dict]:
    """Descents from ``hint`` and from random starts, then elite crossover until ``deadline``,
    or until ``patience`` descents in a row have not improved the best (small problems).

    Returns (best assignment, its score, {"starts", "crossovers", "improving_crossovers"})."""
    rng = np.random.default_rng(seed)
    L, n = hint.shape
    pool: list[tuple[float, np.ndarray]] = []
    stats = {"starts": 0, "crossovers": 0, "improving_crossovers": 0}

    def offer(a, sc) -> bool:
        """Keep the elite: the `elite` best distinct scores."""
        if any(abs(sc - s) < 1e-9 for s, _ in pool):
            return False
        if len(pool) < elite or sc < pool[-1][0]:
            pool.append((sc, a))
            pool.sort(key=lambda t: t[0])
            del pool[elite:]
            return True
        return False

    offer(*descent(counts, hint, parts, lo, hi, score, deadline, node_size, pairs_only))
    # first half of the time: diverse starts; then recombine the elite (random starts keep
    # coming in, one in four, so the pool does not collapse on one basin)
    half = time.perf_counter() + (deadline - time.perf_counter()) / 2
    since_best = 0
    while time.perf_counter() < deadline and since_best < patience:
        late = time.perf_counter() >= half or since_best >= patience // 2
        recombine = late and len(pool) >= 2 and L > 1 and rng.random() < 0.75
        if recombine:
            i, j = rng.choice(len(pool), 2, replace=False)
            child = crossover(counts, pool[i][1], pool[j][1], int(rng.integers(1, L)), parts)
            stats["crossovers"] += 1
        else:
            child = random_start(L, n, parts, rng)
            stats["starts"] += 1
        a, sc = descent(counts, child, parts, lo, hi, score, deadline, node_size, pairs_only)
        since_best += 1
        if offer(a, sc) and sc <= pool[0][0]:
            since_best = 0
            stats["improving_crossovers"] += recombine
    return pool[0][1], pool[0][0], stats
