"""The chooser of the adaptive MoE layer: strategy names, a cost model calibrated on the machine,
and per-shape online correction from measured step times (Tutel never chose automatically).

Shape legend as in adaptive.py: T = tokens of a rank, D = hidden, I = expert ffn size, E = experts,
K = top-k, W = ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .adaptive_blend import BLENDS, group_sizes

STRATEGIES = ("ep", "dp", "tp") + BLENDS


@dataclass(frozen=True)
class Strategy:
    name: str = "ep"
    degree: int = 1  # pipelining degree (chunks), "ep" only
    group: int = 0   # ranks per group, blends ("ep+dp", "ep+tp") only; must divide the ranks

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown parallel strategy {self.name!r}; choose one of {STRATEGIES}")
        if self.degree < 1 or (self.name != "ep" and self.degree != 1):
            raise ValueError(f"pipelining degree must be >= 1 and is only defined for 'ep' "
                             f"(got {self.name!r} with degree {self.degree})")
        if (self.name in BLENDS) != (self.group >= 1) or self.group < 0:
            raise ValueError(f"ranks per group is required (>= 1) for the blends {BLENDS} and only for "
                             f"them (got {self.name!r} with group={self.group})")

    def __str__(self) -> str:
        if self.name == "ep":
            return f"ep:d{self.degree}"
        return f"{self.name}:g{self.group}" if self.name in BLENDS else self.name

    @classmethod
    def parse(cls, text: str) -> "Strategy":
        """Inverse of ``str``: "ep:d2", "dp", "tp", "ep+dp:g2", "ep+tp:g1"."""
        name, _, arg = text.partition(":")
        try:
            if name == "ep":
                return cls("ep", int(arg[1:]) if arg else 1)
            if name in BLENDS:
                return cls(name, group=int(arg[1:]) if arg.startswith("g") else 0)
        except ValueError:
            pass
        if name in BLENDS or (name == "ep" and arg):
            raise ValueError(f"bad strategy {text!r}; write e.g. 'ep:d2', 'dp', 'tp', 'ep+dp:g2', 'ep+tp:g1'")
        return cls(name)


# --- the chooser ---------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int
    world: int
    elem_bytes: int
    training: bool = False

    def bucket(self) -> tuple:
        """Shapes whose measured corrections are shared: tokens by power of two."""
        return (max(0, int(self.tokens).bit_length()), self.hidden, self.ffn, self.experts, self.top_k,
                self.world, self.training)


def gathered_weight_bytes(s: LayerShape, strat: Strategy) -> float:
    """Bytes of other ranks' weights a strategy gathers onto each rank for one step."""
    weights = 3 * s.experts * s.hidden * s.ffn * s.elem_bytes
    if strat.name == "dp":
        return weights
    return weights * strat.group / s.world if strat.name == "ep+dp" else 0.0


@dataclass
class CostModel:
    """Time of one collective = latency + bytes / bandwidth; expert math at ``flops_per_s``."""
    latency_s: float = 50e-6
    a2a_bytes_per_s: float = 150e9
    allgather_bytes_per_s: float = 150e9
    flops_per_s: float = 400e12

    def comm(self, nbytes: float, bw: float) -> float:
        return self.latency_s + nbytes / bw

    def predict(self, s: LayerShape, strat: Strategy) -> float:
        W, b = s.world, s.elem_bytes
        rows = s.tokens * s.top_k  # (token, slot) pairs on this rank
        # expert math for all ranks' rows, spread evenly: 3 matrices of D x I, 2 FLOPs per MAC
        compute = 2 * 3 * s.hidden * s.ffn * rows / self.flops_per_s
        weights = 3 * s.experts * s.hidden * s.ffn * b
        cross = (W - 1) / W
        bwd = 2.0 if s.training else 1.0  # backward runs the adjoint collectives once more
        flops_mult = 3.0 if s.training else 1.0
        if strat.name == "dp":
            comm = bwd * self.comm(weights * cross, self.allgather_bytes_per_s)
            compute_dp = 2 * 3 * s.hidden * s.ffn * rows / self.flops_per_s
            return comm + flops_mult * compute_dp
        if strat.name == "tp":
            tok_bytes = s.tokens * s.hidden * b * (W - 1)
            comm = bwd * (self.comm(tok_bytes, self.allgather_bytes_per_s) + self.comm(tok_bytes, self.a2a_bytes_per_s))
            return comm + flops_mult * compute
        slices = max(1, W // s.experts)
        if strat.name in BLENDS:
            g = strat.group
            G = W // g
            # a token visits each group holding one of its K x slices units once: expected
            # distinct groups of K*slices uniform picks
            visits = G * (1 - (1 - 1 / G) ** (s.top_k * slices))
            pair_bytes = s.tokens * visits * s.hidden * b
            comm = 2 * (3 * self.latency_s + pair_bytes * (G - 1) / G / self.a2a_bytes_per_s)
            if strat.name == "ep+dp" and g > 1:  # gather the group's units (once a step)
                comm += self.comm(weights * (g - 1) / W, self.allgather_bytes_per_s)
            elif g > 1:  # ep+tp: gather the group's received tokens, reduce-scatter the outputs
                comm += 2 * self.comm(pair_bytes * (g - 1), self.allgather_bytes_per_s)
            return bwd * comm + flops_mult * compute
        d = strat.degree
        a2a_bytes = rows * slices * s.hidden * b * cross
        comm = bwd * 2 * (d * self.latency_s + a2a_bytes / self.a2a_bytes_per_s)
        comp = flops_mult * compute
        # d chunks: all but one chunk's communication hides behind compute (and vice versa); only
        # inference overlaps them (AdaptiveMoEExperts._ep_overlapped), training runs chunks in turn
        return max(comm, comp) + min(comm, comp) / d if d > 1 and not s.training else comm + comp


@dataclass
class StrategyChooser:
    """Picks the strategy with the least predicted time; predictions are scaled per shape bucket
    by the median of the last ``window`` measured / predicted ratios, so a wrong model corrects
    itself online and one noisy step does not flip the choice.

    Exploring a new shape bucket: every candidate whose prediction is within ``explore_margin`` of
    the best prediction is run once (a cost model calibrated on micro-benchmarks can rank close
    strategies wrongly). Then the chooser settles (``decide`` returns settled=True) only once
    every measured candidate within ``close`` (20%) of the fastest measured one, the fastest
    included, has ``repeats`` samples (when there are two or more such) (``short_repeats`` when the best step is shorter than
    ``short_step_s``: short steps are the noisy ones); until then it re-runs the least sampled of
    them. At short steps a candidate with fewer than ``short_repeats`` samples stays in that race
    within ``close_once`` (50%) of the fastest: on 2 H200s (session 5) the chooser's wrong picks
    were candidates whose one sample came out 20-40% slow and were never run again. So it never
    settles on a candidate measured once while another measured once is within 20% of it (50% at
    short steps). Every decision is a function of the observations alone: ranks that observe the
    same (agreed) times decide the same without exchanging anything.

    ``check_every``: once settled, the layer re-agrees the shape and feeds a new measurement only
    every this many calls (see AdaptiveMoEExperts.forward); in between, a call costs nothing."""
    cost: CostModel = field(default_factory=CostModel)
    degrees: tuple[int, ...] = (1, 2, 4)
    explore_margin: float = 3.0
    close: float = 0.2
    close_once: float = 0.5
    repeats: int = 2
    short_repeats: int = 3
    short_step_s: float = 0.05
    window: int = 5
    check_every: int = 16
    allow: tuple[str, ...] = STRATEGIES
    max_gather_bytes: float | None = None  # leave out dp / ep+dp whose gathered weights exceed it
    _ratios: dict = field(default_factory=dict)  # (bucket, strategy) -> last ``window`` ratios
    _cand_cache: dict = field(default_factory=dict, repr=False)   # shape -> candidates
    _model_cache: dict = field(default_factory=dict, repr=False)  # (shape, strategy) -> cost model's time
    current: Strategy | None = None

    def __post_init__(self):
        bad = [a for a in self.allow if a not in STRATEGIES]
        if bad or not self.allow:
            raise ValueError(f"allow must name strategies among {STRATEGIES}, got {self.allow}")
        if self.explore_margin < 1.0:
            raise ValueError(f"explore_margin must be >= 1 (1 = never explore), got {self.explore_margin}")
        if not 1 <= self.repeats <= self.window or not 1 <= self.short_repeats <= self.window:
            raise ValueError(f"repeats ({self.repeats}) and short_repeats ({self.short_repeats}) must be "
                             f"between 1 and window ({self.window}): a median needs its samples kept")
        if self.check_every < 1 or self.close < 0:
            raise ValueError(f"check_every must be >= 1 and close >= 0, got {self.check_every}, {self.close}")
        if self.close_once < self.close:
            raise ValueError(f"close_once ({self.close_once}) must be >= close ({self.close}): it is the race "
                             f"margin of candidates with too few samples")

    def candidates(self, shape: LayerShape) -> list[Strategy]:
        out = self._cand_cache.get(shape)
        if out is None:
            out = self._candidates(shape)
            self._cache_put(self._cand_cache, shape, out)
        return list(out)

    def _candidates(self, shape: LayerShape) -> list[Strategy]:
        out = []
        for name in self.allow:
            if name == "ep":
                out += [Strategy("ep", d) for d in self.degrees]
            elif name in BLENDS:
                # g = W is dp / tp again; g = 1 of ep+tp is ep with one copy of a token per rank
                lo = 2 if name == "ep+dp" else 1
                out += [Strategy(name, group=g) for g in group_sizes(shape.world) if lo <= g < shape.world]
            else:
                out.append(Strategy(name))
        if self.max_gather_bytes is not None:
            out = [s for s in out if gathered_weight_bytes(shape, s) <= self.max_gather_bytes] or out[:1]
        return out

    @staticmethod
    def _cache_put(cache: dict, key, value) -> None:
        if len(cache) >= 4096:  # token counts vary without end in serving: keep the caches bounded
            cache.clear()
        cache[key] = value

    def _model(self, shape: LayerShape, strat: Strategy) -> float:
        """The cost model's prediction (fixed for a shape: the model does not change once built)."""
        key = (shape, strat)
        v = self._model_cache.get(key)
        if v is None:
            v = self.cost.predict(shape, strat)
            self._cache_put(self._model_cache, key, v)
        return v

    def samples(self, shape: LayerShape, strat: Strategy) -> int:
        """How many measurements of ``strat`` on this shape's bucket the chooser holds."""
        return len(self._ratios.get((shape.bucket(), strat), ()))

    @staticmethod
    def _median(r) -> float:
        s = sorted(r)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])

    def predict(self, shape: LayerShape, strat: Strategy) -> float:
        r = self._ratios.get((shape.bucket(), strat))
        return self._model(shape, strat) * (self._median(r) if r else 1.0)

    def decide(self, shape: LayerShape) -> tuple[Strategy, bool]:
        """The strategy for the next call, and whether exploration is over for this bucket."""
        # one pass over the candidates (a check call runs this: session 5 made it ~3x cheaper by
        # computing the bucket, the model's predictions and the candidate list once)
        cands = self.candidates(shape)
        b = shape.bucket()
        ratios = {s: self._ratios.get((b, s), ()) for s in cands}
        n = {s: len(r) for s, r in ratios.items()}
        pred = {s: self._model(shape, s) * (self._median(r) if r else 1.0) for s, r in ratios.items()}
        best = min(cands, key=pred.get)
        if self.explore_margin > 1.0:
            bound = pred[best] * self.explore_margin
            untried = [s for s in cands if n[s] == 0 and pred[s] <= bound]
            if untried:
                return min(untried, key=pred.get), False
        if n[best] == 0:  # nothing measured (explore_margin 1): the model alone
            return best, True
        short_step = pred[best] < self.short_step_s
        need = self.short_repeats if short_step else self.repeats
        # at short steps one sample can be 1.4x off (host jitter): a candidate measured fewer than
        # ``need`` times stays in the race within the wider ``close_once``
        race = [s for s in cands if n[s] > 0 and pred[s] <= pred[best] * (
            1 + (self.close_once if short_step and n[s] < need else self.close))]
        short = [s for s in race if n[s] < need]
        if len(race) > 1 and short:  # a close race decided by too few samples: sample again
            return min(short, key=lambda s: (n[s], pred[s])), False
        return best, True

    def choose(self, shape: LayerShape) -> Strategy:
        self.current = self.decide(shape)[0]
        return self.current

    def observe(self, shape: LayerShape, strat: Strategy, seconds: float) -> None:
        key = (shape.bucket(), strat)
        r = seconds / max(self._model(shape, strat), 1e-12)
        self._ratios[key] = (self._ratios.get(key, []) + [r])[-self.window:]


def calibrate(group=None, device: str | torch.device = "cpu", dtype=torch.float32, repeats: int = 5) -> CostModel:
    """Measure collective latency/bandwidth and the GEMM rate on this machine (all ranks call it)."""
    device = torch.device(device)

    def timed(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=group)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        # every rank must agree on the model: take the slowest rank's figure
        t = torch.tensor([best], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return float(t)

    W = dist.get_world_size(group)
    small = torch.zeros(W, dtype=dtype, device=device)
    lat = timed(lambda: dist.all_to_all_single(torch.empty_like(small), small, group=group))
    elem = small.element_size()

    def rate(run, n1: int, n2: int, crossing: float) -> float:
        """Bytes per second from the slope between two sizes, so that the fixed cost (latency,
        launch) cancels: at NVLink speeds one size's time minus the small-message latency can be
        zero or negative, which made the bandwidth absurd (8e15 B/s on 2 H200s). ``crossing``:
        bytes that cross between ranks per unit of ``n``."""
        t1, t2 = run(n1), run(n2)
        if t2 > t1 * 1.05:
            return (n2 - n1) * crossing / (t2 - t1)
        return n2 * crossing / t2  # no measurable slope (noise): the conservative average rate

    def a2a(n: int) -> float:
        x = torch.randn(n * W, dtype=dtype, device=device)
        out = torch.empty_like(x)
        return timed(lambda: dist.all_to_all_single(out, x, group=group))

    def ag(n: int) -> float:
        x = torch.randn(n * W, dtype=dtype, device=device)
        out = torch.empty(n * W * W, dtype=dtype, device=device)
        return timed(lambda: dist.all_gather_into_tensor(out, x, group=group))

    n1, n2 = ((1 << 20), (1 << 23)) if device.type == "cuda" else ((1 << 14), (1 << 17))
    a2a_bw = rate(a2a, n1, n2, W * elem * (W - 1) / W)  # a rank's bytes that leave it
    ag_bw = rate(ag, n1, n2, W * elem * (W - 1))         # the bytes a rank receives
    m = 2048 if device.type == "cuda" else 256
    a = torch.randn(m, m, dtype=dtype, device=device)
    t_mm = timed(lambda: a @ a)
    return CostModel(latency_s=lat, a2a_bytes_per_s=a2a_bw, allgather_bytes_per_s=ag_bw,
                     flops_per_s=2 * m ** 3 / t_mm)
