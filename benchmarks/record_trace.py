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

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe import Tokenizer, load_model  # noqa: E402
from moe.corpus import EOS_TEXT, CorpusConfig, build_corpus, read_documents  # noqa: E402
from moe.tiny import ASSETS_DEFAULT  # noqa: E402
from routing import RoutingTrace  # noqa: E402
from routing.record import record_sequences, save_features  # noqa: E402


def heldout_sequences(tok: Tokenizer, heldout: Path, max_tokens: int, seq_len: int) -> list[list[int]]:
    eos = tok.encode(EOS_TEXT, add_special_tokens=False)
    seqs, total = [], 0
    for doc in read_documents(heldout):
        ids = eos + tok.encode(doc, add_special_tokens=False)
        for i in range(0, len(ids), seq_len):
            piece = ids[i:i + seq_len][:max_tokens - total]
            if len(piece) >= 16:
                seqs.append(piece)
                total += len(piece)
            if total >= max_tokens:
                return seqs
    return seqs


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
    with torch.no_grad():
        trace, feats = record_sequences(model, seqs, batch_size=8, hidden_layers="all")
    token_ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    trace = RoutingTrace(trace.expert_ids, trace.num_experts, None, trace.request_ids, trace.positions,
                         {**trace.meta, "model_dir": str(Path(args.model).resolve()), "text": "stdlib held-out"},
                         token_ids=token_ids if len(token_ids) == trace.num_tokens else trace.token_ids)
    path = trace.save(args.out / f"{args.name}.npz")
    fpath = save_features(args.out / f"{args.name}.features.npz",
                          {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feats.items()})
    print(f"{trace!r} -> {path}; features -> {fpath} ({fpath.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
