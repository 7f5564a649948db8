"""Affinity counts and plan figures against brute-force loops over tokens."""
import numpy as np
import pytest

from placement.affinity import AffinityStats, synthetic_affinity_trace
from placement.metrics import cross_fraction_fast, evaluate
from placement.plan import PlacementPlan
from routing.trace import RoutingTrace


def _brute_pairs(ids, E):
    L, T, K = ids.shape
    n = np.zeros((L - 1, E, E), dtype=np.int64)
    for l in range(L - 1):
        for t in range(T):
            for a in ids[l, t]:
                for b in ids[l + 1, t]:
                    if a >= 0 and b >= 0:
                        n[l, a, b] += 1
    return n


def test_pair_counts_match_brute_force_topk_with_dropped_slots():
    rng = np.random.default_rng(1)
    ids = rng.integers(-1, 5, size=(3, 40, 2))
    st = AffinityStats.from_trace(RoutingTrace(ids, 5))
    np.testing.assert_array_equal(st.pair_counts, _brute_pairs(ids, 5))
    np.testing.assert_array_equal(st.load[1], np.bincount(ids[1][ids[1] >= 0], minlength=5))
    assert st.pair_weight().sum() == pytest.approx(st.pair_counts.sum() / 4)


def test_planted_trace_has_strong_affinity():
    tr, groups = synthetic_affinity_trace(3, 8, 2, 500, top_k=2, stay=1.0, seed=3)
    st = AffinityStats.from_trace(tr)
    # with stay=1 no pair ever leaves its planted group
    for l in range(2):
        same = groups[l][:, None] == groups[l + 1][None, :]
        assert st.pair_counts[l][~same].sum() == 0
    assert st.concentration() > 1 / 8


@pytest.mark.parametrize("bad, msg", [
    (lambda: AffinityStats.from_trace(RoutingTrace(np.zeros((1, 4, 1), int), 2)), "at least 2"),
    (lambda: AffinityStats.from_trace(RoutingTrace(np.zeros((2, 0, 1), int), 2)), "no tokens"),
    (lambda: AffinityStats.from_trace(RoutingTrace(-np.ones((2, 3, 1), int), 2)), "-1"),
    (lambda: AffinityStats.from_trace(np.zeros((2, 3, 1))), "RoutingTrace"),
    (lambda: RoutingTrace(np.full((2, 3, 1), 7), 4), "num_experts"),
])
def test_malformed_traces_are_clear_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        bad()


def test_fast_cross_fraction_equals_token_simulation():
    rng = np.random.default_rng(0)
    tr = RoutingTrace(rng.integers(0, 8, size=(4, 300, 2)), 8, request_ids=np.arange(300) // 10)
    st = AffinityStats.from_trace(tr)
    for seed in range(3):
        a = np.stack([np.random.default_rng(seed + l).permutation(8) % 4 for l in range(4)])
        plan = PlacementPlan(a.tolist(), 4)
        assert cross_fraction_fast(plan, st) == pytest.approx(evaluate(plan, tr).cross_fraction)


def test_messages_top1_by_hand():
    # 2 ranks; expert e on rank e (2 experts). token 0 (origin 0): 0 -> 1 -> 1; token 1 (origin 1): 0 -> 0 -> 1
    ids = np.array([[[0], [0]], [[1], [0]], [[1], [1]]])
    tr = RoutingTrace(ids, 2, request_ids=np.array([0, 1]))
    f = evaluate(PlacementPlan([[0, 1]] * 3, 2), tr, hidden_size=10, dtype_bytes=2)
    # context-coherent: token 0 crosses at layer 1, token 1 starts on 1 -> expert at 0 (1 msg), crosses at 2
    assert f.cc_messages_per_token == pytest.approx(3 / 2)
    # standard EP: every layer, 2 messages when the expert is not on the origin
    # token 0: layers 1,2 remote -> 4; token 1: layers 0,1 remote -> 4
    assert f.ep_messages_per_token == pytest.approx(4.0)
    assert f.ep_bytes_per_token == pytest.approx(4.0 * 20)
    assert f.cross_fraction == pytest.approx(2 / 4)


def test_topk_context_coherent_combine_goes_to_heaviest_rank():
    # one token, top-2, experts 0 (rank 0) and 1 (rank 1); weight favours expert 1
    ids = np.array([[[0, 1]], [[1, 1]]])
    ids[1, 0, 1] = -1  # layer 1: only expert 1
    w = np.array([[[0.2, 0.8]], [[1.0, 0.0]]], dtype=np.float32)
    tr = RoutingTrace(ids, 2, weights=w, request_ids=np.array([0]))
    f = evaluate(PlacementPlan([[0, 1], [0, 1]], 2), tr)
    # layer 0: dispatch to rank 1 (1), combine to rank 1 from rank 0 (1); layer 1: home 1 = expert's rank (0)
    assert f.cc_messages_per_token == 2
    # EP from origin 0: layer 0 -> rank 1 and back (2), layer 1 -> rank 1 and back (2)
    assert f.ep_messages_per_token == 4


def test_replica_on_home_is_used():
    ids = np.array([[[0]], [[1]]])
    tr = RoutingTrace(ids, 2, request_ids=np.array([0]))
    plain = PlacementPlan([[0, 1], [0, 1]], 2)
    rep = PlacementPlan([[0, 1], [0, 1]], 2, replicas=({}, {1: (0,)}))
    assert evaluate(plain, tr).cross_fraction == 1.0
    assert evaluate(rep, tr).cross_fraction == 0.0
    with pytest.raises(ValueError, match="replicas"):
        cross_fraction_fast(rep, AffinityStats.from_trace(tr))
