"""Synthetic routing traces with controlled structure, for tests and benchmarks.

Three knobs model what real MoE routing shows (ExFlow, ExpertFlow, MoE-Infinity):

- ``popularity_skew`` s: at each layer expert popularity follows Zipf, p(rank r) ~ 1 / r^s, over
  a random order of the experts (s = 0: uniform);
- ``temporal_locality`` q: with probability q a token reuses, at a layer, the expert set the
  previous token of the same request took there;
- ``affinity`` a: each expert e of layer l has one successor at layer l+1 (a random
  permutation, so popularity is not distorted); each of a token's k slots follows its
  predecessor's successor with probability a. P(next-layer expert | expert) is then
  concentrated on one expert.

Slots not fixed by locality or affinity are drawn from the layer's popularity without
replacement (Gumbel top-k), so a token's k experts are always distinct.

Planted-path mode (``planted_paths`` = P > 0): P whole paths [L, K] are drawn (their layer-0
sets all differ); each token follows one of them (chosen by Zipf over paths with the same skew,
or the previous token's path with probability q), each slot replaced by a random expert with
probability ``path_noise``. Knowing layer 0 then determines every later layer, which is what a
path predictor must discover. Token ids are Zipf-random in both modes and carry no routing
information (a predictor that leaned on them would learn nothing real).

Shape legend: L = layers, R = requests, K = top-k, E = experts, T = tokens.
"""
from __future__ import annotations

import numpy as np

from .trace import RoutingTrace


def _zipf(n: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** skew
    p /= p.sum()
    return p[rng.permutation(n)]


def _gumbel_topk(logp_E: np.ndarray, forced_RE: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct experts per row: forced ones first, the rest sampled from exp(logp) without replacement."""
    R, E = forced_RE.shape
    score = logp_E[None, :] + rng.gumbel(size=(R, E))
    score = np.where(forced_RE, np.inf, score)
    return np.argsort(-score, axis=1, kind="stable")[:, :k]


def synthesize(num_layers: int = 8, num_experts: int = 16, top_k: int = 2, num_requests: int = 16,
               tokens_per_request: int = 64, popularity_skew: float = 1.0, temporal_locality: float = 0.0,
               affinity: float = 0.0, seed: int = 0, planted_paths: int = 0, path_noise: float = 0.0,
               vocab_size: int = 1000) -> RoutingTrace:
    """A synthetic RoutingTrace; tokens are interleaved across requests like decode steps."""
    L, E, K, R, N = num_layers, num_experts, top_k, num_requests, tokens_per_request
    for name, v in (("num_layers", L), ("num_experts", E), ("top_k", K), ("num_requests", R),
                    ("tokens_per_request", N), ("vocab_size", vocab_size)):
        if int(v) <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if K > E:
        raise ValueError(f"top_k ({K}) cannot exceed num_experts ({E})")
    for name, v in (("temporal_locality", temporal_locality), ("affinity", affinity), ("path_noise", path_noise)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} is a probability, got {v}")
    if popularity_skew < 0:
        raise ValueError(f"popularity_skew must be >= 0 (0 = uniform), got {popularity_skew}")
    if planted_paths < 0:
        raise ValueError(f"planted_paths must be >= 0, got {planted_paths}")
    rng = np.random.default_rng(seed)
    logp_LE = np.log(np.stack([_zipf(E, popularity_skew, rng) for _ in range(L)]))
    ids_NLRK = np.empty((N, L, R, K), dtype=np.int16)
    tok_NR = np.empty((N, R), dtype=np.int64)

    p_tok = _zipf(vocab_size, 1.0, rng)
    tok_NR[:] = rng.choice(vocab_size, size=(N, R), p=p_tok)
    if planted_paths:
        paths_PLK = _planted(planted_paths, L, E, K, logp_LE, rng)
        p_path = _zipf(planted_paths, popularity_skew, rng)
        choice_R = rng.choice(planted_paths, size=R, p=p_path)
        for t in range(N):
            if t:
                fresh = rng.random(R) >= temporal_locality
                choice_R = np.where(fresh, rng.choice(planted_paths, size=R, p=p_path), choice_R)
            ids_LRK = paths_PLK[choice_R].transpose(1, 0, 2).copy()
            noisy = rng.random(ids_LRK.shape) < path_noise
            ids_LRK[noisy] = rng.integers(0, E, size=int(noisy.sum()))
            ids_NLRK[t] = _dedupe(ids_LRK, E, rng)
        meta_extra = {"planted_paths": int(planted_paths), "path_noise": float(path_noise)}
    else:
        successor_LE = np.stack([rng.permutation(E) for _ in range(L)])  # layer l expert -> layer l+1
        rows = np.arange(R)[:, None]
        for t in range(N):
            for l in range(L):
                forced_RE = np.zeros((R, E), dtype=bool)
                if l and affinity > 0:
                    follow_RK = rng.random((R, K)) < affinity
                    succ_RK = successor_LE[l - 1][ids_NLRK[t, l - 1].astype(np.int64)]
                    forced_RE[np.broadcast_to(rows, (R, K))[follow_RK], succ_RK[follow_RK]] = True
                ids_RK = _gumbel_topk(logp_LE[l], forced_RE, K, rng)
                if t and temporal_locality > 0:
                    reuse_R = rng.random(R) < temporal_locality
                    ids_RK = np.where(reuse_R[:, None], ids_NLRK[t - 1, l], ids_RK)
                ids_NLRK[t, l] = ids_RK
        meta_extra = {}
    # token order: step t of every request, then step t + 1 (like continuous batching decode)
    ids_LTK = ids_NLRK.transpose(1, 0, 2, 3).reshape(L, N * R, K)
    req = np.tile(np.arange(R), N)
    pos = np.repeat(np.arange(N), R)
    meta = {"source": "synthetic", "seed": int(seed), "popularity_skew": float(popularity_skew),
            "temporal_locality": float(temporal_locality), "affinity": float(affinity), **meta_extra}
    return RoutingTrace(ids_LTK, E, request_ids=req, positions=pos, meta=meta,
                        token_ids=tok_NR.reshape(-1))


def _planted(P: int, L: int, E: int, K: int, logp_LE: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """P paths [P, L, K] whose layer-0 expert sets are pairwise different."""
    from math import comb
    if comb(E, K) < P:
        raise ValueError(f"cannot plant {P} paths with distinct layer-0 sets: only C({E},{K}) = {comb(E, K)} "
                         "sets exist; use fewer planted_paths or more experts")
    paths = np.empty((P, L, K), dtype=np.int16)
    seen: set[tuple[int, ...]] = set()
    uniform = np.zeros(E)
    for p in range(P):
        for l in range(L):
            while True:
                # layer 0 uniform so that distinct sets are easy to find; later layers by popularity
                s = _gumbel_topk(uniform if l == 0 else logp_LE[l], np.zeros((1, E), bool), K, rng)[0]
                key = tuple(sorted(s.tolist()))
                if l or key not in seen:
                    break
            if l == 0:
                seen.add(key)
            paths[p, l] = s
    return paths


def _dedupe(ids_LRK: np.ndarray, E: int, rng: np.random.Generator) -> np.ndarray:
    """Replace repeated experts within a token's set (noise can repeat one) by unused ones."""
    srt = np.sort(ids_LRK, axis=-1)
    dup_l, dup_r = np.nonzero((srt[..., 1:] == srt[..., :-1]).any(-1))
    K = ids_LRK.shape[-1]
    for l, r in zip(dup_l.tolist(), dup_r.tolist()):
        row = ids_LRK[l, r]
        free = [e for e in rng.permutation(E).tolist() if e not in set(row.tolist())]
        seen: set[int] = set()
        for i in range(K):
            if int(row[i]) in seen:
                row[i] = free.pop()
            seen.add(int(row[i]))
    return ids_LRK
