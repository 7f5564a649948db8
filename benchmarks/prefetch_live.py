"""Live offloaded decode of the embedded default model: which prefetch reads the next layer best.

    python benchmarks/prefetch_live.py [--traces runs/traces_features] [--slots 2] [--requests 4] [--tokens 64] [--budgets 1 2]

Needs a routing trace recorded from the default model with its hidden states
(``python benchmarks/record_trace.py --tokens 16384 --out runs/traces_features``). Its requests are split
50/50 as in ``benchmarks/predictor.py``: the train half fits the probes (``routing.ProbeLookahead``) and
the path predictor; the test half's longest requests are decoded together, token by token with their
real tokens (teacher forcing), by the offloaded model on the CPU with ``--slots`` expert slots per layer,
once per prefetch mode:

    none               demand caching only (LRU)
    next_layer_gate    layer l+1's router on layer l's input (mixtral-offloading's speculation)
    attention          layer l+1's own attention on the residual entering layer l's experts, then its
                       router (point C of benchmarks/lookahead_points.py; offload.prefetch.AttentionRouter)
    probe              layer l's fitted probe to layer l+1 instead of the router
    predictor          LRU + the path predictor's prefetch (with the probes as its lookahead source,
                       handed each layer's input)
    predictor policy   the predictor's eviction and prefetch
    predictor bN       the predictor's prefetch queued behind the layer's demand copies, at most N
                       expert copies per layer (``OffloadConfig.prefetch_budget``; the rows above
                       prefetch only while the copy engine is idle)
    pred. policy bN    the same with the predictor's eviction
    pred.+C [policy] bN  the same with a predictor whose lookahead reads point C one ahead over the probes
                       (routing.AttentionLookahead; the offloaded layers hand it C's logits live)

Prints the expert-cache hit ratio and the prefetches' precision / recall of each. Runs on the CPU: it
measures what each guess is worth, not time (the copy engine's overlap is BENCHMARKS section 3's).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe import load_model  # noqa: E402
from offload import OffloadConfig, apply_offload  # noqa: E402
from routing import (AttentionLookahead, PathPredictor, PredictorConfig, ProbeLookahead, RoutingTrace,  # noqa: E402
                     hidden_matrix, load_features)
from routing.point_c import attention_guesses  # noqa: E402


@torch.no_grad()
def decode(model, tokens_BT: torch.Tensor) -> None:
    cache = model.new_cache(tokens_BT.shape[0], tokens_BT.shape[1] + 1)
    for t in range(tokens_BT.shape[1]):
        model(tokens_BT[:, t:t + 1], cache=cache)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=Path, default=ROOT / "runs" / "traces_features")
    ap.add_argument("--slots", type=int, default=2, help="expert slots per MoE layer")
    ap.add_argument("--requests", type=int, default=4, help="test requests decoded together")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per request")
    ap.add_argument("--budgets", type=float, nargs="*", default=[1.0, 2.0],
                    help="prefetch budgets (expert copies per layer) for the predictor rows that queue "
                         "behind demand copies (OffloadConfig.prefetch_budget)")
    args = ap.parse_args(argv)
    trace_path, feat_path = args.traces / "default.npz", args.traces / "default.features.npz"
    if not (trace_path.is_file() and feat_path.is_file()):
        raise SystemExit(f"needs {trace_path} and {feat_path}: record them with "
                         "`python benchmarks/record_trace.py --tokens 16384 --out runs/traces_features`")
    trace = RoutingTrace.load(trace_path)
    model_dir = trace.meta.get("model_dir") or str(ROOT / "moe" / "assets" / "default")
    hidden = hidden_matrix(load_features(feat_path), trace.num_layers)
    if hidden is None or trace.token_ids is None:
        raise SystemExit(f"{feat_path} needs hidden_<l> of every layer and the trace its token ids")
    req = trace.request_ids_or_default()
    train, test = trace.split_requests(0.5, seed=0)
    in_train = np.isin(req, np.unique(train.request_ids_or_default()))
    probes = ProbeLookahead.fit(train, hidden[in_train])
    # with the exact-set sources (match_layers=2), as section 7d was measured
    pred = PathPredictor.fit(train, PredictorConfig(match_layers=2), features={"hidden_NLD": hidden[in_train]},
                             lookahead=probes)
    # and one reading point C one ahead over the probes (routing.AttentionLookahead; its train half decoded for C)
    base = load_model(model_dir, dtype=torch.float32)
    _, c_logits = attention_guesses(base.eval(), train, logits=True)
    look_c = AttentionLookahead(trace.num_layers, trace.num_experts, trace.top_k, base=probes)
    pred_c = PathPredictor.fit(train, PredictorConfig(match_layers=2), lookahead=look_c,
                               features={"hidden_NLD": np.concatenate([hidden[in_train].astype(np.float32), c_logits],
                                                                      -1)})
    # the test half's longest requests, their first --tokens tokens, decoded together
    t_req = test.request_ids_or_default()
    uniq, counts = np.unique(t_req, return_counts=True)
    longest = uniq[np.argsort(-counts, kind="stable")[:args.requests]]
    n = min(args.tokens, int(counts[np.isin(uniq, longest)].min()))
    seqs = [test.token_ids[t_req == r][:n] for r in longest]
    tokens = torch.tensor(np.stack(seqs).astype(np.int64))
    E = trace.num_experts
    print(f"default model ({model_dir}), {trace.num_layers} MoE layers x {E} experts, top-{trace.top_k}; "
          f"{args.slots} slots per layer ({args.slots / E:.0%}); {len(seqs)} held-out requests x {n} tokens "
          "decoded together, teacher-forced")
    modes = {
        "none": dict(),
        "next_layer_gate": dict(prefetch="next_layer_gate"),
        "attention": dict(prefetch="attention"),
        "probe": dict(prefetch="probe", probes=probes),
        "predictor": dict(prefetch="predictor", predictor=pred),
        "predictor policy": dict(policy="predictor", prefetch="predictor", predictor=pred),
    }
    for b in args.budgets:  # the predictor's prefetch queued behind demand copies, b copies per layer
        modes[f"predictor b{b:g}"] = dict(prefetch="predictor", predictor=pred, prefetch_budget=b)
        modes[f"pred. policy b{b:g}"] = dict(policy="predictor", prefetch="predictor", predictor=pred,
                                             prefetch_budget=b)
        modes[f"pred.+C b{b:g}"] = dict(prefetch="predictor", predictor=pred_c, prefetch_budget=b)
        modes[f"pred.+C policy b{b:g}"] = dict(policy="predictor", prefetch="predictor", predictor=pred_c,
                                              prefetch_budget=b)
    print(f"{'prefetch':<18}{'hit ratio':>10}{'prefetches':>12}{'precision':>11}{'recall':>8}")
    for name, kw in modes.items():
        m = apply_offload(copy.deepcopy(base), OffloadConfig(slots_per_layer=args.slots, device="cpu", calibrate=False,
                                                             **{"policy": "lru", **kw}))
        decode(m, tokens)
        st = m.offload_cache.stats()
        print(f"{name:<18}{st['hit_ratio']:>10.3f}{st['prefetches']:>12d}{st['prefetch_precision']:>11.3f}"
              f"{st['prefetch_recall']:>8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
