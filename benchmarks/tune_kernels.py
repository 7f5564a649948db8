"""Tune the fused MoE launch configs on this GPU and write them as data to kernels/configs/.

    python3 benchmarks/tune_kernels.py --shapes mixtral,qwen3 --tokens 1,8,64,512,4096,16384

For each shape and token count, the row block (block_m) is tried from a small candidate list, and for
each block_m the up (gate/up + SwiGLU) and down GEMMs are timed separately over each of their tile
candidates (same alignment, random routing, random weights); the pair with the smallest sum wins.
The candidate lists are short on purpose: each new tile is one more compile, and device time is
scarce. ``--refine`` starts from the tuned files instead and sweeps each GEMM's B and A paths (TMA or
pointers), pipeline depth, tail tiles and persistent grid around its tile, runs the few fastest of
each as whole calls in every pairing, and keeps a change only where the whole call gains 3%.
``--refine-backward`` does the same for the backward's dh and dx GEMMs (``MoEConfig.bwd_up`` /
``bwd_down``), judged by whole forward + backward steps. Files are named
``E=..,N=..,K=..,device_name=...json`` (kernels.launch_config).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)  # run as a script: import the kernels package, not benchmarks/kernels.py

import torch  # noqa: E402

# (name, E, D hidden, I ffn, K top-k)
SHAPES = {
    "mixtral": ("Mixtral-8x7B", 8, 4096, 14336, 2),
    "qwen3": ("Qwen3-30B-A3B", 128, 2048, 768, 8),
    "dsv2lite": ("DeepSeek-V2-Lite", 64, 2048, 1408, 6),
    "olmoe": ("OLMoE-1B-7B", 64, 2048, 1024, 8),
}


def candidates(num_tokens: int, top_k: int, num_experts: int):
    """(block_m list, up tiles, down tiles) worth trying at this many rows per expert."""
    from kernels.launch_config import GemmConfig as G
    rows = num_tokens * top_k / num_experts
    if rows <= 16 and num_tokens <= 64:
        tiles = [G(32, 128, 1, 4, 4), G(64, 128, 1, 4, 4), G(32, 256, 1, 4, 3), G(16, 256, 1, 4, 3),
                 G(32, 64, 1, 4, 4), G(16, 128, 1, 4, 4)]
        # past a few rows per expert, a row block of 16 would split an expert in two and stream its
        # weights twice (measured: Mixtral at 64 tokens, 1.27x the floor with block_m 16)
        return ([16] if rows <= 4 else [16, 32, 64]), tiles, tiles
    # past decode sizes every tile is also tried with TMA weight loads (measured on the H200: 8-13%
    # faster down GEMMs at >= 4096 tokens, mixed for the up GEMM)
    if rows <= 128:
        up = [G(64, 64, 8, 4, 4), G(64, 128, 8, 4, 3), G(128, 64, 8, 4, 3), G(128, 64, 8, 8, 3), G(128, 64, 8, 8, 4)]
        down = [G(64, 64, 8, 4, 4), G(128, 64, 8, 4, 4), G(64, 128, 8, 4, 3), G(128, 64, 8, 8, 3), G(128, 128, 8, 8, 3)]
        return ([16, 32, 64] if rows <= 32 else [32, 64, 128]), _with_tma(up), _with_tma(down)
    up = [G(64, 64, 8, 4, 4), G(128, 64, 8, 8, 3), G(128, 64, 8, 8, 4), G(128, 128, 8, 8, 3), G(64, 128, 8, 8, 3)]
    down = [G(128, 64, 8, 8, 4), G(128, 128, 8, 8, 3), G(256, 64, 8, 8, 3), G(256, 64, 8, 8, 4), G(256, 64, 4, 8, 3)]
    return [64, 128], _with_tma(up), _with_tma(down)


def _with_tma(tiles):
    from dataclasses import replace
    return [c for t in tiles for c in (t, replace(t, tma=True))]


def random_routing(T: int, E: int, K: int, device, gen=None):
    scores = torch.rand(T, E, device=device, generator=gen)
    w, ids = scores.topk(K, dim=1)
    return ids, torch.softmax(w, dim=1)


def _random_experts(E: int, D: int, I: int, dtype):
    """(device, generator, w13, w2): random expert weights on the GPU, seeded alike for every shape."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * I, D, device=dev, dtype=dtype, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, device=dev, dtype=dtype, generator=g) / I ** 0.5
    return dev, g, w13, w2


def tune_shape(E: int, D: int, I: int, K: int, tokens, dtype=torch.bfloat16, log=print) -> dict:
    """{str(T): MoEConfig dict} for one shape on the current GPU, with the timings in '_times_ms'."""
    import triton.testing

    from kernels.align import align_tokens
    from kernels.grouped_gemm import moe_gemm, moe_up
    from kernels.launch_config import MoEConfig
    dev, g, w13, w2 = _random_experts(E, D, I, dtype)
    table, times = {}, {}
    for T in tokens:
        x = torch.randn(T, D, device=dev, dtype=dtype, generator=g)
        ids, w = random_routing(T, E, K, dev, g)
        w_P = w.reshape(-1).contiguous()
        best = None
        bms, ups, downs = candidates(T, K, E)
        for bm in bms:
            al = align_tokens(ids, E, bm)
            h = None
            up_t = []
            for c in ups:
                try:
                    ms = triton.testing.do_bench(lambda: moe_up(x, w13, al, c, False), warmup=5, rep=25,
                                                 return_mode="median")
                except Exception as exc:  # a tile too large for shared memory is a candidate, not a failure
                    log(f"  skip up {c}: {type(exc).__name__}")
                    continue
                up_t.append((ms, c))
            h = moe_up(x, w13, al, min(up_t, key=lambda t: t[0])[1], False)[0]
            dn_t = []
            for c in downs:
                try:
                    ms = triton.testing.do_bench(
                        lambda: moe_gemm(h, w2, (w2.stride(0), w2.stride(1), w2.stride(2)), D, I, al, c,
                                         a_gather=False, c_scatter=True, weight_P=w_P),
                        warmup=5, rep=25, return_mode="median")
                except Exception as exc:
                    log(f"  skip down {c}: {type(exc).__name__}")
                    continue
                dn_t.append((ms, c))
            (tu, cu), (td, cd) = min(up_t, key=lambda t: t[0]), min(dn_t, key=lambda t: t[0])
            if best is None or tu + td < best[0]:
                best = (tu + td, MoEConfig(bm, cu, cd))
        if T == 1:
            best = _tune_one_token(x, w13, w2, ids, w, best[1], log)
        elif best[1].block_m >= 32:
            best = (best[0], _tune_variants(x, w13, w2, ids, w, best[1], log))
        table[str(T)] = best[1].to_dict()
        times[str(T)] = round(best[0], 5)
        log(f"  E={E} D={D} I={I} K={K} T={T}: {best[0]:.4f} ms  {best[1]}")
    table["_times_ms"] = times
    return table


# the fused one-token kernels (kernels/fused_decode.py): (block_i, block_d, block_d2, warps, stages),
# the best of session 5's sweeps (runs k10, k12, k13) on the four shapes
FUSED_CANDIDATES = [(64, 128, 256, 4, 4), (64, 256, 256, 8, 3), (64, 256, 512, 8, 3), (128, 128, 256, 8, 3),
                    (32, 256, 512, 8, 3), (64, 256, 512, 4, 3)]


def _tune_one_token(x, w13, w2, ids, w, cfg, log):
    """(ms, config) for one token: the three-kernel path with ``cfg`` against the fused one-token
    kernels with each candidate, whole forward calls timed alike; the fused entry is kept only where
    it wins. (The time recorded for one token is thus a whole call's, the others' up + down GEMMs.)"""
    import triton.testing
    from dataclasses import replace

    from kernels.fused_moe import fused_moe
    from kernels.launch_config import FusedDecodeConfig

    def t(c):
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fused_moe(x, w13, w2, ids, w, config=c), warmup=5, rep=25,
                                           return_mode="median")
    best = (t(cfg), cfg)
    for v in FUSED_CANDIDATES:
        c = replace(cfg, fused=FusedDecodeConfig(*v))
        try:
            ms = t(c)
        except Exception as exc:  # too large for shared memory on this GPU
            log(f"  skip one-token kernels {v}: {type(exc).__name__}")
            continue
        if ms < best[0]:
            best = (ms, c)
    return best


# a (tail, a_tma) setting is kept only when its whole forward call beats the plain tiles by this much:
# session 8's A/B runs (NOTES-kernels version 14) moved by 1-5% either way from run to run on most cells
VARIANT_MIN_GAIN = 0.03


def _tune_variants(x, w13, w2, ids, w, cfg, log):
    """The chosen tiles with an expert's last row block run as a half (tail 1) or quarter (tail 2)
    tile and with A rows by TMA (a_tma), in both GEMMs, against the plain tiles: whole forward calls,
    interleaved over three rounds, the best of each. Kept only past VARIANT_MIN_GAIN."""
    import triton.testing
    from dataclasses import replace

    from kernels.fused_moe import fused_moe

    cands = {(t, a): replace(cfg, up=replace(cfg.up, tail=t, a_tma=a), down=replace(cfg.down, tail=t, a_tma=a))
             for t in (0, 1, 2) for a in (False, True)}
    best = {k: float("inf") for k in cands}
    with torch.no_grad():
        for _ in range(3):
            for k, c in cands.items():
                best[k] = min(best[k], triton.testing.do_bench(lambda: fused_moe(x, w13, w2, ids, w, config=c),
                                                               warmup=5, rep=25, return_mode="median"))
    log("  (tail, a_tma): " + ", ".join(f"{k}: {v:.4f} ms" for k, v in best.items()))
    k = min(best, key=best.get)
    return cands[k] if best[k] < (1 - VARIANT_MIN_GAIN) * best[(0, False)] else cands[(0, False)]


# --refine: the knobs swept around each GEMM's tuned tile. The first tuning chose tiles with A rows by
# pointers, then toggled (tail, a_tma) for both GEMMs at once; with A by TMA the best B path and depth
# can differ (session 9, run k25: Mixtral 4096's up GEMM with A and B both by TMA and 4 stages, 3.16 ms
# against the tuned 3.68).
REFINE_KNOBS = {"tma": (False, True), "a_tma": (False, True), "num_stages": (3, 4), "tail": (0, 1, 2),
                "persistent": (0, 1)}


def _neighbours(c, knobs=REFINE_KNOBS):
    """Every combination of ``knobs`` on tile ``c`` that GemmConfig accepts (its own values included;
    e.g. a persistent grid only with tail 0 and weights by TMA)."""
    from dataclasses import replace
    from itertools import product
    out = []
    for vals in product(*knobs.values()):
        try:
            out.append(replace(c, **dict(zip(knobs, vals))))
        except ValueError:  # a combination the launch config refuses
            continue
    return out


def _best_of(fns: dict, rounds: int, timer) -> dict:
    """Best time of each candidate over interleaved rounds; a candidate that fails to compile or
    launch (a tile too large for shared memory) is dropped. A timer with a ``rotation`` (the GPU
    timers) times every call of every candidate alone, in rotation, instead (``_rotation``)."""
    if getattr(timer, "rotation", None) is not None:
        return timer.rotation(fns, rounds)
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            if best[k] is None:
                continue
            try:
                best[k] = min(best[k], timer(f))
            except Exception:  # noqa: BLE001 - a candidate, not a failure
                best[k] = None
    return {k: v for k, v in best.items() if v is not None}


# The H200 here is capped at 700 W: under back-to-back GEMMs its clock falls from 1980 MHz to 1400-1620
# within seconds (NOTES-kernels 17e), so a candidate timed for 25 ms after another ran on a different
# clock than the one before it (a fixed-order A/B in run s11-e made a faster alignment look up to 14%
# slower). The GPU timers therefore time single calls in rotation: pass i runs every candidate once,
# starting at candidate i, each call between CUDA events, and a candidate's time is the median of its
# calls. ROTATION_MS: about how long each candidate runs in all, per round asked for.
ROTATION_MS = 25
ROTATION_PASSES = (5, 200)


def _rotation(runs: dict, passes: int, timed_call, settle=lambda: None) -> dict:
    """Median ms of each of ``runs`` (name -> zero-argument call) over ``passes`` passes; pass i starts at
    candidate i (mod their number), so each takes every place in the order about equally often.
    ``timed_call(run)`` runs it once and returns a zero-argument reader of its time, valid after
    ``settle()``."""
    import statistics
    names = list(runs)
    pending = {k: [] for k in names}
    for i in range(passes):
        for j in range(len(names)):
            k = names[(i + j) % len(names)]
            pending[k].append(timed_call(runs[k]))
    settle()
    return {k: statistics.median(read() for read in v) for k, v in pending.items()}


def _event_timed(run):
    """Run once between two CUDA events on the current stream; the reader gives ms once synchronized."""
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    run()
    e1.record()
    return lambda: e0.elapsed_time(e1)


def _rotate_runs(runs: dict, rounds: int) -> dict:
    """Time ``runs`` in rotation (``_rotation``) for about ROTATION_MS x rounds each, on the GPU: the
    slowest candidate's first timed call sets the number of passes."""
    if not runs:
        return {}
    first = _rotation(runs, 1, _event_timed, torch.cuda.synchronize)
    lo, hi = ROTATION_PASSES
    passes = max(lo, min(hi, int(ROTATION_MS * rounds / max(max(first.values()), 1e-3))))
    return _rotation(runs, passes, _event_timed, torch.cuda.synchronize)


def _graph_rotation(fns: dict, rounds: int) -> dict:
    """The rotation of ``_graph_timer``: each candidate captured as one CUDA graph (one that fails to
    compile, launch or capture is dropped), then its replays timed in rotation. Graph replay, as
    benchmarks/kernels.py times its headline column: session 9 (NOTES-kernels 15d) saw eager timing of
    one GEMM at a time rank fine-grained up GEMMs in an order that graph replay reversed by 5-12%."""
    from benchmarks.kernels import capture_graph  # (that module imports this one: not at the top)
    runs = {}
    for k, f in fns.items():
        try:
            runs[k] = capture_graph([f]).replay
        except Exception:  # noqa: BLE001 - a candidate, not a failure
            continue
    return _rotate_runs(runs, rounds)


def _eager_rotation(fns: dict, rounds: int) -> dict:
    """The rotation of ``_eager_timer`` (forward + backward steps: autograd is not captured): a first
    call of each drops those that cannot run, then single calls are timed in rotation."""
    runs = {}
    for k, f in fns.items():
        try:
            f()
            runs[k] = f
        except Exception:  # noqa: BLE001 - a candidate, not a failure
            continue
    torch.cuda.synchronize()
    return _rotate_runs(runs, rounds)


def _graph_timer(f) -> float:
    """ms of one CUDA-graph replay of ``f`` alone, timed as ``_graph_rotation`` times a group (raises
    when it cannot run). ``_best_of`` hands the GPU timers every candidate at once (``.rotation``)."""
    return _graph_rotation({0: f}, 1)[0]


# --refine: how many of each GEMM's fastest settings (timed alone) go into the whole-call round, as
# every up x down pair. Session 9 (NOTES-kernels 15d-e): a GEMM's rank alone did not predict the
# whole call, even in graph replay (the up GEMM's output and the gather share L2 with the down GEMM).
REFINE_FINALISTS = 3


def refine_config(x, w13, w2, ids, w, cfg, log, rounds: int = 2, timer=None, finalists: int = REFINE_FINALISTS,
                  knobs: dict | None = None):
    """(ms, config): each GEMM of ``cfg`` swept over REFINE_KNOBS alone (same alignment; the up GEMM's
    time includes gathering x when A comes by TMA); the ``finalists`` fastest of each then run as whole
    forward calls in every up x down pair beside ``cfg`` (three rounds' worth, ``_best_of``), and the fastest
    pair is kept only when it beats ``cfg``'s whole call by VARIANT_MIN_GAIN. Every time is a
    CUDA-graph replay (``_graph_timer``) unless ``timer`` says otherwise; ``knobs``: a subset of
    REFINE_KNOBS to sweep (the others keep the tuned values)."""
    from dataclasses import replace

    from kernels.align import align_tokens
    from kernels.fused_moe import fused_moe
    from kernels.grouped_gemm import moe_gemm, moe_up
    timer = timer or _graph_timer
    E, J, D = w13.shape
    I = J // 2
    w_P = w.reshape(-1).contiguous()
    al = align_tokens(ids, E, cfg.block_m)
    st = (w2.stride(0), w2.stride(1), w2.stride(2))
    with torch.no_grad():
        h = moe_up(x, w13, al, replace(cfg.up, tail=0), False)[0]  # every padded row written
        knobs = knobs or REFINE_KNOBS
        ups = _best_of({c: (lambda c=c: moe_up(x, w13, al, c, False)) for c in _neighbours(cfg.up, knobs)}, rounds,
                       timer)
        downs = _best_of({c: (lambda c=c: moe_gemm(h, w2, st, D, I, al, c, a_gather=False, c_scatter=True, weight_P=w_P))
                          for c in _neighbours(cfg.down, knobs)}, rounds, timer)
        if not ups or not downs:
            return None, cfg
        top_up = sorted(ups, key=ups.get)[:finalists]
        top_down = sorted(downs, key=downs.get)[:finalists]
        log(f"  alone: up {ups.get(cfg.up, float('nan')):.4f} -> {ups[top_up[0]]:.4f} ms, "
            f"down {downs.get(cfg.down, float('nan')):.4f} -> {downs[top_down[0]]:.4f} ms")
        pairs = [cfg] + [replace(cfg, up=u, down=d) for u in top_up for d in top_down
                         if replace(cfg, up=u, down=d) != cfg]
        return _gate(cfg, {c: (lambda c=c: fused_moe(x, w13, w2, ids, w, config=c)) for c in pairs}, timer, log,
                     "whole call")


def _gate(cfg, calls: dict, timer, log, what: str):
    """(ms, config) of the fastest of ``calls`` (config -> closure; ``cfg`` among them) over three
    rounds (``_best_of``: on the GPU, calls timed in rotation), kept only when it beats ``cfg`` by VARIANT_MIN_GAIN; (None, cfg) when ``cfg``
    itself could not be timed."""
    whole = _best_of(calls, 3, timer)
    if cfg not in whole:
        return None, cfg
    best = min(whole, key=whole.get)
    log(f"  {what} {whole[cfg]:.4f} -> {whole[best]:.4f} ms (best of {len(whole)} pairs)")
    if whole[best] < (1 - VARIANT_MIN_GAIN) * whole[cfg]:
        return whole[best], best
    return whole[cfg], cfg


# --refine-backward: the backward's two activation GEMMs (kernels.fused_moe backward). Both read their
# weights through pointers (dh: w2 as is; dx: w13 transposed), so they run per tile: swept over depth
# and tail tiles, the dx GEMM also over its A rows (dgu, sorted) by TMA.
BWD_KNOBS = {"num_stages": (3, 4), "tail": (0, 1, 2)}


def _bwd_neighbours(c, dx: bool):
    """Backward tiles around ``c``: BWD_KNOBS (and a_tma for the dx GEMM), on a per-tile grid with the
    TMA weight flag cleared (no backward GEMM reads its weights by TMA: equal kernels, one candidate)."""
    from dataclasses import replace
    return _neighbours(replace(c, persistent=0, tma=False), {**BWD_KNOBS, **({"a_tma": (False, True)} if dx else {})})


def _eager_timer(f) -> float:
    """ms of one eager call of ``f`` (a forward + backward step: autograd is not captured in graphs),
    timed as ``_eager_rotation`` times a group (raises when it cannot run)."""
    return _eager_rotation({0: f}, 1)[0]


_graph_timer.rotation = _graph_rotation
_eager_timer.rotation = _eager_rotation


def refine_backward(x, w13, w2, ids, w, cfg, log, rounds: int = 2, timer=None, step_timer=None,
                    finalists: int = REFINE_FINALISTS):
    """(ms, config): the backward's dh GEMM (SwiGLU backward) and dx GEMM each swept alone around
    ``cfg.backward`` (graph replay, same alignment and saved activations), the ``finalists`` fastest
    of each then run as whole forward + backward steps (eager) in every pairing beside ``cfg``, and
    the fastest pair kept as ``bwd_up`` / ``bwd_down`` only when the step gains VARIANT_MIN_GAIN.
    The forward's tiles do not change."""
    from dataclasses import replace

    from kernels.fused_moe import _forward, fused_moe
    from kernels.grouped_gemm import moe_gemm, moe_swiglu_bwd
    timer, step_timer = timer or _graph_timer, step_timer or _eager_timer
    E, J, D = w13.shape
    w_P = w.reshape(-1).contiguous()
    dy = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=torch.Generator(x.device).manual_seed(1))
    tstr = (w13.stride(0), w13.stride(2), w13.stride(1))  # dx = dgu @ W13[e]: B[e][d, j] = w13[e, j, d]
    bwd_up, bwd_down = cfg.backward
    with torch.no_grad():
        _, al, _, gu = _forward(x, w13, w2, ids, w_P, cfg, save=True)
        dgu, _ = moe_swiglu_bwd(dy, w2, gu, w_P, al, replace(bwd_up, tail=0))  # every padded row written
        dhs = _best_of({c: (lambda c=c: moe_swiglu_bwd(dy, w2, gu, w_P, al, c)) for c in _bwd_neighbours(bwd_up, False)},
                       rounds, timer)
        dxs = _best_of({c: (lambda c=c: moe_gemm(dgu, w13, tstr, D, J, al, c, a_gather=False, c_scatter=True))
                        for c in _bwd_neighbours(bwd_down, True)}, rounds, timer)
    if not dhs or not dxs:
        return None, cfg
    top_dh = sorted(dhs, key=dhs.get)[:finalists]
    top_dx = sorted(dxs, key=dxs.get)[:finalists]
    log(f"  alone: dh {dhs[top_dh[0]]:.4f} ms, dx {dxs[top_dx[0]]:.4f} ms (fastest of {len(dhs)} / {len(dxs)})")

    def step(c):
        xs, a, b, ws = (t.detach().requires_grad_(True) for t in (x, w13, w2, w))
        fused_moe(xs, a, b, ids, ws, config=c).backward(dy)
    pairs = [cfg] + [replace(cfg, bwd_up=u, bwd_down=d) for u in top_dh for d in top_dx]
    return _gate(cfg, {c: (lambda c=c: step(c)) for c in pairs}, step_timer, log, "forward + backward")


def refine_shape(E: int, D: int, I: int, K: int, tokens, dtype=torch.bfloat16, log=print,
                 backward: bool = False, knobs: dict | None = None) -> dict:
    """{str(T): MoEConfig dict} for the token counts whose tuned entry refine_config (with
    ``backward``: refine_backward) improves; ``knobs`` as refine_config's."""
    from kernels.launch_config import load_tuned
    current = load_tuned(E, I, D, torch.cuda.get_device_name())
    if not current:
        raise SystemExit(f"--refine needs a tuned file for E={E} I={I} D={D} on this GPU; run without --refine first")
    dev, g, w13, w2 = _random_experts(E, D, I, dtype)
    table, times = {}, {}
    for T in tokens:
        cfg = current.get(T)
        if cfg is None or cfg.block_m < 32:
            log(f"  T={T}: no tuned entry with row blocks of 32+ rows; not refined")
            continue
        x = torch.randn(T, D, device=dev, dtype=dtype, generator=g)
        ids, w = random_routing(T, E, K, dev, g)
        log(f"  E={E} D={D} I={I} K={K} T={T}: refining {'the backward of ' if backward else ''}{cfg}")
        ms, new = (refine_backward(x, w13, w2, ids, w, cfg, log) if backward
                   else refine_config(x, w13, w2, ids, w, cfg, log, knobs=knobs))
        if new != cfg:
            table[str(T)] = new.to_dict()
            times[str(T)] = round(ms, 5)
            log(f"  T={T}: kept {new}")
    if table:  # (the backward's gate times whole forward + backward steps: kept apart from forward times)
        table["_fwd_bwd_times_ms" if backward else "_times_ms"] = times
    return table


def write_table(E: int, I: int, D: int, table: dict, out_dirs) -> list[Path]:
    """Into kernels/configs/ (merged: entries of other token counts stay), and into each out dir's
    tuned_configs.json as {file name: table} (the device's file transfer refuses names with '=' or ',')."""
    from kernels.launch_config import CONFIG_DIR, config_file_name, load_tuned
    name = config_file_name(E, I, D, torch.cuda.get_device_name())
    p = CONFIG_DIR / name
    if p.exists():  # token counts not tuned this time keep their entries
        old = json.loads(p.read_text())
        times = {k: {**old.get(k, {}), **table.get(k, {})} for k in ("_times_ms", "_fwd_bwd_times_ms")
                 if k in old or k in table}
        table = {**old, **table, **times}
    p.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    paths = [p]
    for d in out_dirs:
        q = Path(d) / "tuned_configs.json"
        q.parent.mkdir(parents=True, exist_ok=True)
        bundle = json.loads(q.read_text()) if q.exists() else {}
        bundle[name] = table
        q.write_text(json.dumps(bundle, indent=1, sort_keys=True) + "\n")
        paths.append(q)
    load_tuned.cache_clear()
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--tokens", default="1,8,64,512,4096,16384")
    ap.add_argument("--out", action="append", default=[], help="also write the files here")
    ap.add_argument("--refine", action="store_true",
                    help="start from the tuned files and sweep each GEMM's TMA paths, depth, tail tiles and "
                         "persistent grid around them")
    ap.add_argument("--refine-backward", action="store_true",
                    help="start from the tuned files and sweep the backward's dh and dx tiles (bwd_up / bwd_down), "
                         "kept where a whole forward + backward step gains 3%%")
    ap.add_argument("--knobs", default="",
                    help=f"with --refine: sweep only these (comma list of {list(REFINE_KNOBS)}); the rest keep "
                         "their tuned values")
    args = ap.parse_args(argv)
    knobs = None
    if args.knobs:
        unknown = set(args.knobs.split(",")) - set(REFINE_KNOBS)
        if unknown or not args.refine:
            raise SystemExit(f"--knobs takes a comma list of {list(REFINE_KNOBS)} with --refine"
                             + (f"; unknown: {sorted(unknown)}" if unknown else ""))
        knobs = {k: REFINE_KNOBS[k] for k in args.knobs.split(",")}
    if args.refine and args.refine_backward:
        raise SystemExit("--refine and --refine-backward sweep different things: run them one after the other")
    if not torch.cuda.is_available():
        raise SystemExit("tune_kernels.py needs a CUDA GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    for key in args.shapes.split(","):
        if key not in SHAPES:
            raise SystemExit(f"unknown shape {key!r}; choose from {list(SHAPES)}")
        name, E, D, I, K = SHAPES[key]
        t0 = time.time()
        refine = args.refine or args.refine_backward
        table = (refine_shape(E, D, I, K, tokens, backward=args.refine_backward, knobs=knobs) if refine
                 else tune_shape(E, D, I, K, tokens))
        if refine and not table:
            print(f"{name}: the tuned entries stand")
            continue
        for p in write_table(E, I, D, table, args.out):
            print(f"{name}: wrote {p} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
