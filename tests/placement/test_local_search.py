"""Local search of the placement program: exact layer moves (against brute force), descents
that never make a plan worse and keep the balance, local optima that no pairwise swap
improves, crossover and multi-start on small synthetic traces."""
import itertools
import time

import numpy as np
import pytest

from placement.affinity import AffinityStats, synthetic_affinity_trace
from placement.baselines import greedy_assignment
from placement.ilp import SolverConfig, _problem, _score
from placement.local_search import (assign_layer, crossover, descent, layer_affinity, multi_start,
                                    random_start)
from placement.metrics import cross_counts

L, E, P = 6, 16, 4


@pytest.fixture(scope="module")
def stats():
    trace, _ = synthetic_affinity_trace(L, E, 4, 1500, top_k=2, stay=0.6, seed=11)
    return AffinityStats.from_trace(trace)


def _far():
    return time.perf_counter() + 60.0


def _hops(a, st, node_size=0):
    c, x = cross_counts(a, st, node_size or None)
    return c + x


def test_assign_layer_is_the_exact_optimum():
    rng = np.random.default_rng(0)
    for lo, hi in ((2, 2), (1, 3)):
        aff = rng.integers(0, 50, (6, 3))
        got = assign_layer(aff, lo, hi)
        sizes = np.bincount(got, minlength=3)
        assert ((sizes >= lo) & (sizes <= hi)).all()
        best = max(sum(aff[i, q] for i, q in enumerate(a)) for a in itertools.product(range(3), repeat=6)
                   if all(lo <= a.count(q) <= hi for q in range(3)))
        assert aff[np.arange(6), got].sum() == best
    with pytest.raises(ValueError, match="cannot be put"):
        assign_layer(np.zeros((7, 3), dtype=np.int64), 2, 2)


def test_layer_affinity_against_a_loop(stats):
    a = random_start(L, E, P, np.random.default_rng(5))
    n = stats.pair_counts
    for layer in (0, 3, L - 1):
        want = np.zeros((E, P), dtype=np.int64)
        for i in range(E):
            for j in range(E):
                if layer > 0:
                    want[i, a[layer - 1, j]] += n[layer - 1][j, i]
                if layer < L - 1:
                    want[i, a[layer + 1, j]] += n[layer][i, j]
        np.testing.assert_array_equal(layer_affinity(n, a, layer, P), want)


def test_descent_never_worse_keeps_balance_and_no_swap_improves(stats):
    score = lambda a: cross_counts(a, stats)[0]  # noqa: E731
    rng = np.random.default_rng(1)
    starts = [greedy_assignment(stats, P)] + [random_start(L, E, P, rng) for _ in range(4)]
    for start in starts:
        for pairs_only in (True, False):
            a, sc = descent(stats.pair_counts, start, P, E // P, E // P, score, _far(), pairs_only=pairs_only)
            assert sc == score(a) <= score(start)
            assert all((np.bincount(a[l], minlength=P) == E // P).all() for l in range(L))
        # a local optimum of the layer moves: no swap of two experts of a layer on different ranks helps
        for l in range(L):
            for i, k in itertools.combinations(range(E), 2):
                if a[l, i] != a[l, k]:
                    b = a.copy()
                    b[l, i], b[l, k] = a[l, k], a[l, i]
                    assert score(b) >= sc


def test_descent_with_load_term_and_relaxed_balance(stats):
    cfg = SolverConfig(time_limit_s=5, balance="relaxed", relaxed_slack=1, load_weight=0.5)
    prob = _problem(stats.pair_counts, stats.load, 3, 5, 6, stats.top_k, cfg)  # 16 experts on 3 ranks
    score = lambda a: _score(prob, cfg, a)  # noqa: E731
    rng = np.random.default_rng(2)
    for _ in range(3):
        start = random_start(L, E, 3, rng)
        a, sc = descent(stats.pair_counts, start, 3, 5, 6, score, _far())
        assert sc == pytest.approx(score(a)) and sc <= score(start)
        sizes = np.stack([np.bincount(a[l], minlength=3) for l in range(L)])
        assert ((sizes >= 5) & (sizes <= 6)).all()


def test_two_node_descent_lowers_hop_cost(stats):
    rng = np.random.default_rng(3)
    score = lambda a: _hops(a, stats, 2)  # noqa: E731
    start = random_start(L, E, P, rng)
    a, sc = descent(stats.pair_counts, start, P, E // P, E // P, score, _far(), node_size=2, pairs_only=True)
    assert sc == score(a) < score(start)
    # the node-aware affinity is the rank's mass plus its node's
    aff = layer_affinity(stats.pair_counts, a, 2, P, node_size=2)
    plain = layer_affinity(stats.pair_counts, a, 2, P)
    np.testing.assert_array_equal(aff[:, 0], plain[:, 0] + plain[:, 0] + plain[:, 1])


def test_crossover_renames_parts_and_keeps_balance(stats):
    rng = np.random.default_rng(4)
    score = lambda a: cross_counts(a, stats)[0]  # noqa: E731
    A, _ = descent(stats.pair_counts, random_start(L, E, P, rng), P, E // P, E // P, score, _far())
    B = random_start(L, E, P, rng)
    pi = rng.permutation(P)
    child = crossover(stats.pair_counts, A, pi[A], 3, P)  # B = A with its parts renamed
    np.testing.assert_array_equal(child, A)  # the renaming is undone at the cut
    child = crossover(stats.pair_counts, A, B, 2, P)
    np.testing.assert_array_equal(child[:2], A[:2])
    assert all((np.bincount(child[l], minlength=P) == E // P).all() for l in range(L))


def test_multi_start_never_worse_than_its_hint(stats):
    score = lambda a: cross_counts(a, stats)[0]  # noqa: E731
    hint = greedy_assignment(stats, P)
    _, from_hint = descent(stats.pair_counts, hint, P, E // P, E // P, score, _far(), pairs_only=True)
    a, sc, info = multi_start(stats.pair_counts, hint, P, E // P, E // P, score, time.perf_counter() + 3.0,
                              seed=0, pairs_only=True)
    assert sc == score(a) <= from_hint
    assert info["starts"] >= 1
    assert all((np.bincount(a[l], minlength=P) == E // P).all() for l in range(L))
