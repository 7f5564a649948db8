import numpy as np
import pytest

from routing import synthesize
from routing.stats import (affinity_concentration, popularity, popularity_entropy, reuse_distance_histogram,
                           reuse_distances, summarize, format_summary, transition_counts)
from routing.trace import RoutingTrace

SMALL = dict(num_layers=4, num_experts=16, top_k=2, num_requests=8, tokens_per_request=64)


def test_shapes_determinism_and_distinct_experts():
    a = synthesize(**SMALL, affinity=0.5, temporal_locality=0.3, seed=3)
    b = synthesize(**SMALL, affinity=0.5, temporal_locality=0.3, seed=3)
    np.testing.assert_array_equal(a.expert_ids, b.expert_ids)
    assert a.expert_ids.shape == (4, 8 * 64, 2)
    s = np.sort(a.expert_ids, -1)
    assert (s[..., 1:] != s[..., :-1]).all(), "a token's k experts must be distinct"
    np.testing.assert_array_equal(a.request_ids[:8], np.arange(8))  # interleaved like decode steps
    p = synthesize(**SMALL, planted_paths=6, path_noise=0.2, seed=1)
    s = np.sort(p.expert_ids, -1)
    assert (s[..., 1:] != s[..., :-1]).all()


def test_knobs_move_the_statistics_they_control():
    flat = synthesize(**SMALL, popularity_skew=0.0, seed=0)
    skew = synthesize(**SMALL, popularity_skew=1.5, seed=0)
    assert popularity_entropy(skew).mean() < popularity_entropy(flat).mean() - 0.3
    assert popularity_entropy(flat).mean() > 3.8  # ~ log2(16) = 4

    aff = synthesize(**SMALL, popularity_skew=0.0, affinity=0.9, seed=0)
    c0, c1 = affinity_concentration(flat), affinity_concentration(aff)
    # each slot follows its expert's successor: about (0.9 + a little) of 2 slots, vs k/E = 0.125
    assert c1["topk_mass"].min() > 0.45 > 0.3 > c0["topk_mass"].max()
    assert c0["topk_mass"].mean() < 3 * c0["uniform_mass"]
    assert c1["cond_entropy_bits"].mean() < c0["cond_entropy_bits"].mean() - 0.6

    loc = synthesize(**SMALL, popularity_skew=0.0, temporal_locality=0.8, seed=0)
    assert reuse_distance_histogram(loc)["1"] > 0.75 > 0.3 > reuse_distance_histogram(flat)["1"]
    text = format_summary(summarize(loc))
    assert "reuse distance" in text and "affinity" in text


def test_statistics_on_a_hand_made_trace():
    # layer 0: token experts {0,1}, {0,2}, {0,1} of request 0; layer 1: {3}, ... ; top_k 2 / 1
    ids = np.array([[[0, 1], [0, 2], [0, 1]], [[3, -1], [3, -1], [2, -1]]])
    t = RoutingTrace(ids, 4, request_ids=[0, 0, 0])
    np.testing.assert_allclose(popularity(t)[0], [1.0, 2 / 3, 1 / 3, 0.0])
    C = transition_counts(t, 0)
    assert C[0, 3] == 2 and C[0, 2] == 1 and C[1, 3] == 1 and C[1, 2] == 1 and C.sum() == 6
    d = reuse_distances(t)
    # layer 0: e0 at 0,1,2 -> cold,1,1; e1 at 0,2 -> cold,2; e2 cold; layer 1: e3 cold,1; e2 cold
    assert sorted(d.tolist()) == sorted([-1, 1, 1, -1, 2, -1, -1, 1, -1])
    h = reuse_distance_histogram(t)
    assert h["cold"] == pytest.approx(5 / 9) and h["1"] == pytest.approx(3 / 9)


@pytest.mark.parametrize("bad", [dict(top_k=20), dict(affinity=1.5), dict(popularity_skew=-1),
                                 dict(planted_paths=500, num_experts=4, top_k=2)])
def test_bad_arguments(bad):
    kw = {**SMALL, **bad}
    with pytest.raises(ValueError):
        synthesize(**kw)
