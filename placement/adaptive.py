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

The chooser (adaptive_chooser.py) predicts each strategy's step time from a cost model calibrated
on the machine (collective latency and bandwidth, expert GEMM rate) and corrects it online with
measured step times (a training call's forward + backward); a switch takes effect at the next
call and moves no weight. Once the chooser has settled on a shape, a call costs no collective, no
host sync and no timing beyond the strategy's own: only every ``check_every``-th call agrees the
shape across ranks and learns a time (recorded with CUDA events, read one check later). ``ReplicatedTokensExperts`` runs the layer where every rank holds every
token (the Ray runtime's context); ``apply_adaptive_parallel`` puts it into a model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels import get_backend

from moe.losses import apply_capacity

from .adaptive_blend import BLENDS, blend_forward
from .adaptive_chooser import (STRATEGIES, CostModel, LayerShape, Strategy, StrategyChooser,  # noqa: F401
                               calibrate, gathered_weight_bytes)
from .collectives import all_gather_v, all_to_all_v, exchange_counts, gather_sizes, reduce_scatter_v


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
class _BackwardStarts(torch.autograd.Function):
    """Identity whose backward first calls ``hook``: the moment backward reaches the layer."""

    @staticmethod
    def forward(ctx, y, hook):
        ctx.hook = hook
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        ctx.hook()
        return g, None


@dataclass
class StepInfo:
    strategy: Strategy
    # the slowest rank's time of the previous check call, learned by the chooser at this call
    # (read lazily, so timing never stalls a step); None when nothing was learned
    seconds: float | None
    dropped: int
    capacity: int | None


class _StepTiming:
    """One check call's time: forward, plus backward in training. On CUDA, events recorded on the
    stream (no host sync; read at the next check call, long after); on CPU, wall clock."""

    def __init__(self, shape: LayerShape, strategy: Strategy, device):
        self.shape, self.strategy = shape, strategy
        self.cuda = torch.device(device).type == "cuda"
        self.marks: dict = {}
        self.bwd_hook = None

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[name] = ev
        else:
            self.marks[name] = time.perf_counter()

    def _span(self, a: str, b: str) -> float:
        if self.cuda:
            self.marks[b].synchronize()
            return self.marks[a].elapsed_time(self.marks[b]) / 1e3
        return self.marks[b] - self.marks[a]

    def seconds(self) -> float:
        """Forward (+ backward) time; 0.0 if the step is incomplete (a training call whose
        backward did not run)."""
        if "fwd1" not in self.marks:
            return 0.0
        total = self._span("fwd0", "fwd1")
        if self.shape.training:
            if "bwd1" not in self.marks or "bwd0" not in self.marks:
                return 0.0
            total += self._span("bwd0", "bwd1")
        return total


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
        self.dropped_total = 0  # (token, slot) pairs dropped by capacity on this rank, all calls
        self.switches = 0       # calls whose strategy differed from the call before
        # the chooser's state on this layer (the same on every rank: it changes only at check calls)
        self._calls = 0         # adaptive calls so far
        self._agreed_shape: LayerShape | None = None
        self._strat: Strategy | None = None
        self._settled = False
        self._timing: _StepTiming | None = None  # the last check call's timing, read at the next one
        self._learned: float | None = None

    def shape_key(self, tokens: int, top_k: int) -> "LayerShape":
        L = self.layout
        return LayerShape(tokens=tokens, hidden=self.hidden, ffn=L.ffn_size, experts=L.num_experts,
                          top_k=top_k, world=self.world, elem_bytes=self.w13.element_size(),
                          training=torch.is_grad_enabled() and self.w13.requires_grad)

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                strategy: Strategy | None = None, max_tokens: int | None = None) -> torch.Tensor:
        """``max_tokens``: the largest token count of any rank, when the caller knows it (the same
        number on every rank, e.g. every rank holds every token): the chooser then re-decides as
        soon as the count leaves its power-of-two bucket, instead of at the next check call."""
        T, K = topk_ids_TK.shape
        if max_tokens is not None and max_tokens < T:
            raise ValueError(f"max_tokens ({max_tokens}) is below this rank's {T} tokens: pass the largest "
                             "token count of any rank, or None to have the ranks agree it")
        # the single-process layer's capacity rule (moe.losses), applied to this rank's tokens as
        # Tutel applies it per rank. Rows are dispatched without padded buffers, so no rank needs
        # the others' loads: with f < 0 a rank drops past min(needed, |f| mean) exactly when it
        # would past min(global needed, |f| mean) (both cut at |f| mean only when it overflows).
        cap, dropped, ids_TK = None, 0, topk_ids_TK
        if self.capacity_factor != 0:
            ids_TK, dropped, cap = apply_capacity(topk_ids_TK, self.layout.num_experts, self.capacity_factor)
        if self._timing is not None and self._timing.bwd_hook is not None:
            # the last check call's backward never ran before this call (e.g. gradient
            # accumulation): its time is incomplete, so it is not learned
            self._timing.bwd_hook.remove()
            self._timing.bwd_hook = None
        adaptive = self.chooser is not None and self.fixed is None and strategy is None
        timing = None
        if adaptive:
            strat, timing = self._adaptive_strategy(T, K, x_TD.device, max_tokens)
        else:
            strat = strategy or self.fixed or Strategy("ep")
        if timing is not None:
            timing.mark("fwd0")
        if strat.name == "ep":
            y = self._ep(x_TD, ids_TK, topk_weights_TK, strat.degree)
        elif strat.name == "dp":
            y = self._dp(x_TD, ids_TK, topk_weights_TK)
        elif strat.name in BLENDS:
            tok, unit, weight = self._rows(ids_TK, topk_weights_TK)
            y = blend_forward(self, x_TD, tok, unit, weight, strat.name, strat.group)
        else:
            y = self._tp(x_TD, ids_TK, topk_weights_TK)
        if timing is not None:
            timing.mark("fwd1")
            if timing.shape.training and y.requires_grad:
                # a training step's cost includes its backward (dp's weight-gradient
                # reduce-scatter, the adjoint all-to-alls): time backward too, from the moment the
                # gradient reaches the output until every input's and weight's gradient is made
                inputs = [t for t in (x_TD, topk_weights_TK, self.w13, self.w2) if t.requires_grad]

                def end(_grads, timing=timing):
                    timing.mark("bwd1")
                    timing.bwd_hook.remove()
                    timing.bwd_hook = None

                timing.bwd_hook = torch.autograd.graph.register_multi_grad_hook(inputs, end)
                y = _BackwardStarts.apply(y, lambda timing=timing: timing.mark("bwd0"))
            self._timing = timing
        if self.last is not None and self.last.strategy != strat:
            self.switches += 1
        self.dropped_total += dropped
        self.last = StepInfo(strat, None if timing is None else self._learned, dropped, cap)
        return y

    def _adaptive_strategy(self, T: int, K: int, device, max_tokens: int | None = None
                           ) -> tuple[Strategy, "_StepTiming | None"]:
        """The chooser's strategy for this call, and a timing to fill when this is a check call.

        Every rank must run the same strategy (they run its collectives together), and decides it
        from the same data: a check call exchanges one tiny all-reduce (the largest token count of
        any rank, and the slowest rank's time of the last check call, read from its CUDA events
        only now, long after they completed) and feeds the chooser; other calls reuse the last
        decision with no collective, no host sync and no timing. Check calls are every call while
        the chooser explores this shape, every ``check_every``-th call once it has settled, and a
        call whose grad mode, or whose ``max_tokens`` bucket, differs from the last check's (the
        same on every rank). A token count that changes otherwise is seen at the next check."""
        self._calls += 1
        training = torch.is_grad_enabled() and self.w13.requires_grad
        check = (self._strat is None or not self._settled or self._calls % self.chooser.check_every == 0
                 or self._agreed_shape.training != training
                 or (max_tokens is not None
                     and self.shape_key(max_tokens, K).bucket() != self._agreed_shape.bucket()))
        if not check:
            return self._strat, None
        last = self._timing
        local = last.seconds() if last is not None else 0.0
        T = T if max_tokens is None else max_tokens
        t = torch.tensor([float(T), local], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        T_max, seconds = int(t[0]), float(t[1])
        self._learned = None
        # 0 = the step was incomplete (its backward never ran): the ranks run the same graph, so
        # then it is 0 on every rank and nothing is learned
        if last is not None and seconds > 0:
            self.chooser.observe(last.shape, last.strategy, seconds)
            self._learned = seconds
        self._timing = None
        shape = self.shape_key(T_max, K)
        strat, self._settled = self.chooser.decide(shape)
        self.chooser.current = strat
        self._agreed_shape, self._strat = shape, strat
        return strat, _StepTiming(shape, strat, device)

    @property
    def settled(self) -> bool:
        """Whether the chooser has finished exploring the shape of this layer's last check call
        (then only every ``check_every``-th call costs anything)."""
        return self._settled

    def stats(self) -> dict:
        """For the metrics endpoint: the strategy of the last call and its capacity per expert (None =
        dropless); counters since construction: (token, slot) pairs dropped on this rank, switches."""
        if self.last is None:
            return {}
        return {"strategy": str(self.last.strategy), "capacity": self.last.capacity,
                "dropped_tokens": self.dropped_total, "strategy_switches": self.switches}

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


class ReplicatedTokensExperts(torch.nn.Module):
    """The adaptive layer where every rank holds every token (the Ray runtime's replicated
    context, placement.runtime): rank r takes tokens r, r + W, r + 2W, ... (standard EP's
    origins), the adaptive layer runs on those, and one all-gather gives every rank the whole
    output, as the runtime's per-layer all-gather does. Same signature as ``block.experts``."""

    def __init__(self, inner: AdaptiveMoEExperts):
        super().__init__()
        self.inner = inner

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        W, r, T = self.inner.world, self.inner.rank, x_TD.shape[0]
        mine = torch.arange(r, T, W, device=x_TD.device)
        # every rank knows every rank's count here, so shape changes need no collective to be seen
        y_mine = self.inner(x_TD[mine], topk_ids_TK[mine], topk_weights_TK[mine], max_tokens=len(range(0, T, W)))
        y_all = all_gather_v(y_mine, [len(range(j, T, W)) for j in range(W)], self.inner.group)  # rank-major
        order = torch.cat([torch.arange(j, T, W, device=x_TD.device) for j in range(W)])
        return torch.zeros_like(x_TD).index_copy(0, order, y_all)

    def stats(self) -> dict:
        return self.inner.stats()


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
