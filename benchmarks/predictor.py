"""Routing-path prediction, token scheduling and predictor-driven expert caching (ExpertFlow).

    python benchmarks/predictor.py [--quick] [--traces benchmarks/traces] [--recorded-only] [--attention]

For every trace (synthetic ones, and each recorded ``benchmarks/traces/*.npz`` with its optional
companion ``*.features.npz`` of hidden states), split by request 50/50 into train and test:

1. recall of the predicted top-k expert set (= its precision, every token having k experts) and
   recall/precision of the top-2k set, at 1, 2, 4 layers ahead of the last known layer and for
   all layers before the token's forward starts ("all"), for the predictor and every baseline
   (popularity, previous token's path, nearest stored trace over 4096 stored tokens as before
   and over every training token ("nearest-all"), the next-layer gate on the current hidden
   state when hidden states and the model are at hand, and probes fitted from the hidden state to
   the next layers' experts (``ProbeLookahead``: "probe-lookahead" fitted from zero, "probe+router"
   started from the model's own routers when the model is at hand; the latter, else the former, is
   the predictors' lookahead source where there are hidden states, and "lean-zero-probes" is the lean
   predictor on the former beside it)), and the predictor without its exact-set sources ("predictor-lean", ``moe predictor
   train --match-layers 0``; its eviction + prefetch as the "lean policy" rows); plus the CPU cost in
   microseconds per token (process CPU time, one thread) of one predict_batch over 64 tokens predicting every
   later layer, the most over the last known layer 0, L/2 and L-2 (one expert copy of
   Qwen3-30B-A3B over PCIe takes 170 us); at Qwen3-30B-A3B's shape also per call at batch 1 and 8;
   With --attention, recorded traces also get point C's one-ahead recall per target layer (the next layer's own
   attention on the residual entering the layer's experts, then its router; lookahead_points.py): the recording
   model decodes the test requests token by token (a trace with token ids, its model at hand);
2. the token scheduler: distinct experts per batch (summed over layers) under FIFO and under
   grouping by predicted path, with the largest extra wait any token saw (bound: 2 batches); and
   two bounds on what grouping can gain on the trace: the true paths with no wait bound, and the
   best partition of each decode round into batches (pairwise swaps, true paths);
3. when offload.simulate exists: the expert-cache hit ratio at 10/25/50% of the experts per
   layer for 4 test requests decoding together, and for the longest one decoding alone: LRU and Belady (the optimum of demand caching)
   without prefetch; then with prefetch of the next layer's experts after each layer, at most
   ``prefetch_budget`` = 1 or 2 expert copies per layer (what the copy engine moves during one
   layer's compute at Qwen3-30B-A3B's ratios; a used prefetched expert counts as a hit): LRU
   eviction + prefetch from each model, the predictor's eviction + its prefetch ("predictor
   policy"), and LRU + the true next-layer experts ("oracle prefetch", the bound at that budget).

Runs on the CPU. Targets (issue 6): next-layer recall >= 95% and 4-ahead >= 80% on real traces;
predictor-driven hit ratio >= LRU + 20 points at 25%; scheduler -30% distinct experts.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routing import (AttentionLookahead, GateLookahead, NearestTraceBaseline, PathPredictor,  # noqa: E402
                     PopularityBaseline, PredictorConfig, PreviousPathBaseline, ProbeLookahead, RoutingTrace, SchedulerConfig, cost_per_token_us, evaluate,
                     format_summary, hidden_matrix, load_features, simulate_schedule, summarize, synthesize)
from routing.cli import format_table, per_layer_table  # noqa: E402

BUDGETS = (0.10, 0.25, 0.50)
PREFETCH_BUDGETS = (1, 2)  # expert copies per layer a prefetch may use


def synthetic_suite(quick: bool) -> list[tuple[str, RoutingTrace]]:
    R, N = (24, 32) if quick else (64, 64)
    shape = dict(num_layers=12, num_experts=32, top_k=4, num_requests=R, tokens_per_request=N)
    return [
        ("synth-structured", synthesize(**shape, popularity_skew=0.8, temporal_locality=0.3, affinity=0.7, seed=0)),
        ("synth-planted", synthesize(**shape, popularity_skew=0.8, planted_paths=24, path_noise=0.05,
                                     temporal_locality=0.5, seed=1)),
        ("synth-structureless", synthesize(**shape, popularity_skew=0.8, seed=2)),
    ]


def recorded_suite(folder: Path) -> list[tuple[str, RoutingTrace, dict | None]]:
    out = []
    for f in sorted(glob.glob(str(folder / "*.npz"))):
        if f.endswith(".features.npz"):
            continue
        trace = RoutingTrace.load(f)
        feats = None
        fp = Path(f[:-4] + ".features.npz")
        if fp.is_file():
            hidden = hidden_matrix(load_features(fp), trace.num_layers)
            if hidden is not None and len(hidden) == trace.num_tokens:
                feats = {"hidden_NLD": hidden}
        out.append((Path(f).stem, trace, feats))
    return out


def find_model(trace: RoutingTrace):
    """The model a recorded trace came from (meta 'model_dir', else the embedded default), if it matches."""
    try:
        from moe import load_model
    except ImportError:
        return None
    for d in (trace.meta.get("model_dir"), ROOT / "moe" / "assets" / "default"):
        if d and (Path(d) / "config.json").is_file():
            try:
                model = load_model(d, dtype=torch.float32)  # float32 routers: the probes' prior is linearized from them
            except Exception as e:  # a broken or foreign checkpoint only costs this baseline
                print(f"  note: could not load {d} for the gate lookahead ({e})")
                continue
            blocks = model.moe_blocks()
            if len(blocks) == trace.num_layers:
                return model
    return None


def split_features(feats, trace, train_mask):
    if feats is None:
        return None, None
    return {"hidden_NLD": feats["hidden_NLD"][train_mask]}, {"hidden_NLD": feats["hidden_NLD"][~train_mask]}


def hit_ratios(test: RoutingTrace, models, max_tokens: int, batch: int = 4,
               hidden_NLD: np.ndarray | None = None) -> dict[str, list[float]] | None:
    """Hit ratio of the expert cache decoding ``batch`` test requests together (a small decode batch,
    the offloading setting): demand LRU and Belady, then prefetching within each copy budget.
    hidden_NLD (the test tokens' hidden states): the predictors that read them get them, step by step."""
    try:
        from offload import simulate
    except ImportError:
        return None
    req = test.request_ids_or_default()
    uniq, counts = np.unique(req, return_counts=True)
    longest = uniq[np.argsort(-counts, kind="stable")[:batch]]
    chosen = np.isin(req, longest)
    sub = test.select_tokens(chosen)
    order, per_step = sub.interleaved_order(min(int(counts.max()), max(1, max_tokens // len(longest))))
    inter = sub.select_tokens(order)
    hid = None if hidden_NLD is None else np.asarray(hidden_NLD)[chosen][order]
    E = test.num_experts
    caps = [max(1, int(round(b * E))) for b in BUDGETS]
    def run(policy, **kw):
        return [simulate(inter, policy, c, tokens_per_step=per_step, hidden_NLD=hid, **kw)["hit_ratio"] for c in caps]
    out: dict[str, list[float]] = {"lru (demand)": run("lru"), "belady (demand)": run("belady")}
    for b in PREFETCH_BUDGETS:
        out[f"b{b} oracle prefetch"] = run("lru", prefetch="oracle", prefetch_budget=b)
        for m in models:
            if (isinstance(m, GateLookahead) and hid is None) or m.name == "nearest-all":
                continue  # a lookahead needs the hidden states
            out[f"b{b} lru+{m.name}"] = run("lru", prefetch="predictor", predictor=m, prefetch_budget=b)
        out[f"b{b} predictor policy"] = run("predictor", prefetch="predictor", predictor=models[0],
                                            prefetch_budget=b)
        lean = [m for m in models if m.name == "predictor-lean"]
        if lean:
            out[f"b{b} lean policy"] = run("predictor", prefetch="predictor", predictor=lean[0], prefetch_budget=b)
    return out


def best_partition_reduction(test: RoutingTrace, B: int, rounds: int, restarts: int = 3, seed: int = 0) -> float:
    """Mean over the first ``rounds`` decode rounds (round t: every request's t-th token, cut to a multiple
    of B) of (distinct experts summed over layers and batches of the best partition into batches of B
    found by pairwise swaps from ``restarts`` random starts) / (the same in request order) - 1: what
    grouping one round at a time could gain with the true paths and no fairness bound."""
    paths, req = test.paths().astype(np.int64), test.request_ids_or_default()
    L, E = test.num_layers, test.num_experts
    rng = np.random.default_rng(seed)
    out = []
    for t in range(rounds):
        toks = [np.flatnonzero(req == r)[t] for r in np.unique(req) if (req == r).sum() > t]
        toks = toks[:len(toks) // B * B]
        if len(toks) < 2 * B:
            continue
        H = np.zeros((len(toks), L, E), bool)  # each token's experts per layer
        for i, tk in enumerate(toks):
            for layer in range(L):
                H[i, layer, paths[tk, layer][paths[tk, layer] >= 0]] = True

        def cost(g):
            return int(H[g].any(0).sum())
        fifo = sum(cost(list(range(i, i + B))) for i in range(0, len(toks), B))
        best = None
        for _ in range(restarts):
            perm = rng.permutation(len(toks))
            groups = [list(perm[i:i + B]) for i in range(0, len(toks), B)]
            improved = True
            while improved:
                improved = False
                for a in range(len(groups)):
                    for b in range(a + 1, len(groups)):
                        for i in range(B):
                            for j in range(B):
                                ga, gb = groups[a][:], groups[b][:]
                                ga[i], gb[j] = groups[b][j], groups[a][i]
                                if cost(ga) + cost(gb) < cost(groups[a]) + cost(groups[b]):
                                    groups[a], groups[b], improved = ga, gb, True
            total = sum(cost(g) for g in groups)
            best = total if best is None else min(best, total)
        out.append(best / fifo - 1)
    return float(np.mean(out)) if out else float("nan")


def schedule(test: RoutingTrace, pred, quick: bool, requests: int = 0) -> tuple[dict, object]:
    """The scheduler's rows: requests of the test split (its first ``requests`` by id; 0 = all) decode together, B = a
    quarter of them; FIFO, grouping by the true and the predicted paths, and two bounds. Returns (grouped, FIFO)."""
    req = np.unique(test.request_ids_or_default())
    if requests:
        test = test.select_tokens(np.isin(test.request_ids_or_default(), req[:requests]))
    n_req = min(len(req), requests or len(req))
    B = max(2, n_req // 4)
    per_req = 8 if quick else 16
    fifo = simulate_schedule(test, None, SchedulerConfig(batch_size=B, grouping=False), per_req)
    sched = {"oracle": simulate_schedule(test, None, SchedulerConfig(batch_size=B, max_wait=2), per_req),
             "predictor": simulate_schedule(test, pred, SchedulerConfig(batch_size=B, max_wait=2), per_req)}
    print(f"scheduler ({n_req} requests, B={B}, max_wait=2): distinct experts per batch FIFO "
          f"{fifo.distinct_experts_per_batch:.1f}; "
          + "; ".join(f"{k} paths {v.distinct_experts_per_batch:.1f} "
                      f"({100 * (v.distinct_experts_per_batch / fifo.distinct_experts_per_batch - 1):+.0f}%, "
                      f"max extra wait {v.max_extra_wait})" for k, v in sched.items()))
    # how far grouping could go on this trace at all: the true paths with no fairness bound, and the best
    # partition of each decode round (every request's t-th token) found by pairwise swaps
    free = simulate_schedule(test, None, SchedulerConfig(batch_size=B, max_wait=10 ** 6), per_req)
    part = best_partition_reduction(test, B, per_req)
    free_red = free.distinct_experts_per_batch / fifo.distinct_experts_per_batch - 1
    print(f"scheduler bounds (true paths): no fairness bound {100 * free_red:+.0f}%; "
          f"best partition of each decode round {100 * part:+.0f}%")
    return sched, fifo


def attention_features(model, trace: RoutingTrace):
    """Point C (the next layer's own attention on the residual entering a layer's experts, then its router:
    routing.point_c, BENCHMARKS 7l/7m) over the whole trace, each request decoded token by token from its first
    token by the model that recorded it: (guesses [L, N, K], logits [N, L, E]) in the trace's token order."""
    from routing.point_c import attention_guesses
    return attention_guesses(model, trace, logits=True)


def attention_row(guesses: np.ndarray, test: RoutingTrace) -> str:
    """One ahead, per target layer: point C's top-k recall on the test tokens (``guesses``: theirs, [L, N, K])."""
    from routing.point_c import layer_recall
    rec = [layer_recall(guesses, test, l) for l in range(test.num_layers - 1)]
    return (f"point C (attention-lookahead) one ahead, per target layer 1..{test.num_layers - 1}: "
            + " ".join(f"{r:.3f}" for r in rec) + f"; mean {np.mean(rec):.3f}")


def run_trace(name: str, trace: RoutingTrace, feats: dict | None, quick: bool, summary: list,
              recall_only: bool = False, only: frozenset = frozenset(), attention: bool = False,
              scheduler_only: bool = False, scheduler_requests: int = 0) -> None:
    print(f"\n=== {name}: {trace!r}")
    print(format_summary(summarize(trace)))
    req = trace.request_ids_or_default()
    if len(np.unique(req)) < 4:
        print("  note: fewer than 4 requests; cannot split train/test by request — skipped")
        return
    # half the requests train, half test: enough test requests for the scheduler to choose among
    train, test = trace.split_requests(0.5, seed=0)
    train_mask = np.isin(req, np.unique(train.request_ids_or_default()))
    f_train, f_test = split_features(feats, trace, train_mask)
    gate = probes = routed = model = None
    if feats is not None:
        model = find_model(trace)
        fit_dev = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        probes = ProbeLookahead.fit(train, f_train["hidden_NLD"], device=fit_dev)
        print(f"probes (hidden state -> next {probes.span} layers' experts) fitted in {time.perf_counter() - t0:.1f} s")
        if model is not None:
            gate = GateLookahead.from_model(model, fallback=PopularityBaseline.fit(train))
            t0 = time.perf_counter()
            routed = ProbeLookahead.fit(train, f_train["hidden_NLD"], prior=gate, device=fit_dev)
            routed.name = "probe+router"
            pulls = [("router" if p is None else f"{p:g}") for p in routed.prior_pull]
            print(f"probes started from the model's routers fitted in {time.perf_counter() - t0:.1f} s; pull chosen "
                  f"per known layer: {' '.join(pulls)}")
        else:
            print("  note: hidden states found but not the model they came from: no gate lookahead, no router prior")
    # the predictor's lookahead source where there are hidden states: the probes started from the model's
    # routers when the model is at hand (session 19, BENCHMARKS 7h), else the probes fitted from zero (7b)
    look = routed if routed is not None else probes
    t0 = time.perf_counter()
    # "predictor" keeps the exact-set sources (match_layers=2, the library default until session 14) so that
    # sections 7-7d read as measured; "predictor-lean" is the library default now
    pred = PathPredictor.fit(train, PredictorConfig(match_layers=2), features=f_train, lookahead=look)
    fit_s = time.perf_counter() - t0
    nearest_all = NearestTraceBaseline.fit(train, max_stored=train.num_tokens, neighbours=8)
    nearest_all.name = "nearest-all"
    # without the exact-set sources (the default of `moe predictor train`): the cheaper live predictor (7e)
    lean = PathPredictor.fit(train, PredictorConfig(match_layers=0), features=f_train, lookahead=look)
    lean.name = "predictor-lean"
    models = [pred, lean]
    if routed is not None:  # the lean predictor as sections 7b-7g measured it: probes fitted from zero
        lean0 = PathPredictor.fit(train, PredictorConfig(match_layers=0), features=f_train, lookahead=probes)
        lean0.name = "lean-zero-probes"
        models.append(lean0)
    models += [PopularityBaseline.fit(train), PreviousPathBaseline.fit(train), NearestTraceBaseline.fit(train),
               nearest_all]
    models += [m for m in (gate, probes, routed) if m is not None]
    if only:
        names = [m.name for m in models]
        models = [m for m in models if m.name in only]
        if not models:
            raise SystemExit(f"--models {','.join(sorted(only))}: none of these rows exists for {name}; "
                             f"its rows are {','.join(names)}")
    rows = []
    max_tokens = 600 if quick else 2000
    for m in ([] if scheduler_only else models):
        r = evaluate(m, test, f_test, max_tokens=max_tokens)
        L = trace.num_layers
        us = max(cost_per_token_us(m, test, layer=layer, features=f_test) for layer in sorted({0, L // 2, L - 2}))
        rows.append((m.name, r, us))
    print(f"predictor fitted in {fit_s:.1f} s on {train.num_tokens} tokens")
    if scheduler_only:
        schedule(test, pred, quick, scheduler_requests)
        return
    print(per_layer_table(rows[0][0], rows[0][1]))
    # one ahead, per target layer, for the lean predictors beside their lookahead sources: where a predictor
    # falls below its source (BENCHMARKS 7i) shows only layer by layer
    for n, r, _ in rows[1:]:
        if n in ("predictor-lean", "lean-zero-probes", "gate-lookahead", "probe-lookahead", "probe+router"):
            print(per_layer_table(n, r, keys=("1",)))
    if attention:
        if model is None:
            model = find_model(trace)
        if model is None or trace.token_ids is None or trace.positions is None:
            print("  note: --attention needs the model that recorded the trace and the trace's token ids and positions")
        else:
            t0 = time.perf_counter()
            att_ids, att_lg = attention_features(model, trace)
            print(f"point C decoded over the {trace.num_tokens} tokens in {time.perf_counter() - t0:.0f} s")
            print(attention_row(att_ids[:, ~train_mask], test))
            # the lean predictor with C as its lookahead one ahead, over its probes further ahead
            f_c = att_lg if feats is None else np.concatenate([feats["hidden_NLD"], att_lg], axis=-1)
            cl = AttentionLookahead(trace.num_layers, trace.num_experts, trace.top_k, base=look,
                                    fallback=PopularityBaseline.fit(train))
            lean_c = PathPredictor.fit(train, PredictorConfig(match_layers=0), features={"hidden_NLD": f_c[train_mask]},
                                       lookahead=cl)
            lean_c.name = "lean+attention"
            fc_test = {"hidden_NLD": f_c[~train_mask]}
            for m in (cl, lean_c):
                r = evaluate(m, test, fc_test, max_tokens=max_tokens)
                us = max(cost_per_token_us(m, test, layer=layer, features=fc_test)
                         for layer in sorted({0, trace.num_layers // 2, trace.num_layers - 2}))
                rows.append((m.name, r, us))
                print(per_layer_table(m.name, r, keys=("1",)))
    print(format_table(rows))
    if recall_only:
        return

    sched, fifo = schedule(test, pred, quick, scheduler_requests)

    hid_test = None if f_test is None else f_test["hidden_NLD"]
    hits = hit_ratios(test, models, 256 if quick else 1024, hidden_NLD=hid_test)
    # one sequence decoding alone: the offloading case of a single user (issue 5), where a layer's few
    # experts leave the copy budget room to bring in most of the next layer's
    hits1 = hit_ratios(test, models, 128 if quick else 512, batch=1, hidden_NLD=hid_test)
    if hits is None:
        print("  note: offload.simulate not available: no cache hit ratios")
    else:
        for label, h in (("4 requests decoding together", hits), ("1 request decoding alone", hits1)):
            print(f"cache hit ratio ({label}) at " + "/".join(f"{int(b * 100)}%" for b in BUDGETS)
                  + " of experts per layer:")
            for k, v in h.items():
                print(f"  {k:<28}" + "".join(f"{x:>8.3f}" for x in v))
    by = {n: r for n, r, _ in rows}
    best = {d: max(by[n][d]["mean_recall"] for n in by
                   if n not in ("predictor", "predictor-lean", "lean-zero-probes", "lean+attention"))
            for d in ("1", "2", "4")}
    summary.append((name, by["predictor"], best, rows[0][2], sched["predictor"], fifo, hits, hits1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller traces (a minute on 2 cores)")
    ap.add_argument("--traces", type=Path, default=ROOT / "benchmarks" / "traces")
    ap.add_argument("--recorded-only", action="store_true",
                    help="only the recorded traces: no synthetic ones, no cost at Qwen3-30B-A3B's shape")
    ap.add_argument("--recall-only", action="store_true",
                    help="stop each trace after its recall table: no scheduler, no cache hit ratios, no summary row")
    ap.add_argument("--models", default="", help="with --recall-only: only these rows, comma-separated names "
                    "(e.g. predictor-lean,gate-lookahead,probe-lookahead,probe+router)")
    ap.add_argument("--attention", action="store_true",
                    help="recorded traces: also point C's one-ahead recall (the recording model decodes the test "
                         "requests token by token; a recorded trace with token ids and its model are needed)")
    ap.add_argument("--mix", action="append", default=[], metavar="NAME=A.npz,B.npz,...",
                    help="also a trace of mixed traffic: the requests of these recorded traces (of one model) "
                         "interleaved in arrival order (RoutingTrace.mix_requests; BENCHMARKS 7o); repeatable")
    ap.add_argument("--scheduler-only", action="store_true",
                    help="each trace's scheduler rows alone (the predictor fitted without hidden states; no recall "
                         "table, no cache hit ratios, no summary row)")
    ap.add_argument("--scheduler-requests", type=int, default=0,
                    help="the scheduler's pool: the first N test requests (0 = all; B = a quarter of the pool)")
    args = ap.parse_args(argv)
    only = frozenset(n for n in args.models.split(",") if n)
    mixes = []
    for spec in args.mix:
        name, eq, files = spec.partition("=")
        paths = [Path(f) for f in files.split(",") if f]
        if not eq or not name or len(paths) < 2:
            ap.error(f"--mix takes NAME=A.npz,B.npz[,...] (two traces or more), got {spec!r}")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            ap.error(f"--mix {name}: no such trace file(s): {missing}")
        mixes.append((name, RoutingTrace.mix_requests([RoutingTrace.load(p) for p in paths], [p.stem for p in paths])))
    if only and not args.recall_only:
        ap.error("--models needs --recall-only (the scheduler and the hit ratios use the full set)")
    torch.set_num_threads(1)  # the predictor's cost is quoted for one CPU core
    summary: list = []
    sched = dict(scheduler_only=args.scheduler_only, scheduler_requests=args.scheduler_requests)
    for name, trace in ([] if args.recorded_only else synthetic_suite(args.quick)):
        run_trace(name, trace, None, args.quick, summary, args.recall_only, only, **sched)
    recorded = recorded_suite(args.traces) if args.traces.is_dir() else []
    if not recorded and not mixes:
        print(f"\nnote: no recorded traces under {args.traces} (the training helper records them from the "
              "trained default model); synthetic traces only")
    for name, trace, feats in recorded + [(n, t, None) for n, t in mixes]:
        run_trace(name, trace, feats, args.quick, summary, args.recall_only, only, args.attention, **sched)

    if not args.recorded_only:
        qwen3_shape_cost(args.quick)
    print_summary(summary)
    return 0


def qwen3_shape_cost(quick: bool) -> None:
    # the predictor's cost at a real model's shape (Qwen3-30B-A3B: 48 MoE layers, 128 experts, top-8)
    big = synthesize(num_layers=48, num_experts=128, top_k=8, num_requests=8, tokens_per_request=32,
                     popularity_skew=0.8, affinity=0.5, temporal_locality=0.3, seed=5)
    t0 = time.perf_counter()
    cfg = PredictorConfig(fit_elements=1 << 20, fit_iters=3 if quick else 20, match_layers=2)
    pbig = PathPredictor.fit(big, cfg)
    fit_s = time.perf_counter() - t0
    costs = {layer: cost_per_token_us(pbig, big, layer=layer) for layer in (-1, 0, 24, 46)}
    print(f"\npredictor at Qwen3-30B-A3B shape (fit {fit_s:.1f} s on {big.num_tokens} tokens): CPU us/token "
          "for all later layers, by last known layer: "
          + ", ".join(f"{k}: {v:.0f}" for k, v in costs.items()) + " (one expert copy over PCIe: 170 us)")
    # and per call at decode batch sizes, where a call costs its number of array operations more than its size
    calls = {b: [cost_per_token_us(pbig, big, layer=layer, batch=b, repeats=400 // b) * b for layer in (0, 24, 46)]
             for b in (1, 8)}
    print("predictor at Qwen3-30B-A3B shape: CPU us per call at batch 1 | 8, last known layer 0/24/46: "
          + " | ".join("/".join(f"{v:.0f}" for v in calls[b]) for b in (1, 8)))
    # without the exact-set sources (`moe predictor train --match-layers 0`): the cheaper live predictor
    lean = PathPredictor.fit(big, dataclasses.replace(cfg, match_layers=0))
    lean_calls = [cost_per_token_us(lean, big, layer=layer, batch=1, repeats=400) for layer in (0, 24, 46)]
    print("the same with match_layers=0: CPU us per call at batch 1, last known layer 0/24/46: "
          + "/".join(f"{v:.0f}" for v in lean_calls))


def print_summary(summary: list) -> None:
    if not summary:  # (--recall-only, --scheduler-only: no rows)
        return
    print("\n=== summary (predictor: recall of the top-k set; best baseline at 1/2/4 ahead; scheduler; "
          "hit ratio @25% with 4 requests: demand LRU, Belady, predictor policy + prefetch at 1 and 2 copies/layer; "
          "and with 1 request alone: LRU, predictor policy at 2 copies/layer)")
    head = (f"{'trace':<22}{'R@1':>7}{'R@2':>7}{'R@4':>7}{'R@all':>7}{'best base 1/2/4':>18}{'us/tok':>8}"
            f"{'sched %':>9}{'wait':>5}{'LRU@25':>8}{'Bel@25':>8}{'pred b1':>8}{'pred b2':>8}{'1:LRU':>8}{'1:pb2':>8}")
    print(head)
    print("-" * len(head))
    keys = ("lru (demand)", "belady (demand)", "b1 predictor policy", "b2 predictor policy")
    for name, r, best, us, s, fifo, hits, hits1 in summary:
        red = 100 * (s.distinct_experts_per_batch / fifo.distinct_experts_per_batch - 1)
        h = "".join(f"{hits[k][1]:>8.3f}" if hits else f"{'-':>8}" for k in keys)
        h += "".join(f"{hits1[k][1]:>8.3f}" if hits1 else f"{'-':>8}" for k in ("lru (demand)", "b2 predictor policy"))
        b = "/".join(f"{best[d]:.3f}" for d in ("1", "2", "4"))
        print(f"{name:<22}{r['1']['mean_recall']:>7.3f}{r['2']['mean_recall']:>7.3f}{r['4']['mean_recall']:>7.3f}"
              f"{r['all']['mean_recall']:>7.3f}{b:>18}{us:>8.1f}{red:>+9.0f}{s.max_extra_wait:>5}{h}")


if __name__ == "__main__":
    sys.exit(main())
