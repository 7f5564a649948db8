"""The listwise fit of the path predictor's weights (one weight vector per group of rows).

Shape legend: R = rows (a token and a target layer), S = evidence sources, E = experts, G = groups.
"""
from __future__ import annotations

import numpy as np


def newton_softmax(X_RSE: np.ndarray, Y_RE: np.ndarray, G_R: np.ndarray, theta_GS: np.ndarray,
                    iters: int, ridge: float | np.ndarray = 1.0) -> tuple[np.ndarray, float]:
    """Listwise fit: softmax over a layer's experts against its real set, one weight vector per group.

    Row r (a token, a target layer) scores expert e as z = X[r, :, e] . theta[G[r]]; the loss is
    -sum over the real experts of log softmax(z). This rewards ranking the real experts first,
    which is what recall of the top-k set measures (a per-expert binary loss spends its weights
    on calibration instead). Damped Newton steps; each group has S weights, so its Hessian is
    tiny. The ridge (a scalar, or one value per source) pulls toward the start for rare groups.
    """
    R, S, E = X_RSE.shape
    n_groups = theta_GS.shape[0]
    order = np.argsort(G_R, kind="stable")
    bounds = np.searchsorted(G_R[order], np.arange(n_groups + 1))
    feats = [X_RSE[order[bounds[g]:bounds[g + 1]]].transpose(0, 2, 1).astype(np.float64)  # [R_g, E, S]
             for g in range(n_groups)]
    ys = [Y_RE[order[bounds[g]:bounds[g + 1]]].astype(np.float64) for g in range(n_groups)]
    theta0 = theta_GS.copy()
    ridge = np.broadcast_to(np.asarray(ridge, dtype=np.float64), (S,))

    def loss_of(th):
        total, ps = 0.5 * float((ridge * (th - theta0) ** 2).sum()), []
        for f, y, t in zip(feats, ys, th):
            z = f @ t  # [R_g, E]
            z = z - z.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            total -= float((y * logp).sum())
            ps.append(np.exp(logp))
        return total, ps

    loss, ps = loss_of(theta_GS)
    for _ in range(iters):
        step = np.zeros_like(theta_GS)
        for g, (f, y, p) in enumerate(zip(feats, ys, ps)):
            if not len(f):
                continue
            n = y.sum(1)  # real experts per row
            grad = np.einsum("res,re->s", f, n[:, None] * p - y) + ridge * (theta_GS[g] - theta0[g])
            mu = np.einsum("res,re->rs", f, p)  # [R_g, S]
            f2 = f.reshape(-1, S)
            hess = (f2 * (n[:, None] * p).reshape(-1, 1)).T @ f2 - (mu * n[:, None]).T @ mu + np.diag(ridge)
            step[g] = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-3:  # backtracking keeps every step a descent step
            new_loss, new_ps = loss_of(theta_GS - t * step)
            if new_loss <= loss:
                break
            t *= 0.5
        else:
            break
        converged = loss - new_loss < 1e-6 * max(abs(loss), 1.0)
        theta_GS, loss, ps = theta_GS - t * step, new_loss, new_ps
        if converged:
            break
    return theta_GS, loss / max(len(Y_RE), 1)
