"""Expert offloading on one GPU: decode tokens/s and hit ratio per policy, against the PCIe floor.

    python benchmarks/offload.py                       # H200: Mixtral-8x7B and Qwen3-30B-A3B shapes
    python benchmarks/offload.py --smoke               # tiny shapes on the CPU (a check of the script)

What runs: a stack of the model's MoE layers with random bf16 weights (router + experts; the
attention and dense parts are resident and equal across policies, so they are left out), as many
layers as the host-memory cap allows; experts in pinned host memory; routing driven by a
synthetic trace (routing.synthesize: popularity skew, temporal locality, inter-layer affinity)
through `offload.route_by_trace`, so random weights see realistic routing. Single-sequence
decode; the first --warmup tokens fill the cache and are not counted.

Per-token figures are scaled from the layers run to the full depth (x full/run) and say so.
--rounds N: the cached rows of a budget run N times, taking turns, each keeping its fastest (a single run
spreads +-10-30% on the H200 machine, BENCHMARKS 3o).
Each row prints its floor: bytes copied per token / measured pinned copy bandwidth.

Rows at each GPU expert budget (share of the experts' bytes held on the GPU, slots = share * E):
  resident      all experts in the cache's slots (every access a hit: the cache's own per-layer work stays)
  resident plain  the experts as plain device tensors, the kernel called on them, no cache (as many layers
                as half the free GPU memory holds; per-token figures scaled like the others)
  no-cache      every expert copied when used, nothing kept
  lru, lfu      the eviction policies, copies on demand (lfu: OffloadConfig's default half-life, 23 steps)
  lfu device    lfu decided on the GPU (OffloadConfig(driver='device')): a plan kernel, the misses read from
                pinned host memory by a kernel, no host sync in a layer (the layers here run eagerly, so
                what it saves is the host's per-layer reads and decisions, not launches)
  gate          lru + next-layer-gate speculation (layer l+1's router on layer l's input; with
                random router weights this guesses at random: reported as measured)
  cpu           lru + misses split between copying and computing on the CPU (cost model)
  predictor     predictor-driven eviction + prefetch (routing.PathPredictor fitted on other
                requests of the same synthetic model)
  predictor+cpu the two together
  predictor bN  (--prefetch-budgets N ...) the predictor rows with its prefetch queued behind the
                layer's demand copies, at most N expert copies per layer (the rows above prefetch
                only while the copy engine is idle)
  lru/G, cpu/G   (after the rows above; --slices) experts cut into G slices of their ffn dimension
                (offload/slices.py), the same bytes per layer in G x the slots: lru/G caches
                slices; cpu/G also shares the slices of one missed expert between the copy engine
                and the CPU (whole-expert misses at batch 1 leave nothing to share); "span": the
                split ignores that a CPU-computed slice stays a miss (miss_split='makespan')
  lru packed, lfu packed, lfu packed device  (last; --packed, bfloat16 only) the experts drawn again with
                the same seed and kept packed to 12 bits a weight (OffloadConfig.pack_experts): a quarter
                fewer bytes a copy, decoded on the GPU after it; "oracle packed": the oracle bound with
                copies of the mean packed expert's bytes (the bound those rows stand against)
  oracle bound  time model: Belady + perfect prefetch + best of copy / CPU per miss, fed by the
                measured copy bandwidth, CPU rate and per-layer compute time (the faster of the two
                resident rows; the cache's all-hits row alone until session 27) (its hit %
                is Belady's before prefetch; the other rows count prefetched experts as hits)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe.layers import Experts as ResidentExperts  # noqa: E402  (the model's own; `Experts` below is a holder)
from offload import (CostModel, HostExpertStore, OffloadConfig, PackedHostExpertStore, TransitionPredictor,  # noqa: E402
                     oracle_bound, route_by_trace, shared_pool_belady, simulate)
from offload.apply import host_available_bytes, install  # noqa: E402

SHAPES = {
    "mixtral": dict(name="Mixtral-8x7B", layers=32, E=8, K=2, D=4096, I=14336, skew=0.6),
    "qwen3": dict(name="Qwen3-30B-A3B", layers=48, E=128, K=8, D=2048, I=768, skew=1.0),
    "tiny": dict(name="tiny", layers=6, E=16, K=2, D=64, I=96, skew=1.0),
}


class Router(nn.Module):
    def __init__(self, D, E, K, device, dtype):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False, device=device, dtype=dtype)
        self.top_k = K

    def forward(self, x_TD):
        logits_TE = self.gate(x_TD).float()
        w_TK, ids_TK = torch.softmax(logits_TE, -1).topk(self.top_k, dim=-1)
        return ids_TK, w_TK / w_TK.sum(-1, keepdim=True), logits_TE


class Experts(nn.Module):
    def __init__(self, w13, w2):
        super().__init__()
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.backend = "torch"


class Block(nn.Module):
    def __init__(self, i, router, experts):
        super().__init__()
        self.layer_idx = self.moe_index = i
        self.router, self.experts = router, experts


class Stack(nn.Module):
    def __init__(self, blocks, K):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.config = type("Cfg", (), dict(num_experts_per_tok=K))()

    def moe_blocks(self):
        return list(self.blocks)


def build(shape, L, device, dtype, pin):
    """Random experts straight into (pinned) host memory, drawn on the device a slice at a time."""
    E, K, D, I = shape["E"], shape["K"], shape["D"], shape["I"]
    g = torch.Generator(device=device).manual_seed(0)
    blocks = []
    for i in range(L):
        w13 = torch.empty(E, 2 * I, D, dtype=dtype, pin_memory=pin)
        w2 = torch.empty(E, D, I, dtype=dtype, pin_memory=pin)
        for e in range(E):
            w13[e].copy_(torch.randn(2 * I, D, device=device, dtype=dtype, generator=g) * D ** -0.5)
            w2[e].copy_(torch.randn(D, I, device=device, dtype=dtype, generator=g) * I ** -0.5)
        blocks.append(Block(i, Router(D, E, K, device, dtype), Experts(w13, w2)))
    return Stack(blocks, K)


def build_store(shape, L, device, dtype, packed: bool = False):
    """(stack, its MoE blocks, the store that took their experts): HostExpertStore, or the experts packed
    to 12 bits a weight (PackedHostExpertStore); pinned on a GPU machine. Prints what it built."""
    t = time.perf_counter()
    pin = device.type == "cuda"
    stack = build(shape, L, device, dtype, pin=pin)
    blocks = stack.moe_blocks()
    kind = PackedHostExpertStore if packed else HostExpertStore
    store = kind.from_blocks(blocks, release=lambda i: setattr(blocks[i], "experts", None), pin=pin)
    took = f"in {time.perf_counter() - t:.1f} s"
    if packed:
        print(f"  packed experts: {store.nbytes() / 2 ** 30:.2f} GiB packed, {store.host_bytes() / 2 ** 30:.2f} GiB of "
              f"host memory, {took}")
    else:
        print(f"  built {store.nbytes() / 2 ** 30:.1f} GiB of experts in {'pinned' if store.pinned else 'plain'} "
              f"host memory {took}")
    return stack, blocks, store


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(stack, cache, trace, warmup, device, dtype, clear_each_step=False):
    """Single-sequence decode over the trace; returns seconds for the tokens after warm-up."""
    blocks = stack.moe_blocks()
    D = blocks[0].router.gate.in_features
    x = torch.randn(1, D, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(1))
    t0 = None
    with torch.no_grad(), route_by_trace(stack, trace, with_logits=False):
        for s in range(trace.num_tokens):
            if s == warmup:
                sync(device)
                cache.reset_stats()
                t0 = time.perf_counter()
            h = x
            for b in blocks:
                ids, w, _ = b.router(h)
                h = F.rms_norm(h + b.experts(h, ids, w), (D,))
            if clear_each_step:
                cache.clear()
        sync(device)
    return time.perf_counter() - t0


class _NoCache:
    """decode()'s cache hooks for a stack without one."""

    def reset_stats(self):
        pass

    def clear(self):
        pass


def resident_plain(stack, store, trace, warmup, device, dtype, backend, max_layers):
    """Seconds a decode token per MoE layer with the experts of the first ``max_layers`` layers resident as
    plain device tensors (the routers and norms as in every row), and how many layers that ran. Only as many
    layers as half the free device memory holds run: the time per layer is what the bound needs."""
    blocks = stack.moe_blocks()
    per_layer = store.layers[0][0].nbytes + store.layers[0][1].nbytes
    n = min(len(blocks), max_layers)
    if device.type == "cuda":
        n = min(n, max(1, int(0.5 * torch.cuda.mem_get_info(device)[0] // per_layer)))
    saved = [b.experts for b in blocks[:n]]
    try:
        for i, b in enumerate(blocks[:n]):
            w13, w2 = store.layers[i]  # the model's own experts module: the kernel called on them, no cache
            b.experts = ResidentExperts(w13.shape[0], w13.shape[2], w2.shape[2], backend=backend, dtype=w13.dtype,
                                        device=device)
            with torch.no_grad():
                b.experts.w13.copy_(w13)
                b.experts.w2.copy_(w2)
        secs = decode(Stack(blocks[:n], stack.config.num_experts_per_tok), _NoCache(), trace, warmup, device, dtype)
    finally:
        for b, ex in zip(blocks[:n], saved):
            b.experts = ex
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return secs / max(trace.num_tokens - warmup, 1) / n, n


def pick_backend(want, device):
    if want != "auto":
        return want
    if device.type != "cuda":
        return "torch"
    try:
        from kernels import get_backend
        get_backend("triton")
        return "triton"
    except Exception as e:  # no Triton kernel available: the reference loop still gives the cache figures
        print(f"  (triton backend unavailable: {e}; using torch)")
        return "torch"


def check_backend(backend, store, device, dtype):
    """The kernel on a slot pool with remapped ids must match the reference before we time it."""
    if backend == "torch":
        return backend
    from kernels import get_backend
    pairs = [store.get(0, e) for e in range(2)]
    w13 = torch.stack([a for a, _ in pairs]).to(device)
    w2 = torch.stack([b for _, b in pairs]).to(device)
    x = torch.randn(3, w13.shape[2], device=device, dtype=dtype)
    ids = torch.tensor([[0, -1], [1, 0], [-1, 1]], device=device)
    wts = torch.full((3, 2), 0.5, device=device)
    try:
        y = get_backend(backend)(x, w13, w2, ids, wts)
        ref = get_backend("torch")(x.float(), w13.float(), w2.float(), ids, wts)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if err < 2e-2:
            return backend
        print(f"  ({backend} backend off by {err:.3g} on the slot pool; using torch)")
    except Exception as e:
        print(f"  ({backend} backend failed on the slot pool: {e}; using torch)")
    return "torch"


def fit_predictor(train, which="routing"):
    if which == "transition":
        return TransitionPredictor.fit(train), "offload.TransitionPredictor"
    try:
        from routing import PathPredictor
        p = PathPredictor.fit(train)
        return p, f"routing.PathPredictor (match_layers={p.config.match_layers})"
    except Exception as e:  # keep the benchmark running with the simple baseline, and say so
        print(f"  (routing.PathPredictor unavailable: {e}; using offload.TransitionPredictor)")
        return TransitionPredictor.fit(train), "offload.TransitionPredictor"


def run_model(key, args, device, dtype):
    shape = SHAPES[key]
    E, K, D, I, L_full = shape["E"], shape["K"], shape["D"], shape["I"], shape["layers"]
    eb = (3 * D * I) * torch.empty((), dtype=dtype).element_size()
    layer_bytes = E * eb
    ram_layers = max(1, int(0.7 * host_available_bytes() // layer_bytes))
    cap_layers = max(1, int(args.max_host_gib * 2 ** 30 // layer_bytes))
    L = min(L_full, ram_layers, cap_layers, args.max_layers or L_full)
    scale = L_full / L
    print(f"\n== {shape['name']} shapes: E={E} top-{K} hidden {D} ffn {I}; expert {eb / 2 ** 20:.1f} MiB, "
          f"{L} of {L_full} MoE layers run (host RAM allows {min(ram_layers, L_full)}; cap --max-host-gib "
          f"{args.max_host_gib:g}); per-token figures scaled x{scale:.2f} to {L_full} layers ==")
    stack, blocks, store = build_store(shape, L, device, dtype)
    cost = CostModel.calibrate(device, *store.get(0, 0))
    whole_cost = cost  # (the slice rows below calibrate their own)
    bw = cost.copy_bytes_per_s
    print(f"  measured: {cost.describe()} (copy of one expert {eb / 1e6:.1f} MB: {cost.copy_s(eb) * 1e3:.3f} ms; "
          f"CPU 1 token: {cost.cpu_s(1) * 1e3:.3f} ms)")

    from routing import synthesize
    n_tok = args.warmup + args.tokens
    full = synthesize(num_layers=L, num_experts=E, top_k=K, num_requests=1 + args.train_requests,
                      tokens_per_request=n_tok, popularity_skew=shape["skew"],
                      temporal_locality=args.locality, affinity=args.affinity, seed=args.seed)
    req = full.request_ids_or_default()
    trace, train = full.select_tokens(req == 0), full.select_tokens(req != 0)
    print(f"  routing: synthetic trace, skew {shape['skew']}, temporal locality {args.locality}, "
          f"affinity {args.affinity}; {args.warmup} warm-up + {args.tokens} timed decode tokens")
    predictor, pname = fit_predictor(train, args.predictor)
    ids_NLK = trace.expert_ids.transpose(1, 0, 2)[:1].astype(np.int64)
    pcost = []  # the first round over the layers is cold (first calls: 4x the warm cost, dev CPU); decode is warm
    for _ in range(2):
        t = time.perf_counter()
        for layer in range(L):
            predictor.predict_batch(ids_NLK, layer, ids_NLK[:, :layer + 1])
        pcost.append((time.perf_counter() - t) / L)
    print(f"  predictor: {pcost[1] * 1e3:.2f} ms per call (first round {pcost[0] * 1e3:.2f}); asked every "
          f"{args.predict_every} layers ({pcost[1] * 1e3 * L / args.predict_every * scale:.1f} ms per token at full depth)")
    backend = check_backend(pick_backend(args.backend, device), store, device, dtype)
    print(f"  expert kernel: {backend}; predictor: {pname}")

    rows = []

    def live(label, budget, slots, cfg_kw, clear=False, fill_all=False, emit=True):
        cfg = OffloadConfig(**{"slots_per_layer": slots, "device": str(device), "calibrate": False, "driver": "host",
                               "expert_slices": store.slices, **cfg_kw})
        row_cost = dataclasses.replace(cost)  # its own: the CPU rows learn their in-use CPU time into it
        cache = install(blocks, store, cfg, device=device, top_k=K, slots=slots, backend=backend, cost=row_cost)
        if fill_all:
            for layer in range(L):
                cache.prefetch(layer, list(range(E)))
            sync(device)  # every copy landed before the warm-up tokens: none of it is timed
        secs = decode(stack, cache, trace, args.warmup, device, dtype, clear_each_step=clear)
        st = cache.stats()
        n = args.tokens
        ms = secs / n * 1e3 * scale
        floor_ms = st["bytes_copied"] / n / bw * 1e3 * scale
        row = dict(model=shape["name"], budget=budget, slots=slots, config=label, ms_per_token=ms,
                   tokens_per_s=1e3 / ms, hit_ratio=st["hit_ratio"], mb_copied_per_token=st["bytes_copied"] / n / 1e6 * scale,
                   copy_floor_ms=floor_ms, cpu_experts_per_token=st["cpu_computed"] / n * scale,
                   prefetch_precision=st["prefetch_precision"], prefetch_recall=st["prefetch_recall"])
        if cfg.cpu_fallback:
            row["cpu_scale"] = row_cost.cpu_scale  # CPU time in use / calibrated (CostModel.observe_cpu)
        if emit:
            rows.append(row)
            show(row)
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    def interleaved(specs):
        """Each (label, budget, slots, cfg_kw) row --rounds times, the rows taking turns, each keeping its
        fastest round (``rounds_ms``: every round's ms/tok, in order): one run of a row spreads +-10-30% on
        the H200 machine from one moment to the next (BENCHMARKS 3o)."""
        best: dict = {}
        for _ in range(args.rounds):
            for label, budget, slots, cfg_kw in specs:
                row = live(label, budget, slots, cfg_kw, emit=False)
                seen = best.get(label, {}).get("rounds_ms", []) + [row["ms_per_token"]]
                if label not in best or row["ms_per_token"] < best[label]["ms_per_token"]:
                    best[label] = row
                best[label]["rounds_ms"] = seen
        for label, *_ in specs:
            rows.append(best[label])
            show(best[label])

    def modeled(label, budget, slots, time_s, hit, copies_per_tok, nbytes=None):
        ms = time_s / args.tokens * 1e3 * scale
        nbytes = eb if nbytes is None else nbytes  # bytes a copy
        row = dict(model=shape["name"], budget=budget, slots=slots, config=label, ms_per_token=ms,
                   tokens_per_s=1e3 / ms, hit_ratio=hit, mb_copied_per_token=copies_per_tok * nbytes / 1e6 * scale,
                   copy_floor_ms=copies_per_tok * nbytes / bw * 1e3 * scale, cpu_experts_per_token=float("nan"),
                   prefetch_precision=float("nan"), prefetch_recall=float("nan"))
        rows.append(row)
        show(row)
        return row

    print(f"  {'budget':>7} {'slots':>5} {'config':<17} {'tok/s':>8} {'ms/tok':>9} {'floor ms':>9} {'hit %':>6} "
          f"{'MB/tok':>8} {'cpu/tok':>7} {'pf P/R':>9}")
    if args.rounds > 1:
        print(f"  (the cached rows of a budget: each the fastest of {args.rounds} rounds, the rows taking turns)")
    res = live("resident", 1.0, E, dict(policy="lru"), fill_all=True)
    # the bound's compute: the faster of the cache's all-hits step (the host path's per-layer reads and
    # decisions included) and the experts resident as plain tensors, no cache at all. Until session 27 only
    # the first: at Qwen3 widths the host path's own work made that "bound" slower than the device driver.
    plain_s, plain_layers = resident_plain(stack, store, trace, args.warmup, device, dtype, backend, L)
    modeled("resident plain", 1.0, E, plain_s * L_full * args.tokens / scale, 1.0, 0.0)
    print(f"  {'':>7} {'':>5} (resident plain: the experts of {plain_layers} of {L} layers on the device as plain "
          f"tensors, no cache; {plain_s * 1e3:.3f} ms a layer against the cache's all-hits "
          f"{res['ms_per_token'] / L_full:.3f})")
    layer_compute_s = min(res["ms_per_token"] / 1e3 / L_full, plain_s)
    live("no-cache", 0.0, K, dict(policy="lru"), clear=True)
    for frac in args.budgets:
        S = max(1, round(frac * E))
        b = S / E
        pk = dict(policy="predictor", prefetch="predictor", predictor=predictor, predict_every=args.predict_every)
        interleaved([("lru", b, S, dict(policy="lru")),
                     ("lfu", b, S, dict(policy="lfu")),  # OffloadConfig's half-life (23 steps) since session 22
                     # the cache decided on the device (offload/device_cache.py): no host sync in a layer
                     ("lfu device", b, S, dict(policy="lfu", driver="device")),
                     ("gate", b, S, dict(policy="lru", prefetch="next_layer_gate")),
                     ("cpu", b, S, dict(policy="lru", cpu_fallback=True)),
                     ("predictor", b, S, pk),
                     ("predictor+cpu", b, S, dict(pk, cpu_fallback=True))]
                    # the predictor's prefetch queued behind demand copies (BENCHMARKS 7d)
                    + [(f"predictor b{nb:g}", b, S, dict(pk, prefetch_budget=nb)) for nb in args.prefetch_budgets])
        cost = whole_cost = rerate_copy(rows, shape["name"], cost, probe_copy_rate(device, store))
        bw = cost.copy_bytes_per_s
        sim_kw = dict(cost=cost, expert_bytes=eb, layer_compute_s=layer_compute_s, warmup_steps=args.warmup)
        bound = oracle_bound(trace, S, **sim_kw)
        copies = (bound["misses"] - bound["cpu_misses"]) / args.tokens
        modeled("oracle bound", b, S, bound["time_s"], bound["hit_ratio"], copies)
        sim = simulate(trace, "lru", S, **sim_kw)
        print(f"  {'':>7} {'':>5} (time model of lru: {sim['time_s'] / args.tokens * 1e3 * scale:.2f} ms/tok, "
              f"hit {100 * sim['hit_ratio']:.1f}%)")
        shared = shared_pool_belady(trace, S * L, warmup_steps=args.warmup)  # the same slots in one pool
        print(f"  {'':>7} {'':>5} (Belady with the {S * L} slots shared by all layers, not {S} a layer: hit "
              f"{100 * shared['hit_ratio']:.1f}% against the oracle's {100 * bound['hit_ratio']:.1f}%)")
    # expert slices (offload/slices.py): the same bytes per layer in G-times more, G-times smaller
    # slots; with the CPU path one missed expert is shared between a copy and the CPU. The store is
    # regrouped in place (one layer at a time), so these rows run last.
    for G in args.slices:
        if I % (G * store.slices) or G < 2:
            print(f"  expert slices {G}: skipped (must be >= 2 and divide the ffn {I // store.slices})")
            continue
        store = store.to_slices(G)
        cost = CostModel.calibrate(device, *store.get(0, 0))
        print(f"  expert slices {store.slices} (hit % and slots count units; bytes per slot / {store.slices}): "
              f"unit {cost.describe()}, copy {cost.copy_s(eb // store.slices) * 1e3:.3f} ms, "
              f"CPU 1 token {cost.cpu_s(1) * 1e3:.3f} ms")
        for frac in args.budgets:
            S = max(1, round(frac * E))
            b, Su = S / E, S * store.slices
            interleaved([(f"lru/{store.slices}", b, Su, dict(policy="lru")),
                         (f"cpu/{store.slices}", b, Su, dict(policy="lru", cpu_fallback=True)),
                         (f"cpu/{store.slices} span", b, Su, dict(policy="lru", cpu_fallback=True,
                                                                    miss_split="makespan"))])
    if args.packed and dtype != torch.bfloat16:
        print("  packed rows: skipped (packing keeps bfloat16 experts; this run's are " + str(dtype) + ")")
    elif args.packed:  # the same experts (build's seed) drawn again, once the store above is gone: one store at a time
        del store, stack, blocks
        if device.type == "cuda":
            torch.cuda.empty_cache()
        stack, blocks, store = build_store(shape, L, device, dtype, packed=True)
        print(f"  ({store.nbytes() / (eb * E * L):.4f} of the bfloat16 bytes)")
        for frac in args.budgets:
            S = max(1, round(frac * E))
            b = S / E
            interleaved([("lru packed", b, S, dict(policy="lru", pack_experts=True)),
                         ("lfu packed", b, S, dict(policy="lfu", pack_experts=True)),
                         ("lfu packed device", b, S, dict(policy="lfu", pack_experts=True, driver="device"))])
            # the bound over the packed bytes (each copy moves the mean packed expert): what these rows stand against
            whole_cost = rerate_copy(rows, shape["name"], whole_cost, probe_copy_rate(device, store))
            bw = whole_cost.copy_bytes_per_s
            pb = store.nbytes() / (E * L)
            bound = oracle_bound(trace, S, cost=whole_cost, expert_bytes=int(pb), layer_compute_s=layer_compute_s,
                                 warmup_steps=args.warmup)
            modeled("oracle packed", b, S, bound["time_s"], bound["hit_ratio"],
                    (bound["misses"] - bound["cpu_misses"]) / args.tokens, nbytes=pb)
    del store, stack, blocks
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def probe_copy_rate(device, store) -> float | None:
    """The host -> GPU rate of one of the store's experts now (bytes/s; None off a GPU)."""
    if device.type != "cuda":
        return None
    from offload.cost_model import copy_bytes_per_s
    return copy_bytes_per_s(device, store.get(0, 0)[0] if not isinstance(store, PackedHostExpertStore)
                            else store.packed(0, 0)[0])


def rerate_copy(rows: list[dict], model: str, cost: CostModel, now: float | None) -> CostModel:
    """The cost the oracle bound stands on, at the fastest copy rate seen: the calibration right after the store
    was built, or ``now`` (a probe right before the bound), if 2% faster; then ``model``'s rows' copy floors are
    re-rated to it too. A probe right after a 48-layer Qwen3 store was written read 26.9 GB/s where every later
    probe read 55 (decode.py, BENCHMARKS 3s): a bound at the first would be twice too slow, and the rows' shares
    of it too high."""
    if now is None or now <= 1.02 * cost.copy_bytes_per_s:
        return cost
    for r in rows:
        if r["model"] == model:
            r["copy_floor_ms"] *= cost.copy_bytes_per_s / now
    print(f"  (copy rate {now / 1e9:.1f} GB/s now, {cost.copy_bytes_per_s / 1e9:.1f} at calibration: the bound and "
          f"the floors of the rows so far re-rated to it)")
    return dataclasses.replace(cost, copy_bytes_per_s=now)


def show(r):
    pf = "" if math.isnan(r["prefetch_precision"]) else f"{r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f}"
    cpu = "" if math.isnan(r["cpu_experts_per_token"]) else f"{r['cpu_experts_per_token']:.1f}"
    print(f"  {100 * r['budget']:6.1f}% {r['slots']:5d} {r['config']:<17} {r['tokens_per_s']:8.2f} "
          f"{r['ms_per_token']:9.2f} {r['copy_floor_ms']:9.2f} {100 * r['hit_ratio']:6.1f} "
          f"{r['mb_copied_per_token']:8.1f} {cpu:>7} {pf:>9}"
          + (f"  (CPU in use x{r['cpu_scale']:.2f} its calibrated time)" if "cpu_scale" in r else ""), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="mixtral,qwen3", help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--slices", default="2", type=lambda v: [int(g) for g in v.split(",") if g],
                    help="expert slices to run after the whole-expert rows, each cutting the last finer "
                         "(e.g. '2,2' runs 2 then 4; '' for none)")
    ap.add_argument("--budgets", default="0.1,0.25,0.5", help="GPU expert budgets, shares of the experts' bytes")
    ap.add_argument("--tokens", type=int, default=32, help="timed decode tokens")
    ap.add_argument("--warmup", type=int, default=16, help="decode tokens that fill the cache first (not timed)")
    ap.add_argument("--max-host-gib", type=float, default=24.0,
                    help="cap on the pinned expert store per model (keeps the run under 5 minutes)")
    ap.add_argument("--max-layers", type=int, default=0, help="cap on MoE layers run (0: RAM / cap decide)")
    ap.add_argument("--locality", type=float, default=0.5, help="temporal locality of the synthetic routing")
    ap.add_argument("--affinity", type=float, default=0.6, help="inter-layer affinity of the synthetic routing")
    ap.add_argument("--train-requests", type=int, default=16, help="requests of the trace the predictor is fitted on")
    ap.add_argument("--predictor", default="routing", choices=["routing", "transition"],
                    help="routing: routing.PathPredictor; transition: offload's inter-layer transition baseline")
    ap.add_argument("--predict-every", type=int, default=4,
                    help="ask the predictor after every n-th layer, prefetching n layers ahead (its cost is per call)")
    ap.add_argument("--prefetch-budgets", type=float, nargs="*", default=[],
                    help="also run the predictor rows with OffloadConfig.prefetch_budget = each of these (expert "
                         "copies per layer queued behind demand copies; default: none, the idle-only rule alone)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the cached rows of each budget this many times, taking turns, and keep each one's "
                         "fastest (rounds_ms in --json: every round)")
    ap.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                    help="also the lru and lfu rows with the experts packed to 12 bits a weight (bfloat16 runs)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="the experts' dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--backend", default="auto", help="expert kernel on the slot pool: auto | torch | triton")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, few tokens: checks the script runs")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, even if the run is cut
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if args.smoke:
        args.models, args.tokens, args.warmup, args.train_requests = "tiny", 6, 4, 4
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
              f"CPU threads {torch.get_num_threads()}")
    else:
        print(f"device: CPU only (pool on the CPU; figures are not PCIe figures); torch {torch.__version__}")
    rows = []
    t = time.perf_counter()
    for key in args.models.split(","):
        if key not in SHAPES:
            raise SystemExit(f"unknown model {key!r}; choose from {', '.join(SHAPES)}")
        rows += run_model(key, args, device, dtype)
        if args.json:  # after each model, so a cut run keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\ntotal {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
