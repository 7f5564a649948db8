"""Adaptive parallelism for one MoE layer, switched per call without moving weights (Tutel).

Shape legend: T = this rank's tokens, D = hidden, E = experts, I = expert ffn size, K = top-k,
W = ranks, S = slices per expert, U = E*S weight units, Uw = U/W units per rank,
N = (token, slot, slice) rows.

One weight layout serves every strategy. Each expert's ffn dimension is cut into
S = max(1, W/E) slices; the E*S units are dealt out in order, Uw per rank. Because
SiLU(gate)*up is elementwise over the ffn index, an expert's output is the sum of its slices'
outputs, so any strategy that sums unit outputs computes exactly the unsliced layer.

Strategies (``Strategy.name``), each a different way to bring tokens and units together:
  "ep"  expert parallel (+ slicing when S > 1; Tutel's r = W/E): rows go by all-to-all to the
        rank holding their unit and come back by a second all-to-all. ``degree`` d splits the
        rows into d chunks whose dispatch is issued ahead of the compute (pipelining).
  "dp"  data parallel (Tutel's r = 0): all-gather every unit's weights, compute local tokens;
        in backward the weight gradients are reduce-scattered back to their owners.
  "tp"  sliced/tensor parallel: all-gather the tokens, each rank computes its own units for
        every token, a reduce-scatter sums the partial outputs back to the tokens' ranks.
  "ep+dp", "ep+tp" with ``group`` g: expert parallel across groups of g ranks, data or tensor
        parallel inside them (adaptive_blend.py; Tutel's r between 1 and W/E is "ep+dp").
Capacity is moe.losses' rule (the single-process layer's), applied to the routing before any
strategy runs, so dropped tokens are the same whatever the strategy: f > 0 fixed factor,
f = 0 dropless, f < 0 the capacity the batch needs, capped at |f| × the mean load.

The chooser predicts each strategy's step time from a cost model calibrated on the machine
(collective latency and bandwidth, expert GEMM rate) and corrects it online with measured step
times; a switch takes effect at the next call and moves no weight.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kernels import get_backend

from moe.losses import apply_capacity

from .adaptive_blend import BLENDS, blend_forward, group_sizes
from .collectives import all_gather_v, all_to_all_v, exchange_counts, gather_sizes, reduce_scatter_v

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


# --- layout --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    num_experts: int
    ffn_size: int
    world_size: int

    def __post_init__(self):
        E, W, I = self.num_experts, self.world_size, self.ffn_size
        if not self.valid_count(E, W):
            raise ValueError(f"num_experts ({E}) and ranks ({W}) must divide one another "
                             "(e.g. 8 experts on 2, 4 or 8 ranks, or 2 experts on 4 ranks)")
        if I % self.slices:
            raise ValueError(f"expert ffn size {I} must be divisible by the {self.slices} slices per expert "
                             f"that {W} ranks over {E} experts need")

    @staticmethod
    def valid_count(num_experts: int, world_size: int) -> bool:
        """Whether this many experts can be laid out on this many ranks."""
        return num_experts % world_size == 0 or world_size % num_experts == 0

    @property
    def slices(self) -> int:
        return max(1, self.world_size // self.num_experts)

    @property
    def units(self) -> int:
        return self.num_experts * self.slices

    @property
    def units_per_rank(self) -> int:
        return self.units // self.world_size

    @property
    def slice_size(self) -> int:
        return self.ffn_size // self.slices

    def shard(self, w13_EJD: torch.Tensor, w2_EDI: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The units rank ``rank`` holds: w13 [Uw, 2*Is, D] and w2 [Uw, D, Is] (copies)."""
        return self.slice_units(w13_EJD, w2_EDI, range(rank * self.units_per_rank, (rank + 1) * self.units_per_rank))

    def slice_units(self, w13_EJD, w2_EDI, units) -> tuple[torch.Tensor, torch.Tensor]:
        I, Is, S = self.ffn_size, self.slice_size, self.slices
        w13, w2 = [], []
        for u in units:
            e, s = divmod(u, S)
            lo, hi = s * Is, (s + 1) * Is
            w13.append(torch.cat([w13_EJD[e, lo:hi], w13_EJD[e, I + lo:I + hi]], dim=0))
            w2.append(w2_EDI[e][:, lo:hi])
        return torch.stack(w13).contiguous(), torch.stack(w2).contiguous()

    def unshard(self, w13_UJD: torch.Tensor, w2_UDI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of slicing all units: [U, 2Is, D], [U, D, Is] -> [E, 2I, D], [E, D, I]."""
        E, S, Is = self.num_experts, self.slices, self.slice_size
        g = w13_UJD[:, :Is].reshape(E, S * Is, -1)
        up = w13_UJD[:, Is:].reshape(E, S * Is, -1)
        w2 = w2_UDI.reshape(E, S, w2_UDI.shape[1], Is).permute(0, 2, 1, 3).reshape(E, w2_UDI.shape[1], S * Is)
        return torch.cat([g, up], dim=1), w2


# --- the layer -----------------------------------------------------------------------------
@dataclass
class StepInfo:
    strategy: Strategy
    seconds: float | None  # measured only when the chooser needs it (timing synchronises the device)
    dropped: int
    capacity: int | None


class AdaptiveMoEExperts(torch.nn.Module):
    """The routed experts of one MoE layer, sharded over a process group.

    forward(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD for this rank's tokens, the same
    signature as the model's ``block.experts``. The strategy is chosen per call by ``chooser``
    (or fixed with ``strategy=``).
    """

    def __init__(self, w13_EJD: torch.Tensor, w2_EDI: torch.Tensor, group=None, backend: str = "torch",
                 capacity_factor: float = 0.0, chooser: "StrategyChooser | None" = None,
                 strategy: Strategy | None = None, *, num_experts: int | None = None):
        """Every rank passes the whole layer's w13 [E, 2I, D] and w2 [E, D, I] and keeps its units;
        or, with ``num_experts`` given, its own units already cut (w13 [Uw, 2Is, D], w2 [Uw, D, Is],
        as ``ShardLayout.shard`` makes them), so no rank ever holds the whole layer."""
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if num_experts is None:
            E, J, D = w13_EJD.shape
            self.layout = ShardLayout(E, J // 2, self.world)
            w13, w2 = self.layout.shard(w13_EJD, w2_EDI, self.rank)
        else:
            Uw, J, D = w13_EJD.shape
            self.layout = ShardLayout(num_experts, J // 2 * max(1, self.world // num_experts), self.world)
            if Uw != self.layout.units_per_rank or tuple(w2_EDI.shape) != (Uw, D, J // 2):
                raise ValueError(f"a shard of {num_experts} experts on {self.world} ranks is w13 "
                                 f"[{self.layout.units_per_rank}, 2*slice, D] and w2 [units, D, slice]; got "
                                 f"{tuple(w13_EJD.shape)} and {tuple(w2_EDI.shape)}")
            w13, w2 = w13_EJD, w2_EDI
        self.w13 = torch.nn.Parameter(w13)  # [Uw, 2Is, D]
        self.w2 = torch.nn.Parameter(w2)    # [Uw, D, Is]
        self.hidden = D
        self.backend = backend
        self.capacity_factor = capacity_factor
        self.chooser = chooser
        self.fixed = strategy
        self.last: StepInfo | None = None

    def shape_key(self, tokens: int, top_k: int) -> "LayerShape":
        L = self.layout
        return LayerShape(tokens=tokens, hidden=self.hidden, ffn=L.ffn_size, experts=L.num_experts,
                          top_k=top_k, world=self.world, elem_bytes=self.w13.element_size(),
                          training=torch.is_grad_enabled() and self.w13.requires_grad)

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                strategy: Strategy | None = None) -> torch.Tensor:
        T, K = topk_ids_TK.shape
        # the single-process layer's capacity rule (moe.losses), applied to this rank's tokens as
        # Tutel applies it per rank. Rows are dispatched without padded buffers, so no rank needs
        # the others' loads: with f < 0 a rank drops past min(needed, |f| mean) exactly when it
        # would past min(global needed, |f| mean) (both cut at |f| mean only when it overflows).
        cap, dropped, ids_TK = None, 0, topk_ids_TK
        if self.capacity_factor != 0:
            ids_TK, dropped, cap = apply_capacity(topk_ids_TK, self.layout.num_experts, self.capacity_factor)
        adaptive = self.chooser is not None and self.fixed is None and strategy is None
        if adaptive:
            # every rank must pick the same strategy (they run its collectives together), so the
            # chooser sees the same shape on every rank: the largest token count of any rank
            T_key = int(self._agreed(T, x_TD.device))
            strat = self.chooser.choose(self.shape_key(T_key, K))
        else:
            strat = strategy or self.fixed or Strategy("ep")
        t0 = time.perf_counter()
        if strat.name == "ep":
            y = self._ep(x_TD, ids_TK, topk_weights_TK, strat.degree)
        elif strat.name == "dp":
            y = self._dp(x_TD, ids_TK, topk_weights_TK)
        elif strat.name in BLENDS:
            tok, unit, weight = self._rows(ids_TK, topk_weights_TK)
            y = blend_forward(self, x_TD, tok, unit, weight, strat.name, strat.group)
        else:
            y = self._tp(x_TD, ids_TK, topk_weights_TK)
        seconds = None
        if adaptive:
            if x_TD.is_cuda:  # the chooser learns from wall time: wait for the device only then
                torch.cuda.current_stream().synchronize()
            # ...and learns the same times: a step lasts as long as its slowest rank
            seconds = self._agreed(time.perf_counter() - t0, x_TD.device)
            self.chooser.observe(self.shape_key(T_key, K), strat, seconds)
        self.last = StepInfo(strat, seconds, dropped, cap)
        return y

    def _agreed(self, value: float, device) -> float:
        """The largest ``value`` of any rank (one tiny all-reduce)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def stats(self) -> dict:
        """For the metrics endpoint: the strategy of the last call, its dropped (token, slot) pairs on
        this rank and the capacity per expert (None = dropless)."""
        if self.last is None:
            return {}
        return {"strategy": str(self.last.strategy), "dropped_tokens": self.last.dropped,
                "capacity": self.last.capacity}

    # rows: one per (token, slot, slice) with a valid expert
    def _rows(self, ids_TK: torch.Tensor, w_TK: torch.Tensor):
        S = self.layout.slices
        T, K = ids_TK.shape
        flat = ids_TK.reshape(-1)
        keep = (flat >= 0).nonzero(as_tuple=True)[0]
        tok = (keep // K).repeat_interleave(S)
        unit = (flat[keep][:, None] * S + torch.arange(S, device=flat.device)[None]).reshape(-1)
        weight = w_TK.reshape(-1)[keep].repeat_interleave(S)
        return tok, unit, weight

    def _compute(self, x_ND, unit_N, weight_N, w13, w2) -> torch.Tensor:
        if x_ND.shape[0] == 0:
            # keep every input in the graph even with no rows: each rank's backward must run the
            # same adjoint collectives (the weights' all-to-all included) or the ranks mismatch
            return x_ND[:0] + 0 * (w13.sum() + w2.sum() + weight_N.sum())
        return get_backend(self.backend)(x_ND, w13, w2, unit_N[:, None], weight_N[:, None])

    def _ep_chunks(self, tok, unit, weight, degree: int):
        """Split rows into ``degree`` chunks, each sorted by destination rank, with its splits."""
        W, Uw = self.world, self.layout.units_per_rank
        chunks = list(torch.arange(tok.numel(), device=tok.device).chunk(degree))
        while len(chunks) < degree:  # every rank must run the same number of collectives
            chunks.append(tok[:0])
        out = []
        for idx in chunks:
            t, u, w = tok[idx], unit[idx], weight[idx]
            dest = u // Uw
            order = torch.argsort(dest, stable=True)
            send = torch.bincount(dest, minlength=W)
            recv = exchange_counts(send, self.group)
            out.append((t[order], u[order], w[order], send.tolist(), recv.tolist()))
        return out

    def _ep(self, x_TD, ids_TK, w_TK, degree: int) -> torch.Tensor:
        Uw = self.layout.units_per_rank
        tok, unit, weight = self._rows(ids_TK, w_TK)
        chunks = self._ep_chunks(tok, unit, weight, degree)
        if degree > 1 and not torch.is_grad_enabled():
            return self._ep_overlapped(x_TD, chunks)
        y_TD = torch.zeros_like(x_TD)
        for t, u, w, s_list, r_list in chunks:
            x_in = all_to_all_v(x_TD[t], s_list, r_list, self.group)
            meta_in = all_to_all_v(torch.stack([u.to(w.dtype), w], dim=1), s_list, r_list, self.group)
            u_in = meta_in[:, 0].round().long() - self.rank * Uw
            y_in = self._compute(x_in, u_in, meta_in[:, 1].to(x_TD.dtype), self.w13, self.w2)
            y_TD = y_TD.index_add(0, t, all_to_all_v(y_in, r_list, s_list, self.group))
        return y_TD

    @torch.no_grad()
    def _ep_overlapped(self, x_TD, chunks) -> torch.Tensor:
        """Inference pipelining: every chunk's dispatch is posted before any compute, so chunk
        i+1 travels while chunk i is computed, and chunk i's combine travels during chunk i+1."""
        Uw = self.layout.units_per_rank
        posted = []
        for t, u, w, s_list, r_list in chunks:
            x_in = x_TD.new_empty((sum(r_list), x_TD.shape[1]))
            meta = torch.stack([u.to(w.dtype), w], dim=1)
            meta_in = meta.new_empty((sum(r_list), 2))
            h1 = dist.all_to_all_single(x_in, x_TD[t].contiguous(), r_list, s_list, group=self.group, async_op=True)
            h2 = dist.all_to_all_single(meta_in, meta, r_list, s_list, group=self.group, async_op=True)
            posted.append((h1, h2, x_in, meta_in))
        back = []
        for (t, u, w, s_list, r_list), (h1, h2, x_in, meta_in) in zip(chunks, posted):
            h1.wait()
            h2.wait()
            u_in = meta_in[:, 0].round().long() - self.rank * Uw
            y_in = self._compute(x_in, u_in, meta_in[:, 1].to(x_TD.dtype), self.w13, self.w2)
            y_back = x_TD.new_empty((sum(s_list), x_TD.shape[1]))
            back.append((t, y_back, dist.all_to_all_single(y_back, y_in.contiguous(), s_list, r_list,
                                                           group=self.group, async_op=True)))
        y_TD = torch.zeros_like(x_TD)
        for t, y_back, h in back:
            h.wait()
            y_TD.index_add_(0, t, y_back)
        return y_TD

    def _dp(self, x_TD, ids_TK, w_TK) -> torch.Tensor:
        Uw = self.layout.units_per_rank
        sizes = [Uw] * self.world
        w13_all = all_gather_v(self.w13, sizes, self.group)
        w2_all = all_gather_v(self.w2, sizes, self.group)
        tok, unit, weight = self._rows(ids_TK, w_TK)
        y = self._compute(x_TD[tok], unit, weight.to(x_TD.dtype), w13_all, w2_all)
        return torch.zeros_like(x_TD).index_add(0, tok, y)

    def _tp(self, x_TD, ids_TK, w_TK) -> torch.Tensor:
        Uw = self.layout.units_per_rank
        sizes = gather_sizes(x_TD.shape[0], x_TD.device, self.group)
        x_all = all_gather_v(x_TD, sizes, self.group)
        ids_all = all_gather_v(ids_TK, sizes, self.group)
        w_all = all_gather_v(w_TK, sizes, self.group)
        tok, unit, weight = self._rows(ids_all, w_all)
        mine = (unit // Uw) == self.rank
        tok, unit, weight = tok[mine], unit[mine] - self.rank * Uw, weight[mine]
        y = self._compute(x_all[tok], unit, weight.to(x_TD.dtype), self.w13, self.w2)
        partial = torch.zeros_like(x_all).index_add(0, tok, y)
        return reduce_scatter_v(partial, sizes, self.group)


def apply_adaptive_parallel(model: torch.nn.Module, group=None, backend: str | None = None,
                            capacity_factor: float = 0.0, chooser: "StrategyChooser | None" = None,
                            strategy: Strategy | None = None) -> torch.nn.Module:
    """Shard the routed experts of every MoE block of ``model`` (a MoEForCausalLM, a MoELayer, or
    anything with ``moe_blocks()``) over the process group; the strategy is chosen per call.

    Every rank calls this with the same weights (each keeps only its shard) and then feeds its own
    tokens: data parallel outside the MoE layers, this layer's strategy inside. One chooser (a new
    one unless given) serves all layers, keyed by shape; ``model.parallel_chooser`` exposes it.
    The rest of the model is untouched: its gradients still need the usual data-parallel
    all-reduce (e.g. DistributedDataParallel), which the experts' shards must be left out of.
    """
    blocks = list(model.moe_blocks()) if hasattr(model, "moe_blocks") else []
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE blocks (moe_blocks()) to parallelise")
    if strategy is None and chooser is None:
        chooser = StrategyChooser()
    for b in blocks:
        ex = b.experts
        if isinstance(ex, AdaptiveMoEExperts):
            raise ValueError("the model's experts are already sharded; apply_adaptive_parallel once")
        if not (hasattr(ex, "w13") and hasattr(ex, "w2")):
            raise ValueError(f"block {getattr(b, 'layer_idx', '?')}'s experts ({type(ex).__name__}) hold no w13/w2: "
                             "apply adaptive parallelism before offloading or placement")
        b.experts = AdaptiveMoEExperts(ex.w13.detach(), ex.w2.detach(), group=group,
                                       backend=backend or getattr(ex, "backend", "torch"),
                                       capacity_factor=capacity_factor, chooser=chooser, strategy=strategy)
        b.experts.w13.requires_grad_(ex.w13.requires_grad)
        b.experts.w2.requires_grad_(ex.w2.requires_grad)
    model.parallel_chooser = chooser
    return model


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
        # d chunks: all but one chunk's communication hides behind compute (and vice versa)
        return max(comm, comp) + min(comm, comp) / d if d > 1 else comm + comp


@dataclass
class StrategyChooser:
    """Picks the strategy with the least predicted time; predictions are scaled per shape bucket
    by the running ratio measured / predicted, so a wrong model corrects itself online.

    For a new shape bucket, every candidate whose prediction is within ``explore_margin`` of the
    best prediction is run once before the chooser settles (a few steps of a long run), since a
    cost model calibrated on micro-benchmarks can rank close strategies wrongly."""
    cost: CostModel = field(default_factory=CostModel)
    degrees: tuple[int, ...] = (1, 2, 4)
    smoothing: float = 0.5
    explore_margin: float = 3.0
    allow: tuple[str, ...] = STRATEGIES
    max_gather_bytes: float | None = None  # leave out dp / ep+dp whose gathered weights exceed it
    _ratio: dict = field(default_factory=dict)
    current: Strategy | None = None

    def __post_init__(self):
        bad = [a for a in self.allow if a not in STRATEGIES]
        if bad or not self.allow:
            raise ValueError(f"allow must name strategies among {STRATEGIES}, got {self.allow}")
        if self.explore_margin < 1.0:
            raise ValueError(f"explore_margin must be >= 1 (1 = never explore), got {self.explore_margin}")

    def candidates(self, shape: LayerShape) -> list[Strategy]:
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

    def predict(self, shape: LayerShape, strat: Strategy) -> float:
        return self.cost.predict(shape, strat) * self._ratio.get((shape.bucket(), strat), 1.0)

    def choose(self, shape: LayerShape) -> Strategy:
        cands = self.candidates(shape)
        best = min(cands, key=lambda s: self.predict(shape, s))
        bucket = shape.bucket()
        if self.explore_margin > 1.0:
            bound = self.predict(shape, best) * self.explore_margin
            untried = [s for s in cands if (bucket, s) not in self._ratio and self.predict(shape, s) <= bound]
            if untried:
                best = min(untried, key=lambda s: self.predict(shape, s))
        self.current = best
        return best

    def observe(self, shape: LayerShape, strat: Strategy, seconds: float) -> None:
        key = (shape.bucket(), strat)
        r = seconds / max(self.cost.predict(shape, strat), 1e-12)
        old = self._ratio.get(key)
        self._ratio[key] = r if old is None else (1 - self.smoothing) * old + self.smoothing * r


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
    big_n = (1 << 22) if device.type == "cuda" else (1 << 18)
    big = torch.randn(big_n * W, dtype=dtype, device=device)
    out = torch.empty_like(big)
    lat = timed(lambda: dist.all_to_all_single(torch.empty_like(small), small, group=group))
    t_a2a = timed(lambda: dist.all_to_all_single(out, big, group=group))
    gather_out = torch.empty(big_n * W * W, dtype=dtype, device=device)
    t_ag = timed(lambda: dist.all_gather_into_tensor(gather_out, big, group=group))
    nbytes = big.numel() * big.element_size()
    m = 2048 if device.type == "cuda" else 256
    a = torch.randn(m, m, dtype=dtype, device=device)
    t_mm = timed(lambda: a @ a)
    return CostModel(latency_s=lat,
                     a2a_bytes_per_s=nbytes * (W - 1) / W / max(t_a2a - lat, 1e-9),
                     allgather_bytes_per_s=nbytes * (W - 1) / max(t_ag - lat, 1e-9),
                     flops_per_s=2 * m ** 3 / t_mm)
