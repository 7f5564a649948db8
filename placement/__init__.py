"""Placement: which rank (GPU or CPU host) holds each expert; the ExFlow integer program,
baselines, and the expert-parallel runtime. Computing a plan needs no GPU.

    stats = AffinityStats.from_trace(trace)
    plan = solve_exflow(stats, num_ranks=8, num_nodes=1, config=SolverConfig(time_limit_s=60))
    evaluate(plan, trace)          # cross-rank fraction, bytes per token (standard vs context-coherent EP)
    plan.save("plan.json"); PlacementPlan.load("plan.json")

The runtime (placement.runtime: Ray actors, torch.distributed) is imported on its own, so
that planning needs neither Ray nor a process group.
"""
from .affinity import AffinityStats, synthetic_affinity_trace
from .baselines import eplb, greedy_affinity, rank_capacity, round_robin
from .metrics import PlanFigures, cross_fraction_fast, evaluate
from .plan import PlacementPlan

__all__ = ["AffinityStats", "synthetic_affinity_trace", "eplb", "greedy_affinity", "rank_capacity", "round_robin",
           "SolverConfig", "solve_exflow", "PlanFigures", "cross_fraction_fast", "evaluate", "PlacementPlan",
           "CPUTierCost", "TierConfig", "TieredPlan", "TierStats", "solve_cpu_tier", "popularity_split",
           "tier_objective", "cpu_costs"]

_NEEDS_ORTOOLS = {"SolverConfig": "ilp", "solve_exflow": "ilp", "CPUTierCost": "cpu_tier", "TierConfig": "cpu_tier",
                  "TieredPlan": "cpu_tier", "TierStats": "cpu_tier", "solve_cpu_tier": "cpu_tier",
                  "popularity_split": "cpu_tier", "tier_objective": "cpu_tier", "cpu_costs": "cpu_tier"}


def __getattr__(name):
    # the solvers' modules are imported on first use; of them only solving needs OR-Tools
    # (local_search.ortools_module), so plans, the runtime and the adaptive layer work on machines
    # without it (the GPU machines have none)
    if name in _NEEDS_ORTOOLS:
        import importlib

        return getattr(importlib.import_module(f".{_NEEDS_ORTOOLS[name]}", __name__), name)
    raise AttributeError(f"module 'placement' has no attribute {name!r}")
