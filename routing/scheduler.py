"""Token scheduling across batches (ExpertFlow): group tokens whose predicted routing paths
overlap, so that each batch activates fewer distinct experts, without starving anyone.

Items are pending tokens (one decode step of one request). ``next_batch`` picks up to B:

1. Fairness first. Each item gets a deadline when it is added: the batch in which plain FIFO
   would serve it (now + floor(items ahead / B)) plus ``max_wait``. Any work-conserving
   schedule leaves the queue length exactly as FIFO would, so FIFO itself meets every
   un-shifted deadline and the deadlines are always jointly feasible. Each batch takes the
   fewest earliest-deadline items that keep the rest feasible: for every horizon h, at most
   B * h of the items still waiting may be due within the next h batches (an EDF argument).
   Hence no item waits more than ``max_wait`` batches beyond its FIFO batch.
2. Then greedy grouping: starting from the forced items (or the oldest item), repeatedly add
   the item that brings the fewest expected new experts, summed over layers: with predicted
   probabilities p[L, E] and the batch's coverage U[L, E], cost = sum p * (1 - U), after which
   U <- 1 - (1 - U)(1 - p). Ties go to the older item.

Shape legend: L = MoE layers, K = top-k, E = experts, Q = pending items.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

from .baselines import PathModel, multi_hot
from .trace import RoutingTrace


@dataclass
class SchedulerConfig:
    batch_size: int = 8
    max_wait: int = 2  # batches an item may be passed over beyond its FIFO batch
    grouping: bool = True  # False: plain FIFO (the reference the grouping is measured against)

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.max_wait < 0:
            raise ValueError(f"max_wait must be >= 0 batches, got {self.max_wait}")


@dataclass
class _Item:
    key: Hashable
    seq: int  # arrival order
    fifo_batch: int
    deadline: int
    probs_LE: np.ndarray


class TokenScheduler:
    """``add(key, predicted)`` pending tokens; ``next_batch()`` returns the keys to run next."""

    def __init__(self, num_experts: int, config: SchedulerConfig | None = None):
        self.num_experts = num_experts
        self.config = config or SchedulerConfig()
        self._items: dict[Hashable, _Item] = {}
        self._seq = 0
        self.batches_formed = 0

    @property
    def pending(self) -> int:
        return len(self._items)

    def add(self, key: Hashable, predicted) -> None:
        """``predicted``: expert ids [L, K] (-1 = none) or probabilities [L, E]."""
        if key in self._items:
            raise ValueError(f"item {key!r} is already pending; add a token again only after it was scheduled")
        p = np.asarray(predicted)
        if np.issubdtype(p.dtype, np.integer):
            p = multi_hot(p, self.num_experts)
        if p.ndim != 2 or p.shape[1] != self.num_experts:
            raise ValueError(f"predicted must be ids [L, K] or probabilities [L, E={self.num_experts}], "
                             f"got shape {p.shape}")
        B = self.config.batch_size
        fifo = self.batches_formed + len(self._items) // B
        self._items[key] = _Item(key, self._seq, fifo, fifo + self.config.max_wait, p.astype(np.float32))
        self._seq += 1

    def pending_keys(self) -> list[Hashable]:
        return list(self._items)

    def fifo_batch(self, key: Hashable) -> int:
        return self._items[key].fifo_batch

    def _forced(self, items: list[_Item]) -> list[_Item]:
        """The fewest earliest-deadline items this batch must take to keep every deadline feasible."""
        B, now = self.config.batch_size, self.batches_formed
        by_deadline = sorted(items, key=lambda it: (it.deadline, it.seq))
        need = 0
        for i, it in enumerate(by_deadline):
            # items 0..i are due within batches now..it.deadline: (it.deadline - now) later batches
            # can take B each, the rest must go now
            need = max(need, i + 1 - B * (it.deadline - now))
        if need > B:
            raise AssertionError(f"fairness deadlines became infeasible ({need} items due now, batch {B})")
        return by_deadline[:need]

    def next_batch(self) -> list[Hashable]:
        if not self._items:
            return []
        B = self.config.batch_size
        items = list(self._items.values())
        if not self.config.grouping:
            chosen = sorted(items, key=lambda it: it.seq)[:B]
        else:
            chosen = self._forced(items)
            if not chosen:
                chosen = [min(items, key=lambda it: it.seq)]
            taken = {id(it) for it in chosen}
            cover = np.zeros_like(chosen[0].probs_LE)
            for it in chosen:
                cover = 1.0 - (1.0 - cover) * (1.0 - it.probs_LE)
            rest = sorted((it for it in items if id(it) not in taken), key=lambda it: it.seq)
            if rest and len(chosen) < B:
                P = np.stack([it.probs_LE for it in rest])  # [Q, L, E]
                free = np.ones(len(rest), dtype=bool)
                while len(chosen) < B and free.any():
                    cost = (P * (1.0 - cover)[None]).sum((1, 2))
                    cost[~free] = np.inf
                    i = int(np.argmin(cost))  # argmin keeps the first (oldest) of equal costs
                    free[i] = False
                    chosen.append(rest[i])
                    cover = 1.0 - (1.0 - cover) * (1.0 - P[i])
        for it in chosen:
            del self._items[it.key]
        self.batches_formed += 1
        return [it.key for it in chosen]


@dataclass
class ScheduleResult:
    distinct_experts_per_batch: float  # mean over full batches of sum over layers of |union of real sets|
    tokens_per_batch: float
    batches: int
    max_extra_wait: int  # max over tokens of (served batch - FIFO batch)
    extra_waits: list = field(default_factory=list)


def simulate_schedule(trace: RoutingTrace, model: PathModel | None, config: SchedulerConfig,
                      max_tokens_per_request: int | None = None) -> ScheduleResult:
    """Decode every request of ``trace`` token by token through a ``TokenScheduler``.

    Each request has at most one token pending (its next one); once served, its following token
    is added, predicted by ``model`` from the served token's real path (``model=None`` uses the
    real path itself: an oracle). Distinct experts per batch are counted on the real paths.
    """
    paths = trace.paths().astype(np.int64)  # [T, L, K]
    req = trace.request_ids_or_default()
    per_req: dict[int, np.ndarray] = {}
    for r in np.unique(req):
        idx = np.flatnonzero(req == r)
        per_req[int(r)] = idx[:max_tokens_per_request] if max_tokens_per_request else idx
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    sched = TokenScheduler(E, config)
    cursor = {r: 0 for r in per_req}

    def predict(r: int, nxt: int) -> np.ndarray:
        tok = per_req[r][nxt]
        if model is None:
            return multi_hot(paths[tok], E)
        prev = paths[per_req[r][nxt - 1]][None] if nxt > 0 else np.full((1, L, K), -1)
        feats = {"token_ids": trace.token_ids[[tok]]} if trace.token_ids is not None else None
        return model.predict_batch(prev, -1, np.zeros((1, 0, K), np.int64), feats)[0]

    for r in per_req:  # requests arrive in id order
        sched.add(r, predict(r, 0))
    distinct, sizes, waits = [], [], []
    while sched.pending:
        fifo = {r: sched.fifo_batch(r) for r in sched.pending_keys()}
        now = sched.batches_formed
        batch = sched.next_batch()
        toks = [per_req[r][cursor[r]] for r in batch]
        distinct.append(int(sum(len(np.unique(paths[toks, l][paths[toks, l] >= 0])) for l in range(L))))
        sizes.append(len(batch))
        for r in batch:
            waits.append(now - fifo[r])
            cursor[r] += 1
            if cursor[r] < len(per_req[r]):
                sched.add(r, predict(r, cursor[r]))
    full = [d for d, n in zip(distinct, sizes) if n == config.batch_size] or distinct
    return ScheduleResult(float(np.mean(full)), float(np.mean(sizes)), len(distinct), int(max(waits)), waits)
