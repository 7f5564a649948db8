"""Adaptive parallelism benchmark (issue 8): step time of each static strategy and of the
adaptive chooser, one process per GPU joined by NCCL.

    python benchmarks/parallel.py --gpus 4 [--out DIR]

Cells: tokens per step per rank x experts per rank x capacity, forward and forward+backward.
Static strategies: ep (pipelining degree 1, 2, 4), dp, tp. The chooser is calibrated on the
machine first (collective latency/bandwidth, GEMM rate), then runs ``--adapt-steps`` steps on
each cell, correcting its model from measured times, and its steady-state choice is timed.
Floor of a cell = max(expert FLOPs / measured GEMM rate, bytes of the cheapest strategy's
communication / measured bandwidth) — printed beside the figures.
Needs no Ray or OR-Tools (the GPU machine has neither).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from placement.adaptive import (AdaptiveMoEExperts, Strategy, StrategyChooser, calibrate)  # noqa: E402

STATIC = [Strategy("ep", 1), Strategy("ep", 2), Strategy("ep", 4), Strategy("dp"), Strategy("tp")]


def _sync():
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.synchronize()


def _time(fn, warmup=2, iters=5) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    ts = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([sorted(ts)[len(ts) // 2]], device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
    return float(t)


def worker(rank, world, init, args, out_path):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.cpu:  # a dry run of the script itself: gloo, float32, plain torch experts
        dev, dtype = "cpu", torch.float32
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    else:
        dev, dtype = "cuda", torch.bfloat16
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
    D, I, K = args.hidden, args.ffn, args.top_k
    cost = calibrate(device=dev, dtype=dtype)
    rows = []
    g = torch.Generator(device=dev).manual_seed(1234 + rank)
    for epr in args.experts_per_rank:
        E = max(1, int(epr * world))
        w13 = (torch.randn(E, 2 * I, D, device=dev, dtype=dtype, generator=g) / D ** 0.5)
        w2 = (torch.randn(E, D, I, device=dev, dtype=dtype, generator=g) / I ** 0.5)
        for cap in args.capacity:
            for T in args.tokens:
                x = torch.randn(T, D, device=dev, dtype=dtype, generator=g)
                logits = torch.randn(T, E, device=dev, generator=g)
                top = logits.topk(min(K, E), dim=1)
                ids, wts = top.indices, torch.softmax(top.values, dim=1)
                for mode in ("fwd", "fwd+bwd"):
                    train = mode == "fwd+bwd"
                    layer = AdaptiveMoEExperts(w13, w2, capacity_factor=cap, backend=args.backend)
                    layer.requires_grad_(train)

                    def step(strategy=None, layer=layer, x=x, train=train):
                        if train:
                            xx = x.detach().requires_grad_()
                            y = layer(xx, ids, wts, strategy=strategy)
                            y.float().sum().backward()
                        else:
                            with torch.no_grad():
                                layer(x, ids, wts, strategy=strategy)

                    times = {str(s): _time(lambda s=s: step(s)) for s in STATIC}
                    chooser = StrategyChooser(cost=cost)
                    layer.chooser = chooser
                    for _ in range(args.adapt_steps):  # online correction from measured steps
                        if train:
                            step()
                        else:
                            with torch.no_grad():
                                step()
                    t_choose0 = time.perf_counter()
                    chosen = chooser.choose(layer.shape_key(T, min(K, E)))
                    choose_s = time.perf_counter() - t_choose0
                    t_adapt = _time(lambda: step(chosen))
                    best = min(times.values())
                    worst = max(times.values())
                    rows.append(dict(experts_per_rank=epr, experts=E, capacity=cap, tokens=T, mode=mode,
                                     static=times, chooser=str(chosen), chooser_s=t_adapt, best_s=best,
                                     worst_s=worst, choose_overhead_s=choose_s,
                                     flops_floor_s=(3 if train else 1) * 6 * D * I * T * world * min(K, E) / world
                                     / cost.flops_per_s))
                    if rank == 0:
                        print(f"E/rank={epr:<4} cap={cap:<5} T={T:<6} {mode:<8} best={best*1e3:8.3f}ms "
                              f"chooser[{chosen}]={t_adapt*1e3:8.3f}ms worst={worst*1e3:8.3f}ms", flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(world=world, cost_model=cost.__dict__, hidden=D, ffn=I, top_k=K, rows=rows), f, indent=1)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    ap.add_argument("--experts-per-rank", type=float, nargs="+", default=[0.5, 1, 4])
    ap.add_argument("--capacity", type=float, nargs="+", default=[0.0, -2.0])
    ap.add_argument("--adapt-steps", type=int, default=8)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cpu", action="store_true", help="dry run on gloo CPU ranks (checks the script, not speed)")
    args = ap.parse_args()
    if args.cpu:
        args.backend = "torch"
    elif not torch.cuda.is_available() or args.gpus < 2:
        sys.exit("benchmarks/parallel.py needs 2 or more CUDA GPUs (or --cpu --gpus N for a dry run)")
    with tempfile.NamedTemporaryFile(delete=False) as f:
        init = f.name
    os.unlink(init)
    out_path = os.path.join(args.out, f"parallel_{args.gpus}gpu.json")
    mp.spawn(worker, args=(args.gpus, init, args, out_path), nprocs=args.gpus, join=True)
    res = json.load(open(out_path))
    name = "CPU (gloo dry run)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"\n{args.gpus} x {name}; D={args.hidden} I={args.ffn} top-{args.top_k}; "
          f"cost model {res['cost_model']}")
    print("| E/rank | cap | tokens/rank | mode | ep1 | ep2 | ep4 | dp | tp | chooser (pick) | chooser/best | worst/chooser | floor (FLOPs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        st = r["static"]
        print(f"| {r['experts_per_rank']} | {r['capacity']} | {r['tokens']} | {r['mode']} | "
              + " | ".join(f"{st[k]*1e3:.2f}" for k in ("ep:d1", "ep:d2", "ep:d4", "dp", "tp"))
              + f" | {r['chooser_s']*1e3:.2f} ({r['chooser']}) | {r['chooser_s']/r['best_s']:.2f} | "
              f"{r['worst_s']/r['chooser_s']:.2f} | {r['flops_floor_s']*1e3:.3f} |")
    print("times in ms (median of 5, slowest rank)")


if __name__ == "__main__":
    main()
