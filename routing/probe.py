"""A learned lookahead: the experts of the next layers read off the hidden state by fitted probes.

``GateLookahead`` applies layer m's own router to the hidden state entering an earlier layer l
(mixtral-offloading's and Fate's trick). It is right where the residual stream changes slowly
between l and m; in the embedded default model (6 layers, hidden 256) it is not: 0.70 recall one
layer ahead on held-out text, 0.30 from layer 0 to layer 1. ``ProbeLookahead`` fits, for each
known layer l and each target layer m = l+1 .. l+span, a softmax regression from the standardized
hidden state entering l to the experts m used (cross-entropy against the token's real set, ridge on
the weights), on a recorded trace with its hidden states. On the default model's held-out text it
reads 0.85 one layer ahead alone (0.88 from layer 0), 0.80 two ahead, 0.74 four ahead (session 12).

It is a drop-in for ``GateLookahead``: the path predictor takes it as its ``lookahead`` (its
``gate`` source), and alone it is a baseline (``probe-lookahead``). Target layers beyond ``span``
get the training trace's popularity (so the predictor's gate source is 0 there: no evidence).

Fitting is convex: zero start, L-BFGS, the same weights every run. Cost of a prediction: one
[N, D] x [D, span * E] product per call.

For offloading, load a predictor with the probes ``moe predictor train --features`` wrote beside it:

    pred = PathPredictor.load("P.npz", lookahead=ProbeLookahead.load("P.probe.npz"))
    apply_offload(model, OffloadConfig(policy="predictor", prefetch="predictor", predictor=pred, ...))

and each MoE layer hands its input to the predictor (``offload.prefetch.Lookahead.wants_hidden``).

Shape legend: N = tokens, L = MoE layers, D = hidden size, E = experts, K = top-k, S = span.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .baselines import GateLookahead, PathModel, PopularityBaseline
from .trace import RoutingTrace

_FORMAT = "moeflow.ProbeLookahead"
_VERSION = 1


class ProbeLookahead(GateLookahead):
    """Fitted probes hidden state (entering layer l) -> experts of layers l+1 .. l+span; see the module
    docstring. ``mean_lD``/``std_lD`` [L-1, D] standardize the input of each known layer, ``W_lDSE``
    [L-1, D, S, E] and ``b_lSE`` [L-1, S, E] are the probes (target l + 1 + s), ``log_pop_LE`` the
    training trace's popularity for targets beyond the span."""
    name = "probe-lookahead"

    def __init__(self, mean_lD: np.ndarray, std_lD: np.ndarray, W_lDSE: np.ndarray, b_lSE: np.ndarray,
                 log_pop_LE: np.ndarray, top_k: int, fallback: PathModel | None = None):
        L, E = log_pop_LE.shape
        if W_lDSE.shape[0] != L - 1 or W_lDSE.shape[3] != E or mean_lD.shape != std_lD.shape or \
                mean_lD.shape != (L - 1, W_lDSE.shape[1]) or b_lSE.shape != (L - 1,) + W_lDSE.shape[2:]:
            raise ValueError(f"inconsistent probe arrays: mean {mean_lD.shape}, std {std_lD.shape}, W "
                             f"{W_lDSE.shape}, b {b_lSE.shape}, popularity {log_pop_LE.shape}")
        self.mean_lD, self.std_lD = mean_lD.astype(np.float32), std_lD.astype(np.float32)
        self.W_lDSE, self.b_lSE = W_lDSE.astype(np.float32), b_lSE.astype(np.float32)
        self.log_pop_LE = log_pop_LE.astype(np.float32)
        self.num_layers, self.num_experts, self.top_k = L, E, top_k
        self.span = W_lDSE.shape[2]
        self.hidden_size = W_lDSE.shape[1]
        self.fallback = fallback

    @classmethod
    def fit(cls, trace: RoutingTrace, hidden_NLD: np.ndarray, span: int = 4, ridge: float = 1e-3,
            iters: int = 100, max_tokens: int = 16384, seed: int = 0) -> "ProbeLookahead":
        """Fit the probes on ``trace`` and its hidden states ``hidden_NLD`` [T, L, D] (the hidden state
        entering each MoE layer, as ``routing.record`` writes it). ``max_tokens`` caps the tokens the
        probes are fitted on (a fixed random subset); ``ridge`` weighs the squared weights against the
        mean cross-entropy (inputs are standardized)."""
        hidden = np.asarray(hidden_NLD)
        L, T, K = trace.expert_ids.shape
        E = trace.num_experts
        if L < 2:
            raise ValueError(f"a probe needs at least 2 MoE layers, the trace has {L}")
        if hidden.ndim != 3 or hidden.shape[:2] != (T, L):
            raise ValueError(f"hidden_NLD must be [tokens={T}, layers={L}, D], got {hidden.shape}: the features "
                             "file must come from the same recording as the trace")
        if span < 1:
            raise ValueError(f"span must be at least 1, got {span}")
        span = min(span, L - 1)
        rows = np.arange(T) if T <= max_tokens else np.sort(
            np.random.default_rng(seed).choice(T, max_tokens, replace=False))
        ids = torch.as_tensor(trace.expert_ids[:, rows].astype(np.int64))  # [L, n, K]
        D = hidden.shape[2]
        mean = np.zeros((L - 1, D), np.float32)
        std = np.ones((L - 1, D), np.float32)
        W = np.zeros((L - 1, D, span, E), np.float32)
        b = np.zeros((L - 1, span, E), np.float32)
        for layer in range(L - 1):
            x = torch.as_tensor(np.asarray(hidden[rows, layer], dtype=np.float32))
            mu, sd = x.mean(0), x.std(0) + 1e-3
            x = (x - mu) / sd
            targets = list(range(layer + 1, min(L, layer + 1 + span)))
            # the real sets as target distributions (1/K on each used expert; -1 = dropped slot: no mass)
            tgt = torch.zeros(len(targets), x.shape[0], E + 1)
            for s, m in enumerate(targets):
                tgt[s].scatter_(1, torch.where(ids[m] < 0, E, ids[m]), 1.0 / K)
            tgt = tgt[..., :E]
            w = torch.zeros(D, len(targets) * E, requires_grad=True)
            bias = torch.zeros(len(targets) * E, requires_grad=True)
            opt = torch.optim.LBFGS([w, bias], max_iter=iters, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-6, tolerance_change=1e-9, history_size=20)

            def closure():
                opt.zero_grad()
                z = (x @ w + bias).view(x.shape[0], len(targets), E).transpose(0, 1)  # [S, n, E]
                loss = -(tgt * torch.log_softmax(z, -1)).sum(-1).mean(1).sum() + 0.5 * ridge * (w * w).sum()
                loss.backward()
                return loss
            opt.step(closure)
            mean[layer], std[layer] = mu.numpy(), sd.numpy()
            W[layer, :, :len(targets)] = w.detach().view(D, len(targets), E).numpy()
            b[layer, :len(targets)] = bias.detach().view(len(targets), E).numpy()
        pop = PopularityBaseline.fit(trace)
        return cls(mean, std, W, b, np.log(np.maximum(pop.popularity_LE, 1e-6)), K, fallback=pop)

    def lookahead_logits(self, hidden_ND: np.ndarray, layer: int) -> np.ndarray:
        """[N, L, E]: the probes of ``layer`` applied to the hidden state entering it (rows <= layer are
        0; targets past the span hold the training popularity)."""
        x = np.asarray(hidden_ND, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.hidden_size:
            raise ValueError(f"hidden_ND must be [N, D={self.hidden_size}], got {x.shape}: features of another model?")
        N, L, E = x.shape[0], self.num_layers, self.num_experts
        out = np.zeros((N, L, E), dtype=np.float32)
        if layer < 0 or layer >= L - 1:
            return out
        out[:, layer + 1:] = self.log_pop_LE[None, layer + 1:]
        S = min(self.span, L - 1 - layer)
        xs = (x - self.mean_lD[layer]) / self.std_lD[layer]
        z = xs @ self.W_lDSE[layer, :, :S].reshape(self.hidden_size, S * E) + self.b_lSE[layer, :S].reshape(-1)
        out[:, layer + 1:layer + 1 + S] = z.reshape(N, S, E)
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        header = {"format": _FORMAT, "version": _VERSION, "top_k": self.top_k}
        path.parent.mkdir(parents=True, exist_ok=True)
        fb = getattr(self.fallback, "popularity_LE", None)
        np.savez_compressed(path, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                            mean=self.mean_lD, std=self.std_lD, W=self.W_lDSE, b=self.b_lSE, log_pop=self.log_pop_LE,
                            **({"fallback_pop": fb} if fb is not None else {}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ProbeLookahead":
        path = Path(path)
        try:
            with np.load(path) as f:
                header = json.loads(bytes(f["header"]).decode())
                arrays = {k: f[k] for k in f.files if k != "header"}
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path} is not a probe file (write one with ProbeLookahead.save or "
                             f"`moe predictor train --features`): {exc}") from exc
        if header.get("format") != _FORMAT or header.get("version", 0) > _VERSION:
            raise ValueError(f"{path} holds {header.get('format')} v{header.get('version')}, not {_FORMAT} "
                             f"v<={_VERSION}")
        fallback = None
        if "fallback_pop" in arrays:
            fallback = PopularityBaseline(arrays["fallback_pop"], int(header["top_k"]))
        return cls(arrays["mean"], arrays["std"], arrays["W"], arrays["b"], arrays["log_pop"], int(header["top_k"]),
                   fallback=fallback)
