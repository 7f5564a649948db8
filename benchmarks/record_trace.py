"""Record a routing trace (and the hidden state entering every MoE layer) of a model on the
held-out half of the stdlib corpus, for benchmarks/predictor.py's gate-lookahead baseline.

    python benchmarks/record_trace.py [MODEL] --tokens 8192 --out runs/traces_features

MODEL defaults to the embedded default model. Writes OUT/<name>.npz (RoutingTrace with request
ids, positions and token ids; meta model_dir) and OUT/<name>.features.npz (float16 hidden states,
[T, D] per MoE layer), then: python benchmarks/predictor.py --traces OUT
The held-out split is by file path hash (moe.corpus.is_heldout), the same on every Python
version, so these files were never trained on.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe import Tokenizer, load_model  # noqa: E402
from moe.corpus import EOS_TEXT, CorpusConfig, build_corpus, read_documents  # noqa: E402
from moe.tiny import ASSETS_DEFAULT  # noqa: E402
from routing.record import pieces, record_trace, save_features  # noqa: E402


def heldout_sequences(tok: Tokenizer, heldout: Path, max_tokens: int, seq_len: int) -> list[list[int]]:
    eos = tok.encode(EOS_TEXT, add_special_tokens=False)
    return pieces((eos + tok.encode(doc, add_special_tokens=False) for doc in read_documents(heldout)),
                  max_tokens, seq_len)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(ASSETS_DEFAULT))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--name", default="default")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model = load_model(args.model, dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        build_corpus(tmp, CorpusConfig())
        seqs = heldout_sequences(tok, Path(tmp) / "heldout.txt", args.tokens, args.seq_len)
    trace, feats = record_trace(model, seqs, {"model_dir": str(Path(args.model).resolve()), "text": "stdlib held-out"})
    path = trace.save(args.out / f"{args.name}.npz")
    fpath = save_features(args.out / f"{args.name}.features.npz", feats)
    print(f"{trace!r} -> {path}; features -> {fpath} ({fpath.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
