"""ExFlow's placement integer program, solved with OR-Tools CP-SAT.

Shape legend: L = MoE layers, E = experts per layer, P = ranks (parts), M = nodes,
n = experts in a sub-problem.

ExFlow (PAPERS.md) writes one variable per token and layer; we write the same program on the
aggregated pair counts ``n[l, i, j]`` (affinity.py), so its size depends on E and the number
of distinct heavy pairs, not on the number of tokens:

    x[l, i, p] ∈ {0,1}      expert i of layer l on part p;   Σ_p x[l, i, p] = 1
    lo <= Σ_i x[l, i, p] <= hi                                 (balance; lo = hi = E/P strict)
    s[l, i, j] ∈ {0,1}      "i at l and j at l+1 share a part": s ⇒ (x[l,i,p] ⇒ x[l+1,j,p]) ∀p
    maximise Σ n[l,i,j] s[l,i,j]  − λ Σ_l maxload[l]  − penalty · overfill

i.e. minimise the consecutive-layer moves that cross parts. Only pairs with a nonzero count
get an s variable, the heaviest ``max_pairs_per_layer`` of them per layer (the rest still
count in the reported figures, they just do not steer the solver).

The start is a multi-start local search on the full objective (local_search.py: exact
one-layer moves by min-cost flow, from the greedy plan and from random balanced starts, then
crossover of the best plans), for ``search_share`` of the time limit. The rest goes to CP-SAT,
warm-started (AddHint) from the best plan: large instances by large-neighbourhood search over
windows of consecutive layers (all layers outside the window fixed, which turns their pairs into
linear terms), small instances as one window; a closing descent polishes what CP-SAT changed.
The result is never worse than the greedy plan.

Several nodes (a cross-node move costs 2, a cross-GPU move inside a node 1): by default one
joint program over all ranks with a second indicator per pair, "same node", so the objective
is the hop cost itself (``multi_node='joint'``); or ExFlow's two stages (``'hierarchical'``):
nodes first (M parts of E/M experts), then each node's GPUs.

Always under a time limit and a fixed number of workers; feasibility and beating the
baselines are asserted by the tests, optimality never.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .affinity import AffinityStats
from .baselines import greedy_assignment, rank_capacity
from .local_search import descent, multi_start, ortools_module
from .metrics import cross_counts
from .plan import PlacementPlan

_SCALE = 100  # objective scaling so the (float) load weight becomes an integer coefficient


@dataclass(frozen=True)
class SolverConfig:
    time_limit_s: float = 60.0
    num_workers: int = 2
    balance: str = "strict"  # 'strict': E/P experts per rank; 'relaxed': floor..ceil (+ slack)
    relaxed_slack: int = 0  # relaxed: ranks may hold up to this many experts beyond ceil(E/P)...
    overfill_penalty: float = 1.0  # ... each costing this many token moves
    load_weight: float = 0.0  # λ: token moves traded per token of the busiest rank's load
    max_pairs_per_layer: int | None = None  # default 6·E
    window_pairs: int = 1500  # pair variables per LNS window (bounds each CP-SAT model)
    multi_node: str = "joint"  # 'joint' (hop cost in one program) or 'hierarchical' (ExFlow's)
    search_share: float = 0.5  # of the time: multi-start local search (local_search.py); then CP-SAT
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.search_share <= 1.0:
            raise ValueError(f"search_share must be in [0, 1] (0: descent from greedy only, then CP-SAT; "
                             f"1: local search only), got {self.search_share}")
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be positive, got {self.time_limit_s}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.balance not in ("strict", "relaxed"):
            raise ValueError(f"balance must be 'strict' or 'relaxed', got {self.balance!r}")
        if self.relaxed_slack < 0 or (self.relaxed_slack and self.balance != "relaxed"):
            raise ValueError(f"relaxed_slack ({self.relaxed_slack}) must be >= 0 and needs balance='relaxed'")
        if self.overfill_penalty < 0 or self.load_weight < 0:
            raise ValueError(f"overfill_penalty ({self.overfill_penalty}) and load_weight ({self.load_weight}) "
                             "must be >= 0")
        if self.max_pairs_per_layer is not None and self.max_pairs_per_layer < 1:
            raise ValueError(f"max_pairs_per_layer must be >= 1, got {self.max_pairs_per_layer}")
        if self.multi_node not in ("joint", "hierarchical"):
            raise ValueError(f"multi_node must be 'joint' or 'hierarchical', got {self.multi_node!r}")
        if self.window_pairs < 1:
            raise ValueError(f"window_pairs must be >= 1, got {self.window_pairs}")


@dataclass
class _Problem:
    """One partition problem: n experts per layer into `parts` parts."""
    counts: np.ndarray  # [L-1, n, n] int64
    load: np.ndarray  # [L, n] int64
    parts: int
    lo: int
    hi: int
    top_k: int
    pairs: list  # per transition l: (i_idx, j_idx, count) arrays of the kept pairs
    node_size: int = 0  # parts per node when a cross-node move costs one more (0: one node)

    @property
    def L(self) -> int:
        return self.load.shape[0]

    @property
    def n(self) -> int:
        return self.load.shape[1]


def _kept_pairs(counts: np.ndarray, cap: int) -> list:
    out = []
    for c in counts:
        i, j = np.nonzero(c)
        v = c[i, j]
        order = np.argsort(-v, kind="stable")[:cap]
        out.append((i[order], j[order], v[order]))
    return out


def _score(p: _Problem, cfg: SolverConfig, assign: np.ndarray) -> float:
    """The (scaled) objective the solver minimises, for any full assignment."""
    diff = assign[:-1, :, None] != assign[1:, None, :]
    cost = float((p.counts * diff).sum()) * _SCALE
    if p.node_size:
        nd = assign // p.node_size
        cost += float((p.counts * (nd[:-1, :, None] != nd[1:, None, :])).sum()) * _SCALE
    if cfg.load_weight:
        lw = round(cfg.load_weight * _SCALE * p.top_k)
        for l in range(p.L):
            cost += lw * np.bincount(assign[l], weights=p.load[l], minlength=p.parts).max()
    if cfg.balance == "relaxed" and cfg.relaxed_slack:
        pen = round(cfg.overfill_penalty * _SCALE * p.top_k ** 2)
        for l in range(p.L):
            cost += pen * np.clip(np.bincount(assign[l], minlength=p.parts) - -(-p.n // p.parts), 0, None).sum()
    return cost


def _solve_window(p: _Problem, cfg: SolverConfig, assign: np.ndarray, a: int, b: int,
                  time_limit: float, break_symmetry: bool) -> tuple[np.ndarray | None, str]:
    """Optimise layers [a, b) with every other layer fixed; returns (new layers [b-a, n], status)."""
    cp_model = ortools_module("ortools.sat.python.cp_model")
    m = cp_model.CpModel()
    P, n, G = p.parts, p.n, p.node_size
    node_of = [list(range(q - q % G, q - q % G + G)) for q in range(P)] if G else None
    x = {(l, i, q): m.NewBoolVar("") for l in range(a, b) for i in range(n) for q in range(P)}
    obj = []
    for l in range(a, b):
        for i in range(n):
            m.AddExactlyOne(x[l, i, q] for q in range(P))
        for q in range(P):
            cnt = sum(x[l, i, q] for i in range(n))
            if cfg.balance == "relaxed" and cfg.relaxed_slack:
                over = m.NewIntVar(0, cfg.relaxed_slack, "")
                m.Add(cnt <= p.hi + over)
                m.Add(cnt >= max(p.lo - cfg.relaxed_slack, 0))
                obj.append(-round(cfg.overfill_penalty * _SCALE * p.top_k ** 2) * over)
            else:
                m.Add(cnt >= p.lo)
                m.Add(cnt <= p.hi)
        if cfg.load_weight:
            top = m.NewIntVar(0, int(p.load[l].sum()), "")
            for q in range(P):
                m.Add(top >= sum(int(p.load[l, i]) * x[l, i, q] for i in range(n)))
            obj.append(-round(cfg.load_weight * _SCALE * p.top_k) * top)
    # transitions touching the window: l -> l+1 for l in [a-1, b)
    for l in range(max(a - 1, 0), min(b, p.L - 1)):
        ii, jj, vv = p.pairs[l]
        in_l, in_next = a <= l < b, a <= l + 1 < b
        if in_l and in_next:
            for i, j, v in zip(ii.tolist(), jj.tolist(), vv.tolist()):
                s = m.NewBoolVar("")
                for q in range(P):
                    m.AddBoolOr([s.Not(), x[l, i, q].Not(), x[l + 1, j, q]])
                obj.append(_SCALE * v * s)
                if G:  # "same node": i on q implies j on one of q's node's ranks
                    sn = m.NewBoolVar("")
                    for q in range(P):
                        m.AddBoolOr([sn.Not(), x[l, i, q].Not()] + [x[l + 1, j, r] for r in node_of[q]])
                    obj.append(_SCALE * v * sn)
        elif in_next:  # layer l fixed: i sits on assign[l, i]
            for i, j, v in zip(ii.tolist(), jj.tolist(), vv.tolist()):
                q = int(assign[l, i])
                obj.append(_SCALE * v * x[l + 1, j, q])
                if G:
                    obj.extend(_SCALE * v * x[l + 1, j, r] for r in node_of[q])
        else:  # layer l+1 fixed
            for i, j, v in zip(ii.tolist(), jj.tolist(), vv.tolist()):
                q = int(assign[l + 1, j])
                obj.append(_SCALE * v * x[l, i, q])
                if G:
                    obj.extend(_SCALE * v * x[l, i, r] for r in node_of[q])
    m.Maximize(sum(obj))
    for l in range(a, b):
        for i in range(n):
            for q in range(P):
                m.AddHint(x[l, i, q], int(assign[l, i]) == q)
    if break_symmetry:
        # parts are interchangeable when nothing outside the window is fixed: pin the first
        # expert of the first layer to the part the hint gives it
        m.Add(x[a, 0, int(assign[a, 0])] == 1)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit, 0.05)
    solver.parameters.num_workers = cfg.num_workers
    solver.parameters.random_seed = cfg.seed
    st = solver.Solve(m)
    name = solver.StatusName(st)
    if st == cp_model.INFEASIBLE:
        raise ValueError(f"the balance constraints cannot be met ({n} experts into {P} parts holding "
                         f"{p.lo}..{p.hi} each); use balance='relaxed' or another number of ranks")
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None, name
    out = np.empty((b - a, n), dtype=np.int64)
    for l in range(a, b):
        for i in range(n):
            out[l - a, i] = next(q for q in range(P) if solver.BooleanValue(x[l, i, q]))
    return out, name


def _solve_partition(p: _Problem, cfg: SolverConfig, hint: np.ndarray, time_limit: float) -> tuple[np.ndarray, str]:
    """Windowed large-neighbourhood search; one window when the whole problem is small."""
    t0 = time.perf_counter()
    # keep a little time for the closing descent, which polishes what CP-SAT changed
    deadline = t0 + time_limit * (0.95 if cfg.search_share < 1 else 1.0)
    score = lambda a: _score(p, cfg, a)  # noqa: E731  (the full objective, all pairs)
    pairs_only = not cfg.load_weight and not (cfg.balance == "relaxed" and cfg.relaxed_slack)
    if cfg.search_share:
        assign, best, ls = multi_start(p.counts, hint, p.parts, p.lo, p.hi, score,
                                       t0 + time_limit * cfg.search_share, p.node_size, cfg.seed,
                                       pairs_only=pairs_only)
        search = f"search({ls['starts']} starts, {ls['crossovers']} crossovers)"
    else:  # a quarter of the time at most for the descent from the greedy plan
        assign, best = descent(p.counts, hint, p.parts, p.lo, p.hi, score, t0 + time_limit / 4, p.node_size,
                               pairs_only)
        search = "descent from greedy"
    if cfg.search_share >= 1:
        return assign, search
    per_layer = max(1, int(np.mean([len(t[0]) for t in p.pairs])) if p.pairs else 1)
    w = max(2, min(p.L, cfg.window_pairs // per_layer))
    if w >= p.L:
        starts = [0]
    else:
        step = max(1, w // 2)
        starts = list(range(0, p.L - w + 1, step))
        if starts[-1] != p.L - w:
            starts.append(p.L - w)
    statuses, sweep, cp_improved = [], 0, False
    while True:
        improved, all_optimal = False, True
        for k, a in enumerate(starts):
            left = deadline - time.perf_counter()
            if left <= 0.02:
                break
            # share the remaining time over the windows left in this sweep
            budget = left / (len(starts) - k) if sweep == 0 else left / len(starts)
            new, st = _solve_window(p, cfg, assign, a, a + w, budget, break_symmetry=len(starts) == 1)
            statuses.append(st)
            all_optimal &= st == "OPTIMAL"
            if new is None:
                continue
            cand = assign.copy()
            cand[a:a + w] = new
            sc = _score(p, cfg, cand)
            if sc < best - 1e-9:
                assign, best, improved, cp_improved = cand, sc, True, True
        sweep += 1
        if len(starts) == 1 or not improved or time.perf_counter() >= deadline - 0.02:
            break
    if cp_improved:
        assign, best = descent(p.counts, assign, p.parts, p.lo, p.hi, score, t0 + time_limit, p.node_size,
                               pairs_only)
    if not statuses:
        return assign, f"{search} + TIME_LIMIT(no CP-SAT window)"
    if len(starts) == 1:
        return assign, f"{search} + CP-SAT {statuses[0]}"
    return assign, (f"{search} + LNS({sweep} sweeps, {len(starts)} windows of {w} layers"
                    f"{', all optimal' if all_optimal else ''})")


def _problem(counts, load, parts, lo, hi, top_k, cfg, node_size: int = 0) -> _Problem:
    cap = cfg.max_pairs_per_layer or 6 * load.shape[1]
    return _Problem(counts, load, parts, lo, hi, top_k, _kept_pairs(counts, cap), node_size)


def solve_exflow(stats: AffinityStats, num_ranks: int, num_nodes: int = 1,
                 config: SolverConfig | None = None) -> PlacementPlan:
    """The ExFlow placement of ``stats`` over ``num_ranks`` ranks on ``num_nodes`` nodes."""
    cfg = config or SolverConfig()
    if not isinstance(stats, AffinityStats):
        raise ValueError(f"expected AffinityStats (AffinityStats.from_trace(trace)), got {type(stats).__name__}")
    if num_nodes <= 0 or num_ranks % num_nodes:
        raise ValueError(f"num_nodes ({num_nodes}) must divide num_ranks ({num_ranks})")
    t0 = time.perf_counter()

    def left() -> float:
        """Solver time still in the limit, 2% kept for the checks that close the solve."""
        return max(cfg.time_limit_s * 0.98 - (time.perf_counter() - t0), 0.05)
    L, E, P, M = stats.num_layers, stats.num_experts, num_ranks, num_nodes
    G = P // M
    lo, hi = rank_capacity(E, P, cfg.balance)
    K = stats.top_k
    if M == 1 or cfg.multi_node == "joint":
        hint = greedy_assignment(stats, P, cfg.balance)
        prob = _problem(stats.pair_counts, stats.load, P, lo, hi, K, cfg, node_size=G if M > 1 else 0)
        assign, status = _solve_partition(prob, cfg, hint, left())
    else:
        # nodes first, each holding exactly E/M experts per layer, so that every node's
        # sub-problem has the same size at every layer
        if E % P:
            raise ValueError(f"several nodes need num_experts ({E}) divisible by num_ranks ({P}); "
                             f"pick a divisor of {E} or plan a single node")
        node_hint = greedy_assignment(stats, M, "strict")
        prob = _problem(stats.pair_counts, stats.load, M, E // M, E // M, K, cfg)
        node_assign, st_nodes = _solve_partition(prob, cfg, node_hint, left() / 2)
        assign = np.empty((L, E), dtype=np.int64)
        sub_status = []
        for node in range(M):
            members = [np.flatnonzero(node_assign[l] == node) for l in range(L)]
            assert all(len(mm) == E // M for mm in members), "node balance is exact"
            sub_counts = np.stack([stats.pair_counts[l][np.ix_(members[l], members[l + 1])] for l in range(L - 1)])
            sub_load = np.stack([stats.load[l][members[l]] for l in range(L)])
            sub = AffinityStats(sub_counts, sub_load, stats.num_tokens, K)
            n = sub_load.shape[1]
            slo, shi = rank_capacity(n, G, cfg.balance)
            sub_hint = greedy_assignment(sub, G, cfg.balance)
            sp = _problem(sub_counts, sub_load, G, slo, shi, K, cfg)
            sa, st = _solve_partition(sp, cfg, sub_hint, left() / (M - node))
            sub_status.append(st)
            for l in range(L):
                assign[l, members[l]] = node * G + sa[l]
        status = f"nodes: {st_nodes}; gpus: {', '.join(sub_status)}"
    # never return something worse than the greedy start on the true (all-pairs) objective
    greedy = greedy_assignment(stats, P, cfg.balance)
    cross, cross_node = cross_counts(assign, stats, G)
    g_cross, g_node = cross_counts(greedy, stats, G)
    if g_cross + g_node < cross + cross_node and cfg.load_weight == 0 and not cfg.relaxed_slack:
        assign, cross, cross_node = greedy, g_cross, g_node
        status += " (greedy kept: truncated pairs)"
    kept = sum(int(t[2].sum()) for t in _kept_pairs(stats.pair_counts, cfg.max_pairs_per_layer or 6 * E))
    total = int(stats.pair_counts.sum())
    obj = {"cross_pairs": cross, "cross_node_pairs": cross_node, "total_pairs": total,
           "hop_cost_pairs": cross + cross_node, "pairs_mass_modelled": kept / max(total, 1)}
    method = "exflow_cpsat" if M == 1 or cfg.multi_node == "joint" else "exflow_hier"
    return PlacementPlan(assign.tolist(), P, M, method=method, objective=obj,
                         solve_time_s=time.perf_counter() - t0, solver_status=status,
                         meta={"time_limit_s": cfg.time_limit_s, "num_workers": cfg.num_workers,
                               "balance": cfg.balance, "load_weight": cfg.load_weight})
