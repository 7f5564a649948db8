"""How well the next layer's router reads ahead, from two points of the forward (issue 6).

    python benchmarks/lookahead_points.py MODEL [--tokens 4096] [--text HELDOUT.txt] [--device cuda]

A model's own routers as the lookahead (Fate's and mixtral-offloading's trick), on held-out text
(the held-out half of the stdlib corpus unless --text names another, e.g. a `moe.corpus` directory's
heldout.txt), the next layer's top-k recall from:
  A   the router input of layer l (what benchmarks/predictor.py's gate-lookahead uses: known when
      layer l's routing is, so a prefetch overlaps layer l's experts and layer l+1's attention)
  A'  the same, rescaled from layer l's norm gain to layer l+1's
  B   the residual after layer l, through layer l+1's norm (known only once layer l's experts have
      run: a prefetch then overlaps layer l+1's attention alone)
  C   layer l+1's own attention run on the residual entering layer l's experts (layer l's experts
      skipped; the keys and values of the earlier tokens are the real ones in the KV cache), then
      layer l+1's norm and router: known when A is (after layer l's attention), at the cost of one
      more attention a layer. Decoded token by token with the cache (``attention_point``). --ahead 2,4:
      the same a layers ahead (C2, C4: the attentions of layers l+1 .. l+a in turn, then layer l+a's router).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe import Tokenizer, load_model  # noqa: E402
from moe.corpus import CorpusConfig, build_corpus  # noqa: E402
from routing.point_c import attention_point  # noqa: E402  (in the library: the predictor CLI records it too)

# the held-out sequences exactly as record_trace.py cuts them (benchmarks/ is not a package, and its
# kernels.py would shadow the library's `kernels` on sys.path)
_spec = importlib.util.spec_from_file_location("record_trace", Path(__file__).with_name("record_trace.py"))
record_trace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(record_trace)


def topk_recall(logits: torch.Tensor, true_ids: torch.Tensor) -> float:
    pred = logits.topk(true_ids.shape[-1], -1).indices
    return (pred.unsqueeze(-1) == true_ids.unsqueeze(-2)).any(-1).float().mean().item()


@torch.no_grad()
def lookahead_points(model, sequences) -> dict[str, list[float]]:
    """Per target layer 1..L-1: next-layer router recall from the points A, A' and B."""
    layers = model.layers
    L = len(layers)
    rin, hout, ids = ([[] for _ in range(L)] for _ in range(3))
    handles = []
    for l, layer in enumerate(layers):
        def on_router(mod, args, out, l=l):
            rin[l].append(args[0].reshape(-1, args[0].shape[-1]))
            ids[l].append(out[0].reshape(-1, out[0].shape[-1]))

        def on_layer(mod, args, out, l=l):
            x = out[0] if isinstance(out, tuple) else out
            hout[l].append(x.reshape(-1, x.shape[-1]))
        handles += [layer.mlp.router.register_forward_hook(on_router), layer.register_forward_hook(on_layer)]
    try:
        for s in sequences:
            model(torch.tensor([s], device=model.device))
    finally:
        for h in handles:
            h.remove()
    rin, hout, ids = ([torch.cat(x) for x in v] for v in (rin, hout, ids))
    out = {"A": [], "A'": [], "B": []}
    for l in range(L - 1):
        nxt = layers[l + 1]
        w = nxt.mlp.router.weight
        gain = nxt.post_attention_layernorm.weight / layers[l].post_attention_layernorm.weight
        out["A"].append(topk_recall(rin[l] @ w.T, ids[l + 1]))
        out["A'"].append(topk_recall((rin[l] * gain) @ w.T, ids[l + 1]))
        out["B"].append(topk_recall(nxt.post_attention_layernorm(hout[l]) @ w.T, ids[l + 1]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--text", type=Path, default=None, help="held-out text (default: the stdlib corpus's held-out half)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ahead", type=lambda v: [int(a) for a in v.split(",")], default=[1],
                    help="point C this many layers ahead, comma list (C2: layers l+1 and l+2's attention, then l+2's "
                         "router; the mean is over the targets it reaches)")
    ap.add_argument("--backend", default=None, choices=["torch", "triton"],
                    help="expert backend (default: triton on a GPU, where the torch loop's launches per expert dominate "
                         "a token-by-token decode; torch on the CPU)")
    args = ap.parse_args()
    backend = args.backend or ("triton" if str(args.device).startswith("cuda") else "torch")
    model = load_model(args.model, dtype=torch.float32, device=args.device, backend=backend).eval()
    tok = Tokenizer.from_dir(args.model)
    if args.text is not None:
        seqs = record_trace.heldout_sequences(tok, args.text, args.tokens, args.seq_len)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            build_corpus(tmp, CorpusConfig())
            seqs = record_trace.heldout_sequences(tok, Path(tmp) / "heldout.txt", args.tokens, args.seq_len)
    t0 = time.perf_counter()
    res = lookahead_points(model, seqs)
    n = len(res["A"])
    print(f"{args.model}: next-layer router recall (top-k) on {sum(map(len, seqs))} held-out tokens "
          f"({backend} experts; A, A', B in {time.perf_counter() - t0:.1f} s)")
    print(f"{'target layer':<14}" + "".join(f"{l + 1:>6d}" for l in range(n)) + "   mean", flush=True)

    def row(k, v, first=0):  # C2 reaches targets 2.. only
        print(f"{k:<14}" + "".join(f"{x:>6.3f}" if i >= first else f"{'':>6}" for i, x in enumerate(v))
              + f" {np.mean(v[first:]):>6.3f}", flush=True)
    for k, v in res.items():
        row(k, v)
    for a in args.ahead:  # each printed as it is done: the token-by-token decodes are the slow part
        t0 = time.perf_counter()
        v = attention_point(model, seqs, ahead=a)
        row("C" if a == 1 else f"C{a}", v, a - 1)
        print(f"{'':<14}({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
