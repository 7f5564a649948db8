"""What the next-layer guess costs a decode step: prefetch='attention' (point C) against the gate trick.

    python benchmarks/attention_lookahead_cost.py [--models olmoe,qwen3,mixtral] [--batch 1,8] [--steps 64] [--layers N]

A resident model of each published shape (random bf16 weights, triton experts, its depth unless --layers), decode steps
replayed from CUDA graphs (benchmarks/decode.py's `run`), three ways: as it is; with each MoE layer computing the
gate trick's guess of the next layer (next_layer_gate: the next router on this layer's router input); with each
computing point C's (prefetch='attention': the next layer's attention on this layer's pre-expert residual, then its
router; offload.prefetch.AttentionRouter). The guesses are only computed (inside the graph, as the offloaded paths
compute them), not prefetched: the rows time what asking costs. Printed beside them: one expert's copy over the host
link at the measured pinned rate, the time a right guess can hide and a wrong one wastes.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.decode import MODELS, build, run  # noqa: E402
from offload.prefetch import attention_routers, guess_count, router_guess  # noqa: E402

def install_guesses(model, how: str) -> list:
    """Pre-hooks on each MoE layer's block (but the last) that compute its guess of the next MoE layer's experts
    (``how``: 'gate' or 'attention'); returns the handles (and the attention routers) to remove."""
    blocks = model.moe_blocks()
    k = guess_count(0, model.config.num_experts_per_tok)
    routers = attention_routers(model) if how == "attention" else [b.router for b in blocks[1:]] + [None]
    handles = []
    for b, r in zip(blocks, routers):
        if r is None:
            continue

        def ask(mod, args, r=r):
            x = args[0]
            router_guess(r, x.reshape(-1, x.shape[-1]), k)
        handles.append(b.register_forward_pre_hook(ask))
    return handles + [r for r in routers if hasattr(r, "remove")]


def pinned_rate(dev) -> float:
    """Host -> device bytes/s, back-to-back copies of a 64 MiB pinned buffer for >= 20 ms."""
    src = torch.empty(64 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device=dev)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    n, t = 0, 0.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    while t < 20.0:
        start.record()
        for _ in range(4):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        t += start.elapsed_time(end)
        n += 4
    return n * src.numel() / (t / 1e3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="olmoe,qwen3,mixtral")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (0: the model's own depth)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cpu: eager steps, a check of the script (no times worth reading)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times CUDA-graph replays (--device cpu checks the script)")
    graph = dev.type == "cuda"
    rate = pinned_rate(dev) if graph else float("nan")
    print(f"pinned host -> GPU: {rate / 1e9:.1f} GB/s; {torch.cuda.get_device_name() if graph else 'cpu'}")
    print(f"{'model':<14}{'layers':>7}{'B':>3}{'plain ms':>10}{'+gate ms':>10}{'+C ms':>9}{'C us/layer':>11}"
          f"{'gate us/layer':>14}{'expert copy us':>15}{'same logits':>12}", flush=True)
    for key in args.models.split(","):
        model = build(key, args.device, args.layers)
        L = len(model.moe_blocks())
        e = model.moe_blocks()[0].experts
        copy_us = (e.w13[0].numel() + e.w2[0].numel()) * e.w13.element_size() / rate * 1e6
        for B in (int(b) for b in args.batch.split(",")):
            t_plain, lg_plain = run(model, B, args.steps, graph=graph, prompt_len=args.prompt_len)
            out = {}
            for how in ("gate", "attention"):
                got = install_guesses(model, how)
                try:
                    out[how] = run(model, B, args.steps, graph=graph, prompt_len=args.prompt_len)
                finally:
                    for h in got:
                        h.remove()
            same = all(torch.equal(a, b) for a, b in zip(lg_plain, out["attention"][1]))
            tg, tc = out["gate"][0], out["attention"][0]
            print(f"{MODELS[key][0]:<14}{L:>7}{B:>3}{t_plain * 1e3:>10.3f}{tg * 1e3:>10.3f}{tc * 1e3:>9.3f}"
                  f"{(tc - t_plain) / (L - 1) * 1e6:>11.1f}{(tg - t_plain) / (L - 1) * 1e6:>14.1f}{copy_us:>15.0f}"
                  f"{str(same):>12}", flush=True)
        del model, e
        gc.collect()  # (the graphs and hooks hold the model in reference cycles: Mixtral after Qwen3 ran out of memory)
        if graph:
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
