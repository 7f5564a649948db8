"""Routing-path baselines, all behind the one method the offload policy calls.

    predict_batch(prev_paths_NLK | None, layer, known_NlK, features=None) -> probs_NLE

For N tokens whose real routing is known at MoE layers 0..``layer`` (``layer`` = -1: nothing
known yet, the start of the token's forward), the probability that each expert is used at each
layer; rows ``<= layer`` are the known one-hot. ``prev_paths_NLK`` is each token's previous
token's full path (-1 rows where a token has none). ``features`` may hold ``token_ids [N]`` and
``hidden_NLD`` (the hidden state entering each layer's router; only rows <= layer are read).

- ``PopularityBaseline``: each layer's expert frequency in a training trace;
- ``PreviousPathBaseline``: the previous token's experts at each layer (temporal locality);
- ``GateLookahead``: layer m's router applied to the hidden state entering layer ``layer``
  (mixtral-offloading, Fate) — the residual stream changes slowly across layers;
- ``NearestTraceBaseline``: the stored token paths whose known prefix best overlaps this
  token's (MoE-Infinity's matching of activation matrices), averaged.

Shape legend: N = tokens being predicted, L = MoE layers, l = known layers (layer + 1),
K = top-k, E = experts, D = hidden size, M = stored paths.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .trace import RoutingTrace


def multi_hot(ids_NK: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., K] expert ids (-1 = none) -> [..., E] float32 0/1."""
    ids = np.asarray(ids_NK, dtype=np.int64)
    out = np.zeros(ids.shape[:-1] + (num_experts + 1,), dtype=np.float32)
    np.put_along_axis(out, np.where(ids < 0, num_experts, ids), 1.0, axis=-1)
    return out[..., :num_experts]


def check_inputs(model, prev_paths_NLK, layer: int, known_NlK) -> tuple[np.ndarray | None, np.ndarray]:
    """Validate the contract's arguments; return them as int64 arrays."""
    L = model.num_layers
    if not -1 <= layer < L:
        raise ValueError(f"layer must be in -1..{L - 1} (the last MoE layer whose routing is known), got {layer}")
    known = np.asarray(known_NlK, dtype=np.int64)
    if known.ndim != 3 or known.shape[1] != layer + 1:
        raise ValueError(f"known_NlK must be [N, layer+1={layer + 1}, K], got shape {known.shape}")
    if known.size and known.max() >= model.num_experts:
        raise ValueError(f"known_NlK holds expert {int(known.max())} but the predictor knows "
                         f"{model.num_experts} experts: trained on a different model?")
    prev = None
    if prev_paths_NLK is not None:
        prev = np.asarray(prev_paths_NLK, dtype=np.int64)
        if prev.ndim != 3 or prev.shape[:2] != (known.shape[0], L):
            raise ValueError(f"prev_paths_NLK must be [N={known.shape[0]}, L={L}, K], got shape {prev.shape}")
    return prev, known


def finish(probs_NLE: np.ndarray, layer: int, known_NlK: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and write the known layers as one-hot rows."""
    probs = np.clip(probs_NLE, 0.0, 1.0).astype(np.float32, copy=False)
    if layer >= 0:
        probs[:, :layer + 1] = multi_hot(known_NlK, probs.shape[-1])
    return probs


class PathModel:
    """Common shape of every path predictor (baselines and ``PathPredictor``)."""
    name = "base"
    num_layers: int
    num_experts: int
    top_k: int

    def predict_batch(self, prev_paths_NLK, layer: int, known_NlK, features: dict | None = None) -> np.ndarray:
        raise NotImplementedError


def _popularity_LE(trace: RoutingTrace, smoothing: float = 1.0) -> np.ndarray:
    """Expected use of each expert per token at each layer (rows sum to K), Laplace-smoothed."""
    L, T, K = trace.expert_ids.shape
    E = trace.num_experts
    counts = multi_hot(trace.expert_ids, E).sum(1)  # [L, E]
    return ((counts + smoothing * K / E) / (T + smoothing)).astype(np.float32)


class PopularityBaseline(PathModel):
    name = "popularity"

    def __init__(self, popularity_LE: np.ndarray, top_k: int):
        self.popularity_LE = np.asarray(popularity_LE, dtype=np.float32)
        self.num_layers, self.num_experts = self.popularity_LE.shape
        self.top_k = top_k

    @classmethod
    def fit(cls, trace: RoutingTrace) -> "PopularityBaseline":
        return cls(_popularity_LE(trace), trace.top_k)

    def predict_batch(self, prev_paths_NLK, layer, known_NlK, features=None):
        _, known = check_inputs(self, prev_paths_NLK, layer, known_NlK)
        probs = np.broadcast_to(self.popularity_LE, (known.shape[0],) + self.popularity_LE.shape).copy()
        return finish(probs, layer, known)


class PreviousPathBaseline(PathModel):
    """The previous token's expert set at each layer; popularity breaks ties and fills gaps."""
    name = "previous-path"

    def __init__(self, popularity: PopularityBaseline):
        self.popularity = popularity
        self.num_layers, self.num_experts, self.top_k = popularity.num_layers, popularity.num_experts, popularity.top_k

    @classmethod
    def fit(cls, trace: RoutingTrace) -> "PreviousPathBaseline":
        return cls(PopularityBaseline.fit(trace))

    def predict_batch(self, prev_paths_NLK, layer, known_NlK, features=None):
        prev, known = check_inputs(self, prev_paths_NLK, layer, known_NlK)
        probs = 0.1 * self.popularity.popularity_LE[None].repeat(known.shape[0], 0)
        if prev is not None:
            probs = probs + 0.9 * multi_hot(prev, self.num_experts)
        return finish(probs, layer, known)


RouterFn = Callable[[torch.Tensor], torch.Tensor]  # x_ND -> router_logits_NE


class GateLookahead(PathModel):
    """Apply later layers' routers to the hidden state entering the last known layer.

    ``routers[m]`` maps x_ND to router logits [N, E]; ``from_model`` takes them from
    ``model.moe_blocks()`` (the third element of each router's output). Needs
    ``features["hidden_NLD"]``; with nothing known (layer -1) it returns ``fallback``'s answer.
    """
    name = "gate-lookahead"

    def __init__(self, routers: Sequence[RouterFn], num_experts: int, top_k: int,
                 fallback: PathModel | None = None):
        self.routers = list(routers)
        self.num_layers, self.num_experts, self.top_k = len(self.routers), num_experts, top_k
        self.fallback = fallback

    @classmethod
    def from_model(cls, model, fallback: PathModel | None = None) -> "GateLookahead":
        blocks = list(model.moe_blocks())
        if not blocks:
            raise ValueError("model.moe_blocks() is empty: nothing to look ahead with")

        def logits_of(router):
            p = next(router.parameters())

            def fn(x_ND):
                return router(x_ND.to(device=p.device, dtype=p.dtype))[2]
            return fn
        # one probe call finds E and K from the router's own output
        p = next(blocks[0].router.parameters())
        ids, _, logits = blocks[0].router(torch.zeros(1, _hidden_size(blocks[0].router), dtype=p.dtype,
                                                      device=p.device))
        return cls([logits_of(b.router) for b in blocks], int(logits.shape[-1]), int(ids.shape[-1]), fallback)

    @torch.no_grad()
    def lookahead_logits(self, hidden_ND: np.ndarray, layer: int) -> np.ndarray:
        """[N, L, E]: router m applied to the hidden state entering ``layer`` (rows <= layer are 0)."""
        x = torch.from_numpy(np.array(hidden_ND, dtype=np.float32))  # a copy: the input may be a read-only view
        out = np.zeros((x.shape[0], self.num_layers, self.num_experts), dtype=np.float32)
        for m in range(layer + 1, self.num_layers):
            out[:, m] = self.routers[m](x).float().cpu().numpy()
        return out

    def predict_batch(self, prev_paths_NLK, layer, known_NlK, features=None):
        prev, known = check_inputs(self, prev_paths_NLK, layer, known_NlK)
        hidden = None if features is None else features.get("hidden_NLD")
        if layer < 0 or hidden is None:
            if self.fallback is None:
                raise ValueError("GateLookahead needs features['hidden_NLD'] and a known layer >= 0 "
                                 "(or a fallback model for the start of the forward)")
            return self.fallback.predict_batch(prev, layer, known, features)
        logits = self.lookahead_logits(np.asarray(hidden)[:, layer], layer)
        z = logits - logits.max(-1, keepdims=True)
        p = np.exp(z)
        probs = self.top_k * p / p.sum(-1, keepdims=True)
        return finish(probs, layer, known)


class AttentionLookahead(GateLookahead):
    """Point C as a lookahead source: the next layer's router logits from its own attention run on the residual
    entering the known layer's experts (routing.point_c, BENCHMARKS 7l/7m: 0.957 one ahead on the
    48-layer recipe, where the gate trick reads 0.918 and fitted probes 0.88-0.89), over a ``base`` lookahead for
    the layers further ahead (fitted probes; None: the next layer only).

    Its features are ``features["hidden_NLD"]`` = the base's hidden states with C's logits appended on the last
    axis ([N, L, D + E]; [N, L, E] without a base): row l of a token holds, after the hidden state entering MoE layer
    l, the logits of C's guess of layer l + 1 (``routing.point_c.attention_guesses(..., logits=True)`` records
    them; 0 in the last row). ``lookahead_logits`` gives the base's logits with the next layer's replaced by
    C's, so a PathPredictor reads C one ahead and the probes beyond (and keeps C's own answer where it reads
    better: direct_LD)."""
    name = "attention-lookahead"
    reads_attention = True  # offload.Lookahead: the offloaded layers hand it the hidden state and C's logits

    def __init__(self, num_layers: int, num_experts: int, top_k: int, base: GateLookahead | None = None,
                 fallback: PathModel | None = None):
        if base is not None and (base.num_layers, base.num_experts) != (num_layers, num_experts):
            raise ValueError(f"the base lookahead reads {base.num_layers} layers x {base.num_experts} experts, this one "
                             f"{num_layers} x {num_experts}: fit both on the same model's trace")
        self.routers = []
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.base, self.fallback = base, fallback
        self.span = getattr(base, "span", None) or 1
        if base is not None:
            self.name = f"{base.name}+attention"

    def lookahead_logits(self, hidden_ND: np.ndarray, layer: int) -> np.ndarray:
        """[N, L, E]: the base's logits from the hidden part, row layer + 1 replaced by C's logits (rows <= layer 0)."""
        f = np.asarray(hidden_ND, dtype=np.float32)
        E = self.num_experts
        if f.shape[-1] < E or (self.base is None and f.shape[-1] != E):
            raise ValueError(f"AttentionLookahead reads [N, D + E] features (C's logits last, E = {E}"
                             f"{'' if self.base is not None else ', no hidden part without a base'}), got "
                             f"{f.shape[-1]} columns: build them with attention_guesses(..., logits=True)")
        if self.base is not None:
            out = np.array(self.base.lookahead_logits(f[:, :-E], layer), dtype=np.float32)
        else:
            out = np.zeros((f.shape[0], self.num_layers, E), dtype=np.float32)
        if layer + 1 < self.num_layers:
            out[:, layer + 1] = f[:, -E:]
        return out


def _hidden_size(router: torch.nn.Module) -> int:
    for m in router.modules():
        if isinstance(m, torch.nn.Linear):
            return m.in_features
    for w in router.parameters():
        if w.ndim == 2:  # the gate weight [E, D]
            return int(w.shape[-1])
    raise ValueError(f"cannot tell the hidden size of router {type(router).__name__}: it has no Linear "
                     "and no 2-D weight; build GateLookahead from router functions instead")


class NearestTraceBaseline(PathModel):
    """Match the known prefix against stored paths; predict from the closest ``neighbours``.

    Similarity = number of shared experts at each known layer, layer j weighted by
    ``decay ** (layer - j)`` (recent layers say most about the next ones). With nothing known,
    the previous token's whole path is the query (temporal locality), as MoE-Infinity matches a
    request's accumulated activations.
    """
    name = "nearest-trace"

    def __init__(self, paths_MLK: np.ndarray, num_experts: int, neighbours: int = 16, decay: float = 0.7,
                 popularity: PopularityBaseline | None = None):
        if neighbours <= 0:
            raise ValueError(f"neighbours must be positive, got {neighbours}")
        paths = np.asarray(paths_MLK)
        self.num_layers, self.num_experts, self.top_k = paths.shape[1], num_experts, paths.shape[2]
        self.stored_MLE = multi_hot(paths, num_experts)  # 0/1
        self.neighbours = min(neighbours, len(paths))
        self.decay = decay
        self.popularity = popularity

    @classmethod
    def fit(cls, trace: RoutingTrace, max_stored: int = 4096, seed: int = 0, **kw) -> "NearestTraceBaseline":
        paths = trace.paths()
        if len(paths) > max_stored:
            paths = paths[np.sort(np.random.default_rng(seed).choice(len(paths), max_stored, replace=False))]
        return cls(paths, trace.num_experts, popularity=PopularityBaseline.fit(trace), **kw)

    def predict_batch(self, prev_paths_NLK, layer, known_NlK, features=None):
        prev, known = check_inputs(self, prev_paths_NLK, layer, known_NlK)
        N, L, E = known.shape[0], self.num_layers, self.num_experts
        M = len(self.stored_MLE)
        if layer >= 0:
            w_l = self.decay ** np.arange(layer, -1, -1, dtype=np.float32)  # [l]
            q = (multi_hot(known, E) * w_l[None, :, None]).reshape(N, -1)
            sim = q @ self.stored_MLE[:, :layer + 1].reshape(M, -1).T  # [N, M]
        elif prev is not None:
            sim = multi_hot(prev, E).reshape(N, -1) @ self.stored_MLE.reshape(M, -1).T
        else:
            sim = np.zeros((N, M), dtype=np.float32)
        # a random-looking but fixed tie-break, so that equal matches do not all pick stored path 0
        sim = sim + 1e-4 * np.sin(np.arange(M, dtype=np.float32))[None]
        nn = np.argpartition(-sim, self.neighbours - 1, axis=1)[:, :self.neighbours]  # [N, nn]
        probs = self.stored_MLE[nn].mean(1)  # [N, L, E]
        if self.popularity is not None:
            probs = 0.95 * probs + 0.05 * self.popularity.popularity_LE[None]
        return finish(probs, layer, known)
