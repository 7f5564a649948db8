"""What to prefetch: the routing predictor's look-ahead, and a simple fallback predictor.

`Lookahead` follows the routing of the current step layer by layer and asks a predictor (the
routing predictor contract, `predict_batch`) for the probability that each expert of each later
layer is used; the predictor-driven policy evicts by these scores and the prefetcher copies the
top ones of the next layer ahead of time.

`TransitionPredictor` is a plain baseline with the same contract (inter-layer transition
counts plus the previous token's path), used when routing's PathPredictor is not available.

Shape legend: N = tokens of a step, L = MoE layers, l = layers known so far, K = experts per
token, E = experts per layer.
"""
from __future__ import annotations

import numpy as np
import torch


class Lookahead:
    """Latest predicted use probability of every (layer, expert), updated after each layer's routing."""

    def __init__(self, predictor, num_layers: int, num_experts: int, every: int = 1, threshold: float = 0.3):
        if every < 1:
            raise ValueError(f"every must be >= 1 (predict after every n-th layer), got {every}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.every, self.threshold = every, threshold
        if not hasattr(predictor, "predict_batch"):
            raise ValueError(f"{type(predictor).__name__} has no predict_batch(prev_paths, layer, known); "
                             "give a routing predictor")
        self.predictor = predictor
        # a predictor that reads the hidden state (a PathPredictor with a lookahead source, or a
        # lookahead itself): observe() is then given each layer's input, else it is not copied off the GPU
        # a lookahead source that reads point C's next-layer logits after the hidden state (routing.AttentionLookahead):
        # the offloaded layers hand it both (OffloadedExperts.lookahead_features)
        self.reads_attention = reads_point_c(predictor)
        self.wants_hidden = (getattr(predictor, "lookahead", None) is not None
                             or hasattr(predictor, "lookahead_logits"))
        self.num_layers, self.num_experts = num_layers, num_experts
        self.score_LE = np.zeros((num_layers, num_experts), dtype=np.float32)
        self._known: list[np.ndarray] = []
        self._prev_NLK: np.ndarray | None = None

    def observe(self, layer: int, ids_NK: np.ndarray, hidden_ND: np.ndarray | None = None) -> bool:
        """Record the layer's routing; predict (every `every` layers and at the last). True if predicted.
        hidden_ND: the hidden state entering this layer's router, row i = token i of ids_NK (for a
        predictor that reads it; see ``wants_hidden``)."""
        ids_NK = np.asarray(ids_NK, dtype=np.int64)
        if layer == 0:
            self._known = []
        if len(self._known) != layer:  # a layer was skipped (e.g. first call mid-step): start over
            self._known = []
            return False
        self._known.append(ids_NK)
        known_NlK = np.stack(self._known, axis=1)
        last = layer == self.num_layers - 1
        if last:
            self._prev_NLK = known_NlK
        if layer % self.every and not last:
            return False  # the predictor costs time: ask it every few layers, prefetch that far ahead
        prev = self._prev_NLK if (self._prev_NLK is not None and self._prev_NLK.shape[0] == ids_NK.shape[0]) else None
        feats = None
        if hidden_ND is not None:
            h = np.asarray(hidden_ND, dtype=np.float32)
            if h.ndim != 2 or h.shape[0] != ids_NK.shape[0]:
                raise ValueError(f"hidden_ND must be [N={ids_NK.shape[0]}, D], got {h.shape}")
            # the predictors read hidden_NLD[:, layer]: a read-only view, no copy per layer
            feats = {"hidden_NLD": np.broadcast_to(h[:, None, :], (h.shape[0], layer + 1, h.shape[1]))}
        args = (prev, layer, known_NlK) if feats is None else (prev, layer, known_NlK, feats)
        probs_NLE = np.asarray(self.predictor.predict_batch(*args), dtype=np.float32)
        if probs_NLE.ndim != 3 or probs_NLE.shape[1] < self.num_layers or probs_NLE.shape[2] != self.num_experts:
            raise ValueError(f"predict_batch returned shape {probs_NLE.shape}; expected "
                             f"[{ids_NK.shape[0]}, {self.num_layers}, {self.num_experts}]")
        # chance that at least one token of the step uses the expert
        p_LE = 1.0 - np.prod(1.0 - np.clip(probs_NLE[:, :self.num_layers], 0.0, 1.0), axis=0)
        self.score_LE[layer + 1:] = p_LE[layer + 1:]
        return True

    def top(self, layer: int, k: int, threshold: float = 0.0) -> list[int]:
        """The k experts of `layer` most likely to be used (score above threshold)."""
        s_E = self.score_LE[layer]
        order = np.argsort(-s_E, kind="stable")[:k]
        return [int(e) for e in order if s_E[e] > threshold]

    def to_prefetch(self, layer: int, k: int, slots: int, is_resident) -> list[int]:
        """Experts worth copying into `layer` now: among the `slots` likeliest (the set the pool
        should hold), the at most k likeliest not yet resident, each above the threshold."""
        return [e for e in self.top(layer, slots, self.threshold) if not is_resident(layer, e)][:k]

    def targets(self, layer: int) -> range:
        """Layers to prefetch for after a prediction at `layer`."""
        return range(layer + 1, min(layer + 1 + self.every, self.num_layers))


def reads_point_c(predictor) -> bool:
    """Whether a routing predictor's lookahead source reads point C (routing.AttentionLookahead): the offloaded
    model must then run each next layer's attention for it."""
    return bool(getattr(getattr(predictor, "lookahead", None), "reads_attention", False))


IDLE_THRESHOLD = 0.3  # the predictor's prefetch without a copy budget: only experts this likely


def guess_count(prefetch_k: int, top_k: int, source: str = "") -> int:
    """How many of each token's next-layer guesses (a router's or a probe's, most confident first) a
    layer prefetches: ``prefetch_k``; else, for ``source`` 'attention' (point C), the model's top-k;
    else half the top-k rounded up. On a copy-bound path every wrong copy costs what it would have saved,
    so how many to take depends on how often the tail of a token's guesses is right. On a trained 48-layer
    model's routing at 25% (OLMoE widths, top-8), with the probes' guesses (precision 0.78) all 8 took
    1.04x the time of no prefetch, the first 4 0.94x, the first 2 0.96x (one H200, BENCHMARKS 3k; the
    simulator ranked them the same). Point C's guesses are right at 0.97 on that routing, and there all 8
    were fastest: 0.85x the serial step against 0.90x for 4 and 0.93x for 2 under LRU, 0.89x / 0.94x /
    0.95x under LFU (host driver; BENCHMARKS 7n, s29-g)."""
    if prefetch_k:
        return prefetch_k
    return top_k if source == "attention" else -(-top_k // 2)


def router_guess(router, x_TD: torch.Tensor, guess_k: int) -> torch.Tensor:
    """A next router's guess of the next layer's experts for these tokens: ids [T, k] on the device, the
    router's k likeliest (k = guess_k, or fewer where the router says it holds ``guesses``), -1 where its
    logit is -inf (no guess). forward(), not __call__: trace hooks on that router must not fire. No host
    sync (it runs inside graph pieces and CUDA graphs)."""
    with torch.no_grad():
        logits_TE = router.forward(x_TD)[2]
    k = min(guess_k, logits_TE.shape[1], getattr(router, "guesses", None) or guess_k)
    top = logits_TE.topk(k, dim=1)
    return torch.where(torch.isfinite(top.values), top.indices, -1)


def guessed_experts(guess_ids: np.ndarray, limit: int) -> np.ndarray:
    """The experts a step's next-layer guesses name (ids of any shape, -1 = none), most guessed first
    (ties by id), at most ``limit``: what a layer prefetches for the next one, live (OffloadedExperts)
    and in the simulator alike."""
    g = np.asarray(guess_ids).reshape(-1)
    experts, counts = np.unique(g[g >= 0], return_counts=True)
    return experts[np.argsort(-counts, kind="stable")][:limit]


def default_threshold(threshold: float | None, budget: float | None, evicts_by_score: bool) -> float:
    """The prefetch threshold in use: as given; else 0 when a copy budget bounds the copies and the
    predictor's own policy evicts (a prefetch, one of the likeliest missing experts of the set the pool
    should hold (``Lookahead.to_prefetch``), then only displaces an expert the predictor rates lower, so
    a threshold would only leave copies the engine had time for unmade); else 0.3. With LRU eviction a
    low-probability prefetch can push out a recently used expert: live at one sequence and one copy
    per layer 0 gave 0.570 against 0.592 at 0.3 (BENCHMARKS 7d), where the predictor's policy gained."""
    if threshold is not None:
        return threshold
    return 0.0 if budget is not None and evicts_by_score else IDLE_THRESHOLD


class CopyBudget:
    """Expert copies the predictor's prefetch may still queue: ``per_layer`` more after each MoE layer,
    banked up to ``max(1, per_layer * every)`` (a predictor asked every few layers prefetches for those
    layers at once). What the copy engine moves during one layer's compute: at Qwen3-30B-A3B's ratios
    (one expert copy ~0.2 ms over PCIe, a decode layer ~0.1-0.2 ms) about 1; at Mixtral's far less.
    One budget per model: there is one copy engine."""

    def __init__(self, per_layer: float, every: int = 1):
        if not per_layer >= 0:
            raise ValueError(f"prefetch budget must be >= 0 expert copies per layer, got {per_layer}")
        self.per_layer = float(per_layer)
        self.bank = max(1.0, self.per_layer * every)
        self.credit = 0.0

    def tick(self) -> None:
        """One layer's compute has passed: the copy engine can fit ``per_layer`` more copies."""
        self.credit = min(self.credit + self.per_layer, self.bank)

    def available(self) -> int:
        return int(self.credit)

    def spend(self, copies: float) -> None:
        self.credit = max(self.credit - copies, 0.0)


class TransitionPredictor:
    """Baseline routing predictor: P(expert at l+1 | experts at l) from counts, mixed with the
    previous token's choice at the same layer (temporal locality). Implements `predict_batch`."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, temporal: float = 0.3, smoothing: float = 0.1):
        if not 0.0 <= temporal <= 1.0:
            raise ValueError(f"temporal must be in [0, 1], got {temporal}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.temporal, self.smoothing = temporal, smoothing
        E = num_experts
        self.trans_LEE = np.full((max(num_layers - 1, 0), E, E), smoothing, dtype=np.float64)
        self.pop_LE = np.full((num_layers, E), smoothing, dtype=np.float64)

    @classmethod
    def fit(cls, trace, **kw) -> "TransitionPredictor":
        p = cls(trace.num_layers, trace.num_experts, trace.top_k, **kw)
        ids = trace.expert_ids.astype(np.int64)
        L, T, K = ids.shape
        for layer in range(L):
            v = ids[layer].reshape(-1)
            np.add.at(p.pop_LE[layer], v[v >= 0], 1.0)
        for layer in range(L - 1):
            a = np.repeat(ids[layer], K, axis=1).reshape(-1)  # every (k, k') pair of one token
            b = np.tile(ids[layer + 1], (1, K)).reshape(-1)
            ok = (a >= 0) & (b >= 0)
            np.add.at(p.trans_LEE[layer], (a[ok], b[ok]), 1.0)
        return p

    def predict_batch(self, prev_paths_NLK, layer: int, known_NlK) -> np.ndarray:
        known_NlK = np.asarray(known_NlK, dtype=np.int64)
        N, E, L, K = known_NlK.shape[0], self.num_experts, self.num_layers, self.top_k
        out_NLE = np.zeros((N, L, E), dtype=np.float32)
        rows = np.arange(N)
        for j in range(layer + 1):  # known rows are one-hot
            for k in range(known_NlK.shape[2]):
                e = known_NlK[:, j, k]
                out_NLE[rows[e >= 0], j, e[e >= 0]] = 1.0
        cur_NE = out_NLE[:, layer].astype(np.float64)
        if getattr(self, "_norm_LEE", None) is None or self._norm_LEE.shape != self.trans_LEE.shape:
            self._norm_LEE = self.trans_LEE / self.trans_LEE.sum(axis=2, keepdims=True)
        for j in range(layer + 1, L):
            dist_NE = cur_NE @ self._norm_LEE[j - 1]
            dist_NE /= np.maximum(dist_NE.sum(axis=1, keepdims=True), 1e-12)
            if prev_paths_NLK is not None and self.temporal > 0:
                prev_NE = np.zeros((N, E))
                pk = np.asarray(prev_paths_NLK, dtype=np.int64)[:, j]
                for k in range(pk.shape[1]):
                    ok = pk[:, k] >= 0
                    prev_NE[rows[ok], pk[ok, k]] += 1.0 / pk.shape[1]
                dist_NE = (1 - self.temporal) * dist_NE + self.temporal * prev_NE
            out_NLE[:, j] = np.minimum(1.0, K * dist_NE)
            cur_NE = dist_NE
        return out_NLE


class ProbeRouter(torch.nn.Module):
    """Layer l's probe to layer l + 1 (a routing.ProbeLookahead's first target) on the device, with a
    router's call shape: forward(x_TD) -> (None, None, logits_TE). What prefetch='probe' applies to
    layer l's input in place of layer l+1's router (mixtral-offloading's speculation, fitted)."""

    def __init__(self, probes, layer: int, device=None):
        super().__init__()
        if not 0 <= layer < probes.num_layers - 1:
            raise ValueError(f"layer must be in 0..{probes.num_layers - 2} (a next layer must exist), got {layer}")
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("mean_D", torch.as_tensor(probes.mean_lD[layer], **f32))
        self.register_buffer("std_D", torch.as_tensor(probes.std_lD[layer], **f32))
        self.register_buffer("W_DE", torch.as_tensor(probes.W_lDSE[layer, :, 0], **f32))
        self.register_buffer("b_E", torch.as_tensor(probes.b_lSE[layer, 0], **f32))

    def forward(self, x_TD: torch.Tensor):
        return None, None, ((x_TD.float() - self.mean_D) / self.std_D) @ self.W_DE + self.b_E


class AttentionRouter:
    """Point C (BENCHMARKS 7l, 7m) with a router's call shape, forward(x_TD) -> (ids, weights, logits_TE): the next
    MoE layer's own attention run on the residual entering layer l's experts, then its norm and router. What
    prefetch='attention' sets as layer l's next router. It reads layer l+1's routing as early as the gate trick
    (next_layer_gate) does, for one more attention a layer: 0.957 one-ahead recall on the 48-layer recipe where the
    gate trick reads 0.918 (7m), and prefetching such guesses took 84% of a perfect guess's gain on the GPU.

    ``layers``: the model's decoder layers; ``src``, ``dst``: the decoder indices of MoE layer l and the next MoE
    layer. Dense layers between them run whole (their MLPs are resident); layer l's experts are skipped. Two
    pre-hooks on layer ``src`` keep what the guess needs, so it works in every forward path (eager, graph pieces,
    one CUDA graph a step): its attention's arguments (positions, mask, KV cache, slots) and the residual its
    post-attention norm takes. The guess's attention writes the current tokens' keys and values into layer
    ``dst``'s KV-cache slots, which ``dst``'s own attention overwrites later in the same forward: so the guess must
    run on the compute stream, in order, never on a side stream beside that attention: both drivers compute every
    guess there (the device driver first in the layer's forward, ``DeviceOffloadedExperts._early_guess``).
    ``remove()`` takes the hooks off."""

    def __init__(self, layers, src: int, dst: int):
        if not 0 <= src < dst < len(layers):
            raise ValueError(f"need 0 <= src < dst < {len(layers)} decoder layers, got src={src}, dst={dst}")
        router = getattr(layers[dst].mlp, "router", None)
        if router is None:
            raise ValueError(f"decoder layer {dst} has no router (a dense layer): the next MoE layer must be the target")
        window = getattr(layers[src], "window", None)
        for j in range(src + 1, dst + 1):
            if getattr(layers[j], "window", None) != window:
                raise ValueError(f"decoder layers {src} and {j} attend over different windows ({window} and "
                                 f"{layers[j].window}): prefetch='attention' reuses layer {src}'s mask for the next "
                                 "layer's attention; use prefetch='next_layer_gate' on this model")
        self.layers, self.src, self.dst, self.router = layers, src, dst, router
        self._ctx = self._xmid = None
        self._handles = [layers[src].attn.register_forward_pre_hook(self._on_attention, with_kwargs=True),
                         layers[src].post_attention_layernorm.register_forward_pre_hook(self._on_norm)]

    def _on_attention(self, module, args, kwargs):
        if kwargs:  # (the model calls it positionally; a caller naming them is bound here)
            import inspect
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            args = tuple(bound.arguments.values())
        self._ctx = args[1:]  # cos, sin, mask, cache, num_slots

    def _on_norm(self, module, args):
        self._xmid = args[0]  # the residual after layer src's attention: what its experts add to

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def forward(self, x_TD: torch.Tensor):
        """x_TD (layer l's router input) is not read: the guess starts from the residual before it."""
        if self._ctx is None or self._xmid is None:
            raise RuntimeError(f"the attention lookahead of decoder layer {self.src} was asked for a guess before that "
                               "layer's attention ran in this model: call it from layer src's experts")
        x = self._xmid
        with torch.no_grad():
            for j in range(self.src + 1, self.dst):
                x, h = self.layers[j].attention_half(x, *self._ctx)
                x = x + self.layers[j].mlp(h)
            _, h = self.layers[self.dst].attention_half(x, *self._ctx)
            return self.router.forward(h.reshape(-1, h.shape[-1]))

    __call__ = forward


def release_router(old, new=None) -> None:
    """A next router being replaced: an AttentionRouter's hooks on its layer come off (else they keep firing)."""
    if old is not None and old is not new and hasattr(old, "remove"):
        old.remove()


def attention_routers(model) -> list:
    """prefetch='attention': per MoE block of ``model`` in order, an AttentionRouter onto the next MoE block (None
    for the last). The model needs decoder layers with attention_half, attn and post_attention_layernorm (moe's
    MoEForCausalLM)."""
    layers = getattr(model, "layers", None)
    if layers is None or not all(hasattr(l, "attention_half") and hasattr(l, "attn") for l in layers):
        raise ValueError(f"prefetch='attention' runs the next layer's attention, so it needs moe's decoder layers "
                         f"(model.layers with attention_half); {type(model).__name__} has none: use next_layer_gate")
    moe_at = [j for j, l in enumerate(layers) if hasattr(l.mlp, "router")]
    made = []
    try:
        for a, b in zip(moe_at, moe_at[1:]):
            made.append(AttentionRouter(layers, a, b))
    except ValueError:
        for r in made:  # a refused model is left without hooks
            r.remove()
        raise
    return made + [None]
