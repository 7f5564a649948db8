"""The CPU tier of the placement program: hot experts stay on GPUs, affine GPU experts share a
rank, the plan beats the popularity split on its objective, plans round-trip through JSON, and
impossible capacities are a clear error."""
import numpy as np
import pytest

from placement.cpu_tier import (CPUTierCost, TierConfig, TieredPlan, TierStats, cpu_costs, popularity_split,
                                solve_cpu_tier, tier_objective)
from routing.synthetic import synthesize

B = 100  # bytes per expert (capacities are counted in bytes)


@pytest.fixture(scope="module")
def stats():
    tr = synthesize(num_layers=4, num_experts=8, top_k=2, num_requests=8, tokens_per_request=32,
                    popularity_skew=1.2, affinity=0.8, temporal_locality=0.3, seed=1)
    return TierStats.from_trace(tr, tokens_per_step=4)


def _cfg(P=2, gpu_experts=8, host_experts=(12, 12), **kw):
    return TierConfig(gpu_bytes=[gpu_experts * B // P] * P, host_bytes=[h * B for h in host_experts],
                      expert_bytes=B, tokens_per_step=4, time_limit_s=5, **kw)


def test_stats_count_uses_per_step(stats):
    tr = synthesize(num_layers=2, num_experts=4, top_k=1, num_requests=2, tokens_per_request=4, seed=0)
    s = TierStats.from_trace(tr, tokens_per_step=2)
    ids = tr.expert_ids.astype(int)
    for l in range(2):
        for e in range(4):
            want = sum(int((ids[l, t:t + 2] == e).any()) for t in range(0, ids.shape[1], 2))
            assert s.uses[l, e] == want
    assert (stats.uses <= stats.affinity.load).all() and (stats.uses > 0).any()


def test_hot_experts_stay_on_gpu_and_capacities_hold(stats):
    cfg = _cfg()
    plan = solve_cpu_tier(stats, cfg)
    loc = plan.location_array()
    on_gpu = loc < 2
    cc = cpu_costs(stats, cfg.cost)
    # the GPU holds exactly the experts that would cost the most on a CPU
    assert on_gpu.sum() == 8
    assert cc[on_gpu].min() >= cc[~on_gpu].max()
    assert stats.affinity.load[on_gpu].mean() > 2 * stats.affinity.load[~on_gpu].mean()
    per = np.bincount(loc.reshape(-1), minlength=4)
    assert (per <= cfg.capacity_experts).all(), per
    assert plan.objective["total_s"] == pytest.approx(tier_objective(loc, 2, stats, cfg.cost)["total_s"])


def test_beats_popularity_split_and_keeps_affine_experts_together(stats):
    cfg = _cfg(cost=CPUTierCost(gpu_hop_s=2e-3))
    plan, base = solve_cpu_tier(stats, cfg), popularity_split(stats, cfg)
    assert plan.objective["total_s"] < base.objective["total_s"]
    assert plan.objective["cross_gpu_moves"] < base.objective["cross_gpu_moves"]
    # the heaviest pairs (top 4 per transition) whose experts are both on GPUs sit on one rank
    # more often in the plan than in the popularity split
    w = stats.affinity.pair_counts

    def together(loc):
        heavy = [(l, i, j) for l in range(3) for i in range(8) for j in range(8)
                 if loc[l, i] < 2 and loc[l + 1, j] < 2 and w[l, i, j] >= np.sort(w[l].ravel())[-4]]
        return np.mean([loc[l, i] == loc[l + 1, j] for l, i, j in heavy])
    assert together(plan.location_array()) > together(base.location_array())
    assert together(plan.location_array()) >= 0.6


def test_plan_json_round_trip_and_views(stats, tmp_path):
    plan = solve_cpu_tier(stats, _cfg())
    back = TieredPlan.load(plan.save(tmp_path / "tier.json"))
    assert back.location == plan.location and back.objective == plan.objective and back.num_hosts == 2
    ht = plan.host_table()
    assert sorted(plan.experts_on_host(0) + plan.experts_on_host(1)) == sorted(map(tuple, np.argwhere(ht >= 0)))
    gp = plan.gpu_plan()
    assert gp.num_ranks == 2 and all(gp.assignment[l][e] == plan.location[l][e] for l in range(4)
                                     for e in plan.gpu_experts(l))
    spread = TieredPlan.on_hosts(4, 8, 3)
    assert spread.counts()["gpu"] == 0 and max(spread.counts()["per_location"][1:]) - \
        min(spread.counts()["per_location"][1:]) <= 1
    with pytest.raises(ValueError, match="not a TieredPlan"):
        TieredPlan.from_dict({"format": "x"})
    with pytest.raises(ValueError, match="locations must lie in 0..2"):
        TieredPlan([[0, 3]], num_gpu_ranks=1, num_hosts=2)


def test_impossible_capacities_are_clear_errors(stats):
    with pytest.raises(ValueError, match=r"the 32 experts .* do not fit: .* give the hosts more memory"):
        solve_cpu_tier(stats, _cfg(gpu_experts=4, host_experts=(10, 10)))
    with pytest.raises(ValueError, match="no CPU hosts and the GPUs hold 8 of 32"):
        popularity_split(stats, _cfg(host_experts=()))
    with pytest.raises(ValueError, match="expert_bytes must be > 0"):
        TierConfig(gpu_bytes=[1], host_bytes=[1], expert_bytes=0)
    with pytest.raises(ValueError, match="cpu_base_s must be >= 0"):
        CPUTierCost(cpu_base_s=-1)
