"""Placement benchmark: the ExFlow integer program against every baseline (runs on CPU).

For synthetic traces with planted affinity and for every recorded trace under
benchmarks/traces/*.npz, at 2, 4 and 8 ranks and at 2 nodes x 4 ranks, prints the fraction of
consecutive-layer token moves that cross ranks (ExFlow's figure), cross-node moves, weighted
hops, bytes one token moves per forward in context-coherent mode (one all-to-all per layer for
top-1) and in standard EP (dispatch + combine), load imbalance and solve time. Then the target
case: 32 layers x 64 experts x 8 ranks solved within 60 s on 2 worker threads.

Targets (issue 7): >= 50% fewer cross-rank moves than round robin on the trained models'
traces; the target case solved in <= 60 s.

    python benchmarks/placement.py [--time-limit 20] [--quick] [--hidden-size 4096]

With ``--runtime RANKS`` it instead measures the expert-parallel runtime (placement/runtime.py:
Ray actors, gloo on CPU / NCCL on GPUs): tokens/s of standard EP vs context-coherent EP, with
the round-robin plan vs the ILP plan. The model is a random one of the shape of ``--trace``
(layers, experts, top-k; ``--hidden-size``, ``--ffn-size``; bf16 on GPU), each rank drawing its
own weights, and its routing is REPLACED by the trace (placement/trace_routing.py), so every plan
and mode routes the trained model's expert choices. Machines without OR-Tools load a plan made
elsewhere: ``--runtime RANKS --save-plan OUT.json`` solves it (no Ray, no GPU), ``--plan OUT.json``
uses it. ``--address auto`` joins a running Ray cluster.

    python benchmarks/placement.py --runtime 4 --save-plan plan4.json --time-limit 60
    python benchmarks/placement.py --runtime 4 --plan plan4.json --hidden-size 2048 --ffn-size 1408
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from placement.affinity import AffinityStats, synthetic_affinity_trace  # noqa: E402
from placement.baselines import eplb, greedy_affinity, round_robin  # noqa: E402
from placement.replicate import add_affinity_replicas  # noqa: E402
from placement.metrics import evaluate  # noqa: E402
from placement.plan import PlacementPlan  # noqa: E402
from routing.trace import RoutingTrace  # noqa: E402

SETUPS = ((2, 1), (4, 1), (8, 1), (8, 2))  # (ranks, nodes)


def traces(quick: bool) -> list[tuple[str, RoutingTrace]]:
    T = 4000 if quick else 20000
    out = [("synth E64 k2 stay.85", synthetic_affinity_trace(16, 64, 8, T, top_k=2, stay=0.85, seed=0)[0]),
           ("synth E64 k4 16grp .7", synthetic_affinity_trace(16, 64, 16, T, top_k=4, stay=0.7, seed=1)[0])]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces")
    for path in sorted(glob.glob(os.path.join(root, "*.npz"))):
        try:
            out.append((os.path.basename(path), RoutingTrace.load(path)))
        except ValueError as e:
            print(f"skipping {path}: {e}")
    return out


def run_case(name, trace, ranks, nodes, cfg, hidden, dtype_bytes):
    from placement.ilp import SolverConfig, solve_exflow
    rows = []
    st = AffinityStats.from_trace(trace)
    E = trace.num_experts
    if E % ranks:
        print(f"skipping {name} at {ranks} ranks: {E} experts not divisible")
        return rows
    plans = [solve_exflow(st, ranks, nodes, cfg), round_robin(trace.num_layers, E, ranks, nodes, st),
             greedy_affinity(st, ranks, nodes), eplb(st, ranks, nodes)]
    if nodes > 1:  # ExFlow's own two-stage method beside our joint program
        plans.insert(1, solve_exflow(st, ranks, nodes, SolverConfig(
            time_limit_s=cfg.time_limit_s, num_workers=cfg.num_workers, multi_node="hierarchical")))
    # the ILP plan with expert copies (placement/replicate.py): one per rank placed by affinity (the
    # memory EPLB gets here), and two of EPLB's hot experts per rank placed by affinity
    plans[1:1] = [add_affinity_replicas(plans[0], trace, 1), add_affinity_replicas(plans[0], trace, 2, "load")]
    figs = [evaluate(p, trace, hidden, dtype_bytes) for p in plans]
    rr = next(f for p, f in zip(plans, figs) if p.method == "round_robin").cross_fraction
    for p, f in zip(plans, figs):
        rows.append(dict(trace=name, setup=f"{nodes}x{ranks // nodes}", method=p.method, cross=f.cross_fraction,
                         xnode=f.cross_node_fraction, hops=f.hop_cost, cc=f.cc_bytes_per_token,
                         ep=f.ep_bytes_per_token, imb=f.load_imbalance, solve=p.solve_time_s,
                         vs_rr=(1 - f.cross_fraction / rr) if rr else 0.0, status=p.solver_status))
    return rows


def _runtime_setup(args):
    """(model config, trace routing spec, trace, round-robin plan, sub-trace of the routed tokens)."""
    import torch  # noqa: F401  (moe imports it anyway)

    from moe import MoEConfig
    from placement.trace_routing import TraceRoutingSpec

    trace = RoutingTrace.load(args.trace)
    L, N, K = trace.expert_ids.shape
    E, H, P = trace.num_experts, args.hidden_size, args.runtime
    heads = H // 128 if H % 128 == 0 and H >= 256 else 4
    if H % heads or (H // heads) % 2:
        raise ValueError(f"--hidden-size {H} must split into {heads} attention heads of an even size")
    cfg = MoEConfig.tiny("mixtral", hidden_size=H, num_hidden_layers=L, num_experts=E, num_experts_per_tok=K,
                         moe_intermediate_size=args.ffn_size, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 4),
                         vocab_size=1024,  # small: every rank returns the prompt's logits to the driver
                         max_position_embeddings=max(4096, args.prompt_len + args.new_tokens))
    # row b reads trace tokens b*stride .. b*stride + stride - 1 (wrapping when the batch outgrows it)
    stride = args.prompt_len + args.new_tokens
    if args.batch * stride > N:
        print(f"note: batch x (prompt + new tokens) = {args.batch * stride} > {N} trace tokens: rows wrap around")
    spec = TraceRoutingSpec.from_trace(trace, stride)
    return cfg, spec, trace, round_robin(L, E, P, 1), spec.sub_trace(args.batch, args.prompt_len)


def save_plan(args) -> int:
    """Solve the ILP plan of --trace for --save-plan RANKS here (OR-Tools, no Ray, no GPU)."""
    from placement.ilp import SolverConfig, solve_exflow
    trace = RoutingTrace.load(args.trace)
    plan = solve_exflow(AffinityStats.from_trace(trace), args.runtime, 1,
                        SolverConfig(time_limit_s=args.time_limit, num_workers=args.workers,
                                     load_weight=args.load_weight))
    plan.meta["trace"] = os.path.basename(args.trace)
    plan.save(args.save_plan)
    rr = round_robin(trace.num_layers, trace.num_experts, args.runtime, 1)
    f, g = evaluate(plan, trace), evaluate(rr, trace)
    print(f"{args.save_plan}: {plan.method} on {args.runtime} ranks, cross {f.cross_fraction:.3f} vs round robin "
          f"{g.cross_fraction:.3f} ({100 * (1 - f.cross_fraction / g.cross_fraction):.1f}% fewer), "
          f"solved in {plan.solve_time_s:.1f} s ({plan.solver_status})")
    return 0


def _median_time(fn, reps: int):
    """(median seconds of ``reps`` calls of fn, the last call's result)."""
    times, out = [], None
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def runtime_bench(args) -> int:
    import ray
    import torch

    from placement.runtime import EPConfig, ExpertParallelRuntime

    P = args.runtime
    cuda = torch.cuda.is_available() and not args.cpu
    cfg, spec, trace, rr, sub = _runtime_setup(args)
    L, E = trace.num_layers, trace.num_experts
    if args.plan:  # solved elsewhere (machines without OR-Tools): --save-plan on the same trace
        ilp = PlacementPlan.load(args.plan)
        ilp.check_compatible(L, E)
        if ilp.num_ranks != P:
            raise ValueError(f"--plan {args.plan} is for {ilp.num_ranks} ranks, --runtime asks {P}; "
                             f"make it with --runtime {P} --save-plan")
    else:
        from placement.ilp import SolverConfig, solve_exflow
        ilp = solve_exflow(AffinityStats.from_trace(trace), P, 1,
                           SolverConfig(time_limit_s=args.time_limit, num_workers=args.workers))
    plans = [rr, ilp]
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=max(2, P), include_dashboard=False, log_to_driver=False)
    ep = EPConfig(mode="standard", device="cuda" if cuda else "cpu", cpus_per_actor=0.5,
                  backend=args.backend or ("triton" if cuda else "torch"),
                  torch_threads=max(1, (os.cpu_count() or 2) // P))
    dtype = torch.bfloat16 if cuda else torch.float32
    t_setup = time.perf_counter()
    rt = ExpertParallelRuntime(None, rr, ep)
    rt.set_trace_routing(spec)
    g = torch.Generator().manual_seed(0)
    V = cfg.vocab_size
    prompt = torch.randint(3, V, (args.batch, args.prompt_len), generator=g)
    rows, logits = [], []
    try:
        for plan in plans:
            rt.load_seeded(cfg, plan, seed=0, std=0.02, dtype=dtype)
            f = evaluate(plan, sub)
            for mode in ("standard", "coherent"):
                rt.set_mode(mode)
                # warm-up: the whole timed sequence once, untimed — the expert kernels compile per token-count
                # bucket and per row-count specialisation, and decode visits many row counts per rank
                rt.forward(prompt, None, True)
                graph_diff = float("nan")
                if not args.prefill_only:
                    rt.greedy(prompt, args.new_tokens)
                    eager_home = rt.greedy(prompt, args.new_tokens, home_only=True)
                    if cuda:  # captures the home-only step's graphs (kept for the timed calls)
                        replayed = rt.greedy(prompt, args.new_tokens, home_only=True, graphs=True)
                        if not torch.equal(replayed[0], eager_home[0]):
                            raise RuntimeError(f"{plan.method} {mode}: CUDA-graph decode chose other tokens than "
                                               "eager home-only decode")
                        graph_diff = float((replayed[1] - eager_home[1]).abs().max())
                rt.reset_counters()
                t_pre, out = _median_time(lambda: rt.forward(prompt, None, True), args.reps)  # last position's logits
                logits.append(out[:, -1].float())
                decode_rep = decode_home = decode_graph = float("nan")
                if not args.prefill_only:
                    # a greedy run = its prefill + the decode steps; the decode part is the difference
                    decode_rep = max(_median_time(lambda: rt.greedy(prompt, args.new_tokens), args.reps)[0]
                                     - t_pre, 1e-9)
                    rt.reset_counters()
                    decode_home = max(_median_time(lambda: rt.greedy(prompt, args.new_tokens, home_only=True),
                                                   args.reps)[0] - t_pre, 1e-9)
                c = rt.counters()
                moved = sum(x["dispatch_rows"] + x["combine_rows"] for x in c)
                a2a = max(x["all_to_all_calls"] for x in c) / max(1, max(x["layers"] for x in c))
                if cuda and not args.prefill_only:  # after the counters: they are the eager run's
                    decode_graph = max(_median_time(lambda: rt.greedy(prompt, args.new_tokens, home_only=True,
                                                                      graphs=True), args.reps)[0] - t_pre, 1e-9)
                rows.append((plan.method, mode, f.cross_fraction, args.batch * args.prompt_len / t_pre,
                             args.batch * args.new_tokens / decode_rep, args.batch * args.new_tokens / decode_home,
                             a2a, moved, args.batch * args.new_tokens / decode_graph, graph_diff))
                if args.profile and (plan is plans[0]) == (mode == "standard"):  # the two compared cases
                    tag = f"{plan.method}_{mode}_b{args.batch}x{args.prompt_len}"
                    tables = {"prefill": rt.profile("forward", prompt, None, True)}
                    if not args.prefill_only:
                        tables["greedy4"] = rt.profile("greedy", prompt, 4, False)
                        tables["greedy4_home"] = rt.profile("greedy", prompt, 4, True)
                    os.makedirs(args.profile, exist_ok=True)
                    for k, tab in tables.items():
                        with open(os.path.join(args.profile, f"{tag}_{k}.txt"), "w") as fh:
                            fh.write(tab)
                    print(f"profiled {tag}: {sorted(tables)} -> {args.profile}")
    finally:
        rt.shutdown()
    wall = time.perf_counter() - t_setup
    # every plan and mode routes the same trace tokens: the logits agree up to summation order
    diff = max(float((x - logits[0]).abs().max()) for x in logits)
    print(f"\n{P} ranks on {'cuda' if cuda else 'cpu'} ({'bf16' if cuda else 'fp32'}), model of {args.trace}: "
          f"{L} layers x {E} experts top-{trace.top_k}, hidden {cfg.hidden_size}, expert ffn {cfg.moe_intermediate_size}; "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens; routing replaced by the trace "
          f"(row b, position p -> trace token b*{spec.stride}+p)")
    print("cross: of the prompt tokens' consecutive-layer moves, the part crossing ranks; decode (replicated): "
          "every rank runs attention for every row, one all-gather per layer; decode (home-only): ExFlow's "
          "decoding (placement/decode.py); a2a/layer and rows moved: the home-only run (prefill included); "
          "home graphs: the home-only steps replayed from CUDA graphs (decode.HomeDecodeGraphs; GPUs only), "
          "graph diff: its logits' largest difference from the eager home-only run's (same tokens checked)")
    head = (f"{'plan':<16}{'mode':<10}{'cross':>7}{'prefill tok/s':>15}{'decode rep':>12}{'decode home':>13}"
            f"{'a2a/layer':>11}{'rows moved':>12}{'home graphs':>13}{'graph diff':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r[0]:<16}{r[1]:<10}{r[2]:>7.3f}{r[3]:>15.0f}{r[4]:>12.1f}{r[5]:>13.1f}{r[6]:>11.2f}{r[7]:>12d}"
              f"{r[8]:>13.1f}{r[9]:>12.3g}")
    print(f"last-token logits, max difference between plans/modes: {diff:.3g}; wall {wall:.0f} s")
    print(f"timed: median of {args.reps} repeats each")
    print(f"coherent + ILP vs standard + round robin (target >= 1.3x on 4 GPUs): prefill {rows[-1][3] / rows[0][3]:.2f}x"
          + ("" if args.prefill_only else f"; decode replicated {rows[-1][4] / rows[0][4]:.2f}x; decode home-only "
             f"{rows[-1][5] / rows[0][5]:.2f}x; best decode vs best decode "
             f"{max(rows[-1][4], rows[-1][5]) / max(rows[0][4], rows[0][5]):.2f}x"
             + ("" if not cuda else f"; home-only from CUDA graphs {rows[-1][8] / rows[0][8]:.2f}x")))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time-limit", type=float, default=20.0, help="ILP time limit per case (s)")
    ap.add_argument("--target-time-limit", type=float, default=60.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hidden-size", type=int, default=4096,
                    help="hidden size of the bytes figures; with --runtime the model's (e.g. 2048)")
    ap.add_argument("--dtype-bytes", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smaller traces and no target case")
    ap.add_argument("--runtime", type=int, default=0, metavar="RANKS", help="measure the EP runtime instead")
    ap.add_argument("--trace", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "traces", "large.npz"),
                    help="--runtime / --save-plan: the routing trace; the model takes its shape, its routing is the trace")
    ap.add_argument("--ffn-size", type=int, default=1408, help="--runtime: expert ffn (intermediate) size")
    ap.add_argument("--save-plan", default=None, metavar="OUT.json",
                    help="with --runtime RANKS: only solve the ILP plan of --trace here and save it (no Ray)")
    ap.add_argument("--load-weight", type=float, default=0.0, help="--save-plan: the ILP's token-load weight")
    ap.add_argument("--address", default=None, help="--runtime: Ray cluster address (e.g. auto)")
    ap.add_argument("--cpu", action="store_true", help="--runtime: gloo on CPU even when GPUs exist")
    ap.add_argument("--plan", default=None, help="--runtime: ILP plan JSON made elsewhere (no OR-Tools needed)")
    ap.add_argument("--reps", type=int, default=3, help="--runtime: timed repeats of each measurement (median)")
    ap.add_argument("--prefill-only", action="store_true", help="--runtime: time the prefill forward only")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="--runtime: write rank 0's torch.profiler tables of the two compared cases to DIR")
    ap.add_argument("--backend", default=None, help="--runtime: expert kernels (default triton on GPU, torch on CPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.save_plan and not args.runtime:
        ap.error("--save-plan needs --runtime RANKS (the number of ranks to plan for)")
    if args.runtime:
        return save_plan(args) if args.save_plan else runtime_bench(args)
    from placement.ilp import SolverConfig
    cfg = SolverConfig(time_limit_s=args.time_limit, num_workers=args.workers)
    rows = []
    for name, tr in traces(args.quick):
        for ranks, nodes in SETUPS:
            rows += run_case(name, tr, ranks, nodes, cfg, args.hidden_size, args.dtype_bytes)
    target = None
    if not args.quick:
        tr, _ = synthetic_affinity_trace(32, 64, 8, 20000, top_k=2, stay=0.85, seed=2)
        t0 = time.perf_counter()
        tcfg = SolverConfig(time_limit_s=args.target_time_limit, num_workers=args.workers)
        rows += run_case("TARGET 32L x 64E", tr, 8, 1, tcfg, args.hidden_size, args.dtype_bytes)
        target = time.perf_counter() - t0
    for r in rows:
        if r["method"].startswith("exflow"):
            print(f"{r['trace']} {r['setup']}: {r['status']}")
    head = (f"{'trace':<24}{'nodes x gpus':>13} {'method':<19}{'cross':>7}{'x-node':>7}{'hops':>7}"
            f"{'CC B/tok':>11}{'EP B/tok':>11}{'imbal':>7}{'solve s':>9}{'vs RR':>8}")
    print()
    print(f"hidden size {args.hidden_size}, {args.dtype_bytes} bytes/element; bytes are per token per forward "
          f"(all layers); floor = round_robin")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['trace']:<24}{r['setup']:>13} {r['method']:<19}{r['cross']:>7.3f}{r['xnode']:>7.3f}"
              f"{r['hops']:>7.3f}{r['cc']:>11.0f}{r['ep']:>11.0f}{r['imb']:>7.2f}{r['solve']:>9.2f}"
              f"{100 * r['vs_rr']:>7.1f}%")
    if target is not None:
        ilp = next(r for r in rows if r["trace"].startswith("TARGET") and r["method"] == "exflow_cpsat")
        ok = ilp["solve"] <= 60.0
        print(f"target: 32 layers x 64 experts x 8 ranks solved in {ilp['solve']:.1f} s on {args.workers} workers "
              f"(<= 60 s: {'met' if ok else 'MISSED'}), {100 * ilp['vs_rr']:.1f}% fewer cross-rank moves than round robin")
    return 0


if __name__ == "__main__":
    sys.exit(main())
