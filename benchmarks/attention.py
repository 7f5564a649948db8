"""The decode attention alone: kernels.decode_attention against torch's SDPA backends, and how often each
gives the same bits.

    python benchmarks/attention.py --out $OUT          # H200
    python benchmarks/attention.py --device cpu --shapes qwen3 --batch 1 --slots 256 --reps 3   # a check of the script

One new token per row over a KV cache, as a decode step calls it: q [B, H, 1, d], the cache's
[B, G, S, d] keys and values read up to S slots (the model rounds the slots up to 256), the
mask of rows whose lengths are S, S - 37, S - 74, ... in the additive form the model hands attention
on CUDA (0 / -inf). Columns: on the GPU, --chain calls captured in one CUDA graph, the replay timed
by triton.testing.do_bench (median) and divided by --chain, as a decode step replays them with no
host work between (a call timed alone is mostly Python and launch time); on the CPU, wall time:

- floor: the keys and values the rows' lengths cover, and q and the output, over the device-copy
  bandwidth measured in the same run;
- moeflow: kernels.decode_attention;
- sdpa: torch's own choice (cuDNN on the H200 for these inputs), sdpa math: the math backend
  (deterministic, expands the grouped heads);
- repeat: how many of --repeat calls gave other bits than the first call (0 = repeatable).

No other peer decode attention (FlashInfer, vLLM's paged attention) is installed on the GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.decode_attention import decode_attention  # noqa: E402

# (query heads, kv heads, key head, value head) of each model's attention as the KV cache holds it
SHAPES = {"qwen3": (32, 4, 128, 128), "mixtral": (32, 8, 128, 128), "dsv2lite": (16, 16, 192, 128)}


def lengths_of(B: int, S: int) -> list[int]:
    return [max(1, S - 37 * i) for i in range(B)]


def inputs(B, H, G, S, d, e, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    q = r(B, H, 1, d)
    k, v = r(B, G, S, d), r(B, G, S, e)
    lens = torch.tensor(lengths_of(B, S), device=device)
    seen = torch.arange(S, device=device)[None, None, None, :] < lens[:, None, None, None]
    mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, float("-inf"))
    return q, k, v, mask


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(q, k, v, mask, scale):
        gqa = q.shape[1] != k.shape[1]
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return f


def timed_ms(fn, device: str, reps: int, chain: int = 10) -> float:
    if device == "cuda":
        import triton.testing
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (compilation) off the capture
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(chain):
                fn()
        return triton.testing.do_bench(graph.replay, return_mode="median") / chain
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def bandwidth(device: str) -> float:
    """The device-copy bandwidth as benchmarks/decode.py measures it (read + write, bytes/s)."""
    from benchmarks.decode import measure_bandwidth  # as benchmarks/serving.py imports it
    return measure_bandwidth(torch.device(device))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="qwen3,mixtral,dsv2lite")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--slots", default="256,2048,8192")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--reps", type=int, default=20, help="timed calls on the CPU (the GPU uses do_bench)")
    ap.add_argument("--chain", type=int, default=10, help="calls per CUDA graph on the GPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    bw = bandwidth(dev)
    print(f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    variants = {"moeflow": decode_attention, "sdpa": sdpa(None), "sdpa_math": sdpa("MATH")}
    rows = []
    for name in args.shapes.split(","):
        H, G, d, e = SHAPES[name]
        for B in (int(b) for b in args.batch.split(",")):
            for S in (int(s) for s in args.slots.split(",")):
                q, k, v, mask = inputs(B, H, G, S, d, e, dev, dtype)
                scale = d ** -0.5
                covered = sum(lengths_of(B, S))
                nbytes = (covered * G * (d + e) + B * H * (d + e)) * q.element_size()
                r = dict(shape=name, B=B, S=S, floor_ms=nbytes / bw * 1e3 if dev == "cuda" else float("nan"))
                want = sdpa("MATH")(q.float(), k.float(), v.float(), mask.float(), scale)  # the definition, float32
                for label, fn in variants.items():
                    first = fn(q, k, v, mask, scale)
                    r[f"{label}_err"] = ((first.float() - want).abs().max() / want.abs().max()).item()
                    r[f"{label}_ms"] = timed_ms(lambda: fn(q, k, v, mask, scale), dev, args.reps, args.chain)
                    r[f"{label}_differ"] = sum(not torch.equal(fn(q, k, v, mask, scale), first)
                                               for _ in range(args.repeat))
                rows.append(r)
                print(json.dumps(r), flush=True)
                del q, k, v, mask, want
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "attention_results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\n## decode attention, ms per call (differ = calls of {args.repeat} with other bits than the first)\n"
          f"{'shape':9s} {'B':>3s} {'S':>5s} {'floor':>7s} {'moeflow':>8s} {'/floor':>6s} {'sdpa':>8s} "
          f"{'math':>8s} {'sdpa/ours':>9s} {'differ ours':>11s} {'differ sdpa':>11s} {'differ math':>11s}")
    for r in rows:
        print(f"{r['shape']:9s} {r['B']:3d} {r['S']:5d} {r['floor_ms']:7.4f} {r['moeflow_ms']:8.4f} "
              f"{r['moeflow_ms'] / r['floor_ms']:6.2f} {r['sdpa_ms']:8.4f} {r['sdpa_math_ms']:8.4f} "
              f"{r['sdpa_ms'] / r['moeflow_ms']:9.2f} {r['moeflow_differ']:11d} {r['sdpa_differ']:11d} "
              f"{r['sdpa_math_differ']:11d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
