"""What rank 0's routing broadcast (placement.runtime.same_routing) costs an expert-parallel forward.

    PYTHONUNBUFFERED=1 python benchmarks/routing_broadcast.py --gpus 2 --out $OUT   # H200s, NCCL
    python benchmarks/routing_broadcast.py --cpu --gpus 2 --tokens 1,4              # dry run: gloo, tiny shapes

Since session 17 every MoE layer of the replicated path (prefill, replicated decode) broadcasts rank
0's routing ([T, 2K] float32: ids and weights) before any split is computed (BENCHMARKS 6e says why).
This script prices that broadcast. One process per GPU joined by NCCL (no Ray); every rank builds the
same seeded model (Qwen3-30B-A3B shapes, --layers decoder layers, random bf16 weights, Triton experts)
with its experts placed round robin, context-coherent mode. Per row count T (a batch of --batch rows
of T / batch tokens each, no KV cache):

- "bcast": the broadcast alone, the tensor same_routing sends: --chain broadcasts back to back per
  timing, divided by --chain (so the ranks' skew leaving the barrier before a timing is shared out),
  median over --rounds;
- "with" / "without": the whole forward with the broadcast and with same_routing replaced by the
  identity, the two alternated round by round (median over rounds, each rank's time maxed over ranks).
  Without the broadcast a forward is only safe when every rank computes the same routing; every rank
  gets the same input, and before timing one forward checks that each rank's own routing equals rank
  0's at every layer. A T where it does not is reported and its "without" column skipped.

Floor of the broadcast: a one-element broadcast (the collective's latency, timed as "bcast") and
the bytes over the bandwidth of a 64 MiB broadcast, both measured in the same run. No peer broadcasts its routing
(vLLM's and SGLang's expert parallelism route each rank's own tokens), so no peer column.
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

QWEN3 = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
             num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=768, vocab_size=32000)
TINY = dict(num_experts=8, num_experts_per_tok=2)


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _max_over_ranks(v: float, dev: str) -> float:
    t = torch.tensor([v], device=dev, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(fn, dev: str) -> float:
    dist.barrier()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - t0


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _layers_routing_differs(model, ids, runtime) -> int:
    """Layers at which this rank's own routing differed from rank 0's in one forward (0: safe to skip the broadcast)."""
    real = runtime.same_routing
    differ = []

    def spy(ids_TK, w_TK, group=None):
        out_ids, out_w = real(ids_TK, w_TK, group)
        differ.append(not (torch.equal(out_ids, ids_TK) and torch.equal(out_w, w_TK)))
        return out_ids, out_w

    runtime.same_routing = spy
    try:
        with torch.no_grad():
            model(ids)
    finally:
        runtime.same_routing = real
    return sum(differ)


def worker(rank, world, init, args, out_path):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from moe import MoEConfig
    from placement import runtime
    from placement.baselines import round_robin
    from placement.collectives import broadcast
    from placement.trace_routing import seeded_model
    if args.cpu:
        dev, dtype, backend, shape = "cpu", torch.float32, "torch", TINY
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    else:
        dev, dtype, backend, shape = "cuda", torch.bfloat16, "triton", QWEN3
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=world,
                                device_id=torch.device("cuda", rank))
    try:
        cfg = MoEConfig.tiny("qwen3_moe").replace(num_hidden_layers=args.layers, **shape)
        model = seeded_model(cfg, 0, 0.02, dtype, device=dev, backend=backend)
        runtime.apply_placement(model, round_robin(args.layers, cfg.num_experts, world), rank, "coherent")
        K = cfg.num_experts_per_tok
        identity = lambda ids_TK, w_TK, group=None: (ids_TK, w_TK)  # noqa: E731
        real = runtime.same_routing

        # the broadcast's floor: latency (one element) and bandwidth (64 MiB)
        one = torch.zeros(1, device=dev)
        big = torch.zeros(16 << 20, device=dev)
        for _ in range(3):
            broadcast(one), broadcast(big)

        def chained(t):
            return _max_over_ranks(_median([_timed(lambda: [broadcast(t) for _ in range(args.chain)], dev)
                                            for _ in range(args.rounds)]), dev) / args.chain

        lat = chained(one)
        bw = big.numel() * 4 / _max_over_ranks(_median([_timed(lambda: broadcast(big), dev) for _ in range(5)]), dev)
        rows = []
        for T in args.tokens:
            B = min(args.batch, T)
            if T % B:
                raise SystemExit(f"--tokens {T} is not a multiple of the batch {B}")
            ids = torch.randint(3, cfg.vocab_size, (B, T // B), generator=torch.Generator().manual_seed(T)).to(dev)
            buf = torch.zeros(T, 2 * K, device=dev)
            for _ in range(3):
                broadcast(buf)
            b_s = chained(buf)
            differ = _layers_routing_differs(model, ids, runtime)
            any_differ = _max_over_ranks(float(differ), dev) > 0
            fwd = lambda: model(ids)  # noqa: E731
            with_s, without_s = [], []
            with torch.no_grad():
                for _ in range(2):
                    fwd()
                for _ in range(args.rounds):
                    with_s.append(_timed(fwd, dev))
                    if not any_differ:
                        runtime.same_routing = identity
                        try:
                            without_s.append(_timed(fwd, dev))
                        finally:
                            runtime.same_routing = real
            w = _max_over_ranks(_median(with_s), dev)
            wo = _max_over_ranks(_median(without_s), dev) if without_s else None
            bytes_ = T * 2 * K * 4
            row = dict(tokens=T, batch=B, bcast_us=b_s * 1e6, floor_us=lat * 1e6 + bytes_ / bw * 1e6,
                       with_ms=w * 1e3, without_ms=None if wo is None else wo * 1e3,
                       per_layer_us=None if wo is None else (w - wo) / args.layers * 1e6,
                       share=None if wo is None else (w - wo) / w, routing_differed_layers=int(differ))
            rows.append(row)
            if rank == 0:
                print(f"T={T}: {row}", flush=True)
        if rank == 0:
            res = dict(world=world, device=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
                       layers=args.layers, shape=shape, latency_us=lat * 1e6, bandwidth_GBps=bw / 1e9, rows=rows)
            with open(out_path, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        dist.destroy_process_group()


def table(res: dict) -> str:
    lines = [f"{res['world']} ranks on {res['device']}, {res['layers']} MoE layers, coherent, round robin; "
             f"one-element broadcast {res['latency_us']:.1f} us, 64 MiB broadcast {res['bandwidth_GBps']:.0f} GB/s",
             "tokens  bcast us  floor us  fwd with ms  fwd without ms  bcast/layer us  share of fwd",
             "-" * 82]
    for r in res["rows"]:
        wo = "skipped (routing differed)" if r["without_ms"] is None else f"{r['without_ms']:14.3f}"
        per = "" if r["per_layer_us"] is None else f"{r['per_layer_us']:14.1f}  {100 * r['share']:11.1f}%"
        lines.append(f"{r['tokens']:6d}  {r['bcast_us']:8.1f}  {r['floor_us']:8.1f}  {r['with_ms']:11.3f}  {wo}  {per}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2, help="ranks (one per GPU; --cpu: gloo processes)")
    ap.add_argument("--cpu", action="store_true", help="dry run of the script: gloo, float32, tiny shapes")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", default="8,64,1024,4096", help="rows per forward (a batch of --batch rows)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--chain", type=int, default=20, help="broadcasts back to back per timing of one alone")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if not args.cpu and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus} but {torch.cuda.device_count()} GPUs are visible (or use --cpu)")
    os.makedirs(args.out, exist_ok=True)
    out_path = os.path.join(args.out, f"routing_broadcast_{args.gpus}{'cpu' if args.cpu else 'gpu'}.json")
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(args.gpus, os.path.join(d, "init"), args, out_path), nprocs=args.gpus, join=True)
    with open(out_path) as f:
        print(table(json.load(f)))


if __name__ == "__main__":
    main()
