"""Adaptive parallelism benchmark (issue 8): step time of each static strategy, of the adaptive
chooser, and the cost of a switch, one process per GPU joined by NCCL.

    PYTHONUNBUFFERED=1 python benchmarks/parallel.py --gpus 4 [--out DIR]
    python benchmarks/parallel.py --cpu --gpus 2          # dry run: gloo, tiny shapes

Cells: expert size {mixtral: D=4096 I=14336, small: D=2048 I=1408} x experts per rank
{0.5 (each expert sliced over 2 GPUs), 4, 16} x tokens per rank {256, 4096, 65536} x
capacity {0 = dropless, 1.25} x {fwd, fwd+bwd}. Static strategies: ep (pipelining degree 1, 2,
4), dp, tp and the blends of adaptive_blend.py for every group size between (Tutel's r).
Strategies whose gathered weights would exceed --max-gather-frac of the GPU's memory are not
run ("-"): the chooser leaves them out the same way.

Per cell: each static strategy is warmed up once and timed over a few steps (slowest rank's
median; fewer for long steps: repeats are cut to fit the time, cells never are); then a fresh
chooser (cost model calibrated on the machine at start) runs until it has settled (at most
--adapt-steps steps: each candidate predicted within 3x of the best once, a race within 20%
2-3 times). The settled chooser is then timed exactly as the static strategies are (one
warm-up, the same repeats, the same lean rule), still switched on so that its own per-call cost
counts, its steps interleaved with the best static strategy's ("best again"), so drift over the
cell cancels: chooser/best is the ratio of those two interleaved timings, and worst/chooser
puts the chooser on the static grid's scale (worst / (chooser/best x best)). Switch cost =
(time of n steps alternating best/second-best A,B,A,B,... - the same n steps as A..A,B..B) /
(n - 2) extra switches, each sequence timed whole, median of 3 interleaved pairs (1 when lean);
n = --switch-steps (64), fewer for long steps (about --switch-budget-s a sequence, at least 6);
as a share of the best step. No weight moves in a switch, so this is what the next step pays for
running another collective pattern. One decision of the chooser (decide(): a settled chooser runs
it on every 16th call, and the chooser's own timing above includes it) is reported beside it as
decision/step. (Until session 5 the switch was 4-step windows with the decision added: at 1-3 ms
steps their jitter was larger than 1%.) A row is printed per
cell as it finishes and the whole table at the end. Behind the --budget-s schedule, cells run
lean (one timed step each, marked "lean") rather than being skipped; only past --deadline-s
(off by default; a safety net under a device's wall limit) are the remaining cells skipped, and
counted in the summary line. Needs no Ray or OR-Tools.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from placement.adaptive import (AdaptiveMoEExperts, ShardLayout, Strategy, StrategyChooser,  # noqa: E402
                                calibrate, gathered_weight_bytes)
from placement.adaptive_blend import group_sizes  # noqa: E402

# hidden, expert ffn size; mixtral first: if a run is cut, the cells never measured before survive
CONFIGS = {"mixtral": (4096, 14336), "small": (2048, 1408)}
CPU_CONFIGS = {"mixtral": (64, 192), "small": (32, 48)}       # --cpu: same cells, tiny shapes


def static_strategies(world: int) -> list[Strategy]:
    out = [Strategy("ep", 1), Strategy("ep", 2), Strategy("ep", 4), Strategy("dp"), Strategy("tp")]
    out += [Strategy("ep+tp", group=g) for g in group_sizes(world) if g < world]
    return out + [Strategy("ep+dp", group=g) for g in group_sizes(world) if 1 < g < world]


def _sync():
    if dist.get_backend() == "nccl":
        torch.cuda.synchronize()


def _agreed_max(v: float) -> float:
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([v], device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
    return float(t)


def _time(fn, iters: int, warm: bool = True) -> float:
    """Median wall time of ``iters`` calls of ``fn`` after one warm-up (slowest rank); ``warm``
    False: the caller has just run the warm-up."""
    if warm:
        fn()
    _sync()
    ts = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return _agreed_max(sorted(ts)[len(ts) // 2])


LONG_STEP_ITERS = 3  # repeats of a step of 20 ms or more, at most (fewer past 83 ms)


def _iters_for(step_s: float, iters: int) -> int:
    """Repeats by step length: short steps are noisy and cheap, long ones steady and dear.
    Steps under 20 ms get all ``iters`` (9 by default; with 3, in four of the six cells of the
    2-GPU run s15-a outside 5%, 1-6 ms steps, the chooser ran the best strategy itself and was
    timed slower than its interleaved twin; the two re-timed with 9 came within, 0.96 and 0.98);
    longer ones at most LONG_STEP_ITERS, as before."""
    if step_s < 0.02:
        return iters
    return max(1, min(iters, LONG_STEP_ITERS, int(0.25 / step_s)))


def run_cell(layer, x, ids, wts, train: bool, args, cost, world, gather_cap, lean: bool) -> dict:
    """``lean``: behind the time budget, so one timed step per strategy (and a shorter settle
    and one switch pair)."""
    max_iters = 1 if lean else args.iters

    def step(strategy=None):
        if train:
            layer.zero_grad(set_to_none=True)
            xx = x.detach().requires_grad_()
            layer(xx, ids, wts, strategy=strategy).float().sum().backward()
        else:
            with torch.no_grad():
                layer(x, ids, wts, strategy=strategy)

    shape = layer.shape_key(x.shape[0], ids.shape[1])
    times = {}
    for s in static_strategies(world):
        if gathered_weight_bytes(shape, s) > gather_cap:
            times[str(s)] = None  # would not fit beside the experts: not run
            continue
        t0 = time.perf_counter()
        step(s)  # the warm-up, and a first length estimate (compiles kernels on the first cell)
        _sync()
        n = _iters_for(_agreed_max(time.perf_counter() - t0), max_iters)
        times[str(s)] = _time(lambda s=s: step(s), n, warm=False)
    ran = {k: v for k, v in times.items() if v is not None}
    best_name = min(ran, key=ran.get)
    best, worst = ran[best_name], max(ran.values())
    iters = _iters_for(best, max_iters)
    # behind schedule, long steps get a shorter settle (short ones are cheap to settle properly)
    adapt_steps = min(args.adapt_steps, 10) if lean and best > 0.05 else args.adapt_steps

    # the chooser: fresh per cell, run until it says it has settled (exploring runs each close
    # candidate once, a close race 2-3 times)
    chooser = StrategyChooser(cost=cost, max_gather_bytes=gather_cap)
    layer.chooser, layer.fixed = chooser, None
    picks = []
    for _ in range(adapt_steps):
        step()
        picks.append(str(layer.last.strategy))
        if layer.settled:
            break
    settled = layer.settled
    t0 = time.perf_counter()
    chosen, _ = chooser.decide(layer._agreed_shape)
    choose_s = _agreed_max(time.perf_counter() - t0)

    # the settled chooser timed exactly as the static strategies (one warm-up, the same repeats,
    # slowest rank's median), its steps interleaved with the best static strategy's so that drift
    # over the cell cancels; the chooser stays on, so its own per-call cost is in its time
    best_s_again, t_chosen = _time_pair(lambda: step(Strategy.parse(best_name)), step, iters)
    used = str(layer.last.strategy)
    layer.chooser = None

    # switch cost: n steps alternating A,B,A,B,... (n - 1 switches) against the same n steps as
    # A...A,B...B (one switch), each timed whole with one sync at its end, the two orders
    # interleaved; (difference) / (n - 2) per extra switch, median over the pairs. Long sequences
    # average the per-step jitter that made 4-step windows unable to resolve 1% (session 4/5 runs).
    second_name = sorted(ran, key=ran.get)[1] if len(ran) > 1 else best_name
    a, b = Strategy.parse(best_name), Strategy.parse(second_name)
    n_seq = max(6, min(args.switch_steps, int(args.switch_budget_s / max(best, 1e-6)))) // 2 * 2
    n_pairs = 1 if lean else 3
    step(b)
    diffs = []
    for _ in range(n_pairs):
        pair = []
        for seq in ([a, b] * (n_seq // 2), [a] * (n_seq // 2) + [b] * (n_seq // 2)):
            _sync()
            dist.barrier()
            t0 = time.perf_counter()
            for st in seq:
                step(st)
            _sync()
            pair.append(time.perf_counter() - t0)
        diffs.append((pair[0] - pair[1]) / (n_seq - 2))
    switch_s = _agreed_max(sorted(diffs)[len(diffs) // 2])
    ratio = t_chosen / best_s_again
    return dict(static=times, best=best_name, best_s=best, worst_s=worst, chooser=used,
                chooser_s=t_chosen, best_again_s=best_s_again, chooser_over_best=ratio,
                # the chooser on the static grid's scale: its interleaved ratio times the grid's best
                worst_over_chooser=worst / (ratio * best), adapt_picks=picks, settled=settled,
                decided=str(chosen), lean=lean, choose_s=choose_s, switch_pair=[best_name, second_name],
                switch_steps=n_seq, switch_pairs=n_pairs, switch_s=switch_s, switch_share=switch_s / best,
                decision_share=choose_s / best)


def _time_pair(fa, fb, iters: int) -> tuple[float, float]:
    """``_time`` of two step functions, their timed calls alternating A,B,A,B,..."""
    fa()
    fb()
    _sync()
    ta, tb = [], []
    for _ in range(iters):
        for fn, out in ((fa, ta), (fb, tb)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            _sync()
            out.append(time.perf_counter() - t0)
    return _agreed_max(sorted(ta)[len(ta) // 2]), _agreed_max(sorted(tb)[len(tb) // 2])


def worker(rank, world, init, args, out_path):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.cpu:  # a dry run of the script itself: gloo, float32, plain torch experts
        dev, dtype = "cpu", torch.float32
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
        gather_cap = float("inf")
    else:
        dev, dtype = "cuda", torch.bfloat16
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
        gather_cap = args.max_gather_frac * torch.cuda.get_device_properties(rank).total_memory
    t_start = time.perf_counter()
    cost = calibrate(device=dev, dtype=dtype)
    configs = CPU_CONFIGS if args.cpu else CONFIGS
    K = args.top_k
    rows, skipped = [], 0
    total = len(args.configs) * len(args.experts_per_rank) * len(args.capacity) * len(args.tokens) * len(args.modes)
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    for cfg in args.configs:
        D, I = configs[cfg]
        for epr in args.experts_per_rank:
            E = max(1, int(epr * world))
            lay = ShardLayout(E, I, world)
            Uw, Is = lay.units_per_rank, lay.slice_size
            # each rank makes only its own units: the whole mixtral-size layer would not fit
            w13 = torch.randn(Uw, 2 * Is, D, device=dev, dtype=dtype, generator=g) / D ** 0.5
            w2 = torch.randn(Uw, D, Is, device=dev, dtype=dtype, generator=g) / I ** 0.5
            layer = AdaptiveMoEExperts(w13, w2, backend=args.backend, num_experts=E)
            del w13, w2
            for cap in args.capacity:
                layer.capacity_factor = cap
                for T in args.tokens:
                    T = max(1, T // 64) if args.cpu else T
                    x = torch.randn(T, D, device=dev, dtype=dtype, generator=g)
                    top = torch.randn(T, E, device=dev, generator=g).topk(min(K, E), dim=1)
                    ids, wts = top.indices, torch.softmax(top.values, dim=1)
                    for mode in args.modes:
                        train = mode == "fwd+bwd"
                        layer.requires_grad_(train)
                        # every rank must agree on leanness (it changes how many collectives run)
                        elapsed = _agreed_max(time.perf_counter() - t_start)
                        if args.deadline_s is not None and elapsed > args.deadline_s:
                            skipped += 1  # the device's wall limit is near: print what ran
                            continue
                        lean = elapsed > args.budget_s * len(rows) / total + 60
                        r = run_cell(layer, x, ids, wts, train, args, cost, world, gather_cap, lean)
                        r.update(config=cfg, hidden=D, ffn=I, experts_per_rank=epr, experts=E, capacity=cap,
                                 tokens=T, mode=mode, dropped=layer.last.dropped,
                                 flops_floor_s=(3 if train else 1) * 6 * D * I * T * min(K, E) / cost.flops_per_s)
                        rows.append(r)
                        if rank == 0:
                            print(_row(r) + f"  [{time.perf_counter() - t_start:.0f}s]", flush=True)
                            _write(out_path, world, cost, K, rows, t_start)  # a cut run keeps its cells
                    del x
            del layer
            if dev == "cuda":
                torch.cuda.empty_cache()
    if rank == 0:
        _write(out_path, world, cost, K, rows, t_start, skipped)
    dist.destroy_process_group()


def _write(path, world, cost, K, rows, t_start, skipped=0):
    with open(path, "w") as f:
        json.dump(dict(world=world, cost_model=cost.__dict__, top_k=K, rows=rows, skipped_cells=skipped,
                       seconds=time.perf_counter() - t_start), f, indent=1)


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def _row(r) -> str:
    st = r["static"]
    return (f"| {r['config']} | {r['experts_per_rank']:g} | {r['capacity']:g} | {r['tokens']} | {r['mode']} | "
            + " | ".join(_ms(st[k]) for k in st)
            + f" | {_ms(r['chooser_s'])} ({r['chooser']}{'' if r['settled'] else ', exploring'}) | "
            f"{_ms(r['best_again_s'])} | {r['chooser_over_best']:.2f} | "
            f"{r['worst_over_chooser']:.2f} | {100 * r['switch_share']:.2f}% | {100 * r.get('decision_share', 0):.2f}% | "
            f"{_ms(r['flops_floor_s'])} |"
            + (" lean" if r.get("lean") else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 4096, 65536], help="per rank")
    ap.add_argument("--experts-per-rank", type=float, nargs="+", default=[0.5, 4, 16])
    ap.add_argument("--capacity", type=float, nargs="+", default=[0.0, 1.25], help="0 = dropless")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--iters", type=int, default=9, help="timed steps of a short cell (long ones get at most 3)")
    ap.add_argument("--adapt-steps", type=int, default=40, help="most steps the chooser gets to settle")
    ap.add_argument("--budget-s", type=float, default=200,
                    help="time the grid should take: behind schedule, cells run lean (one timed step each)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the cells not started by then (a safety net under a device's wall limit)")
    ap.add_argument("--switch-steps", type=int, default=64, help="steps of each alternating / blocked sequence")
    ap.add_argument("--switch-budget-s", type=float, default=0.3,
                    help="fewer switch steps for long steps: about this many seconds a sequence (at least 6)")
    ap.add_argument("--max-gather-frac", type=float, default=0.1,
                    help="leave out dp / ep+dp gathering more than this share of GPU memory")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu", action="store_true", help="dry run on gloo CPU ranks (checks the script, not speed)")
    args = ap.parse_args()
    if args.cpu:
        args.backend = "torch"
    elif not torch.cuda.is_available() or args.gpus < 2:
        sys.exit("benchmarks/parallel.py needs 2 or more CUDA GPUs (or --cpu --gpus N for a dry run)")
    bad = [e for e in args.experts_per_rank if not ShardLayout.valid_count(max(1, int(e * args.gpus)), args.gpus)]
    if bad:
        sys.exit(f"--experts-per-rank {bad}: experts ({[int(e * args.gpus) for e in bad]}) and {args.gpus} ranks "
                 "must divide one another")
    with tempfile.NamedTemporaryFile(delete=False) as f:
        init = f.name
    os.unlink(init)
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"parallel_{args.gpus}gpu{'_cpu' if args.cpu else ''}.json")
    name = "CPU (gloo dry run)" if args.cpu else torch.cuda.get_device_name(0)
    names = [str(s) for s in static_strategies(args.gpus)]
    header = ("| experts | E/rank | cap | tokens/rank | mode | " + " | ".join(names)
              + " | chooser (pick) | best again | chooser/best | worst/chooser | switch/step | decision/step | floor (FLOPs) |")
    print(f"{args.gpus} x {name}; top-{args.top_k}; times in ms, slowest rank, median of <= {args.iters}")
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|", flush=True)
    mp.spawn(worker, args=(args.gpus, init, args, out_path), nprocs=args.gpus, join=True)
    res = json.load(open(out_path))
    print(f"\n{args.gpus} x {name}; top-{args.top_k}; cost model {res['cost_model']}; "
          f"{res['seconds']:.0f} s; results in {out_path}")
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|")
    for r in res["rows"]:
        print(_row(r))
    ratios = [r["chooser_over_best"] for r in res["rows"]]
    print(f"chooser/best: max {max(ratios):.2f}, cells within 5%: {sum(x <= 1.05 for x in ratios)}/{len(ratios)}; "
          f"worst/chooser min {min(r['worst_over_chooser'] for r in res['rows']):.2f}; "
          f"switch/step max {100 * max(r['switch_share'] for r in res['rows']):.2f}%, "
          f"< 1% in {sum(r['switch_share'] < 0.01 for r in res['rows'])}/{len(res['rows'])}; "
          f"decision/step max {100 * max(r['decision_share'] for r in res['rows']):.2f}%"
          + (f"; {res['skipped_cells']} cells not run (--deadline-s)" if res.get("skipped_cells") else ""))


if __name__ == "__main__":
    main()
