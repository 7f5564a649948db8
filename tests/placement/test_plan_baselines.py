"""PlacementPlan JSON round trip and validation; baseline placements keep their promises."""
import json

import numpy as np
import pytest

from placement.affinity import AffinityStats, synthetic_affinity_trace
from placement.baselines import eplb, greedy_affinity, rank_capacity, round_robin
from placement.plan import PlacementPlan


def test_json_round_trip_with_replicas(tmp_path):
    plan = PlacementPlan([[0, 1, 2, 3], [3, 2, 1, 0]], 4, num_nodes=2, replicas=({1: (0, 3)}, {}),
                         method="x", objective={"cross_pairs": 3}, solve_time_s=1.5, solver_status="OPTIMAL")
    back = PlacementPlan.load(plan.save(tmp_path / "p.json"))
    assert back.to_dict() == plan.to_dict()
    assert back.ranks_of(0, 1) == (1, 0, 3) and back.experts_on(3, 0) == [1, 3]
    assert back.node_of(3) == 1 and back.ranks_per_node == 2


@pytest.mark.parametrize("d, msg", [
    ({"format": "other"}, "not a PlacementPlan"),
    ({"format": "moeflow.PlacementPlan", "version": 99}, "version"),
    ({"format": "moeflow.PlacementPlan", "version": 1, "num_ranks": 2}, "lacks"),
    ({"format": "moeflow.PlacementPlan", "version": 1, "num_ranks": 2, "assignment": [[0, 2]]}, "0..1"),
    ({"format": "moeflow.PlacementPlan", "version": 1, "num_ranks": 2, "assignment": [[0, 1]],
      "replicas": [{"0": [0]}]}, "primary"),
    ({"format": "moeflow.PlacementPlan", "version": 1, "num_ranks": 3, "num_nodes": 2,
      "assignment": [[0, 1]]}, "divisor"),
])
def test_invalid_plans_are_clear_errors(d, msg):
    with pytest.raises(ValueError, match=msg):
        PlacementPlan.from_dict(d)


def test_load_rejects_non_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        PlacementPlan.load(p)
    with pytest.raises(FileNotFoundError):
        PlacementPlan.load(tmp_path / "none.json")


def test_rank_capacity():
    assert rank_capacity(8, 4) == (2, 2)
    assert rank_capacity(6, 4, "relaxed") == (1, 2)
    with pytest.raises(ValueError, match="divisible"):
        rank_capacity(6, 4)
    with pytest.raises(ValueError, match="at least one"):
        rank_capacity(3, 4, "relaxed")


@pytest.fixture(scope="module")
def stats():
    tr, _ = synthetic_affinity_trace(5, 16, 4, 2000, top_k=2, stay=0.8, seed=2)
    return AffinityStats.from_trace(tr)


def test_round_robin_and_greedy_are_balanced(stats):
    for plan in (round_robin(5, 16, 4), greedy_affinity(stats, 4)):
        assert (plan.experts_per_rank() == 4).all()
    g = greedy_affinity(stats, 4)
    r = round_robin(5, 16, 4, stats=stats)
    assert g.objective["cross_pairs"] < r.objective["cross_pairs"]


def test_greedy_relaxed_respects_floor_and_ceil(stats):
    sub = AffinityStats(stats.pair_counts[:, :14, :14], stats.load[:, :14], stats.num_tokens, stats.top_k)
    counts = greedy_affinity(sub, 4, balance="relaxed").experts_per_rank()
    assert counts.min() >= 3 and counts.max() <= 4


def test_eplb_replicates_hot_experts_and_balances_load(stats):
    plan = eplb(stats, 4, extra_slots_per_rank=1)
    per_rank = plan.experts_per_rank()
    assert per_rank.max() <= 5 and per_rank.sum(1).min() > 16  # extra copies were made
    for l in range(5):
        hot = int(np.argmax(stats.load[l]))
        assert len(plan.ranks_of(l, hot)) > 1
        # every expert has exactly one primary; replicas sit on distinct ranks
        for e in range(16):
            assert len(set(plan.ranks_of(l, e))) == len(plan.ranks_of(l, e))
    json.dumps(plan.to_dict())
