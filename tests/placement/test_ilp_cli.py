"""The ExFlow integer program: recovers planted affinity, beats the baselines, respects balance;
and the `moe place` command."""
import numpy as np
import pytest

from placement.affinity import AffinityStats, synthetic_affinity_trace
from placement.baselines import greedy_affinity, round_robin
from placement.cli import main
from placement.ilp import SolverConfig, solve_exflow
from placement.metrics import cross_counts, evaluate
from placement.plan import PlacementPlan

FAST = SolverConfig(time_limit_s=10.0, num_workers=2)


@pytest.fixture(scope="module")
def planted():
    return synthetic_affinity_trace(4, 16, 4, 3000, top_k=2, stay=0.9, seed=5)


def test_recovers_planted_groups_and_beats_baselines(planted):
    trace, groups = planted
    st = AffinityStats.from_trace(trace)
    plan = solve_exflow(st, 4, config=FAST)
    a = plan.assignment_array()
    assert (plan.experts_per_rank() == 4).all()
    # each rank holds exactly one planted group per layer, and the same token group across layers
    for l in range(4):
        for r in range(4):
            assert len(set(groups[l][a[l] == r])) == 1
    f = evaluate(plan, trace)
    rr = evaluate(round_robin(4, 16, 4), trace)
    gr = evaluate(greedy_affinity(st, 4), trace)
    assert f.cross_fraction <= gr.cross_fraction + 1e-12
    assert f.cross_fraction < 0.5 * rr.cross_fraction
    # the planted jumps (1 - stay) land on another group 3 times in 4
    assert f.cross_fraction < 0.1
    assert plan.objective["cross_pairs"] == cross_counts(a, st)[0]


def test_lns_windows_solve_long_models():
    trace, _ = synthetic_affinity_trace(9, 16, 4, 1500, top_k=1, stay=0.85, seed=7)
    st = AffinityStats.from_trace(trace)
    cfg = SolverConfig(time_limit_s=10.0, window_pairs=40)  # forces windows of a few layers
    plan = solve_exflow(st, 4, config=cfg)
    assert "LNS(" in plan.solver_status
    assert (plan.experts_per_rank() == 4).all()
    assert plan.objective["cross_pairs"] <= greedy_affinity(st, 4).objective["cross_pairs"]
    assert plan.objective["cross_pairs"] < 0.5 * round_robin(9, 16, 4, stats=st).objective["cross_pairs"]


@pytest.mark.parametrize("multi_node", ["joint", "hierarchical"])
def test_two_nodes_minimise_hop_cost(planted, multi_node):
    trace, _ = planted
    st = AffinityStats.from_trace(trace)
    plan = solve_exflow(st, 4, num_nodes=2, config=SolverConfig(time_limit_s=6, multi_node=multi_node))
    assert plan.num_nodes == 2 and (plan.experts_per_rank() == 4).all()
    f, rr = evaluate(plan, trace), evaluate(round_robin(4, 16, 4, num_nodes=2), trace)
    gr = evaluate(greedy_affinity(st, 4, num_nodes=2), trace)
    assert f.cross_node_fraction < 0.5 * rr.cross_node_fraction
    assert f.hop_cost < 0.5 * rr.hop_cost and f.hop_cost <= gr.hop_cost + 1e-12
    assert plan.objective["hop_cost_pairs"] == sum(cross_counts(plan.assignment_array(), st, 2))
    if multi_node == "hierarchical":
        assert "nodes:" in plan.solver_status and plan.method == "exflow_hier"


def test_joint_node_objective_prefers_keeping_moves_inside_a_node():
    # 4 ranks on 2 nodes; planted groups are 4, and tokens of group g jump only to group g^1
    # (its "partner"): the best plan puts partners on the same node
    trace, groups = synthetic_affinity_trace(4, 8, 4, 2000, top_k=1, stay=1.0, seed=9)
    ids = trace.expert_ids.astype(np.int64)
    rng = np.random.default_rng(0)
    g_T = groups[0][ids[0, :, 0]]
    for l in range(1, 4):
        jump = rng.random(trace.num_tokens) < 0.3
        g_T = np.where(jump, g_T ^ 1, g_T)
        members = [np.flatnonzero(groups[l] == g) for g in range(4)]
        ids[l, :, 0] = [members[g][rng.integers(len(members[g]))] for g in g_T]
    from routing.trace import RoutingTrace
    tr = RoutingTrace(ids, 8)
    st = AffinityStats.from_trace(tr)
    plan = solve_exflow(st, 4, num_nodes=2, config=SolverConfig(time_limit_s=5))
    f = evaluate(plan, tr)
    assert f.cross_fraction > 0.2  # the jumps cross GPUs ...
    assert f.cross_node_fraction < 0.02  # ... but not nodes


def test_impossible_balance_is_a_clear_error_and_relaxed_mode_works():
    trace, _ = synthetic_affinity_trace(3, 6, 2, 300, top_k=1, seed=1)
    st = AffinityStats.from_trace(trace)
    with pytest.raises(ValueError, match="divisible"):
        solve_exflow(st, 4, config=FAST)
    with pytest.raises(ValueError, match="at least one"):
        solve_exflow(st, 8, config=SolverConfig(time_limit_s=5, balance="relaxed"))
    plan = solve_exflow(st, 4, config=SolverConfig(time_limit_s=5, balance="relaxed"))
    c = plan.experts_per_rank()
    assert c.min() >= 1 and c.max() <= 2
    slack = solve_exflow(st, 4, config=SolverConfig(time_limit_s=5, balance="relaxed", relaxed_slack=1,
                                                    overfill_penalty=0.0))
    assert slack.experts_per_rank().max() <= 3
    assert slack.objective["cross_pairs"] <= plan.objective["cross_pairs"]
    with pytest.raises(ValueError, match="relaxed"):
        SolverConfig(relaxed_slack=1)


def test_load_weight_trades_affinity_for_even_load():
    # two planted groups, one carrying most tokens: pure affinity puts the hot group on one rank
    trace, groups = synthetic_affinity_trace(3, 8, 2, 1200, top_k=1, stay=1.0, seed=4)
    g_T = groups[0][trace.expert_ids[0, :, 0]]
    keep = (g_T == 0) | (np.random.default_rng(0).random(trace.num_tokens) < 0.1)
    trace = trace.select_tokens(keep)
    st = AffinityStats.from_trace(trace)
    plain = solve_exflow(st, 2, config=FAST)
    balanced = solve_exflow(st, 2, config=SolverConfig(time_limit_s=10.0, load_weight=5.0))
    fp, fb = evaluate(plain, trace), evaluate(balanced, trace)
    assert fp.cross_fraction < 0.01 and fp.load_imbalance > 1.6
    assert fb.load_imbalance < fp.load_imbalance - 0.3
    assert fb.cross_fraction > fp.cross_fraction  # the price paid in affinity
    # `moe place` warns about the concentrated plan, not about the balanced one
    from placement.cli import load_note
    rr = round_robin(trace.num_layers, trace.num_experts, 2, 1, st)
    rows = [(p, evaluate(p, trace).as_dict()) for p in (plain, balanced, rr)]
    assert "--load-weight" in load_note([rows[0], rows[2]])
    assert load_note([rows[1], rows[2]]) is None


def test_cli_prints_every_baseline_and_writes_the_plan(tmp_path, planted, capsys):
    trace, _ = planted
    path = trace.save(tmp_path / "t.npz")
    out = tmp_path / "plan.json"
    assert main(["place", str(path), "--gpus", "4", "--time-limit", "5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for m in ("exflow_cpsat", "round_robin", "greedy_affinity", "eplb", "fewer"):
        assert m in text
    plan = PlacementPlan.load(out)
    assert plan.num_ranks == 4 and "cross_fraction" in plan.objective
    assert main(["place", str(path), "--gpus", "4", "--nodes", "2", "--time-limit", "3"]) == 0
    assert "exflow_hier" in capsys.readouterr().out


def test_synthetic_trace_arguments_are_checked():
    with pytest.raises(ValueError, match="equal groups"):
        synthetic_affinity_trace(2, 10, 4, 10)
    with pytest.raises(ValueError, match="probability"):
        synthetic_affinity_trace(2, 8, 4, 10, stay=1.5)


def test_cli_errors_are_messages(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros(3))
    assert main(["place", str(bad), "--gpus", "2"]) == 2
    assert "RoutingTrace" in capsys.readouterr().err
    assert main(["place", str(tmp_path / "missing.npz"), "--gpus", "2"]) == 2
