import numpy as np

from routing.listwise import newton_softmax


def test_recovers_planted_weights_per_group():
    rng = np.random.default_rng(0)
    R, S, E = 4000, 2, 6
    X = rng.normal(size=(R, S, E)).astype(np.float32)
    G = rng.integers(0, 2, R)
    true = np.array([[2.0, -1.0], [0.5, 1.5]])
    z = np.einsum("rse,rs->re", X, true[G])
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    Y = np.zeros((R, E), np.float32)
    Y[np.arange(R), [rng.choice(E, p=row) for row in p]] = 1.0  # one real expert per row
    theta, loss = newton_softmax(X, Y, G, np.zeros((2, S)), iters=20, ridge=1e-3)
    np.testing.assert_allclose(theta, true, atol=0.2)
    _, loss0 = newton_softmax(X, Y, G, np.zeros((2, S)), iters=1, ridge=1e-3)
    assert loss < loss0


def test_per_source_ridge_holds_a_source_at_its_start():
    rng = np.random.default_rng(1)
    R, S, E = 500, 2, 4
    X = rng.normal(size=(R, S, E)).astype(np.float32)
    Y = np.zeros((R, E), np.float32)
    Y[np.arange(R), X[:, 1].argmax(1)] = 1.0  # source 1 tells the answer
    free, _ = newton_softmax(X, Y, np.zeros(R, int), np.zeros((1, S)), iters=20, ridge=1.0)
    held, _ = newton_softmax(X, Y, np.zeros(R, int), np.zeros((1, S)), iters=20, ridge=np.array([1.0, 1e6]))
    assert free[0, 1] > 1.0 and abs(held[0, 1]) < 0.01
