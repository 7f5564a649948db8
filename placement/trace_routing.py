"""Routing replaced by a recorded trace, keyed by (batch row, position), and random weights that
every rank builds by itself: what the runtime benchmark needs to measure a trained model's
routing on a model nobody has to ship.

Shape legend: L = MoE layers, N = tokens of the trace, K = experts per token, B = batch rows,
T = tokens per row in one call, n = rows of one router call, E = experts, D = hidden size,
I = expert ffn size.

Trace routing. ``offload.route_by_trace`` consumes a trace in call order, which works for one
process. In the expert-parallel runtime the ranks call their routers on different subsets:
the replicated forward routes every token of the batch on every rank, but ExFlow's decoding
(decode.py) routes each row only on its home rank. So here a token's route is a function of
its identity, not of the call: the token at batch row b and absolute position p takes trace
token ``(b * stride + p) mod N`` (row b reads a contiguous stretch of the trace, as a request
would). A forward pre-hook on ``model.rotary`` (called with the positions [B, T] of every
forward and decode step) remembers the positions; a forward hook on each router replaces its
output (every router call sees the whole batch: ExFlow's decoding in decode.py routes all rows
with a mask of the owned ones). Weights are the trace's, or uniform 1/K when it has none, so the routing does not depend
on the hidden states: every rank, plan and mode sees identical expert ids and weights.

Seeded weights. A random model of a trace's shape can be large (16 layers x 64 experts of
2048 x 1408: 18 GB in bf16); shipping it to the actors would dominate a benchmark. Instead
every parameter is drawn from its own generator, seeded by the parameter's name (dense part)
or by (layer, expert) (routed experts), so a rank draws exactly its own experts and the
single-process model drawn the same way on the same device is identical.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

_EXPERT_SEED_STRIDE = 1_000_003  # keeps (seed, layer, expert) seeds apart for any realistic L*E


# --- trace routing ------------------------------------------------------------------------------
def trace_keys(rows_n: np.ndarray | torch.Tensor, pos_n, stride: int, num_tokens: int):
    """Trace token index of the tokens at (row, position): ``(row * stride + pos) mod N``."""
    return (rows_n * stride + pos_n) % num_tokens


@dataclass
class TraceRoutingSpec:
    """A trace's expert ids (and weights) and the row stride that maps tokens to it."""
    expert_ids: np.ndarray  # [L, N, K] int
    weights: np.ndarray | None  # [L, N, K] float or None (uniform 1/K)
    num_experts: int
    stride: int

    def __post_init__(self):
        ids = np.asarray(self.expert_ids)
        if ids.ndim != 3 or ids.shape[1] == 0:
            raise ValueError(f"expert_ids must be [layers, tokens, top_k] with tokens > 0, got {ids.shape}")
        if self.weights is not None and np.asarray(self.weights).shape != ids.shape:
            raise ValueError(f"weights {np.asarray(self.weights).shape} must match expert_ids {ids.shape}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1 (tokens of the trace per batch row), got {self.stride}")
        if ids.max() >= self.num_experts or ids.min() < -1:
            raise ValueError(f"expert ids must lie in -1..{self.num_experts - 1}, found {ids.min()}..{ids.max()}")

    @classmethod
    def from_trace(cls, trace, stride: int) -> "TraceRoutingSpec":
        return cls(trace.expert_ids, trace.weights, trace.num_experts, stride)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(np.asarray(self.expert_ids).shape)

    def sub_trace(self, batch: int, length: int):
        """The RoutingTrace of the tokens rows 0..batch-1, positions 0..length-1 take (row-major).

        No request ids: metrics.py then gives token t the origin t mod P, as the runtime's
        replicated forward does."""
        from routing.trace import RoutingTrace
        rows, pos = np.divmod(np.arange(batch * length), length)
        keys = trace_keys(rows, pos, self.stride, self.shape[1])
        w = None if self.weights is None else np.asarray(self.weights)[:, keys]
        return RoutingTrace(np.asarray(self.expert_ids)[:, keys], self.num_experts, weights=w,
                            positions=pos.astype(np.int32))


class _Positions:
    """Holds the positions [B, T] of the current forward or decode step (remembered from the model's
    rotary call by ``watch``), and gives its tokens' trace keys."""

    def __init__(self):
        self.pos_BT: torch.Tensor | None = None

    def watch(self, model):
        """The hook handle that keeps pos_BT current."""
        def remember(module, args):
            self.pos_BT = args[0]
        return model.rotary.register_forward_pre_hook(remember)

    def keys(self, n: int, stride: int, num_tokens: int, who: str) -> torch.Tensor:
        """Trace token of each of the step's n tokens (the whole batch, row-major as the blocks flatten it)."""
        if self.pos_BT is None:
            raise RuntimeError(f"{who} saw no positions: the model must call model.rotary first")
        B, T = self.pos_BT.shape
        if B * T != n:
            raise RuntimeError(f"{who}: the layer saw {n} tokens, the step's positions name {B * T}")
        rows_n = torch.arange(B, device=self.pos_BT.device).repeat_interleave(T)
        return trace_keys(rows_n.long(), self.pos_BT.reshape(-1).long(), stride, num_tokens)


def install_trace_routing(model, spec: TraceRoutingSpec) -> list:
    """Make every router of ``model`` return the trace's routing; returns the hook handles.

    Install again after ``model.reset_rotary`` (new module)."""
    blocks = model.moe_blocks()
    L, N, K = spec.shape
    if L < len(blocks):
        raise ValueError(f"the trace has {L} MoE layers but the model has {len(blocks)}; use a trace of the "
                         "model's shape (or build the model from the trace: benchmarks/placement.py --trace)")
    if blocks and blocks[0].experts.num_experts != spec.num_experts:
        raise ValueError(f"the trace has {spec.num_experts} experts, the model {blocks[0].experts.num_experts}")
    dev = model.embed.weight.device
    ids_LNK = torch.as_tensor(np.asarray(spec.expert_ids).astype(np.int64), device=dev)
    w_LNK = (torch.full(ids_LNK.shape, 1.0 / K, device=dev) if spec.weights is None
             else torch.as_tensor(np.asarray(spec.weights, dtype=np.float32), device=dev))
    w_LNK = torch.where(ids_LNK >= 0, w_LNK, 0.0)
    seen = _Positions()

    def make_hook(layer: int):
        def hook(module, inputs, out):
            ids_nK, _, logits_nE = out
            keys = seen.keys(ids_nK.shape[0], spec.stride, N, "trace routing").to(dev)
            tid_nK, tw_nK = ids_LNK[layer, keys], w_LNK[layer, keys]
            lg = torch.full_like(logits_nE, -1e4)
            lg.scatter_(1, tid_nK.clamp(min=0).to(lg.device), torch.log(tw_nK.clamp(min=1e-9)).to(lg.dtype))
            return tid_nK.to(ids_nK.device), tw_nK.to(ids_nK.device), lg
        return hook

    handles = [seen.watch(model)]
    handles += [b.router.register_forward_hook(make_hook(i)) for i, b in enumerate(blocks)]
    return handles


class TraceLookahead(torch.nn.Module):
    """A recorded guess of layer l+1's experts, with a router's call shape: forward(x_TD) -> (None,
    None, logits_TE) for the tokens of the current step, keyed like the trace routing (row,
    position). What ``OffloadedExperts.set_next_router`` takes for prefetch one layer ahead when
    the routing is a recorded trace: the guesses were made on the model the trace came from (its
    next router, or probes, on its hidden states), so a random-weight model of another size meets
    that model's prediction quality together with its routing. Guesses are in confidence order
    (the first scores highest); -1 = none. Experts not guessed score -inf, which
    ``OffloadedExperts.guess_next`` drops (a token's repeated or missing guesses add no filler).
    Built by ``install_trace_lookahead``."""

    def __init__(self, next_ids_NK: torch.Tensor, num_experts: int, stride: int, seen: "_Positions"):
        super().__init__()
        self.next_ids_NK, self.num_experts, self.stride, self.seen = next_ids_NK, num_experts, stride, seen
        self.guesses = next_ids_NK.shape[1]  # per token: OffloadedExperts.guess_next takes no more

    def forward(self, x_TD: torch.Tensor):
        keys = self.seen.keys(x_TD.shape[0], self.stride, self.next_ids_NK.shape[0], "trace lookahead")
        ids_nK = self.next_ids_NK[keys.to(self.next_ids_NK.device)]
        K = ids_nK.shape[1]
        score_K = torch.arange(K, 0, -1, device=ids_nK.device, dtype=torch.float32)  # confidence order
        logits = torch.full((ids_nK.shape[0], self.num_experts + 1), float("-inf"), device=ids_nK.device)
        logits.scatter_(1, torch.where(ids_nK >= 0, ids_nK, self.num_experts), score_K.expand_as(ids_nK).contiguous())
        return None, None, logits[:, :self.num_experts].to(x_TD.device)


def install_trace_lookahead(model, next_ids: np.ndarray, num_experts: int, stride: int) -> tuple[list, list]:
    """(hook handles, one TraceLookahead per MoE layer but the last): layer l's guesses of layer l+1's
    experts, ``next_ids`` [L, N, K'] for the trace's N tokens (row l guesses layer l+1; the last
    row is not read), keyed by (row, position) with the trace routing's ``stride``."""
    blocks = model.moe_blocks()
    nxt = np.asarray(next_ids)
    if nxt.ndim != 3 or nxt.shape[0] < len(blocks) - 1:
        raise ValueError(f"next_ids must be [layers >= {len(blocks) - 1}, tokens, guesses], got {nxt.shape}")
    if nxt.size and (nxt.max() >= num_experts or nxt.min() < -1):
        raise ValueError(f"guessed expert ids must lie in -1..{num_experts - 1}, found {nxt.min()}..{nxt.max()}")
    dev = model.embed.weight.device
    seen = _Positions()
    handles = [seen.watch(model)]
    routers = [TraceLookahead(torch.as_tensor(nxt[i].astype(np.int64), device=dev), num_experts, stride, seen)
               for i in range(len(blocks) - 1)]
    return handles, routers


# --- seeded random weights ----------------------------------------------------------------------
def _generator(seed: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def expert_weights(num_layers_experts: tuple[int, int], layer: int, ids: list[int], shapes: tuple, seed: int,
                   std: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [n, 2I, D], w2 [n, D, I]) of experts ``ids`` of ``layer``, each from its own generator."""
    L, E = num_layers_experts
    (J, D), (D2, I) = shapes
    w13 = torch.empty((len(ids), J, D), dtype=dtype, device=device)
    w2 = torch.empty((len(ids), D2, I), dtype=dtype, device=device)
    for k, e in enumerate(ids):
        g = _generator(seed * _EXPERT_SEED_STRIDE + layer * E + int(e) + 1, device)
        w13[k] = torch.randn((J, D), generator=g, device=device, dtype=torch.float32).mul_(std).to(dtype)
        w2[k] = torch.randn((D2, I), generator=g, device=device, dtype=torch.float32).mul_(std).to(dtype)
    return w13, w2


@torch.no_grad()
def init_dense_seeded(model, seed: int, std: float) -> None:
    """Draw every parameter outside the routed experts from a generator seeded by its name."""
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        if p.dim() == 1:  # norms 1, biases 0 (as MoEForCausalLM.init_weights)
            p.fill_(1.0 if name.endswith("norm.weight") or "layernorm" in name else 0.0)
            continue
        g = _generator(seed * _EXPERT_SEED_STRIDE + zlib.crc32(name.encode()), p.device)
        p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32).mul_(std))
    for block in model.moe_blocks():
        if block.router.e_score_correction_bias is not None:
            block.router.e_score_correction_bias.zero_()


def expert_shapes(model) -> tuple:
    """((2I, D), (D, I)) of one routed expert of ``model``'s config."""
    c = model.config
    return (2 * c.moe_intermediate_size, c.hidden_size), (c.hidden_size, c.moe_intermediate_size)


@torch.no_grad()
def seeded_model(config, seed: int = 0, std: float = 0.02, dtype=torch.float32, device="cpu", backend="torch"):
    """The single-process model whose weights every rank of ``EPWorker.load_seeded`` draws."""
    from moe import MoEForCausalLM
    model = MoEForCausalLM(config, backend=backend, dtype=dtype, device=device)
    init_dense_seeded(model, seed, std)
    blocks = model.moe_blocks()
    L, E = len(blocks), config.num_experts
    for b in blocks:
        w13, w2 = expert_weights((L, E), b.moe_index, list(range(E)), expert_shapes(model), seed, std, dtype,
                                 device)
        b.experts.w13.copy_(w13)
        b.experts.w2.copy_(w2)
    return model.eval()
