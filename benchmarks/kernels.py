"""Fused MoE kernels on the GPU: correctness in bf16, then time against the floor and today's peers.

    python3 benchmarks/kernels.py --out $OUT            # all four shapes x tokens {1,...,16384}
    python3 benchmarks/kernels.py --out $OUT --rounds 3 --tokens 4096,16384 --shapes mixtral   # settle close cells
    python3 benchmarks/kernels.py --out $OUT --tokens 8 --shapes mixtral --anchor-draws   # vLLM's draw, like for like

Columns (ms, median): floor = max(bytes / measured copy bandwidth, FLOPs / measured bf16 matmul rate),
both ceilings measured in this run (m/f@774: moeflow against the floor at ANCHORS.md's 774 TFLOP/s;
m/f bs: compute-bound cells against the matmul rate measured right before the cell's own timings);
moeflow = kernels.fused_moe (token alignment included);
loop = one matmul pair per active expert (token lists prepared outside the timed region);
gmm = torch._grouped_mm (its sort included). "graph" = CUDA-graph replay, "eager" = plain launches;
fwd+bwd is eager. Inputs rotate over several routing sets when they would otherwise sit in L2.
The vLLM column is copied from shared/ANCHORS.md (same machine kind, graph replay, sort excluded).
Results: a table printed last, every number in OUT/kernels_results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)  # run as a script: import the kernels package, not this file

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.tune_kernels import SHAPES, random_routing  # noqa: E402

# vLLM fused_moe figures from ANCHORS.md (H200, bf16, graph replay, sort excluded), ms
VLLM = {
    "mixtral": {1: 0.199, 8: 0.504, 64: 0.671, 512: 1.057, 4096: 5.94, 16384: 21.5},
    "qwen3": {1: 0.045, 8: 0.146, 64: 0.308, 512: 0.346, 4096: 0.882, 16384: 2.98},
    "dsv2lite": {1: 0.057, 64: 0.295, 512: 0.485, 4096: 1.88, 16384: 7.05},
    "olmoe": {1: 0.055, 64: 0.224, 512: 0.380, 4096: 1.76, 16384: 6.60},
}
# ANCHORS.md's bf16 matmul rate on the H200 (TFLOP/s), the one issue 3's compute-bound target names
ANCHOR_TFLOPS = 774

# ANCHORS.md's floor of the routing draw behind each vLLM figure of a decode-sized (memory-bound)
# cell, ms: how many experts that draw had active (its weights over the copy bandwidth). A cell whose
# own draw differs by an expert or more is also timed on a draw with ANCHORS' count (--anchor-draws),
# so the vLLM comparison is like for like (Mixtral at 8 tokens: ~6 active there, 7.2 on average here).
VLLM_FLOOR = {
    "mixtral": {1: 0.165, 8: 0.494, 64: 0.659},
    "qwen3": {1: 0.018, 8: 0.117, 64: 0.280},
    "dsv2lite": {1: 0.024, 64: 0.259},
    "olmoe": {1: 0.024, 64: 0.188},
}


def routing_with_active(T: int, E: int, K: int, active: int, device, gen=None):
    """(ids [T, K], weights [T, K]): each token's K distinct experts drawn from one random set of
    ``active`` experts, every one of them used (needs K <= active <= T * K and active <= E)."""
    if not K <= active <= min(E, T * K):
        raise ValueError(f"cannot route {T} tokens x top-{K} onto exactly {active} of {E} experts")
    chosen = torch.randperm(E, generator=gen, device=device)[:active]
    while True:
        ranks = torch.rand(T, active, generator=gen, device=device).argsort(dim=1)[:, :K]
        if torch.unique(ranks).numel() == active:
            break
    w = torch.softmax(torch.rand(T, K, generator=gen, device=device), dim=1)
    return chosen[ranks], w


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# the peers

def loop_plan(ids, E):
    """Per active expert: (expert, token index, pair index) — prepared outside the timed region."""
    T, K = ids.shape
    flat = ids.reshape(-1)
    plan = []
    for e in torch.unique(flat[flat >= 0]).tolist():
        pos = (flat == e).nonzero().flatten()
        plan.append((e, pos // K, pos))
    return plan


def loop_moe(x, w13, w2, w, plan):
    I = w2.shape[2]
    y = torch.zeros_like(x)
    w_P = w.reshape(-1)
    for e, tok, pos in plan:
        h = x[tok] @ w13[e].t()
        y = y.index_add(0, tok, ((F.silu(h[:, :I]) * h[:, I:]) @ w2[e].t()) * w_P[pos][:, None].to(x.dtype))
    return y


def gmm_moe(x, w13_t, w2_t, ids, w, E):
    """torch._grouped_mm with a sync-free sort; w13_t [E, D, 2I] and w2_t [E, I, D] (views are fine)."""
    T, K = ids.shape
    I = w2_t.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    tok = order // K
    h = torch._grouped_mm(x[tok], w13_t, offs=offs)
    o = torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], w2_t, offs=offs)
    o = o * w.reshape(-1)[order][:, None].to(o.dtype)
    return torch.zeros_like(x).index_add(0, tok, o)


# ---------------------------------------------------------------------------------------------
# timing

def bench(fn, grad_to_none=None, warmup: int = 10, rep: int = 60) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def capture_graph(fns) -> torch.cuda.CUDAGraph:
    """One CUDA graph of the calls ``fns`` in order (each run once first on a side stream: compiles and
    allocator warm-up stay out of the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def bench_graph(fns, warmup: int = 10, rep: int = 60) -> float:
    """CUDA-graph replay of one call per rotated input set; ms per call (do_bench's warmup and rep, ms)."""
    g = capture_graph(fns)
    ms = bench(g.replay, warmup=warmup, rep=rep) / len(fns)
    del g
    return ms


def matmul_rate(n: int = 8192) -> float:
    """bf16 matmul rate in FLOP/ms of an n x n x n GEMM on random data, now."""
    m = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    m2 = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / bench(lambda: m @ m2)


def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/ms counting read + write, bf16 matmul rate in FLOP/ms) on random data."""
    n = 1 << 30
    a = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    bw = 2 * a.numel() * 2 / bench(lambda: b.copy_(a))
    del a, b
    return bw, matmul_rate()


def floor_ms(E, D, I, K, ids, bw, rate, dtype_bytes=2) -> tuple[float, float, float]:
    active = int(torch.unique(ids[ids >= 0]).numel())
    T = ids.shape[0]
    nbytes = active * 3 * I * D * dtype_bytes + 2 * T * D * dtype_bytes
    flops = 2 * 3 * D * I * int((ids >= 0).sum())
    return max(nbytes / bw, flops / rate), nbytes / bw, flops / rate


# ---------------------------------------------------------------------------------------------

def run_case(key, E, D, I, K, T, w13, w2, w13_t, w2_t, ceil, fwd_bwd: bool, log, rounds: int = 1,
             anchor_draws: bool = False) -> dict:
    """One (shape, tokens) cell. rounds > 1: every timing is taken that many times, the methods
    interleaved round by round, and the best kept (the spread between runs reaches 5-9% on large
    cells, NOTES-kernels 14; interleaving puts every method under the same clock and power state).
    anchor_draws: also time moeflow on draws with as many active experts as ANCHORS' vLLM figure had
    (``VLLM_FLOOR``), where that differs from this cell's draws by an expert or more."""
    from kernels.fused_moe import fused_moe
    dev, dt = w13.device, w13.dtype
    g = torch.Generator(device=dev).manual_seed(T)
    # rotate inputs while the active weights would fit in L2 (60 MB): several routing sets
    R = 4 if T <= 512 else 1
    sets = []
    for _ in range(R):
        ids, w = random_routing(T, E, K, dev, g)
        sets.append((torch.randn(T, D, device=dev, dtype=dt, generator=g), ids, w, loop_plan(ids, E)))
    # the floor of each routing set (how many experts are active varies), averaged like the timings
    fls = [floor_ms(E, D, I, K, s[1], *ceil) for s in sets]
    fl, fl_mem, fl_math = (sum(f[i] for f in fls) / R for i in range(3))
    # the same floor at ANCHORS.md's fixed matmul rate: the measured one moves by up to 15% between runs
    fl_anchor = max(fl_mem, fl_math * ceil[1] / (ANCHOR_TFLOPS * 1e9))
    r = dict(shape=key, E=E, D=D, I=I, K=K, T=T, floor=fl, floor_mem=fl_mem, floor_math=fl_math,
             floor_at_anchor_rate=fl_anchor)
    # The H200 here is capped at 700 W and its clock falls from 1980 to 1400-1620 MHz under sustained
    # GEMMs (NOTES-kernels 17e): a compute-bound cell is also held to the matmul rate measured right
    # before its own timings (the best of its rounds), not only to the run's opening one.
    compute_bound = fl_math > fl_mem
    methods = {
        "moeflow": lambda s: (lambda: fused_moe(s[0], w13, w2, s[1], s[2])),
        "loop": lambda s: (lambda: loop_moe(s[0], w13, w2, s[2], s[3])),
        "gmm": lambda s: (lambda: gmm_moe(s[0], w13_t, w2_t, s[1], s[2], E)),
    }
    def keep(k, ms):
        r[k] = min(r.get(k, float("inf")), ms)
    with torch.no_grad():
        for _ in range(rounds):
            if compute_bound:
                r["matmul_rate_beside"] = max(r.get("matmul_rate_beside", 0.0), matmul_rate())
            for name, make in methods.items():
                if f"{name}_error" in r:
                    continue
                try:
                    keep(f"{name}_eager", bench(make(sets[0])))
                    keep(f"{name}_graph", bench_graph([make(s) for s in sets]))
                except Exception as exc:  # a peer that cannot run here is recorded, not fatal
                    r[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    log(f"   {name} failed: {r[f'{name}_error']}")
    if compute_bound:
        r["floor_beside"] = max(fl_mem, fl_math * ceil[1] / r["matmul_rate_beside"])
        r["matmul_TFLOPs_beside"] = r.pop("matmul_rate_beside") / 1e9
    anchor = VLLM_FLOOR.get(key, {}).get(T)
    if anchor_draws and anchor is not None:
        bw = ceil[0]
        n_anchor = round(anchor * bw / (3 * I * D * 2))  # ANCHORS' floors are of bf16 weights, as floor_ms
        n_here = sum(int(torch.unique(s[1]).numel()) for s in sets) / R
        if abs(n_anchor - n_here) >= 1 and K <= n_anchor <= min(E, T * K):
            asets = []
            for _ in range(R):
                ids, w = routing_with_active(T, E, K, n_anchor, dev, g)
                asets.append((torch.randn(T, D, device=dev, dtype=dt, generator=g), ids, w))
            r.update(anchor_active=n_anchor, active_here=n_here,
                     floor_anchor_draw=sum(floor_ms(E, D, I, K, s[1], *ceil)[0] for s in asets) / R)
            with torch.no_grad():
                for _ in range(rounds):
                    keep("moeflow_graph_anchor_draw",
                         bench_graph([(lambda s=s: fused_moe(s[0], w13, w2, s[1], s[2])) for s in asets]))
    if T in (64, 512, 4096):
        r.update(breakdown(sets[0][0], w13, w2, sets[0][1], sets[0][2]))
    if fwd_bwd:
        x, ids, w, plan = sets[0]
        xg = x.clone().requires_grad_()
        wg = w.clone().requires_grad_()
        dy = torch.randn_like(x)
        params = [xg, wg, w13, w2]
        w13.requires_grad_(True), w2.requires_grad_(True)
        fb = {
            "moeflow": lambda: fused_moe(xg, w13, w2, ids, wg).backward(dy),
            "loop": lambda: loop_moe(xg, w13, w2, wg, plan).backward(dy),
            "gmm": lambda: gmm_moe(xg, w13.transpose(1, 2), w2.transpose(1, 2), ids, wg, E).backward(dy),
        }
        for _ in range(rounds):
            for name, fn in fb.items():
                if f"{name}_fwdbwd_error" in r:
                    continue
                try:
                    keep(f"{name}_fwdbwd", bench(lambda: fn(), grad_to_none=params))
                except Exception as exc:
                    r[f"{name}_fwdbwd_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    log(f"   {name} fwd+bwd failed: {r[f'{name}_fwdbwd_error']}")
        w13.requires_grad_(False), w2.requires_grad_(False)
        w13.grad = w2.grad = None
    return r


def breakdown(x, w13, w2, ids, w) -> dict:
    """Eager time of each stage of one fused_moe call (its own config), to see where time goes."""
    from kernels.align import align_tokens
    from kernels.fused_moe import config_for
    from kernels.grouped_gemm import moe_gemm, moe_sum, moe_up
    E, J, D = w13.shape
    cfg = config_for(x, w13, ids.shape[1])
    w_P = w.reshape(-1).contiguous()
    al = align_tokens(ids, E, cfg.block_m)
    h = moe_up(x, w13, al, cfg.up, False)[0]
    out = moe_gemm(h, w2, (w2.stride(0), w2.stride(1), w2.stride(2)), D, J // 2, al, cfg.down, a_gather=False,
                   c_scatter=True, weight_P=w_P)
    return dict(
        t_align=bench(lambda: align_tokens(ids, E, cfg.block_m)),
        t_up=bench(lambda: moe_up(x, w13, al, cfg.up, False)),
        t_down=bench(lambda: moe_gemm(h, w2, (w2.stride(0), w2.stride(1), w2.stride(2)), D, J // 2, al, cfg.down,
                                      a_gather=False, c_scatter=True, weight_P=w_P)),
        t_sum=bench(lambda: moe_sum(out, ids, E, x.dtype)),
        config=str(cfg))


def check_correctness(key, E, D, I, K, w13, w2, log) -> dict:
    """bf16 fused_moe (forward and gradients) against the fp32 reference, at 1, 64 and 4096 tokens."""
    from kernels.fused_moe import fused_moe
    from kernels import moe_experts_reference
    dev = w13.device
    out = {}
    g = torch.Generator(device=dev).manual_seed(123)
    for T in (1, 64, 4096):
        ids, w = random_routing(T, E, K, dev, g)
        if T == 64:
            ids[3, 0] = -1                                   # a slot not on this rank
        x = torch.randn(T, D, device=dev, dtype=w13.dtype, generator=g)
        want = moe_experts_reference(x.float(), w13.float(), w2.float(), ids, w)
        y = torch.full_like(x, float("nan"))
        y.copy_(fused_moe(x, w13, w2, ids, w))
        out[f"fwd_T{T}"] = rel_err(y, want) if torch.isfinite(y).all() else float("nan")
    # gradients (fp32 reference autograd) at 64 tokens (decode tiles, small row blocks) and 4096
    # (large row blocks: the TMA weight-gradient path with its transposed operands)
    for T in (64, 4096):
        ids, w = random_routing(T, E, K, dev, g)
        x = torch.randn(T, D, device=dev, dtype=w13.dtype, generator=g)
        dy = torch.randn(T, D, device=dev, generator=g)
        ref = [t.float().detach().requires_grad_() for t in (x, w13, w2, w)]
        moe_experts_reference(ref[0], ref[1], ref[2], ids, ref[3]).backward(dy)
        got = [t.detach().clone().requires_grad_() for t in (x, w13, w2, w)]
        fused_moe(got[0], got[1], got[2], ids, got[3]).backward(dy.to(w13.dtype))
        for name, a, b in zip(("dx", "dw13", "dw2", "dweights"), got, ref):
            out[f"grad_{name}_T{T}"] = rel_err(a.grad, b.grad)
        del ref, got
        torch.cuda.empty_cache()
    log(f"  correctness {key}: " + " ".join(f"{k}={v:.2e}" for k, v in out.items()))
    return out


def fmt(v, w=7):
    return f"{v:{w}.3f}" if isinstance(v, float) else f"{'-':>{w}}"


def print_table(rows, log):
    log("\n## fused MoE on " + torch.cuda.get_device_name() + " (bf16, ms, median)")
    log(f"{'shape':9} {'T':>5} | {'floor':>7} {'moeflow':>7} {'m/floor':>7} {'m/f@774':>7} {'m/f bs':>7} {'vLLM':>7}"
        f" {'gmm':>7} {'loop':>7} | {'eager':>7} | {'fb:moe':>7} {'fb:gmm':>7} {'fb:loop':>7}")
    for r in rows:
        m = r.get("moeflow_graph")
        ratio = m / r["floor"] if isinstance(m, float) else None
        ratio_a = m / r["floor_at_anchor_rate"] if isinstance(m, float) else None
        ratio_b = m / r["floor_beside"] if isinstance(m, float) and "floor_beside" in r else None
        log(f"{r['shape']:9} {r['T']:>5} | {fmt(r['floor'])} {fmt(m)} {fmt(ratio)} {fmt(ratio_a)} {fmt(ratio_b)}"
            f" {fmt(VLLM[r['shape']].get(r['T']))}"
            f" {fmt(r.get('gmm_graph'))} {fmt(r.get('loop_graph'))} | {fmt(r.get('moeflow_eager'))} |"
            f" {fmt(r.get('moeflow_fwdbwd'))} {fmt(r.get('gmm_fwdbwd'))} {fmt(r.get('loop_fwdbwd'))}")
    for r in rows:
        if "moeflow_graph_anchor_draw" in r:
            log(f"{r['shape']} T={r['T']} on a draw with ANCHORS' {r['anchor_active']} active experts (this table's draws:"
                f" {r['active_here']:.1f}): floor {r['floor_anchor_draw']:.4f}, moeflow {r['moeflow_graph_anchor_draw']:.4f},"
                f" vLLM {VLLM[r['shape']][r['T']]:.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,8,64,512,4096,16384")
    ap.add_argument("--fwd-bwd-tokens", default="64,4096,16384", help="token counts also timed fwd+bwd")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget-s", type=float, default=330, help="start no new case after this many seconds")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--anchor-draws", action="store_true",
                    help="decode-sized cells whose routing draw has another active-expert count than ANCHORS' vLLM "
                         "figure: also time moeflow on a draw with that count")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every method this many times, interleaved, and keep the best (3 settles the "
                         "cells within a few percent of a peer)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_f = open(out / "kernels_bench.log", "a")

    def log(s):
        print(s, flush=True)
        log_f.write(s + "\n")
        log_f.flush()

    tokens = [int(t) for t in args.tokens.split(",")]
    fb_tokens = {int(t) for t in args.fwd_bwd_tokens.split(",") if t}
    bw, rate = measure_ceilings()
    log(f"ceilings: copy {bw / 1e9:.2f} TB/s (read+write), bf16 matmul {rate / 1e9:.0f} TFLOP/s; "
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    rows = []
    res_f = open(out / "kernels_results.jsonl", "a")
    res_f.write(json.dumps(dict(kind="ceilings", copy_TBps=bw / 1e9, bf16_TFLOPs=rate / 1e9)) + "\n")
    for key in args.shapes.split(","):
        name, E, D, I, K = SHAPES[key]
        g = torch.Generator(device="cuda").manual_seed(1)
        w13 = torch.randn(E, 2 * I, D, device="cuda", dtype=torch.bfloat16, generator=g) / D ** 0.5
        w2 = torch.randn(E, D, I, device="cuda", dtype=torch.bfloat16, generator=g) / I ** 0.5
        w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)
        if not args.no_check and time.time() - t0 < args.budget_s:
            res_f.write(json.dumps(dict(kind="check", shape=key, **check_correctness(key, E, D, I, K, w13, w2, log)))
                        + "\n")
        for T in tokens:
            if time.time() - t0 > args.budget_s:
                log(f"  budget reached: {key} T={T} not run")
                continue
            r = run_case(key, E, D, I, K, T, w13, w2, w13_t, w2_t, (bw, rate), T in fb_tokens, log, args.rounds,
                         args.anchor_draws)
            rows.append(r)
            res_f.write(json.dumps(dict(kind="time", **r)) + "\n")
            res_f.flush()
            log(f"  {key} T={T}: floor {r['floor']:.4f} moeflow {r.get('moeflow_graph', float('nan')):.4f} "
                f"gmm {r.get('gmm_graph', float('nan')):.4f} loop {r.get('loop_graph', float('nan')):.4f} "
                f"({time.time() - t0:.0f} s)")
        del w13, w2, w13_t, w2_t
        torch.cuda.empty_cache()
    print_table(rows, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
