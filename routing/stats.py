"""Summary statistics of a routing trace: how much structure a predictor or a cache can use.

- popularity: per layer, the fraction of tokens that use each expert, and its entropy (bits;
  log2 E means uniform, lower means a few experts dominate);
- inter-layer affinity: P(expert e' used at layer l+1 | expert e used at layer l). Reported as
  the share of next-layer slots covered by each expert's k most likely successors (its top-k
  mass; uniform routing gives k/E) and the conditional's entropy (uniform: log2 E);
- reuse distance: for each use of an expert at a layer, how many tokens of the same request
  ago that expert was last used at that layer (1 = the previous token); "cold" = first use in
  the request. ``scope="global"`` counts tokens in processing order across requests instead,
  which is what a cache shared by interleaved requests sees.

And the metrics of a path predictor on a trace (``evaluate``): recall and precision of the
predicted expert sets at 1, 2, 4 layers ahead and before the token's forward; its CPU cost.

Shape legend: L = layers, T = tokens, K = top-k, E = experts.
"""
from __future__ import annotations

import numpy as np

from .baselines import PathModel, multi_hot
from .trace import RoutingTrace

REUSE_BINS = ("1", "2", "3-4", "5-8", "9-16", "17-32", "33+", "cold")


def popularity(trace: RoutingTrace) -> np.ndarray:
    """[L, E]: fraction of tokens routed to each expert at each layer (rows sum to ~K)."""
    L, T, K = trace.expert_ids.shape
    E = trace.num_experts
    out = np.zeros((L, E), dtype=np.float64)
    ids = trace.expert_ids.astype(np.int64)
    for l in range(L):
        valid = ids[l] >= 0
        out[l] = np.bincount(ids[l][valid], minlength=E)
    return out / max(T, 1)


def _entropy_bits(p: np.ndarray, axis=-1) -> np.ndarray:
    p = p / np.clip(p.sum(axis=axis, keepdims=True), 1e-30, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -(np.where(p > 0, p * np.log2(p), 0.0)).sum(axis=axis)


def popularity_entropy(trace: RoutingTrace) -> np.ndarray:
    """[L]: entropy (bits) of each layer's expert-use distribution; log2(E) is uniform."""
    return _entropy_bits(popularity(trace))


def transition_counts(trace: RoutingTrace, layer: int, next_layer: int | None = None) -> np.ndarray:
    """[E, E]: C[e, e'] = number of tokens using e at ``layer`` and e' at ``next_layer`` (default layer+1)."""
    m = layer + 1 if next_layer is None else next_layer
    if not (0 <= layer < trace.num_layers and 0 <= m < trace.num_layers):
        raise ValueError(f"layers {layer} -> {m} out of range for a trace of {trace.num_layers} layers")
    E = trace.num_experts
    a = trace.expert_ids[layer].astype(np.int64)  # [T, K]
    b = trace.expert_ids[m].astype(np.int64)
    pa = np.repeat(a, b.shape[1], axis=1).reshape(-1)
    pb = np.tile(b, (1, a.shape[1])).reshape(-1)
    ok = (pa >= 0) & (pb >= 0)
    return np.bincount(pa[ok] * E + pb[ok], minlength=E * E).reshape(E, E).astype(np.float64)


def affinity_concentration(trace: RoutingTrace) -> dict:
    """Per consecutive layer pair: top-k mass and entropy of P(next-layer expert | expert).

    Each expert's conditional is weighted by how often that expert is used. Returns
    ``{"topk_mass": [L-1], "uniform_mass": k/E, "cond_entropy_bits": [L-1], "uniform_entropy_bits"}``.
    """
    L, K, E = trace.num_layers, trace.top_k, trace.num_experts
    mass, ent = np.zeros(max(L - 1, 0)), np.zeros(max(L - 1, 0))
    for l in range(L - 1):
        C = transition_counts(trace, l)
        use = C.sum(1)  # = K * (tokens using e)
        w = use / max(use.sum(), 1e-30)
        topk = np.sort(C, axis=1)[:, ::-1][:, :K].sum(1) / np.clip(use, 1e-30, None)
        mass[l] = float((w * topk).sum())
        ent[l] = float((w * _entropy_bits(C + 1e-30)).sum())
    return {"topk_mass": mass, "uniform_mass": K / E, "cond_entropy_bits": ent,
            "uniform_entropy_bits": float(np.log2(E))}


def reuse_distances(trace: RoutingTrace, scope: str = "request") -> np.ndarray:
    """Distance in tokens since the same (layer, expert) was last used, per use; -1 = cold. [uses]."""
    if scope not in ("request", "global"):
        raise ValueError(f"scope must be 'request' or 'global', got {scope!r}")
    L, T, K = trace.expert_ids.shape
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    req = trace.request_ids_or_default().astype(np.int64) if scope == "request" else np.zeros(T, np.int64)
    # ordinal of each token inside its request (processing order)
    order = np.argsort(req, kind="stable")
    ordinal = np.empty(T, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(req[order])) + 1]
    counts = np.diff(np.r_[starts, T])
    ordinal[order] = np.arange(T) - np.repeat(starts, counts)
    lay = np.broadcast_to(np.arange(L)[:, None, None], (L, T, K)).reshape(-1)
    tok = np.broadcast_to(np.arange(T)[None, :, None], (L, T, K)).reshape(-1)
    ex = trace.expert_ids.astype(np.int64).reshape(-1)
    ok = ex >= 0
    lay, tok, ex = lay[ok], tok[ok], ex[ok]
    idx = np.lexsort((ordinal[tok], ex, lay, req[tok]))
    r, l, e, o = req[tok][idx], lay[idx], ex[idx], ordinal[tok][idx]
    same = np.r_[False, (r[1:] == r[:-1]) & (l[1:] == l[:-1]) & (e[1:] == e[:-1])]
    d = np.where(same, o - np.r_[0, o[:-1]], -1)
    return d


def reuse_distance_histogram(trace: RoutingTrace, scope: str = "request") -> dict[str, float]:
    """Share of expert uses in each reuse-distance bin (``REUSE_BINS``); values sum to 1."""
    d = reuse_distances(trace, scope)
    n = max(len(d), 1)
    edges = [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, np.inf)]
    out = {name: float(((d >= lo) & (d <= hi)).sum() / n) for name, (lo, hi) in zip(REUSE_BINS, edges)}
    out["cold"] = float((d < 0).sum() / n)
    return out


def summarize(trace: RoutingTrace) -> dict:
    """All statistics above in one dict (arrays as lists, so it prints and serialises)."""
    aff = affinity_concentration(trace)
    ent = popularity_entropy(trace)
    return {"layers": trace.num_layers, "tokens": trace.num_tokens, "top_k": trace.top_k,
            "num_experts": trace.num_experts,
            "popularity_entropy_bits": ent.tolist(), "uniform_entropy_bits": float(np.log2(trace.num_experts)),
            "affinity_topk_mass": aff["topk_mass"].tolist(), "affinity_uniform_mass": aff["uniform_mass"],
            "affinity_cond_entropy_bits": aff["cond_entropy_bits"].tolist(),
            "reuse_histogram": reuse_distance_histogram(trace)}


def format_summary(s: dict) -> str:
    def mean(x):
        return float(np.mean(x)) if len(x) else float("nan")
    lines = [f"trace: {s['layers']} layers x {s['tokens']} tokens, top-{s['top_k']} of {s['num_experts']} experts",
             f"popularity entropy: mean {mean(s['popularity_entropy_bits']):.2f} bits "
             f"(uniform {s['uniform_entropy_bits']:.2f})",
             f"next-layer affinity top-k mass: mean {mean(s['affinity_topk_mass']):.3f} "
             f"(uniform {s['affinity_uniform_mass']:.3f}); conditional entropy "
             f"{mean(s['affinity_cond_entropy_bits']):.2f} bits",
             "reuse distance (tokens, same request): " +
             "  ".join(f"{k}:{v:.2f}" for k, v in s["reuse_histogram"].items())]
    return "\n".join(lines)


# --- predictor metrics --------------------------------------------------------------------------------------
def token_inputs(trace: RoutingTrace, features: dict | None = None, max_tokens: int | None = None,
                 seed: int = 0, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """(paths [N, L, K], previous token's paths [N, L, K] (-1 = none), features, token index), for the
    tokens ``index`` when given, else every token or ``max_tokens`` of them drawn with ``seed``."""
    paths = trace.paths().astype(np.int64)
    prev_idx = trace.previous_token_index()
    idx = np.arange(trace.num_tokens) if index is None else np.asarray(index)
    if index is None and max_tokens is not None and len(idx) > max_tokens:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_tokens, replace=False))
    prev = np.where(prev_idx[idx, None, None] >= 0, paths[np.maximum(prev_idx[idx], 0)], -1)
    feats: dict = {}
    if trace.token_ids is not None:
        feats["token_ids"] = trace.token_ids[idx]
    if features is not None and features.get("hidden_NLD") is not None:
        feats["hidden_NLD"] = np.asarray(features["hidden_NLD"])[idx]
    return paths[idx], prev, feats, idx


def evaluate(model: PathModel, trace: RoutingTrace, features: dict | None = None,
             distances=(1, 2, 4), max_tokens: int | None = 2000, seed: int = 0) -> dict:
    """Per-layer recall and precision of predicted expert sets, by how far ahead they are.

    For each known layer ``l`` (0..L-2) and distance d, the top-k predicted experts of layer
    l + d are compared with the real ones: recall = hits / real experts, precision = hits / k
    (equal when every token has k experts). ``"all"`` predicts every layer with nothing of the
    token known (layer -1: the start of its forward). ``*_2k`` use the 2k most likely experts
    (what a prefetcher with twice the room would load).
    Returns ``{key: {"recall": [L], "precision": [L], "recall_2k": [L], "precision_2k": [L],
    "mean_recall": float, ...}}`` with NaN for layers a key never targets.
    """
    L, E, K = model.num_layers, model.num_experts, model.top_k
    if trace.num_layers != L or trace.num_experts > E:
        raise ValueError(f"trace has {trace.num_layers} layers / {trace.num_experts} experts but the model "
                         f"predicts {L} / {E}: evaluate on a trace of the same model")
    paths, prev, feats, _ = token_inputs(trace, features, max_tokens, seed)
    true_NLE = multi_hot(paths, E)
    n_true = true_NLE.sum(-1)  # [N, L]
    keys = [str(d) for d in distances] + ["all"]
    acc = {k: {"hits": np.zeros(L), "hits2": np.zeros(L), "true": np.zeros(L), "count": np.zeros(L)} for k in keys}
    k2 = min(2 * K, E)
    for layer in range(-1, L - 1):
        probs = model.predict_batch(prev, layer, paths[:, :layer + 1], feats)
        top2 = np.argsort(-probs, axis=-1, kind="stable")[..., :k2]  # [N, L, 2K]
        hit = np.take_along_axis(true_NLE, top2, axis=-1)  # [N, L, 2K]
        hits, hits2 = hit[..., :K].sum((0, 2)), hit.sum((0, 2))
        targets = ([("all", m) for m in range(L)] if layer < 0 else
                   [(str(d), layer + d) for d in distances if layer + d < L])
        for key, m in targets:
            a = acc[key]
            a["hits"][m] += hits[m]
            a["hits2"][m] += hits2[m]
            a["true"][m] += n_true[:, m].sum()
            a["count"][m] += len(paths)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for key, a in acc.items():
            r = dict(recall=a["hits"] / a["true"], precision=a["hits"] / (K * a["count"]),
                     recall_2k=a["hits2"] / a["true"], precision_2k=a["hits2"] / (k2 * a["count"]))
            for name in list(r):
                r["mean_" + name] = float(np.nansum(r[name] * a["true"]) / max(a["true"].sum(), 1)) \
                    if name.startswith("recall") else float(np.nansum(r[name] * a["count"]) / max(a["count"].sum(), 1))
            out[key] = r
    return out


def cost_per_token_us(model: PathModel, trace: RoutingTrace, layer: int = 0, batch: int = 64,
                      repeats: int = 20, features: dict | None = None) -> float:
    """CPU microseconds per token of one ``predict_batch`` call over ``batch`` tokens.

    Process CPU time, not wall time: on a shared machine wall time mostly measures waiting. Run
    with ``torch.set_num_threads(1)`` to get one core's cost (the benchmark does).
    """
    import time
    paths, prev, feats, _ = token_inputs(trace, features, batch)
    layer = min(layer, model.num_layers - 2)
    model.predict_batch(prev, layer, paths[:, :layer + 1], feats)  # warm-up
    t0 = time.process_time()
    for _ in range(repeats):
        model.predict_batch(prev, layer, paths[:, :layer + 1], feats)
    return (time.process_time() - t0) / repeats / len(paths) * 1e6
