"""Can a kernel read experts straight from pinned host memory as fast as the copy engine copies them?

    python3 benchmarks/zero_copy.py [--mib 256] [--json out.json]

The device-driven cache (offload/device_cache.py) fills its slots with a kernel that reads the pinned
host store over PCIe (zero-copy) instead of copies the host issues. This times, in one process:
  - the copy engine (``copy_`` from pinned memory, torch's allocator and offload.pinned's registered
    one): the reference, and in practice the link's floor;
  - a grid-stride copy kernel reading host memory, by grid size and tile;
  - a GEMV reading its weights from host memory (Mixtral's w1, OLMoE's w13), with and without writing
    them into a device slot on the way (compute and fill in one pass), checked against the device GEMV.
Every copy is checked bit for bit. Prints GB/s of the bytes read from host memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    for start in tl.range(pid * BLOCK, n, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


@triton.jit
def _gemv_kernel(w, x, y, fill, N, K, BN: tl.constexpr, BK: tl.constexpr, FILL: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    acc = tl.zeros([BN], dtype=tl.float32)
    for k0 in tl.range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        t = tl.load(w + rows[:, None] * K + cols[None, :])
        if FILL:
            tl.store(fill + rows[:, None] * K + cols[None, :], t)
        acc += tl.sum(t.to(tl.float32) * tl.load(x + cols).to(tl.float32)[None, :], axis=1)
    tl.store(y + rows, acc)


def median_ms(fn, reps: int = 8) -> float:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="bytes of the copy tests")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("zero_copy.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from offload.pinned import host_empty
    dev = torch.device("cuda")
    nbytes = args.mib << 20
    n = nbytes // 2
    src_t = torch.randn(n, dtype=torch.bfloat16).pin_memory()
    src_r = host_empty((n,), torch.bfloat16, True)
    src_r.copy_(src_t)
    dst = torch.empty(n, dtype=torch.bfloat16, device=dev)
    ref = src_t.to(dev)
    rows = []
    for name, src in (("torch pinned", src_t), ("registered", src_r)):
        rows.append((name, "copy engine (the reference)", "", nbytes / median_ms(lambda: dst.copy_(src, non_blocking=True)) / 1e6))
        for G in (8, 16, 32, 66, 132, 264):
            for block, warps in ((2048, 4), (8192, 8)):
                dst.fill_(0)
                ms = median_ms(lambda: _copy_kernel[(G,)](src, dst, n, BLOCK=block, num_warps=warps), reps=6)
                rows.append((name, f"copy kernel, {G} programs x {block}", "exact" if torch.equal(dst, ref) else "WRONG",
                             nbytes / ms / 1e6))
    for label, N, K in (("Mixtral w1", 14336, 4096), ("OLMoE w13", 2048, 2048)):
        w_h = torch.randn(N * K, dtype=torch.bfloat16).pin_memory()
        w_d = w_h.to(dev)
        x = torch.randn(K, dtype=torch.bfloat16, device=dev)
        y = torch.empty(N, dtype=torch.float32, device=dev)
        slot = torch.empty(N * K, dtype=torch.bfloat16, device=dev)
        want = w_d.view(N, K).float() @ x.float()
        for where, w in (("device", w_d), ("host", w_h)):
            for fill in (False, True):
                for BN, BK, warps in ((16, 512, 4), (32, 256, 4), (64, 256, 8)):
                    slot.fill_(0)
                    ms = median_ms(lambda: _gemv_kernel[(N // BN,)](w, x, y, slot, N, K, BN=BN, BK=BK, FILL=fill,
                                                                     num_warps=warps), reps=6)
                    err = float((y - want).norm() / want.norm())
                    ok = err < 1e-5 and (not fill or torch.equal(slot, w_d))
                    rows.append((label, f"GEMV from {where}{' + fill' if fill else ''}, {BN} x {BK}",
                                 f"{'exact' if ok else 'WRONG'} ({err:.0e})", N * K * 2 / ms / 1e6))
        rows.append((label, "copy engine (the reference)", "", N * K * 2 / median_ms(
            lambda: slot.copy_(w_h, non_blocking=True)) / 1e6))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    print(f"{'source':14s} {'what':42s} {'check':16s} {'GB/s':>7s}   ({torch.cuda.get_device_name()})")
    for r in rows:
        print(f"{r[0]:14s} {r[1]:42s} {r[2]:16s} {r[3]:7.1f}")
    return 0 if all("WRONG" not in str(r[2]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
