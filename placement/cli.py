"""`moe place TRACE --gpus N [--nodes M] [--time-limit S] [--extra-slots C [--copies load]] [--out plan.json]`

Fits the ExFlow placement to a routing trace and prints its figures next to every baseline.
The hub (moe/cli.py) imports this module lazily and calls ``register(subparsers)``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from routing.trace import RoutingTrace

from .affinity import AffinityStats
from .baselines import eplb, greedy_affinity, round_robin
from .ilp import SolverConfig, solve_exflow
from .metrics import evaluate
from .plan import PlacementPlan
from .replicate import COPY_MODES, add_affinity_replicas

_COLUMNS = ("cross_fraction", "cross_node_fraction", "hop_cost", "cc_bytes_per_token", "ep_bytes_per_token",
            "load_imbalance")


def format_table(rows: list[tuple[PlacementPlan, dict]]) -> str:
    head = f"{'method':<16}{'cross':>8}{'x-node':>8}{'hops':>8}{'CC B/tok':>12}{'EP B/tok':>12}{'imbal':>7}{'solve s':>9}"
    lines = [head, "-" * len(head)]
    for plan, f in rows:
        lines.append(f"{plan.method:<16}{f['cross_fraction']:>8.3f}{f['cross_node_fraction']:>8.3f}"
                     f"{f['hop_cost']:>8.3f}{f['cc_bytes_per_token']:>12.0f}{f['ep_bytes_per_token']:>12.0f}"
                     f"{f['load_imbalance']:>7.2f}{plan.solve_time_s:>9.2f}")
    return "\n".join(lines)


def place(trace: RoutingTrace, gpus: int, nodes: int = 1, config: SolverConfig | None = None,
          hidden_size: int = 4096, dtype_bytes: int = 2, extra_slots: int = 0, copies: str = "affinity"
          ) -> tuple[PlacementPlan, list[tuple[PlacementPlan, dict]]]:
    """The ExFlow plan and [(plan, figures)] for it and every baseline, the plan first; with
    ``extra_slots``, the plan with that many expert copies per rank (placement/replicate.py) comes
    first, then the plan without them, and EPLB gets the same number of extra slots."""
    stats = AffinityStats.from_trace(trace)
    plan = solve_exflow(stats, gpus, nodes, config)
    first = [add_affinity_replicas(plan, trace, extra_slots, copies)] if extra_slots else []
    others = [] if nodes == 1 else [solve_exflow(stats, gpus, nodes, replace(
        config or SolverConfig(), multi_node="hierarchical"))]  # ExFlow's own two-stage method
    others += [round_robin(trace.num_layers, trace.num_experts, gpus, nodes, stats),
              greedy_affinity(stats, gpus, nodes, (config or SolverConfig()).balance),
              eplb(stats, gpus, nodes, max(1, extra_slots))]
    rows = [(p, evaluate(p, trace, hidden_size, dtype_bytes).as_dict()) for p in first + [plan] + others]
    plan, figs = rows[0][0], rows[0][1]
    plan = replace(plan, objective={**plan.objective, **figs},
                   meta={**plan.meta, "trace": trace.meta, "hidden_size": hidden_size, "dtype_bytes": dtype_bytes})
    return plan, rows


def load_note(rows: list[tuple[PlacementPlan, dict]], tolerance: float = 1.25) -> str | None:
    """A warning when the plan (rows[0]) loads its busiest rank much more than round robin does.

    Measured on 4 H200s (BENCHMARKS.md 6b): a plan with 3.6x fewer rows moved but 2.34x the mean
    token load on its busiest rank (round robin: 1.30x) ran 13% slower than round robin, because
    all-to-alls over NVLink are ~9% of a step and the busiest rank sets its pace."""
    plan_imb = rows[0][1]["load_imbalance"]
    rr_imb = next(f for p, f in rows if p.method == "round_robin")["load_imbalance"]
    if plan_imb <= tolerance * rr_imb:
        return None
    return (f"note: this plan's busiest rank carries {plan_imb:.2f}x the mean token load (round robin: {rr_imb:.2f}x). "
            "Where all-to-alls are cheap (GPUs joined by NVLink) the busiest rank sets the step time and such a "
            "plan can be slower than round robin; --load-weight 1 to 2, or --extra-slots N --copies load, trades "
            "some affinity for balance")


def _run(args: argparse.Namespace) -> int:
    trace = RoutingTrace.load(args.trace)
    cfg = SolverConfig(time_limit_s=args.time_limit, num_workers=args.workers, balance=args.balance,
                       load_weight=args.load_weight, search_share=args.search_share)
    plan, rows = place(trace, args.gpus, args.nodes, cfg, args.hidden_size, args.dtype_bytes, args.extra_slots,
                       args.copies)
    print(f"{trace!r} -> {args.gpus} ranks on {args.nodes} node(s); solver status: {plan.solver_status}")
    print(format_table(rows))
    rr = next(f for p, f in rows if p.method == "round_robin")["cross_fraction"]
    if rr > 0:
        print(f"cross-rank transitions vs round robin: {100 * (1 - rows[0][1]['cross_fraction'] / rr):.1f}% fewer")
    note = load_note(rows)
    if note:
        print(note)
    if args.out:
        path = plan.save(args.out)
        print(f"plan written to {path}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("place", help="place experts on ranks from a routing trace (ExFlow ILP)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="routing trace .npz (RoutingTrace.save)")
    p.add_argument("--gpus", type=int, required=True, help="number of ranks (GPUs) in total")
    p.add_argument("--nodes", type=int, default=1, help="machines the ranks are spread over (cross-node costs 2)")
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit in seconds")
    p.add_argument("--workers", type=int, default=2, help="CP-SAT worker threads")
    p.add_argument("--balance", choices=("strict", "relaxed"), default="strict")
    p.add_argument("--load-weight", type=float, default=0.0, help="token-load balance weight λ")
    p.add_argument("--search-share", type=float, default=0.5,
                   help="share of the time for the multi-start local search before CP-SAT (0..1)")
    p.add_argument("--extra-slots", type=int, default=0,
                   help="expert copies per rank and layer added to the plan (memory of that many more experts)")
    p.add_argument("--copies", choices=COPY_MODES, default="affinity",
                   help="affinity: copies that keep the most moves local; load: EPLB's hot experts, placed by affinity")
    p.add_argument("--hidden-size", type=int, default=4096, help="for bytes per token")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per activation element")
    p.add_argument("--out", type=Path, default=None, help="write the plan as JSON")
    p.set_defaults(func=_run)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m placement.cli place ...`: the same as `moe place ...` (the hub parses and reports errors)."""
    from moe.cli import main as moe_main

    return moe_main(argv)


if __name__ == "__main__":
    sys.exit(main())
