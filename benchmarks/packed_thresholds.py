"""The two thresholds of kernels.packed_attention, timed on the GPU (BENCHMARKS 3z).

    python benchmarks/packed_thresholds.py                     # H200: both sweeps, ~2 minutes
    python benchmarks/packed_thresholds.py --device cpu --quick --rounds 1 --heads olmoe   # a check of the script
                                                                 # (the interpreter, tiny sizes: ~2 minutes)

1. The uncut rule (UNCUT_PROGRAMS): a run of P tokens at a context, beside 7 decoding rows, cut in pieces at SPLIT
   slots against uncut; "rule" is what block_table does by default.
2. The one-token table (single_from_slots(R)): 7 decoding rows at a context beside a 32-token chunk, every block in the
   main table ("main") against every one-token run in the 16-row table ("single") and the default ("default"), around
   each head layout's threshold.

Each case is checked against packed_attention_reference (relative error). Times: ms a layer (attention alone), eager,
the variants of a case timed in turn, best of 3 rounds of --calls calls (CUDA events; wall time on the CPU). A case
of a few tenths of a ms moves by 10-20% from run to run: compare variants of one case, not cases of two runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import kernels.packed_attention as pa  # noqa: E402
from kernels.packed_attention import (block_table, group_rows, packed_attention,  # noqa: E402
                                      packed_attention_reference, single_from_slots)

HEADS = {"qwen3": (32, 4), "mixtral": (32, 8), "olmoe": (16, 16), "gqa-r2": (16, 8)}


def bench(fns, device: str, calls: int, rounds: int = 3) -> list[float]:
    for f in fns if device == "cuda" else ():  # (compiles; the interpreter has nothing to warm)
        f()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            if device == "cuda":
                torch.cuda.synchronize()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(calls):
                    f()
                e.record()
                torch.cuda.synchronize()
                ms = s.elapsed_time(e) / calls
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    f()
                ms = (time.perf_counter() - t0) * 1e3 / calls
            best[i] = min(best[i], ms)
    return best


def case(H, G, d, dec_ctx, P, at, device, dtype):
    """q, k, v and the block_table arguments of 7 decoding rows at dec_ctx beside a run of P tokens at ``at``."""
    R, TB = group_rows(H, G)
    dec, max_len = 7, -(-(max(dec_ctx, at + P) + 80) // 256) * 256
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(dec + 1, G, max_len + 1, d, generator=gen).to(device, dtype)
    v = torch.randn(dec + 1, G, max_len + 1, d, generator=gen).to(device, dtype)
    q = torch.randn(H, dec + P, d, generator=gen).to(device, dtype)
    args = (list(range(dec + 1)), list(range(dec)) + [dec], [1] * dec + [P], [dec_ctx - 1] * dec + [at], TB, device,
            max_len)
    return q, k, v, args


def err(q, k, v, table, ref) -> float:
    return float((packed_attention(q, k, v, table, 0.088).float() - ref).norm() / ref.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", default="qwen3,mixtral,olmoe,gqa-r2", help=f"head layouts of {sorted(HEADS)}")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a check of the script)")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (the variants of a case timed in turn)")
    ap.add_argument("--sweeps", default="uncut,single", help="which sweeps: uncut, single")
    ap.add_argument("--contexts", default="", help="the one-token sweep's contexts (slots, comma-separated; default: "
                    "around each layout's threshold)")
    ap.add_argument("--out", default=None, help="folder for packed_thresholds.json")
    args = ap.parse_args(argv)
    unknown = [h for h in args.heads.split(",") if h not in HEADS]
    if unknown:
        ap.error(f"--heads: unknown {unknown}; choose from {sorted(HEADS)}")
    if not set(args.sweeps.split(",")) <= {"uncut", "single"}:
        ap.error(f"--sweeps takes uncut and/or single, got {args.sweeps!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device (--device cpu --quick checks the script)")
    dev, dt = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float32)
    calls = 1 if args.quick else args.calls
    d = 16 if args.quick else 128
    saved = pa.SPLIT, pa.SINGLE_FROM, pa.SINGLE_FROM_BY_R
    if args.quick:  # the thresholds scaled down to the tiny sizes: pieces of 64 slots, the one-token table from 128
        pa.SPLIT, pa.SINGLE_FROM, pa.SINGLE_FROM_BY_R = 64, 128, {}
    try:
        return sweeps(args, dev, dt, calls, d)
    finally:
        pa.SPLIT, pa.SINGLE_FROM, pa.SINGLE_FROM_BY_R = saved


def sweeps(args, dev, dt, calls: int, d: int) -> int:
    rows = []
    sweeps_asked = args.sweeps.split(",")
    if "uncut" in sweeps_asked:
        uncut_sweep(args, dev, dt, calls, d, rows)
    if "single" in sweeps_asked:
        single_sweep(args, dev, dt, calls, d, rows)
    bad = [r for r in rows if not r["err"] < (1e-4 if dt == torch.float32 else 1e-2)]
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "packed_thresholds.json").write_text(json.dumps(rows, indent=1))
    if bad:
        print(f"FAILED: {len(bad)} cases differ from the reference: {bad[:3]}")
        return 1
    return 0


def uncut_sweep(args, dev, dt, calls: int, d: int, rows: list) -> None:
    print("(1) uncut rule: a run of P tokens at context `at` beside 7 decoding rows at 64 slots; ms cut / uncut")
    print(f"{'heads':>7} {'P':>5} {'at':>6} {'progs':>5} {'cut':>7} {'uncut':>7} {'ratio':>6} {'rule':>5} {'err':>8}")
    sweep = ((150,), (8, 40)) if args.quick else ((2048, 8192, 30000), (64, 128, 192, 256, 384, 512, 1024))
    for name in args.heads.split(","):
        H, G = HEADS[name]
        R, TB = group_rows(H, G)
        for at in sweep[0]:
            for P in sweep[1]:
                q, k, v, a = case(H, G, d, 64, P, at, dev, dt)
                saved = pa.UNCUT_PROGRAMS
                try:
                    pa.UNCUT_PROGRAMS = 1 << 40
                    cut = block_table(*a, kv_heads=G)
                    pa.UNCUT_PROGRAMS = 1
                    unc = block_table(*a, kv_heads=G)
                finally:
                    pa.UNCUT_PROGRAMS = saved
                rule = "uncut" if -(-P // TB) * G >= pa.UNCUT_PROGRAMS else "cut"
                ref = packed_attention_reference(q, k, v, cut, 0.088).float()
                e = max(err(q, k, v, cut, ref), err(q, k, v, unc, ref))
                t = bench([lambda tab=tab: packed_attention(q, k, v, tab, 0.088) for tab in (cut, unc)], dev, calls,
                          args.rounds)
                rows.append(dict(sweep="uncut", heads=name, P=P, at=at, programs=-(-P // TB) * G, cut_ms=t[0],
                                 uncut_ms=t[1], rule=rule, err=e))
                print(f"{name:>7} {P:>5} {at:>6} {-(-P // TB) * G:>5} {t[0]:>7.3f} {t[1]:>7.3f} {t[1] / t[0]:>6.2f} "
                      f"{rule:>5} {e:>8.1e}", flush=True)


def single_sweep(args, dev, dt, calls: int, d: int, rows: list) -> None:
    print("\n(2) one-token table: 7 decoding rows at `ctx` slots beside a 32-token chunk; ms main / single / default")
    print(f"{'heads':>7} {'R':>2} {'from':>6} {'ctx':>6} {'main':>7} {'single':>7} {'default':>7} {'takes':>6} "
          f"{'err':>8}")
    for name in args.heads.split(","):
        H, G = HEADS[name]
        R, TB = group_rows(H, G)
        at_ = single_from_slots(R)
        ctxs = (at_ - 1, at_) if args.quick else sorted({c for c in (at_ // 2, at_ - 1024, at_ - 1, at_, at_ + 2048,
                                                                   2 * at_, 32768) if 1024 <= c <= 32768})
        if args.contexts:
            ctxs = [int(c) for c in args.contexts.split(",") if c]
        for ctx in ctxs:
            q, k, v, a = case(H, G, d, ctx, 32, 64, dev, dt)
            tabs = (block_table(*a, kv_heads=G, single_from=1 << 30), block_table(*a, kv_heads=G, single_from=1),
                    block_table(*a, kv_heads=G))
            ref = packed_attention_reference(q, k, v, tabs[0], 0.088).float()
            e = max(err(q, k, v, t, ref) for t in tabs)
            t = bench([lambda tab=tab: packed_attention(q, k, v, tab, 0.088) for tab in tabs], dev, calls, args.rounds)
            takes = "single" if tabs[2].single is not None else "main"
            rows.append(dict(sweep="single", heads=name, R=R, single_from=at_, ctx=ctx, main_ms=t[0], single_ms=t[1],
                             default_ms=t[2], takes=takes, err=e))
            print(f"{name:>7} {R:>2} {at_:>6} {ctx:>6} {t[0]:>7.3f} {t[1]:>7.3f} {t[2]:>7.3f} {takes:>6} {e:>8.1e}",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
