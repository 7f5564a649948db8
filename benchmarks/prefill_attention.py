"""A long run's attention (a prompt's prefill, or a chunk of one, at a context): kernels.packed_attention against torch
SDPA's backends (BENCHMARKS 3aa).

    python benchmarks/prefill_attention.py --out $OUT                  # H200: every head layout and case, ~2 minutes
    python benchmarks/prefill_attention.py --device cpu --quick        # a check of the script (the interpreter)

One row's run of P tokens at positions at .. at + P - 1 over its cache (each token sees the slots up to its own
position): what a packed step's attention does for a lone prompt, as the engine launches it (block_table's default
tables: the wide table for long runs over long contexts, WIDE_ROWS; the main table otherwise). Columns, ms a layer:

- floor: the larger of the causal FLOPs (QK and PV, 2 x (d + e) a query head and a slot seen) over the bf16 matrix
  rate and the cache's keys and values over the device-copy rate, both measured in the same run;
- moeflow: kernels.packed_attention (table / tile rows it took);
- sdpa flash, sdpa cudnn: torch's FlashAttention-2 and cuDNN backends on the same queries, keys and values (keys and
  values expanded to every query head, outside the timed region; bottom-right causal, ``causal_lower_right``: each
  query sees the context and the run up to itself), where the backend takes the case;
- sdpa cudnn mask, sdpa mask: cuDNN, and torch's own choice of backend, given the same as an additive [P, context]
  mask, as the model's padded path hands it (the mask made outside the timed region).

On the GPU each call is captured in a CUDA graph and the replays timed (CUDA events, the best of --rounds rounds of
--reps replays), so no host time is in any column; eager calls add the host's launch work. Each output is checked
against a float32 math-backend reference (relative error). No other peer prefill attention (FlashAttention-3,
FlashInfer) is installed on the GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.packed_attention import block_table, group_rows, packed_attention  # noqa: E402

# (query heads, key/value heads, key head size, value head size) as the engine's cache holds them (DeepSeek-V2-Lite:
# MLA decompressed, every query head its own key/value head, 192-wide keys)
HEADS = {"qwen3": (32, 4, 128, 128), "mixtral": (32, 8, 128, 128), "olmoe": (16, 16, 128, 128),
         "dsv2lite": (16, 16, 192, 128)}
CASES = [(1024, 0), (2048, 0), (8192, 0), (1024, 3072), (4096, 4096), (512, 8192), (2048, 16384)]
QUICK_CASES = [(40, 0), (24, 70)]


def reference(q, k, v, P, at, scale, chunk=512):
    """[P, H, e] in float32 by the math backend, a chunk of queries at a time (explicit masks; no per-length plans)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    H = q.shape[0]
    G = k.shape[1]
    kk = k[0, :, :at + P].float().repeat_interleave(H // G, dim=0)[None]
    vv = v[0, :, :at + P].float().repeat_interleave(H // G, dim=0)[None]
    s = torch.arange(at + P, device=q.device)
    out = []
    for c0 in range(0, P, chunk):
        c1 = min(P, c0 + chunk)
        pos = torch.arange(at + c0, at + c1, device=q.device)
        with sdpa_kernel([SDPBackend.MATH]):
            o = F.scaled_dot_product_attention(q[None, :, c0:c1].float(), kk, vv,
                                               attn_mask=(s[None, :] <= pos[:, None])[None, None], scale=scale)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def causal_flops(P: int, at: int, H: int, d: int, e: int) -> float:
    seen = np.arange(at + 1, at + P + 1, dtype=np.float64)
    return float(seen.sum()) * H * 2 * (d + e)


def timed(fn, device: str, reps: int, rounds: int) -> float:
    """ms a call: CUDA-graph replays on the GPU (best of rounds), wall time on the CPU."""
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) / reps)
    return best


def rates(device: str) -> tuple[float, float]:
    """(bf16 matrix FLOP/s, device-copy bytes/s) measured here: an 8192^3 product, a 1 GiB copy."""
    if device != "cuda":
        return 1e12, 1e11
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = timed(lambda: a @ b, device, 20, 3)
    x = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    cp = float("inf")  # eager: a copy captured in a graph becomes a copy-engine node (2.7 against 4.2 TB/s, s36-c)
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        y.copy_(x)
        s.record()
        for _ in range(10):
            y.copy_(x)
        e.record()
        torch.cuda.synchronize()
        cp = min(cp, s.elapsed_time(e) / 10)
    del a, b, x, y
    return 2 * 8192 ** 3 / (mm * 1e-3), 2 * (1 << 30) / (cp * 1e-3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--cases", default=None, help="P@at,... (default: the table's)")
    ap.add_argument("--quick", action="store_true", help="tiny cases (the interpreter)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--wide-from-slots", type=int, default=None,
                    help="kernels.packed_attention.WIDE_FROM_SLOTS for this run (default: the module's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.wide_from_slots is not None:
        import kernels.packed_attention as PA
        PA.WIDE_FROM_SLOTS = a.wide_from_slots
    dev = a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cases = ([tuple(int(x) for x in c.split("@")) for c in a.cases.split(",")] if a.cases
             else QUICK_CASES if a.quick else CASES)
    if a.quick:  # the wide table's rule scaled down with the cases: the second case takes it, the first does not
        import kernels.packed_attention as PA
        PA.WIDE_ROWS, PA.WIDE_FROM_SLOTS = 16, 64
    flops_rate, copy_rate = rates(dev)
    print(f"# {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}: bf16 matrix {flops_rate / 1e12:.0f} "
          f"TFLOP/s, device copy {copy_rate / 1e12:.2f} TB/s (measured here)", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    # (name, backend or None for torch's own choice, the mask: "causal" = causal_lower_right, "dense" = the additive
    # [P, context] mask the model's padded path hands SDPA)
    peers = [("sdpa flash", SDPBackend.FLASH_ATTENTION, "causal"), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION, "causal"),
             ("sdpa cudnn mask", SDPBackend.CUDNN_ATTENTION, "dense"), ("sdpa mask", None, "dense")]
    rows = []
    header = f"{'heads':9s} {'P':>5s} {'at':>6s} {'floor':>7s} {'moeflow':>8s} {'x floor':>7s} {'table':>10s}"
    header += "".join(f" {n:>15s}" for n, _, _ in peers) + "  rel. error (moeflow / peers)"
    print(header, flush=True)
    for hk in a.heads.split(","):
        H, G, d, e = HEADS[hk]
        R, TB = group_rows(H, G)
        if a.quick:
            H, G, d, e = max(1, H // 4), max(1, G // 4), 16, 16 if e == d else 8
            R, TB = group_rows(H, G)
        for P, at in cases:
            ctx = at + P
            max_len = -(-(ctx + 64) // 256) * 256
            gen = torch.Generator(device=dev).manual_seed(0)
            k = torch.randn(1, G, max_len + 1, d, device=dev, generator=gen, dtype=dtype)
            v = torch.randn(1, G, max_len + 1, e, device=dev, generator=gen, dtype=dtype)
            q = torch.randn(H, P, d, device=dev, generator=gen, dtype=dtype)
            scale = d ** -0.5
            table = block_table([0], [0], [P], [at], TB, dev, max_len, kv_heads=G)
            took = "wide" if table.wide is not None else "main"
            tile = (table.wide or table).tokens_per_block * R
            ref = reference(q, k, v, P, at, scale)
            out = packed_attention(q, k, v, table, scale)
            errs = [float((out.float() - ref).norm() / ref.norm())]
            times = [timed(lambda: packed_attention(q, k, v, table, scale), dev, a.reps, a.rounds)]
            kx = k[:, :, :ctx].repeat_interleave(H // G, dim=1).contiguous()
            vx = v[:, :, :ctx].repeat_interleave(H // G, dim=1).contiguous()
            if d != e:  # (FlashAttention-2 wants one head size: the values padded, the padding's columns dropped)
                vx = F.pad(vx, (0, d - e))
            bias = causal_lower_right(P, ctx)
            pos = torch.arange(at, ctx, device=dev)
            dense = torch.zeros(P, ctx, device=dev, dtype=dtype).masked_fill_(
                torch.arange(ctx, device=dev)[None, :] > pos[:, None], float("-inf"))[None, None]
            for name, backend, how in peers:
                def peer(backend=backend, mask=bias if how == "causal" else dense):
                    if backend is None:
                        return F.scaled_dot_product_attention(q[None], kx, vx, attn_mask=mask, scale=scale)
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q[None], kx, vx, attn_mask=mask, scale=scale)
                try:
                    o = peer()
                    errs.append(float((o[0, :, :, :e].transpose(0, 1).float() - ref).norm() / ref.norm()))
                    times.append(timed(peer, dev, a.reps, a.rounds))
                except RuntimeError as exc:  # a backend that does not take the case (device, head size, mask)
                    errs.append(float("nan"))
                    times.append(float("nan"))
                    print(f"  ({name} skipped: {str(exc).splitlines()[0][:100]})", flush=True)
            fl = causal_flops(P, at, H, d, e)
            kv_bytes = G * ctx * (d + e) * k.element_size() + (q.numel() + P * H * e) * q.element_size()
            floor = max(fl / flops_rate, kv_bytes / copy_rate) * 1e3
            line = (f"{hk:9s} {P:5d} {at:6d} {floor:7.3f} {times[0]:8.3f} {times[0] / floor:7.2f} "
                    f"{f'{took} {tile}':>10s}" + "".join(f" {t:15.3f}" for t in times[1:])
                    + "  " + " / ".join(f"{x:.1e}" for x in errs))
            print(line, flush=True)
            rows.append(dict(heads=hk, P=P, at=at, floor_ms=floor, moeflow_ms=times[0], table=took, tile_rows=tile,
                             **{f"{n}_ms": t for (n, _, _), t in zip(peers, times[1:])}, errors=errs))
            if errs[0] > (5e-3 if dtype == torch.bfloat16 else 1e-4):
                raise SystemExit(f"moeflow's output is off the reference ({errs[0]:.1e}) at {hk} {P}@{at}")
            del q, k, v, kx, vx, ref, out, dense
            if dev == "cuda":
                torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "prefill_attention.json"), "w") as fh:
            json.dump(dict(flops_rate=flops_rate, copy_rate=copy_rate, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
