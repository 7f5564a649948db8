"""PlacementPlan: which rank holds each expert of each MoE layer, and how the plan was made.

Shape legend: L = MoE layers, E = experts per layer, P = ranks (GPUs or CPU hosts).

    assignment   [L][E] int   the primary rank of each expert
    replicas     [L] {expert: (extra ranks...)}   extra copies of experts (EPLB-style, or by affinity)
    copy_choice  "spread" | "home"                the copy of a token not homed on one

Ranks are numbered node-major: with ``num_nodes`` machines of ``P / num_nodes`` ranks each,
rank r lives on node ``r // (P / num_nodes)``.

Saved as JSON (nothing pickled); frozen in memory. ``objective`` holds the figures the method
reported (e.g. cross-rank transition counts on the trace it was fitted to), ``method`` and
``solver_status`` say how it was obtained, ``solve_time_s`` how long it took.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_FORMAT = "moeflow.PlacementPlan"
COPY_CHOICES = ("spread", "home")
_VERSION = 1


@dataclass(frozen=True, eq=False)
class PlacementPlan:
    assignment: tuple[tuple[int, ...], ...]  # [L][E] primary rank
    num_ranks: int
    num_nodes: int = 1
    replicas: tuple[dict[int, tuple[int, ...]], ...] | None = None  # [L] expert -> extra ranks
    method: str = "manual"
    objective: dict = field(default_factory=dict)
    solve_time_s: float = 0.0
    solver_status: str = ""
    meta: dict = field(default_factory=dict)
    # which copy a token takes when none is on its home rank: "spread" (one by token index, among
    # the copies on the home's node first: spreads load, EPLB) or "home" (the primary: copies
    # serve only the tokens homed on them, as affinity copies intend)
    copy_choice: str = "spread"

    def __post_init__(self):
        a = np.asarray(self.assignment)
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"assignment must be a non-empty [layers][experts] table of ranks, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"assignment entries must be integer ranks, got dtype {a.dtype}")
        if not isinstance(self.num_ranks, (int, np.integer)) or self.num_ranks <= 0:
            raise ValueError(f"num_ranks must be a positive integer, got {self.num_ranks!r}")
        if not isinstance(self.num_nodes, (int, np.integer)) or self.num_nodes <= 0 \
                or self.num_ranks % self.num_nodes:
            raise ValueError(f"num_nodes ({self.num_nodes}) must be a positive divisor of num_ranks "
                             f"({self.num_ranks}): every node holds the same number of ranks")
        if a.min() < 0 or a.max() >= self.num_ranks:
            raise ValueError(f"assignment ranks must lie in 0..{self.num_ranks - 1}, found "
                             f"{int(a.min())}..{int(a.max())}: wrong num_ranks for this plan?")
        if self.copy_choice not in COPY_CHOICES:
            raise ValueError(f"copy_choice must be one of {COPY_CHOICES}, got {self.copy_choice!r}")
        object.__setattr__(self, "assignment", tuple(tuple(int(r) for r in row) for row in a))
        object.__setattr__(self, "num_ranks", int(self.num_ranks))
        object.__setattr__(self, "num_nodes", int(self.num_nodes))
        L, E = a.shape
        reps = self.replicas
        if reps is not None:
            if len(reps) != L:
                raise ValueError(f"replicas must have one entry per layer ({L}), got {len(reps)}")
            clean = []
            for l, d in enumerate(reps):
                out = {}
                for e, ranks in dict(d).items():
                    e = int(e)
                    if not 0 <= e < E:
                        raise ValueError(f"layer {l}: replicated expert {e} outside 0..{E - 1}")
                    ranks = tuple(int(r) for r in ranks)
                    for r in ranks:
                        if not 0 <= r < self.num_ranks:
                            raise ValueError(f"layer {l}: replica of expert {e} on rank {r} outside "
                                             f"0..{self.num_ranks - 1}")
                    if len(set(ranks)) != len(ranks) or a[l, e] in ranks:
                        raise ValueError(f"layer {l}: replicas of expert {e} {ranks} repeat a rank or its "
                                         f"primary rank {int(a[l, e])}")
                    if ranks:
                        out[e] = ranks
                clean.append(out)
            reps = tuple(clean) if any(clean) else None
        object.__setattr__(self, "replicas", reps)

    # --- shape ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.assignment)

    @property
    def num_experts(self) -> int:
        return len(self.assignment[0])

    @property
    def ranks_per_node(self) -> int:
        return self.num_ranks // self.num_nodes

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def assignment_array(self) -> np.ndarray:
        """[L, E] int64 primary ranks."""
        return np.asarray(self.assignment, dtype=np.int64)

    # --- look-ups -------------------------------------------------------------------------
    def ranks_of(self, layer: int, expert: int) -> tuple[int, ...]:
        """Every rank holding a copy of the expert, the primary first."""
        extra = self.replicas[layer].get(expert, ()) if self.replicas else ()
        return (self.assignment[layer][expert],) + tuple(extra)

    def experts_on(self, rank: int, layer: int) -> list[int]:
        """Experts of ``layer`` that ``rank`` holds (primaries and replicas), ascending."""
        return [e for e in range(self.num_experts) if rank in self.ranks_of(layer, e)]

    def experts_per_rank(self) -> np.ndarray:
        """[L, P] number of experts (copies included) each rank holds at each layer."""
        out = np.zeros((self.num_layers, self.num_ranks), dtype=np.int64)
        for l in range(self.num_layers):
            for e in range(self.num_experts):
                for r in self.ranks_of(l, e):
                    out[l, r] += 1
        return out

    def check_compatible(self, num_layers: int, num_experts: int) -> None:
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise ValueError(f"the plan is for {self.num_layers} MoE layers x {self.num_experts} experts but "
                             f"the model/trace has {num_layers} x {num_experts}; make a plan from a trace of this model")

    # --- disk -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _VERSION, "num_ranks": self.num_ranks,
                "num_nodes": self.num_nodes, "assignment": [list(r) for r in self.assignment],
                "replicas": None if self.replicas is None else
                [{str(e): list(r) for e, r in d.items()} for d in self.replicas],
                "method": self.method, "objective": self.objective, "solve_time_s": self.solve_time_s,
                "solver_status": self.solver_status, "meta": self.meta, "copy_choice": self.copy_choice}

    @classmethod
    def from_dict(cls, d: dict) -> "PlacementPlan":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a PlacementPlan: expected format {_FORMAT!r}, got "
                             f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
        if d.get("version") != _VERSION:
            raise ValueError(f"unsupported PlacementPlan version {d.get('version')} (this moeflow reads {_VERSION})")
        missing = [k for k in ("num_ranks", "assignment") if k not in d]
        if missing:
            raise ValueError(f"PlacementPlan JSON lacks {missing}")
        reps = d.get("replicas")
        if reps is not None:
            try:
                reps = tuple({int(e): tuple(r) for e, r in layer.items()} for layer in reps)
            except (AttributeError, TypeError, ValueError) as e:
                raise ValueError(f"PlacementPlan replicas must be a list of {{expert: [ranks]}} maps ({e})") from e
        return cls(assignment=d["assignment"], num_ranks=d["num_ranks"], num_nodes=d.get("num_nodes", 1),
                   replicas=reps, method=d.get("method", "unknown"), objective=dict(d.get("objective") or {}),
                   solve_time_s=float(d.get("solve_time_s", 0.0)), solver_status=d.get("solver_status", ""),
                   meta=dict(d.get("meta") or {}), copy_choice=d.get("copy_choice", "spread"))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "PlacementPlan":
        return cls.from_dict(read_json(path, "placement plan", "make one with `moe place TRACE --out`"))

    def __repr__(self) -> str:
        n_rep = sum(len(d) for d in self.replicas) if self.replicas else 0
        return (f"PlacementPlan(method={self.method!r}, layers={self.num_layers}, experts={self.num_experts}, "
                f"ranks={self.num_ranks}, nodes={self.num_nodes}, replicas={n_rep}, status={self.solver_status!r})")


def write_json(path: str | Path, d: dict) -> Path:
    """Write a plan's dict as JSON (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=1))
    return path


def read_json(path: str | Path, what: str, hint: str = "") -> dict:
    """A plan's dict from JSON; a missing or non-JSON file is an error naming ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" + (f"; {hint}" if hint else ""))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON {what} ({e})") from e
