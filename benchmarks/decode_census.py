"""What a resident decode step is made of: kernels per layer and GPU time per kernel name, from the
torch profiler over 10 CUDA-graph-replayed steps (or eager steps) of Qwen3-30B-A3B-shaped layers.

    python benchmarks/decode_census.py --layers 8            # H200; --eager for eager steps

The census behind BENCHMARKS 9's "kernels per layer" figures (batch 1, random bf16 weights).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decode import MODELS  # noqa: E402
from moe.config import MoEConfig  # noqa: E402
from moe.cuda_graph import DecodeGraphs  # noqa: E402
from moe.model import MoEForCausalLM  # noqa: E402


@torch.inference_mode()
def census(m: MoEForCausalLM, layers: int, graph: bool, steps: int = 10, top: int = 28) -> None:
    cache = m.new_cache(1, 64)
    ids = torch.randint(3, 1000, (1, 16), device="cuda")
    nxt = m(ids, cache=cache, last_only=True).argmax(-1)
    valid = torch.ones(1, 1, dtype=torch.bool, device="cuda")
    g = DecodeGraphs(m, cache) if graph else None
    length = 16

    def step():
        nonlocal nxt, length
        out = g.step(nxt, valid, length) if graph else m(nxt, cache=cache)
        nxt = out[:, -1].argmax(-1, keepdim=True)
        length += 1

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    k = collections.defaultdict(lambda: [0, 0.0])
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k[e.name[:70]][0] += 1
            k[e.name[:70]][1] += e.device_time
    n = sum(v[0] for v in k.values()) / steps
    t = sum(v[1] for v in k.values()) / steps
    print(f"\n{'graph' if graph else 'eager'} step: {n:.0f} kernels ({n / layers:.1f} per layer), {t:.0f} us GPU time")
    for name, (c, us) in sorted(k.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {c / steps:6.1f}/step {us / steps:8.1f} us  {name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--eager", action="store_true", help="census eager steps instead of graph replays")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_census.py profiles CUDA kernels: it needs a CUDA device")
    _, kw = MODELS["qwen3"]
    kw = dict(kw, num_hidden_layers=args.layers)
    cfg = MoEConfig.tiny(kw.pop("model_type"), **kw, max_position_embeddings=4096)
    m = MoEForCausalLM(cfg, backend="triton", dtype=torch.bfloat16, device="cuda")
    m.init_weights(seed=0)
    census(m.eval(), args.layers, graph=not args.eager)
    return 0


if __name__ == "__main__":
    sys.exit(main())
