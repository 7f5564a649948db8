"""Decode-step projections: kernels.proj.multi_linear (one launch for several weights) against F.linear
per weight, CUDA-graph replayed, with a sweep of launch tiles, against the weights' streaming floor.

    python benchmarks/gemv.py                      # H200: Qwen3-30B-A3B and Mixtral-8x7B q/k/v, router, o_proj
    python benchmarks/gemv.py --device cpu --smoke # a check of the script (interpreted kernels, no timing)

Floor = the weights' bytes / measured copy bandwidth (at decode a projection streams its weight once).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.decode import measure_bandwidth  # noqa: E402

# name: (K, [N of each weight]) at bf16
SHAPES = {
    "qwen3 qkv": (2048, (4096, 512, 512)), "mixtral qkv": (4096, (4096, 1024, 1024)),
    "qwen3 router": (2048, (128,)), "mixtral router": (4096, (8,)),
    "qwen3 o_proj": (4096, (2048,)), "mixtral o_proj": (4096, (4096,)),
}
TILES = [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
         for bn, bk, w, st in itertools.product((16, 32, 64), (128, 256, 512), (2, 4), (4,))]


def graph_time(fn) -> float:
    """us per call of fn, replayed 20 at a time from a CUDA graph (do_bench's default warmup and rep)."""
    from benchmarks.kernels import bench_graph
    return bench_graph([fn] * 20, warmup=25, rep=100) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", default="1,8,16")
    ap.add_argument("--smoke", action="store_true", help="CPU: check each shape's result once, time nothing")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.smoke and torch.device(args.device).type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # the CPU smoke run needs the interpreter (set before the kernels are imported); on a GPU nothing is set, so
        # a caller in the same process (the test suite on a GPU machine) does not find the interpreter flag on after
        os.environ["TRITON_INTERPRET"] = "1"
    from kernels.proj import multi_linear
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bw = measure_bandwidth(dev)  # bytes/s of a device copy (read + write); nan on the CPU
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; us per call")
    print(f"{'shape':16s} {'rows':>4} {'floor':>7} {'F.linear':>9} {'default':>8} {'best':>7}  best tile")
    rows_out = []
    for name, (K, Ns) in SHAPES.items():
        if args.smoke:
            K, Ns = 64, tuple(max(8, n // 64) for n in Ns)
        ws = [torch.randn(n, K, device=dev, dtype=dtype) / K ** 0.5 for n in Ns]
        floor = sum(w.numel() * w.element_size() for w in ws) / bw * 1e6
        for M in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            ref = [F.linear(x, w) for w in ws]
            err = max(((g.float() - r.float()).norm() / r.float().norm()).item()
                      for g, r in zip(multi_linear(x, ws), ref))
            if args.smoke:
                print(f"{name:16s} {M:4d} relative error {err:.1e}")
                continue
            t_ref = graph_time(lambda: [F.linear(x, w) for w in ws])
            t_def = graph_time(lambda: multi_linear(x, ws))
            best = min(((graph_time(lambda: multi_linear(x, ws, **c)), c) for c in TILES), key=lambda tc: tc[0])
            rows_out.append(dict(shape=name, rows=M, floor_us=floor, f_linear_us=t_ref, default_us=t_def,
                                 best_us=best[0], best_tile=best[1], rel_err=err))
            print(f"{name:16s} {M:4d} {floor:7.2f} {t_ref:9.2f} {t_def:8.2f} {best[0]:7.2f}  {best[1]}", flush=True)
    if rows_out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gemv.json").write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
