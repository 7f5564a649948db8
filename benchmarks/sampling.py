"""Sampling the next token: moe.sampling.sample_tokens per call, at a real vocabulary, against its floor.

    python benchmarks/sampling.py                          # H200: Qwen3-30B-A3B's vocabulary, 1/8/32 rows
    python benchmarks/sampling.py --old path/to/other/tree # also time another checkout's sample_tokens
    python benchmarks/sampling.py --device cpu --vocab 4096 --rows 1,2 --calls 3   # a check of the script

Host wall time per call (the call returns Python ints, so it includes the read back), for three
settings: temperature only, temperature with a seed per row, and nucleus filtering (top_p 0.9).
Floor = the logits' bytes read once / measured copy bandwidth (the draw itself is elementwise).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.decode import measure_bandwidth  # noqa: E402


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_calls(mod, logits, kw, seeded, calls, dev) -> float:
    R = logits.shape[0]
    params = [mod.SamplingParams(seed=i if seeded else None, **kw) for i in range(R)]
    gens = [p.make_generator(dev) for p in params]
    for _ in range(3):
        mod.sample_tokens(logits, params, gens)
    sync(dev)
    t = time.perf_counter()
    for _ in range(calls):
        mod.sample_tokens(logits, params, gens)
    return (time.perf_counter() - t) / calls * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size (default: Qwen3-30B-A3B's)")
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--old", default="", help="another checkout whose moe/sampling.py is timed beside")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    mods = [("now", load(ROOT / "moe" / "sampling.py", "sampling_now"))]
    if args.old:
        mods.insert(0, ("old", load(Path(args.old) / "moe" / "sampling.py", "sampling_old")))
    bw = measure_bandwidth(dev)  # bytes/s of a device copy (read + write); nan on the CPU
    settings = (("temperature 0.8", dict(temperature=0.8), False), ("seeded", dict(temperature=0.8), True),
                ("top_p 0.9", dict(temperature=0.8, top_p=0.9), False))
    print(f"vocabulary {args.vocab}, {dev}; copy bandwidth {bw / 1e12:.2f} TB/s; ms per call")
    print(f"{'rows':>4} {'setting':16s} {'floor':>8} " + " ".join(f"{name:>8}" for name, _ in mods))
    for R in [int(r) for r in args.rows.split(",")]:
        logits = torch.randn(R, args.vocab, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
        floor = logits.numel() * logits.element_size() / bw * 1e3
        for label, kw, seeded in settings:
            ts = [time_calls(mod, logits, kw, seeded, args.calls, dev) for _, mod in mods]
            print(f"{R:4d} {label:16s} {floor:8.4f} " + " ".join(f"{t:8.3f}" for t in ts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
