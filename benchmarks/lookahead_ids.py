"""A recorded trace's held-out requests and, for their tokens, each layer's guess of the next layer's
experts: what benchmarks/decode.py --trace / --lookahead need to time next-layer prefetch with a
trained model's routing and that model's prediction quality, at the weight sizes of a published model.

    python benchmarks/lookahead_ids.py runs/tr/d48.npz --out runs/tr/d48_test

Half the requests (``RoutingTrace.split_requests(0.5, seed=0)``, as benchmarks/predictor.py splits)
fit the guess; the other half are written: ``OUT.npz`` (their trace) and ``OUT.lookahead.npz``
(``next_ids`` [L, N, K], row l = layer l's guess of layer l+1's K experts for each token, best first;
the last row is -1). The guess is probes (``routing.ProbeLookahead``, one layer ahead) on the hidden
state entering layer l, fitted from zero on the fitting half (the features file beside the trace,
``NAME.features.npz``): what ``OffloadConfig(prefetch="probe")`` applies on the device. Their
one-ahead recall on the written tokens is printed.

``--guess attention --model DIR`` (the model that recorded the trace): the guess is instead point C of
benchmarks/lookahead_points.py, layer l+1's own attention on the residual entering layer l's experts, then its
router (nothing fitted; the requests decoded token by token; needs the trace's token ids, positions from 0).
``--guess best``: per layer, whichever of the two reads the fitting half's next layer better.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing import ProbeLookahead, RoutingTrace, hidden_matrix, load_features  # noqa: E402
from routing.point_c import attention_guesses, layer_recall, one_ahead_recall  # noqa: E402


def guesses(probes: ProbeLookahead, hidden_NLD: np.ndarray, k: int) -> np.ndarray:
    """[L, N, k] int16: layer l's k likeliest experts of layer l+1 (best first); the last layer's row is -1."""
    N, L, _ = hidden_NLD.shape
    out = np.full((L, N, k), -1, dtype=np.int16)
    for layer in range(L - 1):
        z = probes.lookahead_logits(hidden_NLD[:, layer], layer)[:, layer + 1]  # [N, E]
        top = torch.topk(torch.from_numpy(z), k, dim=1).indices.numpy()
        out[layer] = top.astype(np.int16)
    return out


def load_recorder(model_dir: Path, trace: RoutingTrace, device: str):
    """The model that recorded ``trace`` (float32, eval), checked to have its MoE layers."""
    from moe import load_model
    # triton experts on a GPU: point C decodes token by token, where the torch loop's launches per expert dominate
    backend = "triton" if str(device).startswith("cuda") else "torch"
    model = load_model(str(model_dir), dtype=torch.float32, device=device, backend=backend).eval()
    if len(model.moe_blocks()) != trace.num_layers:
        raise SystemExit(f"{model_dir} has {len(model.moe_blocks())} MoE layers, the trace {trace.num_layers}: give the "
                         "model that recorded it")
    return model


def _time_model(expert_bytes: float, copy_gbps: float, layer_ms: float) -> dict:
    """offload.simulate's time model: copies at copy_gbps, no CPU experts, layer_ms of compute a layer."""
    from offload import CostModel
    cost = CostModel(copy_bytes_per_s=copy_gbps * 1e9, cpu_base_s=1.0, cpu_per_token_s=0.0, copy_latency_s=0.0)
    return dict(cost=cost, expert_bytes=int(expert_bytes), layer_compute_s=layer_ms * 1e-3)


def simulate_rows(held: RoutingTrace, nxt: np.ndarray, slots: int, ks: list[int], expert_bytes: float,
                  copy_gbps: float, layer_ms: float) -> list[dict]:
    """offload.simulate over the held-out requests one token a step (LRU, ``slots`` per layer): no
    prefetch, each token's first k guesses for each k, and the true next layer as the guess."""
    from offload import simulate
    true_next = np.concatenate([held.expert_ids[1:], np.full_like(held.expert_ids[:1], -1)])
    kw = _time_model(expert_bytes, copy_gbps, layer_ms)
    rows = [dict(guess="none", **simulate(held, "lru", slots, **kw))]
    for k in ks:
        rows.append(dict(guess=f"first {k}", **simulate(held, "lru", slots, prefetch="guesses", guesses=nxt,
                                                        prefetch_k=k, **kw)))
    rows.append(dict(guess="true next", **simulate(held, "lru", slots, prefetch="guesses", guesses=true_next,
                                                   prefetch_k=true_next.shape[2], **kw)))
    return rows


def policy_rows(held: RoutingTrace, slots: int, half_lives: list[float], expert_bytes: float, copy_gbps: float,
                layer_ms: float) -> list[dict]:
    """Eviction without prefetch over the held-out requests: LRU, LFU over the whole run and LFU with
    each half-life; one token a step (timed as simulate_rows) and 4 requests decoding together."""
    from offload import simulate
    from offload.policies import LFUPolicy
    kw = _time_model(expert_bytes, copy_gbps, layer_ms)
    inter, _ = held.interleaved()
    req = inter.request_ids_or_default()
    four = inter.select_tokens(np.isin(req, np.unique(req)[:4]))
    rows = []
    for name, make in [("lru", lambda: "lru"), ("lfu (whole run)", lambda: LFUPolicy())] + \
            [(f"lfu hl {h:g}", lambda h=h: LFUPolicy(half_life=h)) for h in half_lives]:
        one = simulate(held, make(), slots, **kw)
        rows.append(dict(policy=name, **one, hit4=simulate(four, make(), slots, tokens_per_step=4)["hit_ratio"]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", type=Path, help="NAME.npz of `moe predictor record` (NAME.features.npz beside it)")
    ap.add_argument("--features", type=Path, default=None, help="default: NAME.features.npz beside the trace")
    ap.add_argument("--out", type=Path, required=True, help="OUT.npz and OUT.lookahead.npz are written")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the probes fit (with --model: where the model decodes)")
    ap.add_argument("--guess", default="probes", choices=["probes", "attention", "best"],
                    help="probes (fitted on the hidden states), attention (point C of lookahead_points.py; needs "
                         "--model) or best (per layer, the one that reads the fitting half better)")
    ap.add_argument("--model", type=Path, default=None, help="the model that recorded the trace (--guess attention/best)")
    ap.add_argument("--simulate", type=int, default=0, metavar="SLOTS",
                    help="also simulate the cache over the written requests (offload.simulate, LRU, SLOTS per layer, "
                         "one token a step) with no prefetch, the guesses and the true next layer")
    ap.add_argument("--k", default="8,6,4,2", help="with --simulate: each token's first k guesses, one row each")
    ap.add_argument("--half-lives", default="7,23,69,693",
                    help="with --simulate: LFU half-lives (steps) of the eviction rows (offload.policies.LFUPolicy)")
    ap.add_argument("--expert-mb", type=float, default=12.58, help="with --simulate: MB per expert (OLMoE: 12.58)")
    ap.add_argument("--copy-gbps", type=float, default=53.0, help="with --simulate: host -> GPU GB/s (H200: 52-55)")
    ap.add_argument("--layer-ms", type=float, default=0.12,
                    help="with --simulate: a layer's compute, ms (OLMoE widths: 5.76 ms a 48-layer step, 3j)")
    args = ap.parse_args(argv)
    trace = RoutingTrace.load(args.trace)
    req = trace.request_ids_or_default()
    fit, held = trace.split_requests(0.5, seed=0)
    fit_mask = np.isin(req, np.unique(fit.request_ids_or_default()))
    if args.guess != "probes" and args.model is None:
        raise SystemExit(f"--guess {args.guess} needs --model: the model that recorded the trace")
    t0 = time.perf_counter()
    if args.guess != "attention":
        fpath = args.features or args.trace.with_name(args.trace.name.replace(".npz", ".features.npz"))
        if not fpath.exists():
            raise SystemExit(f"{fpath} not found: record the trace with its hidden states (`moe predictor record`, "
                             "features on) or give --features")
        hidden = hidden_matrix(load_features(fpath), trace.num_layers)
        if hidden is None:
            raise SystemExit(f"{fpath} lacks hidden_<l> for some of the {trace.num_layers} layers")
        probes = ProbeLookahead.fit(fit, hidden[fit_mask], span=1, device=args.device)
        print(f"probes fitted on {int(fit_mask.sum())} tokens in {time.perf_counter() - t0:.1f} s")
        nxt = guesses(probes, hidden[~fit_mask], trace.top_k)
    if args.guess != "probes":
        t0 = time.perf_counter()
        model = load_recorder(args.model, trace, args.device)
        att = attention_guesses(model, held)
        print(f"point C's guesses (layer l+1's attention, then its router) in {time.perf_counter() - t0:.1f} s")
        if args.guess == "attention":
            nxt = att
        else:  # per layer, the source that reads the fitting half's next layer better
            on_fit_p = guesses(probes, hidden[fit_mask], trace.top_k)
            on_fit_a = attention_guesses(model, fit)
            take = [layer_recall(on_fit_a, fit, l) > layer_recall(on_fit_p, fit, l) for l in range(trace.num_layers - 1)]
            for l, a in enumerate(take):
                if a:
                    nxt[l] = att[l]
            print("per layer, guessed by: " + " ".join("C" if a else "p" for a in take) + " (fitting half)")
    print(f"held-out requests: {len(np.unique(held.request_ids_or_default()))}, {held.num_tokens} tokens; "
          f"one-ahead recall of the guesses {one_ahead_recall(nxt, held):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tpath = held.save(args.out.with_name(args.out.name + ".npz"))
    lpath = args.out.with_name(args.out.name + ".lookahead.npz")
    np.savez_compressed(lpath, next_ids=nxt)
    print(f"wrote {tpath} and {lpath}")
    if args.simulate:
        rows = simulate_rows(held, nxt, args.simulate, [int(k) for k in args.k.split(",")], args.expert_mb * 1e6,
                             args.copy_gbps, args.layer_ms)
        print(f"\n## simulated decode, one token a step over {held.num_tokens} tokens: LRU, {args.simulate} slots a "
              f"layer, {args.expert_mb} MB experts at {args.copy_gbps} GB/s, {args.layer_ms} ms a layer\n"
              f"{'guess':>10s} {'hit':>5s} {'MB/step':>8s} {'precision':>9s} {'ms/step':>8s} {'copy floor':>10s}")
        for r in rows:
            mb = r["bytes_copied"] / r["steps"] / 1e6
            floor = mb / args.copy_gbps + trace.num_layers * args.layer_ms
            print(f"{r['guess']:>10s} {r['hit_ratio']:5.3f} {mb:8.1f} {r['prefetch_precision']:9.2f} "
                  f"{r['time_per_step_s'] * 1e3:8.2f} {floor:10.2f}")
        rows = policy_rows(held, args.simulate, [float(h) for h in args.half_lives.split(",")],
                           args.expert_mb * 1e6, args.copy_gbps, args.layer_ms)
        print(f"\n## eviction, no prefetch (one token a step as above; hit4: 4 requests decoding together)\n"
              f"{'policy':>12s} {'hit':>5s} {'MB/step':>8s} {'ms/step':>8s} {'hit4':>5s}")
        for r in rows:
            print(f"{r['policy']:>12s} {r['hit_ratio']:5.3f} {r['bytes_copied'] / r['steps'] / 1e6:8.1f} "
                  f"{r['time_per_step_s'] * 1e3:8.2f} {r['hit4']:5.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
