"""Expert copies placed where the tokens that need them already are (placement/replicate.py)."""
import numpy as np
import pytest

from placement.affinity import AffinityStats, synthetic_affinity_trace
from placement.baselines import round_robin
from placement.cli import main
from placement.metrics import evaluate
from placement.plan import PlacementPlan
from placement.replicate import add_affinity_replicas
from routing.trace import RoutingTrace


def test_a_copy_goes_where_its_tokens_come_from():
    # 3 layers, 4 experts on 2 ranks (0, 2 on rank 0; 1, 3 on rank 1), top-1, one copy per rank.
    # Tokens of request 0 start on rank 0, those of request 1 on rank 1.
    # Layer 0: everyone uses expert 1 (rank 1): rank 0 copies it, so request 0 stays home.
    # Layer 1: everyone uses expert 2 (rank 0). A copy on rank 1 would keep request 1's move into
    #   layer 1 local but make its move out cross (at layer 2 it uses expert 0, on rank 0): no gain,
    #   no copy. Layer 2: request 0 uses expert 3 (rank 1): rank 0 copies it; request 1 uses 0.
    T = 40
    req = np.repeat([0, 1], T // 2).astype(np.int32)
    ids = np.zeros((3, T, 1), np.int16)
    ids[0], ids[1] = 1, 2
    ids[2, :, 0] = np.where(req == 0, 3, 0)
    trace = RoutingTrace(ids, num_experts=4, request_ids=req)
    base = PlacementPlan([[0, 1, 0, 1]] * 3, 2)
    plan = add_affinity_replicas(base, trace, 1)
    assert plan.replicas == ({1: (0,)}, {}, {3: (0,)})
    assert evaluate(base, trace).cross_fraction == 0.75  # layer 0 -> 1 all cross, 1 -> 2 half
    assert evaluate(plan, trace).cross_fraction == 0.25  # only request 1's move into layer 1
    assert plan.method == "manual+rep1" and plan.meta["extra_slots"] == 1 and plan.copy_choice == "home"
    # no slot to spare: the plan as it was
    assert add_affinity_replicas(base, trace, 0).replicas is None


@pytest.fixture(scope="module")
def planted():
    return synthetic_affinity_trace(4, 16, 4, 3000, top_k=2, stay=0.9, seed=5)[0]


@pytest.mark.parametrize("copies", ["affinity", "load"])
def test_copies_respect_the_slot_budget_and_beat_the_plan_without(planted, copies, tmp_path):
    base = round_robin(4, 16, 4)
    f0 = evaluate(base, planted)
    for extra in (1, 2):
        plan = add_affinity_replicas(base, planted, extra, copies)
        per_rank = np.zeros((4, 4), int)
        for l, reps in enumerate(plan.replicas):
            for e, ranks in reps.items():
                assert base.assignment[l][e] not in ranks  # never a copy beside its primary
                per_rank[l, list(ranks)] += 1
        assert per_rank.max() <= extra and per_rank.sum() > 0
        f = evaluate(plan, planted)
        if copies == "affinity":
            assert f.cross_fraction < f0.cross_fraction - 0.05
            # from a near-perfect plan, affinity copies must not make things worse
            from placement.ilp import SolverConfig, solve_exflow
            good = solve_exflow(AffinityStats.from_trace(planted), 4, 1, SolverConfig(time_limit_s=3, num_workers=2))
            assert evaluate(add_affinity_replicas(good, planted, extra), planted).cross_fraction \
                <= evaluate(good, planted).cross_fraction + 1e-12
        else:
            assert f.load_imbalance <= f0.load_imbalance + 1e-9
        # a plan with copies round-trips through JSON like any other, its copy choice with it
        back = PlacementPlan.load(plan.save(tmp_path / f"{copies}{extra}.json"))
        assert back.replicas == plan.replicas
        assert back.copy_choice == plan.copy_choice == ("home" if copies == "affinity" else "spread")


def test_bad_arguments_are_clear_errors(planted):
    base = round_robin(4, 16, 4)
    with pytest.raises(ValueError, match="extra_slots must be >= 0"):
        add_affinity_replicas(base, planted, -1)
    with pytest.raises(ValueError, match="leaves no expert to copy"):
        add_affinity_replicas(base, planted, 13)
    with pytest.raises(ValueError, match="copies must be one of"):
        add_affinity_replicas(base, planted, 1, "random")
    with pytest.raises(ValueError, match="experts"):
        add_affinity_replicas(round_robin(4, 8, 4), planted, 1)


def test_cli_extra_slots_prints_both_plans_and_writes_the_copies(tmp_path, planted, capsys):
    path = planted.save(tmp_path / "t.npz")
    out = tmp_path / "plan.json"
    assert main(["place", str(path), "--gpus", "4", "--time-limit", "3", "--extra-slots", "1",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "exflow_cpsat+rep1" in text and "\nexflow_cpsat " in text and "eplb" in text
    plan = PlacementPlan.load(out)
    assert plan.method == "exflow_cpsat+rep1" and plan.replicas is not None
    assert main(["place", str(path), "--gpus", "4", "--time-limit", "3", "--extra-slots", "2",
                 "--copies", "load"]) == 0
    assert "exflow_cpsat+load2" in capsys.readouterr().out


def test_a_token_without_a_copy_at_home_takes_one_on_its_node_and_runtime_agrees():
    """2 nodes x 2 ranks; expert 0 on rank 0 with copies on ranks 1 and 2, expert 1 on rank 3 alone.
    A token homed on rank 3 (node 1) takes the copy on rank 2 (its node), one homed on rank 1 its
    own copy; the simulation (metrics) and the runtime layer pick alike on random routings."""
    import torch

    from placement.metrics import _slot_ranks
    from placement.runtime import ExpertParallelExperts, TokenState, copies_table
    plan = PlacementPlan([[0, 3, 1, 2]], 4, num_nodes=2, replicas=({0: (1, 2)},))
    ids = np.array([[0], [0], [0], [1]])
    home = np.array([3, 1, 0, 0])
    assert _slot_ranks(plan, 0, ids, home)[:, 0].tolist() == [2, 1, 0, 3]
    # copy_choice "home": copies serve their home's tokens only; the rest go to the primary
    home_only = PlacementPlan([[0, 3, 1, 2]], 4, num_nodes=2, replicas=({0: (1, 2)},), copy_choice="home")
    assert _slot_ranks(home_only, 0, ids, home)[:, 0].tolist() == [0, 1, 0, 3]
    rng = np.random.default_rng(0)
    for p in (plan, home_only):
        layer = ExpertParallelExperts(torch.zeros(3, 4, 2), torch.zeros(3, 2, 2), [0], copies_table(p, 0),
                                      TokenState(0, 4, "coherent"), first_layer=True, ranks_per_node=2,
                                      copy_choice=p.copy_choice)
        for _ in range(5):
            ids = rng.integers(-1, 4, (50, 2))
            home = rng.integers(0, 4, 50)
            want = _slot_ranks(p, 0, ids, home)
            got = layer._slot_ranks(torch.as_tensor(ids), torch.as_tensor(home)).numpy()
            assert (got == want).all()
    with pytest.raises(ValueError, match="copy_choice"):
        PlacementPlan([[0, 1]], 2, copy_choice="nearest")
