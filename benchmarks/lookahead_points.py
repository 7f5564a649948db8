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


@torch.no_grad()
def attention_point(model, sequences, batch: int = 64, keep_guesses: bool = False, ahead: int = 1,
                    keep_logits: bool = False):
    """Per target layer 1..L-1 (0.0 where it or its source layer has no router, or it lies less than ``ahead``
    layers in): router recall from C, the sequences decoded token by token in batches of equal length. ``ahead``
    a: layer l's guess of layer l+a runs the attention of layers l+1 .. l+a in turn on the residual entering layer
    l's experts (every expert between skipped), then layer l+a's router. Each of those attentions writes its
    guess's key and value into the cache slot the real layer then overwrites (the cache advances after the step).
    keep_guesses: also returns, per sequence in order, the guesses [L, n, K] int16 (row l: layer l's guess of
    layer l+a's K experts for each token, best first; -1 where there is none, as in the last a rows).
    keep_logits: returns (recalls, guesses, logits): also, per sequence, the guesses' router logits [L, n, E]
    float32 (0 where there is none): what a predictor's lookahead source reads (routing.AttentionLookahead)."""
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1, got {ahead}")
    layers = model.layers
    L = len(layers)
    K = model.config.num_experts_per_tok
    # counted on the device, read once at the end: a read per layer would stall the host on every layer's kernels
    hits = torch.zeros(max(L - 1, 0), dtype=torch.int64, device=model.device)
    count = torch.zeros(max(L - 1, 0), dtype=torch.int64, device=model.device)
    keep_guesses = keep_guesses or keep_logits
    E = model.config.num_experts
    kept = [np.full((L, len(s), K), -1, dtype=np.int16) for s in sequences] if keep_guesses else None
    kept_lg = [np.zeros((L, len(s), E), dtype=np.float32) for s in sequences] if keep_logits else None
    by_len: dict[int, list] = {}
    for j, s in enumerate(sequences):
        by_len.setdefault(len(s), []).append(j)
    for n, group in by_len.items():
        for i in range(0, len(group), batch):
            rows = group[i:i + batch]
            ids = torch.tensor([sequences[j] for j in rows], device=model.device)
            B = ids.shape[0]
            cache = model.new_cache(B, n + 1)
            made = torch.full((L, B, n, K), -1, dtype=torch.int16, device=model.device) if kept is not None else None
            made_lg = torch.zeros((L, B, n, E), device=model.device) if kept_lg is not None else None
            for t in range(n):
                pos, mask, windowed, slots = model._positions_and_masks(B, 1, cache, None, None)
                x = model.embed(ids[:, t:t + 1])
                cos, sin = model.rotary(pos, x.dtype)
                cache.step_slots(pos)
                pending: dict[int, torch.Tensor] = {}  # target layer -> the guess made for it
                try:
                    for l, layer in enumerate(layers):
                        xmid, h = layer.attention_half(x, cos, sin, layer.pick_mask(mask, windowed), cache, slots)
                        routed = hasattr(layer.mlp, "router")
                        guess = pending.pop(l, None)
                        if guess is not None and routed:
                            true = layer.mlp.router(h.reshape(B, -1))[0]
                            hits[l - 1] += (guess.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).sum()
                            count[l - 1] += true.numel()
                        target = l + ahead
                        if routed and target < L and hasattr(layers[target].mlp, "router"):
                            xg = xmid
                            for j in range(l + 1, target + 1):
                                xg, hg = layers[j].attention_half(xg, cos, sin, layers[j].pick_mask(mask, windowed),
                                                                  cache, slots)
                            routed_g = layers[target].mlp.router(hg.reshape(B, -1))
                            pending[target] = routed_g[0]
                            if made is not None:
                                made[l, :, t] = pending[target].to(torch.int16)
                            if made_lg is not None:
                                made_lg[l, :, t] = routed_g[2].float()
                        x = xmid + layer.mlp(h)
                finally:
                    cache.step_slots(None)
                cache.advance(None, 1)
            if made is not None:
                got = made.cpu().numpy()
                for b, j in enumerate(rows):
                    kept[j][:] = got[:, b]
            if made_lg is not None:
                got = made_lg.cpu().numpy()
                for b, j in enumerate(rows):
                    kept_lg[j][:] = got[:, b]
    hits, count = hits.tolist(), count.tolist()
    recalls = [float(h / c) if c else 0.0 for h, c in zip(hits, count)]
    if keep_logits:
        return recalls, kept, kept_lg
    return (recalls, kept) if keep_guesses else recalls


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
