"""Point C: the next MoE layer's own attention run on the residual entering a layer's experts, then its router.

Every earlier one-ahead source reads layer l+1's routing without layer l+1's attention (the gate trick applies
layer l+1's router to layer l's router input; probes are fitted on it). Point C runs that attention (earlier tokens'
keys and values from the KV cache; the guess's own slot rewritten by the real layer afterwards) and is known as early
as the gate trick, for one more attention a layer. BENCHMARKS 7l (the default model) and 7m (the 48-layer recipe:
0.957 one ahead, where the gate trick reads 0.918).

    attention_point(model, sequences, ...)   recall per target layer, decoded token by token (and the guesses,
                                             their logits); benchmarks/lookahead_points.py prints it
    attention_guesses(model, trace, logits)  the guesses (and logits) of a recorded trace's requests in its token
                                             order: prefetch files (benchmarks/lookahead_ids.py) and the features
                                             of a predictor reading C (routing.AttentionLookahead)
    layer_recall, one_ahead_recall           how much of the next layer's routing such guesses name

Live, offload.prefetch.AttentionRouter computes the same guess inside the offloaded model's forward.
"""
from __future__ import annotations

import numpy as np
import torch

from .trace import RoutingTrace


@torch.no_grad()
def attention_point(model, sequences, batch: int = 64, keep_guesses: bool = False, ahead: int = 1,
                    keep_logits: bool = False):
    """Per target layer 1..L-1 (0.0 where it or its source layer has no router, or it lies less than ``ahead``
    layers in): router recall from C, the sequences decoded token by token in batches of equal length. ``ahead``
    a: layer l's guess of layer l+a runs the attention of layers l+1 .. l+a in turn on the residual entering layer
    l's experts (every expert between skipped), then layer l+a's router. Each of those attentions writes its
    guess's key and value into the cache slot the real layer then overwrites (the cache advances after the step).
    keep_guesses: also returns, per sequence in order, the guesses [L, n, K] int16 (row l: layer l's guess of
    layer l+a's K experts for each token, best first; -1 where there is none, as in the last a rows).
    keep_logits: returns (recalls, guesses, logits): also, per sequence, the guesses' router logits [L, n, E]
    float32 (0 where there is none): what a predictor's lookahead source reads (routing.AttentionLookahead)."""
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    layers = model.layers
    L = len(layers)
    K = model.config.num_experts_per_tok
    # counted on the device, read once at the end: a read per layer would stall the host on every layer's kernels
    hits = torch.zeros(max(L - 1, 0), dtype=torch.int64, device=model.device)
    count = torch.zeros(max(L - 1, 0), dtype=torch.int64, device=model.device)
    keep_guesses = keep_guesses or keep_logits
    E = model.config.num_experts
    kept = [np.full((L, len(s), K), -1, dtype=np.int16) for s in sequences] if keep_guesses else None
    kept_lg = [np.zeros((L, len(s), E), dtype=np.float32) for s in sequences] if keep_logits else None
    by_len: dict[int, list] = {}
    for j, s in enumerate(sequences):
        by_len.setdefault(len(s), []).append(j)
    for n, group in by_len.items():
        for i in range(0, len(group), batch):
            rows = group[i:i + batch]
            ids = torch.tensor([sequences[j] for j in rows], device=model.device)
            B = ids.shape[0]
            cache = model.new_cache(B, n + 1)
            made = torch.full((L, B, n, K), -1, dtype=torch.int16, device=model.device) if kept is not None else None
            made_lg = torch.zeros((L, B, n, E), device=model.device) if kept_lg is not None else None
            for t in range(n):
                pos, mask, windowed, slots = model._positions_and_masks(B, 1, cache, None, None)
                x = model.embed(ids[:, t:t + 1])
                cos, sin = model.rotary(pos, x.dtype)
                cache.step_slots(pos)
                pending: dict[int, torch.Tensor] = {}  # target layer -> the guess made for it
                try:
                    for l, layer in enumerate(layers):
                        xmid, h = layer.attention_half(x, cos, sin, layer.pick_mask(mask, windowed), cache, slots)
                        routed = hasattr(layer.mlp, "router")
                        guess = pending.pop(l, None)
                        if guess is not None and routed:
                            true = layer.mlp.router(h.reshape(B, -1))[0]
                            hits[l - 1] += (guess.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).sum()
                            count[l - 1] += true.numel()
                        target = l + ahead
                        if routed and target < L and hasattr(layers[target].mlp, "router"):
                            xg = xmid
                            for j in range(l + 1, target + 1):
                                xg, hg = layers[j].attention_half(xg, cos, sin, layers[j].pick_mask(mask, windowed),
                                                                  cache, slots)
                            routed_g = layers[target].mlp.router(hg.reshape(B, -1))
                            pending[target] = routed_g[0]
                            if made is not None:
                                made[l, :, t] = pending[target].to(torch.int16)
                            if made_lg is not None:
                                made_lg[l, :, t] = routed_g[2].float()
                        x = xmid + layer.mlp(h)
                finally:
                    cache.step_slots(None)
                cache.advance(None, 1)
            if made is not None:
                got = made.cpu().numpy()
                for b, j in enumerate(rows):
                    kept[j][:] = got[:, b]
            if made_lg is not None:
                got = made_lg.cpu().numpy()
                for b, j in enumerate(rows):
                    kept_lg[j][:] = got[:, b]
    hits, count = hits.tolist(), count.tolist()
    recalls = [float(h / c) if c else 0.0 for h, c in zip(hits, count)]
    if keep_logits:
        return recalls, kept, kept_lg
    return (recalls, kept) if keep_guesses else recalls


def attention_guesses(model, held: RoutingTrace, logits: bool = False):
    """[L, N, K] int16 in ``held``'s token order: point C's guesses by the model that recorded the trace (float32,
    eval), each request decoded from its first token. logits: returns (guesses, logits [N, L, E] float32): row l of
    a token holds the router logits of its guess of MoE layer l+1 (0 in the last row), the features of a predictor
    whose lookahead source is point C (routing.AttentionLookahead)."""
    if held.token_ids is None or held.positions is None:
        raise ValueError("point C decodes the trace's requests: it needs their token ids and positions; record the "
                         "trace with `moe predictor record`")
    req = held.request_ids_or_default()
    order, seqs = [], []
    for r in np.unique(req):
        idx = np.flatnonzero(req == r)
        idx = idx[np.argsort(held.positions[idx], kind="stable")]
        if not np.array_equal(held.positions[idx], np.arange(len(idx))):
            raise ValueError(f"request {r}: positions are not 0..{len(idx) - 1}; point C decodes each request from "
                             "its first token, so the trace must hold whole requests")
        order.append(idx)
        seqs.append(held.token_ids[idx].astype(np.int64).tolist())
    got = attention_point(model, seqs, keep_guesses=True, keep_logits=logits)
    kept = got[1]
    out = np.full((held.num_layers, held.num_tokens, held.top_k), -1, dtype=np.int16)
    moe_layers = [i for i, layer in enumerate(model.layers) if hasattr(layer.mlp, "router")]
    for idx, g in zip(order, kept):
        out[:, idx] = g[moe_layers][:, :, :held.top_k]
    if not logits:
        return out
    lg = np.zeros((held.num_tokens, held.num_layers, held.num_experts), dtype=np.float32)
    for idx, g in zip(order, got[2]):
        lg[idx] = g[moe_layers].transpose(1, 0, 2)
    return out, lg


def _hits(next_ids: np.ndarray, trace: RoutingTrace, layer: int) -> int:
    """How many of layer+1's routed experts, over the tokens, layer's guess names."""
    truth, guess = trace.expert_ids[layer + 1], next_ids[layer]
    return sum(len(set(t[t >= 0]) & set(g[g >= 0])) for t, g in zip(truth, guess))


def layer_recall(next_ids: np.ndarray, trace: RoutingTrace, layer: int) -> float:
    """Share of layer+1's routed experts that layer's guess names."""
    return _hits(next_ids, trace, layer) / max(1, int((trace.expert_ids[layer + 1] >= 0).sum()))


def one_ahead_recall(next_ids: np.ndarray, trace: RoutingTrace) -> float:
    """Mean share of layer l+1's routed experts that layer l's guess names (l = 0..L-2)."""
    L, N, K = trace.expert_ids.shape
    return sum(_hits(next_ids, trace, layer) for layer in range(L - 1)) / max(1, (L - 1) * N * K)
