"""`moe predictor {record,train,eval,stats,synth}`: the routing-path predictor from the command line.

    moe predictor record MODEL --text A.txt [B.txt ...] --out DIR [--name N] [--no-features]
    moe predictor train TRACE.npz --out P.npz [--features F.npz [--model DIR [--attention]]]
    moe predictor eval P.npz TEST.npz [--train TRAIN.npz] [--features F.npz [--model DIR]]
    moe predictor stats TRACE.npz
    moe predictor synth OUT.npz --layers 8 --experts 16 --top-k 2 --affinity 0.8 ...

``--features`` is the companion file of a recorded trace (``routing.save_features``) holding the
hidden state entering every MoE layer. With it, ``train`` fits probes from that hidden state to the
next layers' experts (``routing.probe.ProbeLookahead``, written beside the predictor as
``P.probe.npz``) and the predictor uses them as its lookahead source. Given ``--model DIR`` (the
model the trace came from) the probes start from that model's own routers and correct them
(``--lookahead probe+router``, the default then); ``--lookahead gate`` uses the routers as they are
(mixtral-offloading's trick). ``--attention`` adds point C (``routing.point_c``: the next layer's own
attention on the residual entering a layer's experts, then its router) one ahead over the probes
(``routing.AttentionLookahead``): the model decodes the trace's requests, and offloading runs it live. ``eval
--features`` reads the probes back (or the routers, given ``--model``) and adds them as a baseline. The hub
(moe/cli.py) imports this module lazily and calls ``register(subparsers)``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .baselines import GateLookahead, NearestTraceBaseline, PathModel, PopularityBaseline, PreviousPathBaseline
from .predictor import PathPredictor, PredictorConfig, cost_per_token_us, evaluate
from .probe import ProbeLookahead
from .record import hidden_matrix, load_features
from .stats import format_summary, summarize
from .synthetic import synthesize
from .trace import RoutingTrace


def format_table(rows: list[tuple[str, dict, float]], keys=("1", "2", "4", "all")) -> str:
    """One line per method: mean recall (top-k) and recall/precision of the top-2k set per distance."""
    head = f"{'method':<16}" + "".join(f"{'R@' + k:>8}{'R2k@' + k:>9}{'P2k@' + k:>9}" for k in keys) + f"{'us/tok':>9}"
    lines = [head, "-" * len(head)]
    for name, r, us in rows:
        cells = "".join(f"{r[k]['mean_recall']:>8.3f}{r[k]['mean_recall_2k']:>9.3f}{r[k]['mean_precision_2k']:>9.3f}"
                        if k in r else f"{'-':>8}{'-':>9}{'-':>9}" for k in keys)
        lines.append(f"{name:<16}{cells}{us:>9.1f}")
    return "\n".join(lines)


def per_layer_table(name: str, r: dict, keys=("1", "2", "4", "all")) -> str:
    L = len(next(iter(r.values()))["recall"])
    head = f"{name} per target layer (recall of top-k; precision = recall when every token has k experts)"
    lines = [head, f"{'ahead':<8}" + "".join(f"{m:>7}" for m in range(L))]
    for k in keys:
        if k in r:
            lines.append(f"{k:<8}" + "".join(f"{v:>7.3f}" if np.isfinite(v) else f"{'-':>7}" for v in r[k]["recall"]))
    return "\n".join(lines)


def _features(args, trace: RoutingTrace) -> dict | None:
    """{"hidden_NLD"} from --features, checked against the trace."""
    if not getattr(args, "features", None):
        return None
    f = load_features(args.features)
    hidden = hidden_matrix(f, trace.num_layers)
    if hidden is None:
        raise ValueError(f"{args.features} lacks hidden_<l> for all {trace.num_layers} layers; record with "
                         "hidden_layers='all'")
    if hidden.shape[0] != trace.num_tokens:
        raise ValueError(f"{args.features} has {hidden.shape[0]} tokens but the trace {trace.num_tokens}")
    return {"hidden_NLD": hidden}


def _gate(args, trace: RoutingTrace) -> GateLookahead:
    import torch

    from moe import load_model  # the model package; routing never imports offload/ or serve/
    # float32 routers: a probe's start is linearized from them, and on the CPU bfloat16 is no faster
    return GateLookahead.from_model(load_model(args.model, dtype=torch.float32), fallback=PopularityBaseline.fit(trace))


def probe_path(predictor: Path) -> Path:
    """Where ``train`` writes the probes of predictor file P.npz: P.probe.npz."""
    p = Path(predictor)
    return p.with_name((p.name[:-4] if p.name.endswith(".npz") else p.name) + ".probe.npz")


def load_predictor(path: str | Path) -> PathPredictor:
    """A predictor file of ``train`` with its probes (P.probe.npz beside it, when there) as its lookahead."""
    beside = probe_path(path)
    return PathPredictor.load(path, lookahead=ProbeLookahead.load(beside) if beside.is_file() else None)


def _with_point_c(model_dir: Path, trace: RoutingTrace, feats: dict, base, dev: str) -> tuple[dict, GateLookahead]:
    """--attention: the model decodes the trace's requests token by token and point C's next-layer logits
    (routing.point_c) are appended to the hidden states; the lookahead reads them one ahead over ``base``."""
    import torch

    from moe import load_model
    from .baselines import AttentionLookahead
    from .point_c import attention_guesses
    model = load_model(model_dir, dtype=torch.float32, device=dev,
                       backend="triton" if str(dev).startswith("cuda") else "torch").eval()
    if len(model.moe_blocks()) != trace.num_layers:
        raise ValueError(f"{model_dir} has {len(model.moe_blocks())} MoE layers, the trace {trace.num_layers}: give "
                         "the model that recorded it")
    t0 = time.perf_counter()
    _, logits = attention_guesses(model, trace, logits=True)
    print(f"point C decoded over the trace's {trace.num_tokens} tokens in {time.perf_counter() - t0:.1f} s")
    look = AttentionLookahead(trace.num_layers, trace.num_experts, trace.top_k, base=base,
                              fallback=PopularityBaseline.fit(trace))
    return {"hidden_NLD": np.concatenate([feats["hidden_NLD"].astype(np.float32), logits], axis=-1)}, look


def _train(args: argparse.Namespace) -> int:
    trace = RoutingTrace.load(args.trace)
    feats = _features(args, trace)
    if args.model and feats is None:
        raise ValueError("--model needs --features (the hidden states the gates are applied to)")
    if args.attention and (feats is None or not args.model):
        raise ValueError("--attention needs --features and --model DIR: the model that recorded the trace runs each "
                         "next layer's attention (point C) over its requests")
    if args.attention and (args.lookahead or "") == "gate":
        raise ValueError("--attention reads point C over fitted probes: use --lookahead probe or probe+router")
    lookahead = None
    if feats is not None:
        kind = args.lookahead or ("probe+router" if args.model else "probe")
        if kind in ("gate", "probe+router") and not args.model:
            raise ValueError(f"--lookahead {kind} needs --model DIR (the model whose routers are applied)")
        if args.fit_device.startswith("cuda") and kind != "gate":
            import torch
            if not torch.cuda.is_available():
                raise ValueError(f"--fit-device {args.fit_device}: this machine has no CUDA device; fit on the CPU "
                                 "(--fit-device cpu, the default)")
        if kind == "gate":
            lookahead = _gate(args, trace)
        else:
            t0 = time.perf_counter()
            prior = _gate(args, trace) if kind == "probe+router" else None
            lookahead = ProbeLookahead.fit(trace, feats["hidden_NLD"], span=args.probe_span, seed=args.seed,
                                           prior=prior, device=args.fit_device)
            how = "" if prior is None else " from the model's routers"
            print(f"probes fitted{how} in {time.perf_counter() - t0:.1f} s (span {lookahead.span})")
    if args.attention:
        feats, lookahead = _with_point_c(args.model, trace, feats, lookahead, args.fit_device)
    cfg = PredictorConfig(context_layers=args.context_layers, token_buckets=args.token_buckets,
                          max_span=args.max_span, match_layers=args.match_layers, seed=args.seed)
    t0 = time.perf_counter()
    p = PathPredictor.fit(trace, cfg, features=feats, lookahead=lookahead, verbose=True)
    print(f"trained on {trace!r} in {time.perf_counter() - t0:.1f} s")
    out = p.save(args.out)
    print(f"written to {out}")
    stale = probe_path(out)
    probes = getattr(lookahead, "base", lookahead)  # (point C's lookahead is saved as its probes and a header mark)
    if isinstance(probes, ProbeLookahead):
        print(f"probes written to {probes.save(stale)}")
    elif stale.exists():  # a probe file of an earlier training must not pair with this predictor
        stale.unlink()
    return 0


def _eval(args: argparse.Namespace) -> int:
    trace = RoutingTrace.load(args.trace)
    feats = _features(args, trace)
    if args.model and feats is None:
        raise ValueError("--model needs --features (the hidden states the gates are applied to)")
    # the lookahead the predictor was trained with: its probes when train wrote them, else the gates
    probes = ProbeLookahead.load(probe_path(args.predictor)) if feats is not None and \
        probe_path(args.predictor).is_file() else None
    gate = _gate(args, trace) if args.model else None
    pred = PathPredictor.load(args.predictor, lookahead=probes or gate)
    pred_feats = feats
    if getattr(pred.lookahead, "reads_attention", False):  # trained with --attention: it reads point C's logits too
        if feats is None or not args.model:
            raise ValueError(f"{args.predictor} reads point C (trained with --attention): give --features and --model "
                             "DIR, whose model decodes the trace's requests for it")
        pred_feats, _ = _with_point_c(args.model, trace, feats, probes, args.device)
    models: list[PathModel] = [pred]
    if args.train:
        train = RoutingTrace.load(args.train)
        models += [PopularityBaseline.fit(train), PreviousPathBaseline.fit(train), NearestTraceBaseline.fit(train)]
    models += [m for m in (gate, probes) if m is not None]
    rows = []
    for m in models:
        f = pred_feats if m is pred else feats
        r = evaluate(m, trace, f, max_tokens=args.max_tokens)
        rows.append((m.name, r, cost_per_token_us(m, trace, features=f)))
    print(per_layer_table(rows[0][0], rows[0][1]))
    print(format_table(rows))
    return 0


def _stats(args: argparse.Namespace) -> int:
    print(format_summary(summarize(RoutingTrace.load(args.trace))))
    return 0


def _synth(args: argparse.Namespace) -> int:
    t = synthesize(args.layers, args.experts, args.top_k, args.requests, args.tokens, args.skew, args.locality,
                   args.affinity, args.seed, args.planted, args.noise)
    print(f"{t!r} written to {t.save(args.out)}")
    return 0


def _record(args: argparse.Namespace) -> int:
    """Record a model's routing (and hidden states) on text files: the trace `train` learns from."""
    import torch

    from moe import Tokenizer, load_model  # the model package; routing never imports offload/ or serve/

    from .record import pieces, record_trace, save_features
    missing = [str(f) for f in args.text if not Path(f).is_file()]
    if missing:
        raise ValueError(f"text file(s) not found: {missing}; give the text the model will serve, one or more "
                         "plain-text files")
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, dtype=dtype, device=device).eval()
    tok = Tokenizer.from_dir(args.model)
    docs = (tok.encode(Path(f).read_text(encoding="utf-8", errors="replace")) for f in args.text)
    seqs = pieces(docs, args.tokens, args.seq_len)
    if not seqs:
        raise ValueError("the text files give no piece of at least 16 tokens; give more text")
    trace, feats = record_trace(model, seqs, {"model_dir": str(Path(args.model).resolve()),
                                              "text": [str(f) for f in args.text]},
                                features=args.features, batch_size=args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    path = trace.save(args.out / f"{args.name}.npz")
    print(f"{trace!r} -> {path}")
    if args.features:
        fpath = save_features(args.out / f"{args.name}.features.npz", feats)
        print(f"hidden states -> {fpath} ({fpath.stat().st_size / 1e6:.1f} MB); then: moe predictor train {path} "
              f"--features {fpath} --out P.npz")
    else:
        print(f"then: moe predictor train {path} --out P.npz")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predictor", help="train / evaluate the routing-path predictor",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="predictor_command", required=True)

    t = sub.add_parser("train", help="fit a PathPredictor to a routing trace")
    t.add_argument("trace", type=Path, help="routing trace .npz (RoutingTrace.save)")
    t.add_argument("--out", type=Path, required=True, help="where to write the predictor (.npz)")
    t.add_argument("--features", type=Path, default=None, help="companion features .npz (hidden states)")
    t.add_argument("--model", type=Path, default=None,
                   help="the model the trace was recorded from: its routers start the probes (or, with "
                        "--lookahead gate, are the lookahead)")
    t.add_argument("--lookahead", choices=("probe", "gate", "probe+router"), default=None,
                   help="with --features: probes fitted from zero (the default without --model), the model's own "
                        "routers (gate), or probes started from those routers (probe+router, the default with "
                        "--model: they read deep models' next layers better than either, BENCHMARKS 7h)")
    t.add_argument("--fit-device", default="cpu", help="where the probes are fitted (cuda: seconds for a deep model)")
    t.add_argument("--attention", action="store_true",
                   help="the lookahead also reads point C one ahead (the next layer's own attention on the residual "
                        "entering a layer's experts, then its router; needs --model; the model decodes the trace's "
                        "requests on --fit-device): BENCHMARKS 7m. Offloading then runs it live in the model")
    t.add_argument("--probe-span", type=int, default=4, help="layers ahead each probe set reaches")
    t.add_argument("--context-layers", type=int, default=3, help="recent known layers used as evidence")
    t.add_argument("--token-buckets", type=int, default=4096, help="hashed token-id table rows (0: off)")
    t.add_argument("--max-span", type=int, default=16, help="longest layer distance with a transition table")
    t.add_argument("--match-layers", type=int, default=PredictorConfig.match_layers,
                   help="latest known layers whose exact expert set is looked up (default 0: none). 2 makes a "
                        "call ~3x dearer at batch 1 (187-244 us against 64-78 at Qwen3-30B-A3B's shape) for <= "
                        "0.004 next-layer recall and no hit ratio on trained models (BENCHMARKS 7e); it pays on "
                        "collapsed routing, where a layer's set fingerprints the token")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)

    r = sub.add_parser("record", help="record a model's routing (and hidden states) on text files")
    r.add_argument("model", type=Path, help="model directory (Hugging Face format, as `moe generate` takes)")
    r.add_argument("--text", type=Path, nargs="+", required=True, help="plain-text files, one document each")
    r.add_argument("--out", type=Path, required=True, help="folder for NAME.npz (and NAME.features.npz)")
    r.add_argument("--name", default="trace")
    r.add_argument("--tokens", type=int, default=16384, help="tokens to record")
    r.add_argument("--seq-len", type=int, default=256, help="tokens per request (documents are cut into pieces)")
    r.add_argument("--features", action=argparse.BooleanOptionalAction, default=True,
                   help="also keep the hidden state entering every MoE layer (float16; T x L x D values), for "
                        "the probes of `train --features` (default on)")
    r.add_argument("--batch-size", type=int, default=8, help="requests per forward")
    r.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]; the model must fit there")
    r.set_defaults(func=_record)

    e = sub.add_parser("eval", help="recall/precision at 1/2/4/all layers ahead on a trace")
    e.add_argument("predictor", type=Path, help="predictor .npz from `moe predictor train`")
    e.add_argument("trace", type=Path, help="held-out routing trace .npz")
    e.add_argument("--train", type=Path, default=None, help="training trace: also fit and show the baselines")
    e.add_argument("--features", type=Path, default=None)
    e.add_argument("--model", type=Path, default=None)
    e.add_argument("--max-tokens", type=int, default=2000, help="tokens sampled for the evaluation")
    e.add_argument("--device", default="cpu", help="where a predictor trained with --attention has the model decode "
                                                   "the trace (point C)")
    e.set_defaults(func=_eval)

    s = sub.add_parser("stats", help="popularity entropy, inter-layer affinity, reuse distance of a trace")
    s.add_argument("trace", type=Path)
    s.set_defaults(func=_stats)

    y = sub.add_parser("synth", help="write a synthetic routing trace")
    y.add_argument("out", type=Path)
    y.add_argument("--layers", type=int, default=8)
    y.add_argument("--experts", type=int, default=16)
    y.add_argument("--top-k", type=int, default=2)
    y.add_argument("--requests", type=int, default=16)
    y.add_argument("--tokens", type=int, default=64, help="tokens per request")
    y.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of expert popularity")
    y.add_argument("--locality", type=float, default=0.0, help="P(reuse the previous token's experts)")
    y.add_argument("--affinity", type=float, default=0.0, help="P(follow the inter-layer successor)")
    y.add_argument("--planted", type=int, default=0, help="number of planted paths (0: off)")
    y.add_argument("--noise", type=float, default=0.0, help="planted-path noise")
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(func=_synth)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m routing.cli predictor ...`: the same as `moe predictor ...` (the hub parses and reports errors)."""
    from moe.cli import main as moe_main

    return moe_main(argv)


if __name__ == "__main__":
    sys.exit(main())
