"""The CPU tier of placement: each expert goes to a GPU rank or to a CPU expert host.

Shape legend: L = MoE layers, E = experts per layer, P = GPU ranks, H = CPU hosts,
Q = P + H locations (ranks 0..P-1, then host h at P + h).

The integer program (OR-Tools CP-SAT, time limit, fixed workers), on a routing trace's
statistics, in seconds of the trace:

    x[l, e, q] ∈ {0,1}        expert e of layer l at location q;   Σ_q x[l, e, q] = 1
    Σ_{l,e} x[l, e, q] · expert_bytes <= capacity_bytes[q]          (memory, not balance)
    g[l, e] = Σ_{p<P} x[l, e, p]                                    (on a GPU)
    s[l, i, j] ⇒ (x[l,i,p] ⇒ x[l+1,j,p]) ∀ p < P,  s ⇒ g[l, i]      (same GPU rank)
    c[l, i, j] >= g[l,i] + g[l+1,j] − 1 − s[l,i,j]                   (a cross-GPU hop)

    minimise  Σ_{l,e} (1 − g[l,e]) · cpu_cost[l,e]  +  hop_s · Σ n[l,i,j]/K² · c[l,i,j]

    cpu_cost[l,e] = load[l,e] · (cpu_per_token_s + row_bytes / bytes_per_s)
                  + uses[l,e] · (cpu_base_s + latency_s)

``load`` counts the token-slots of the expert, ``uses`` the steps (``tokens_per_step`` tokens
of the trace) in which it gets at least one: a CPU host streams the expert from RAM once per
call (``cpu_base_s``) and each call pays a round trip. The latency term charges every use,
although calls to several hosts in one layer overlap: an upper bound, linear. A hot expert then
costs the most on a CPU and stays on a GPU; a cold one (few steps, few tokens) moves to a host;
among GPU experts the ExFlow pair term keeps affine experts on one rank.

The start is a two-stage heuristic (the experts of largest CPU cost fill the GPU capacity; GPU
experts go to ranks by affinity with the previous layer; CPU experts to the host with the least
CPU time so far), the solver is hinted with it, and the result is never worse than it.
Baseline: ``popularity_split`` (hottest by load to the GPUs, round-robin ranks and hosts).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from routing.trace import RoutingTrace

from .affinity import AffinityStats
from .ilp import _kept_pairs  # the same pair truncation as the ExFlow program
from .local_search import ortools_module
from .plan import PlacementPlan, read_json, write_json

_FORMAT = "moeflow.TieredPlan"
_VERSION = 1
_US = 1e6  # objective unit: microseconds (integer coefficients for CP-SAT)


@dataclass(frozen=True)
class CPUTierCost:
    """What one token sent to a CPU host costs (serve.cpu_host_pool.probe_cost measures it), and one
    token move between two GPU ranks (``gpu_hop_s``)."""
    latency_s: float = 200e-6
    bytes_per_s: float = 5e9
    cpu_base_s: float = 5e-3
    cpu_per_token_s: float = 2e-4
    row_bytes: int = 16384  # bytes of one token row there and back (2 · D · element size)
    gpu_hop_s: float = 20e-6

    def __post_init__(self):
        for k in ("latency_s", "cpu_base_s", "cpu_per_token_s", "gpu_hop_s"):
            if getattr(self, k) < 0:
                raise ValueError(f"CPUTierCost.{k} must be >= 0, got {getattr(self, k)}")
        if self.bytes_per_s <= 0 or self.row_bytes < 0:
            raise ValueError(f"bytes_per_s ({self.bytes_per_s}) must be > 0 and row_bytes ({self.row_bytes}) >= 0")

    def per_token_s(self) -> float:
        return self.cpu_per_token_s + self.row_bytes / self.bytes_per_s

    def per_use_s(self) -> float:
        return self.cpu_base_s + self.latency_s


@dataclass(frozen=True)
class TierConfig:
    """Capacities (bytes per GPU rank and per CPU host) and the solver's budget."""
    gpu_bytes: tuple[int, ...]
    host_bytes: tuple[int, ...]
    expert_bytes: int
    cost: CPUTierCost = field(default_factory=CPUTierCost)
    tokens_per_step: int = 1
    time_limit_s: float = 10.0
    num_workers: int = 2
    max_pairs_per_layer: int | None = None  # default 6·E
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "gpu_bytes", tuple(int(b) for b in self.gpu_bytes))
        object.__setattr__(self, "host_bytes", tuple(int(b) for b in self.host_bytes))
        if not self.gpu_bytes:
            raise ValueError("gpu_bytes needs one entry per GPU rank (at least one)")
        if any(b < 0 for b in self.gpu_bytes + self.host_bytes):
            raise ValueError(f"capacities must be >= 0 bytes: gpu {self.gpu_bytes}, hosts {self.host_bytes}")
        if self.expert_bytes <= 0:
            raise ValueError(f"expert_bytes must be > 0, got {self.expert_bytes}")
        if self.tokens_per_step < 1 or self.time_limit_s <= 0 or self.num_workers < 1:
            raise ValueError(f"tokens_per_step ({self.tokens_per_step}) and num_workers ({self.num_workers}) "
                             f"must be >= 1, time_limit_s ({self.time_limit_s}) > 0")

    @property
    def capacity_experts(self) -> np.ndarray:
        """[Q] experts each location can hold."""
        return np.array([b // self.expert_bytes for b in self.gpu_bytes + self.host_bytes], dtype=np.int64)


# --- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TieredPlan:
    """Where each expert lives: location [L][E] in 0..P-1 (GPU rank) or P..P+H-1 (host q-P)."""
    location: tuple[tuple[int, ...], ...]
    num_gpu_ranks: int
    num_hosts: int
    num_nodes: int = 1
    method: str = "manual"
    objective: dict = field(default_factory=dict)
    solve_time_s: float = 0.0
    solver_status: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        a = np.asarray(self.location)
        Q = self.num_gpu_ranks + self.num_hosts
        if a.ndim != 2 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"location must be a non-empty [layers][experts] integer table, got shape {a.shape}")
        if self.num_gpu_ranks < 1 or self.num_hosts < 0:
            raise ValueError(f"num_gpu_ranks ({self.num_gpu_ranks}) must be >= 1 and num_hosts ({self.num_hosts}) >= 0")
        if a.min() < 0 or a.max() >= Q:
            raise ValueError(f"locations must lie in 0..{Q - 1} ({self.num_gpu_ranks} GPU ranks then "
                             f"{self.num_hosts} hosts), found {int(a.min())}..{int(a.max())}")
        object.__setattr__(self, "location", tuple(tuple(int(q) for q in row) for row in a))

    @classmethod
    def on_hosts(cls, num_layers: int, num_experts: int, num_hosts: int, num_gpu_ranks: int = 1) -> "TieredPlan":
        """Every expert on a CPU host, spread evenly (expert e of layer l on host (l + e) mod H):
        the plan under offload.tiered's dispatch='split', where a GPU cache decides at run time
        which experts also run on the GPU, and a start when there is no routing trace to plan from."""
        if num_layers < 1 or num_experts < 1 or num_hosts < 1:
            raise ValueError(f"need >= 1 layer, expert and host; got {num_layers}, {num_experts}, {num_hosts}")
        loc = (np.arange(num_layers)[:, None] + np.arange(num_experts)[None, :]) % num_hosts + num_gpu_ranks
        return cls(loc.tolist(), num_gpu_ranks, num_hosts, method="on_hosts")

    @property
    def num_layers(self) -> int:
        return len(self.location)

    @property
    def num_experts(self) -> int:
        return len(self.location[0])

    def location_array(self) -> np.ndarray:
        return np.asarray(self.location, dtype=np.int64)

    def host_table(self) -> np.ndarray:
        """[L, E] host of each expert, -1 when it is on a GPU."""
        a = self.location_array() - self.num_gpu_ranks
        return np.where(a >= 0, a, -1)

    def host_of(self, layer: int, expert: int) -> int:
        q = self.location[layer][expert] - self.num_gpu_ranks
        return q if q >= 0 else -1

    def experts_on_host(self, host: int) -> list[tuple[int, int]]:
        q = self.num_gpu_ranks + host
        return [(l, e) for l, row in enumerate(self.location) for e, v in enumerate(row) if v == q]

    def gpu_experts(self, layer: int, rank: int | None = None) -> list[int]:
        row = self.location[layer]
        return [e for e, q in enumerate(row) if q < self.num_gpu_ranks and (rank is None or q == rank)]

    def gpu_plan(self) -> PlacementPlan:
        """The GPU ranks' PlacementPlan for the expert-parallel runtime. A CPU-hosted expert's
        entry names rank e mod P: tiered layers never route a token to it there."""
        a = self.location_array()
        P = self.num_gpu_ranks
        fill = np.arange(self.num_experts)[None, :] % P
        return PlacementPlan(np.where(a < P, a, fill).tolist(), P, self.num_nodes, method=f"{self.method}:gpu_tier")

    def counts(self) -> dict:
        a = self.location_array()
        P = self.num_gpu_ranks
        return {"gpu": int((a < P).sum()), "cpu": int((a >= P).sum()),
                "per_location": np.bincount(a.reshape(-1), minlength=P + self.num_hosts).tolist()}

    def check_compatible(self, num_layers: int, num_experts: int) -> None:
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise ValueError(f"the tiered plan is for {self.num_layers} MoE layers x {self.num_experts} experts, "
                             f"the model has {num_layers} x {num_experts}; plan from a trace of this model")

    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "num_gpu_ranks": self.num_gpu_ranks,
                "num_hosts": self.num_hosts, "num_nodes": self.num_nodes,
                "location": [list(r) for r in self.location], "method": self.method, "objective": self.objective,
                "solve_time_s": self.solve_time_s, "solver_status": self.solver_status, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "TieredPlan":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a TieredPlan: expected format {_FORMAT!r}, got "
                             f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
        if d.get("version") != _VERSION:
            raise ValueError(f"unsupported TieredPlan version {d.get('version')} (this moeflow reads {_VERSION})")
        missing = [k for k in ("location", "num_gpu_ranks", "num_hosts") if k not in d]
        if missing:
            raise ValueError(f"TieredPlan JSON lacks {missing}")
        return cls(d["location"], d["num_gpu_ranks"], d["num_hosts"], d.get("num_nodes", 1), d.get("method", "unknown"),
                   dict(d.get("objective") or {}), float(d.get("solve_time_s", 0.0)), d.get("solver_status", ""),
                   dict(d.get("meta") or {}))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "TieredPlan":
        return cls.from_dict(read_json(path, "tiered plan"))

    def __repr__(self) -> str:
        c = self.counts()
        return (f"TieredPlan(method={self.method!r}, layers={self.num_layers}, experts={self.num_experts}, "
                f"gpu_ranks={self.num_gpu_ranks}, hosts={self.num_hosts}, on_gpu={c['gpu']}, on_cpu={c['cpu']})")


# --- statistics and objective ---------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TierStats:
    """AffinityStats plus, per expert, the number of steps that use it."""
    affinity: AffinityStats
    uses: np.ndarray  # [L, E] int64
    tokens_per_step: int

    @classmethod
    def from_trace(cls, trace: RoutingTrace, tokens_per_step: int = 1) -> "TierStats":
        if tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
        aff = AffinityStats.from_trace(trace)
        L, T, K = trace.expert_ids.shape
        E = trace.num_experts
        S = -(-T // tokens_per_step)
        ids = trace.expert_ids.astype(np.int64)
        step = np.repeat(np.arange(S), tokens_per_step)[:T]
        uses = np.zeros((L, E), dtype=np.int64)
        for l in range(L):
            ok = ids[l] >= 0
            key = np.unique(step[:, None].repeat(K, 1)[ok] * E + ids[l][ok])
            uses[l] = np.bincount(key % E, minlength=E)
        return cls(aff, uses, tokens_per_step)


def cpu_costs(stats: TierStats, cost: CPUTierCost) -> np.ndarray:
    """[L, E] seconds the trace would spend on each expert were it on a CPU host."""
    return stats.affinity.load * cost.per_token_s() + stats.uses * cost.per_use_s()


def tier_objective(location: np.ndarray, num_gpu_ranks: int, stats: TierStats, cost: CPUTierCost) -> dict:
    """The program's objective of any location table, on all pairs: cpu_s + hop_s = total_s."""
    a = np.asarray(location, dtype=np.int64)
    P = num_gpu_ranks
    on_cpu = a >= P
    cpu_s = float((cpu_costs(stats, cost) * on_cpu).sum())
    w = stats.affinity.pair_weight()
    both_gpu = ~on_cpu[:-1, :, None] & ~on_cpu[1:, None, :]
    cross = both_gpu & (a[:-1, :, None] != a[1:, None, :])
    hops = float((w * cross).sum())
    hop_s = hops * cost.gpu_hop_s
    return {"total_s": cpu_s + hop_s, "cpu_s": cpu_s, "hop_s": hop_s, "cross_gpu_moves": hops,
            "cpu_token_slots": int((stats.affinity.load * on_cpu).sum()),
            "gpu_token_slots": int((stats.affinity.load * ~on_cpu).sum())}


def _check_capacity(L: int, E: int, cfg: TierConfig) -> np.ndarray:
    cap = cfg.capacity_experts
    if len(cfg.host_bytes) == 0 and cap.sum() < L * E:
        raise ValueError(f"no CPU hosts and the GPUs hold {int(cap.sum())} of {L * E} experts; add CPU hosts")
    if cap.sum() < L * E:
        gib = 2 ** 30
        raise ValueError(f"the {L * E} experts ({L * E * cfg.expert_bytes / gib:.2f} GiB) do not fit: GPU ranks hold "
                         f"{sum(cfg.gpu_bytes) / gib:.2f} GiB and CPU hosts {sum(cfg.host_bytes) / gib:.2f} GiB "
                         f"({int(cap.sum())} experts of {cfg.expert_bytes / 2 ** 20:.1f} MiB); give the hosts more "
                         "memory or start more hosts")
    return cap


# --- heuristics ----------------------------------------------------------------------------------
def _fill_hosts(loc: np.ndarray, cpu_cost: np.ndarray, P: int, cap: np.ndarray, by_cost: bool) -> None:
    """Experts marked -1 in loc go to hosts: least CPU time so far (by_cost) or round robin."""
    H = len(cap) - P
    left = cap[P:].copy()
    busy = np.zeros(H)
    todo = np.argwhere(loc < 0)
    if by_cost:
        todo = todo[np.argsort(-cpu_cost[todo[:, 0], todo[:, 1]], kind="stable")]
    nxt = 0
    for l, e in todo:
        if by_cost:
            h = int(np.argmin(np.where(left > 0, busy, np.inf)))
        else:
            for _ in range(H):
                if left[nxt % H] > 0:
                    break
                nxt += 1
            h = nxt % H
            nxt += 1
        assert left[h] > 0, "capacity was checked"
        loc[l, e] = P + h
        left[h] -= 1
        busy[h] += cpu_cost[l, e]


def _gpu_budget(cap: np.ndarray, P: int, L: int, E: int) -> int:
    return int(min(cap[:P].sum(), L * E))


def popularity_split(stats: TierStats, cfg: TierConfig) -> TieredPlan:
    """Baseline: the hottest experts (by token load, over all layers) fill the GPUs, ranks taken
    in turn; the rest go to the hosts in turn."""
    t0 = time.perf_counter()
    load = stats.affinity.load
    L, E = load.shape
    P = len(cfg.gpu_bytes)
    cap = _check_capacity(L, E, cfg)
    loc = np.full((L, E), -1, dtype=np.int64)
    left = cap[:P].copy()
    order = np.argsort(-load.reshape(-1), kind="stable")[:_gpu_budget(cap, P, L, E)]
    r = 0
    for flat in order:
        while left[r % P] == 0:
            r += 1
        loc[flat // E, flat % E] = r % P
        left[r % P] -= 1
        r += 1
    _fill_hosts(loc, cpu_costs(stats, cfg.cost), P, cap, by_cost=False)
    obj = tier_objective(loc, P, stats, cfg.cost)
    return TieredPlan(loc.tolist(), P, len(cfg.host_bytes), method="popularity_split", objective=obj,
                      solve_time_s=time.perf_counter() - t0, solver_status="heuristic")


def _two_stage(stats: TierStats, cfg: TierConfig, cap: np.ndarray) -> np.ndarray:
    load = stats.affinity.load
    L, E = load.shape
    P = len(cfg.gpu_bytes)
    cc = cpu_costs(stats, cfg.cost)
    on_gpu = np.zeros((L, E), dtype=bool)
    on_gpu.reshape(-1)[np.argsort(-cc.reshape(-1), kind="stable")[:_gpu_budget(cap, P, L, E)]] = True
    loc = np.full((L, E), -1, dtype=np.int64)
    left = cap[:P].copy()
    pairs = stats.affinity.pair_counts
    for l in range(L):
        for e in np.argsort(-load[l], kind="stable"):
            if not on_gpu[l, e]:
                continue
            aff = np.zeros(P)
            if l:
                prev = loc[l - 1]
                ok = (prev >= 0) & (prev < P)
                np.add.at(aff, prev[ok], pairs[l - 1][ok, e])
            p = int(np.argmax(np.where(left > 0, aff + 1e-9 * left, -np.inf)))
            loc[l, e] = p
            left[p] -= 1
    _fill_hosts(loc, cc, P, cap, by_cost=True)
    return loc


# --- the program ----------------------------------------------------------------------------------
def solve_cpu_tier(stats: TierStats | RoutingTrace, cfg: TierConfig) -> TieredPlan:
    """The tiered placement minimising the trace's CPU time plus cross-GPU hops (module doc)."""
    if isinstance(stats, RoutingTrace):
        stats = TierStats.from_trace(stats, cfg.tokens_per_step)
    if not isinstance(stats, TierStats):
        raise ValueError(f"expected TierStats or a RoutingTrace, got {type(stats).__name__}")
    t0 = time.perf_counter()
    aff = stats.affinity
    L, E, K = aff.num_layers, aff.num_experts, aff.top_k
    P, H = len(cfg.gpu_bytes), len(cfg.host_bytes)
    Q = P + H
    cap = _check_capacity(L, E, cfg)
    hint = _two_stage(stats, cfg, cap)
    cc_us = np.rint(cpu_costs(stats, cfg.cost) * _US).astype(np.int64)

    cp_model = ortools_module("ortools.sat.python.cp_model")
    m = cp_model.CpModel()
    x = {(l, e, q): m.NewBoolVar("") for l in range(L) for e in range(E) for q in range(Q)}
    for l in range(L):
        for e in range(E):
            m.AddExactlyOne(x[l, e, q] for q in range(Q))
    for q in range(Q):
        m.Add(sum(x[l, e, q] for l in range(L) for e in range(E)) <= int(min(cap[q], L * E)))
    obj = [int(cc_us[l, e]) * x[l, e, P + h] for l in range(L) for e in range(E) for h in range(H)]
    if P > 1 and cfg.cost.gpu_hop_s > 0:
        # pair counts are per slot pair (1/K² of a token move): coefficient in µs, rounded up so
        # that no kept pair is free
        unit = cfg.cost.gpu_hop_s * _US / K ** 2
        for l, (ii, jj, vv) in enumerate(_kept_pairs(aff.pair_counts, cfg.max_pairs_per_layer or 6 * E)):
            for i, j, v in zip(ii.tolist(), jj.tolist(), vv.tolist()):
                s, c = m.NewBoolVar(""), m.NewBoolVar("")
                for p in range(P):
                    m.AddBoolOr([s.Not(), x[l, i, p].Not(), x[l + 1, j, p]])
                m.AddBoolOr([s.Not()] + [x[l, i, p] for p in range(P)])
                g_i = sum(x[l, i, p] for p in range(P))
                g_j = sum(x[l + 1, j, p] for p in range(P))
                m.Add(c >= g_i + g_j - 1 - s)
                obj.append(max(1, int(np.ceil(unit * v))) * c)
    m.Minimize(sum(obj))
    for l in range(L):
        for e in range(E):
            for q in range(Q):
                m.AddHint(x[l, e, q], int(hint[l, e]) == q)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = cfg.time_limit_s
    solver.parameters.num_workers = cfg.num_workers
    solver.parameters.random_seed = cfg.seed
    st = solver.Solve(m)
    status = solver.StatusName(st)
    if st == cp_model.INFEASIBLE:  # capacities were checked; this would be a modelling bug
        raise ValueError(f"the tier capacities cannot hold the experts: {cfg.capacity_experts.tolist()} experts "
                         f"per location for {L} x {E}")
    loc = hint
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        sol = np.empty((L, E), dtype=np.int64)
        for l in range(L):
            for e in range(E):
                sol[l, e] = next(q for q in range(Q) if solver.BooleanValue(x[l, e, q]))
        # compare on the true objective (all pairs, unrounded): keep the better one
        if tier_objective(sol, P, stats, cfg.cost)["total_s"] <= tier_objective(hint, P, stats, cfg.cost)["total_s"]:
            loc = sol
        else:
            status += " (two-stage start kept)"
    else:
        status += " (two-stage start)"
    obj = tier_objective(loc, P, stats, cfg.cost)
    return TieredPlan(loc.tolist(), P, H, method="cpu_tier_cpsat", objective=obj,
                      solve_time_s=time.perf_counter() - t0, solver_status=status,
                      meta={"time_limit_s": cfg.time_limit_s, "num_workers": cfg.num_workers,
                            "tokens_per_step": stats.tokens_per_step, "expert_bytes": cfg.expert_bytes,
                            "gpu_bytes": list(cfg.gpu_bytes), "host_bytes": list(cfg.host_bytes),
                            "cost": cfg.cost.__dict__})
