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
# the pulls towards the router a prior-started fit tries, strongest first (inputs standardized, loss = the
# mean cross-entropy summed over the span's targets)
PRIOR_RIDGES = (10.0, 1.0, 0.1, 0.01, 0.001)
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
        self.prior_pull: list | None = None  # set by fit with a prior: the pull chosen per known layer

    @classmethod
    def fit(cls, trace: RoutingTrace, hidden_NLD: np.ndarray, span: int = 4, ridge: float = 1e-3,
            iters: int = 100, max_tokens: int = 16384, seed: int = 0, prior: GateLookahead | None = None,
            prior_ridges: tuple[float, ...] = PRIOR_RIDGES, device: str | torch.device = "cpu") -> "ProbeLookahead":
        """Fit the probes on ``trace`` and its hidden states ``hidden_NLD`` [T, L, D] (the hidden state
        entering each MoE layer, as ``routing.record`` writes it). ``max_tokens`` caps the tokens the
        probes are fitted on (a fixed random subset); without a prior, ``ridge`` weighs the squared
        weights against the mean cross-entropy (inputs are standardized). ``device``: where the fits run (the result is the
        same arrays on the host; a GPU fits a deep model's probes in seconds instead of minutes).

        ``prior``: the routers of the model the trace came from (``GateLookahead.from_model``). A probe
        fitted from zero learns the next layers' routing from the trace alone, and in deep models it
        reads them worse than the model's own next router does (48 layers: 0.881 against 0.905 one layer
        ahead, BENCHMARKS 7h): the router saw millions of tokens, the probe a few thousand. With a
        prior each probe starts from its target layer's router applied to the known layer's input (the
        gate lookahead, linearized around the mean input) and its ridge pulls towards that start, not
        towards zero. How hard it pulls is chosen per known layer on a fifth of the fitting requests held
        out: the rescaled router as it is, or the fit at each of ``prior_ridges`` (strongest first,
        each started from the last), whichever reads those tokens' next layers best; a fit that wins is
        then refitted on all the tokens (``prior_pull`` lists the choices; None = the router). Where the router reads badly (the first layers of a deep model, a shallow
        model) the weakest pull wins and the probe is the one fitted from zero, near enough."""
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
        if prior is not None and not prior_ridges:
            raise ValueError("prior_ridges is empty: give at least one ridge to fit the correction to the router with")
        span = min(span, L - 1)
        rows = np.arange(T) if T <= max_tokens else np.sort(
            np.random.default_rng(seed).choice(T, max_tokens, replace=False))
        dev = torch.device(device)
        ids = torch.as_tensor(trace.expert_ids[:, rows].astype(np.int64), device=dev)  # [L, n, K]
        n, D = len(rows), hidden.shape[2]
        # the prior's calibration and pull are chosen without these: every fifth request (every fifth token
        # when there are fewer than 5). Tokens of requests the fit saw flatter a freely fitted probe, since
        # neighbours in one text are alike: on the s20 48-layer trace a probe fitted from zero read 0.914
        # on every fifth token of the fitting requests, 0.906 on every fifth request, 0.900 on new ones
        held_np = np.arange(n) % 5 == 4
        req = trace.request_ids_or_default()[rows]
        uniq = np.unique(req)
        if len(uniq) >= 5:
            held_np = np.isin(req, uniq[np.arange(len(uniq)) % 5 == 4])
        held = torch.as_tensor(held_np, device=dev)
        mean = np.zeros((L - 1, D), np.float32)
        std = np.ones((L - 1, D), np.float32)
        W = np.zeros((L - 1, D, span, E), np.float32)
        b = np.zeros((L - 1, span, E), np.float32)
        pulls: list = []  # per known layer, with a prior: the ridge chosen (None = the router as it is)
        for layer in range(L - 1):
            x = torch.as_tensor(np.asarray(hidden[rows, layer], dtype=np.float32), device=dev)
            mu, sd = x.mean(0), x.std(0) + 1e-3
            x = (x - mu) / sd
            targets = list(range(layer + 1, min(L, layer + 1 + span)))
            S = len(targets)
            # the real sets as target distributions (1/K on each used expert; -1 = dropped slot: no mass)
            tgt = torch.zeros(S, n, E + 1, device=dev)
            for s, m in enumerate(targets):
                tgt[s].scatter_(1, torch.where(ids[m] < 0, E, ids[m]), 1.0 / K)
            tgt = tgt[..., :E]
            if prior is None:
                w0, b0 = torch.zeros(D, S * E, device=dev), torch.zeros(S * E, device=dev)
                w, bias = _fit_probe(x, tgt, w0, b0, w0, ridge, iters)
            else:
                w0, b0 = (t.to(dev) for t in _router_start(prior, targets, mu.cpu(), sd.cpu(), E))
                w0, b0 = _calibrate(x[~held], tgt[:, ~held], w0, b0, iters)
                true = ids[targets][:, held]  # [S, h, K]
                best = (_recall(x[held] @ w0 + b0, true), w0, b0, None)
                w, bias = w0, b0
                for lam in prior_ridges:
                    w, bias = _fit_probe(x[~held], tgt[:, ~held], w, bias, w0, lam, iters)
                    r = _recall(x[held] @ w + bias, true)
                    if r > best[0]:
                        best = (r, w, bias, lam)
                _, w, bias, lam = best
                if lam is not None:
                    w, bias = _fit_probe(x, tgt, w, bias, w0, lam, iters)
                pulls.append(lam)
            mean[layer], std[layer] = mu.cpu().numpy(), sd.cpu().numpy()
            W[layer, :, :S] = w.detach().view(D, S, E).cpu().numpy()
            b[layer, :S] = bias.detach().view(S, E).cpu().numpy()
        pop = PopularityBaseline.fit(trace)
        out = cls(mean, std, W, b, np.log(np.maximum(pop.popularity_LE, 1e-6)), K, fallback=pop)
        out.prior_pull = pulls if prior is not None else None
        return out

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


@torch.no_grad()
def _router_start(prior: GateLookahead, targets: list[int], mu_D: torch.Tensor, sd_D: torch.Tensor,
                  E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(w [D, S * E], b [S * E]) on standardized inputs xs = (x - mu) / sd that reproduce each target
    router m on x = mu + sd * xs: b = router(mu), column i of w = router(mu + sd_i e_i) - router(mu)
    (exact for a linear router, its linearization around the mean input otherwise)."""
    if prior.num_experts != E or prior.num_layers <= max(targets):
        raise ValueError(f"the prior's routers ({prior.num_layers} layers x {prior.num_experts} experts) do not "
                         f"match the trace (targets up to layer {max(targets)}, {E} experts): the prior must be "
                         "the routers of the model the trace was recorded from")
    D = mu_D.shape[0]
    pts = torch.cat([mu_D[None], mu_D[None] + torch.diag(sd_D)]).numpy()  # [1 + D, D]
    w, b = [], []
    for m in targets:
        z = prior.routers[m](torch.from_numpy(pts)).float().cpu()
        if z.shape != (D + 1, E):
            raise ValueError(f"router {m} of the prior returned {tuple(z.shape)} logits for {D + 1} inputs, "
                             f"expected ({D + 1}, {E})")
        b.append(z[0])
        w.append(z[1:] - z[0])
    return torch.cat(w, 1), torch.cat(b)


def _fit_probe(x_nD, tgt_SnE, w_start, b_start, w_centre, ridge: float, iters: int):
    """L-BFGS on the mean cross-entropy of softmax(x @ w + b) against the target distributions, plus
    ridge / 2 * |w - w_centre|^2; started at (w_start, b_start). Returns the fitted (w, b), detached."""
    S, n, E = tgt_SnE.shape
    w = w_start.detach().clone().requires_grad_(True)
    bias = b_start.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, bias], max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9, history_size=20)

    def closure():
        opt.zero_grad()
        z = (x_nD @ w + bias).view(n, S, E).transpose(0, 1)  # [S, n, E]
        loss = -(tgt_SnE * torch.log_softmax(z, -1)).sum(-1).mean(1).sum() + 0.5 * ridge * ((w - w_centre) ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach(), bias.detach()


def _calibrate(x_nD, tgt_SnE, w0, b0, iters: int):
    """The router start rescaled to the probes' cross-entropy: one scale per target fitted on (x, tgt)
    (a positive scale keeps the router's ranking; a bias per expert as well reorders it, and cost recall
    on the synthetic test of tests/routing/test_probe.py).
    Returns the rescaled (w, b) of the same shapes."""
    S, n, E = tgt_SnE.shape
    z0 = (x_nD @ w0 + b0).view(n, S, E).transpose(0, 1)  # [S, n, E], fixed
    scale = torch.ones(S, device=x_nD.device, requires_grad=True)
    opt = torch.optim.LBFGS([scale], max_iter=iters, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9, history_size=20)

    def closure():
        opt.zero_grad()
        loss = -(tgt_SnE * torch.log_softmax(z0 * scale[:, None, None], -1)).sum(-1).mean(1).sum()
        loss.backward()
        return loss
    opt.step(closure)
    a = scale.detach()
    return (w0.view(-1, S, E) * a[None, :, None]).reshape(w0.shape), (b0.view(S, E) * a[:, None]).reshape(-1)


def _recall(z_nSE: torch.Tensor, true_ShK: torch.Tensor) -> float:
    """Mean top-k recall of logits [h, S * E] against the real ids [S, h, K] (-1 = no expert)."""
    S, h, K = true_ShK.shape
    pred = z_nSE.view(h, S, -1).transpose(0, 1).topk(K, -1).indices  # [S, h, K]
    hit = (pred.unsqueeze(-1) == true_ShK.unsqueeze(-2)).any(-1)
    valid = (true_ShK >= 0).sum()
    return float(hit.sum() / valid.clamp(min=1))
