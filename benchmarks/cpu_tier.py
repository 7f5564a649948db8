"""CPU expert hosts as a tier, against the GPU cache with PCIe copies: decode tokens/s at a 25%
GPU expert budget, batch 1, 8 and 32.

    python benchmarks/cpu_tier.py                   # H200 machine: Mixtral-8x7B shapes (< 4 min)
    python benchmarks/cpu_tier.py --model qwen3     # Qwen3-30B-A3B shapes
    python benchmarks/cpu_tier.py --smoke           # tiny shapes on the CPU (a check of the script)
    python benchmarks/cpu_tier.py --batches 1 --hosts 2 --replicas 2   # each miss's host part on 2 hosts

What runs: a stack of the model's MoE layers with random bf16 weights (router + experts; the
attention and dense parts are the same in every configuration and left out), as many layers as
--layers and host RAM allow, per-token figures scaled to the full depth (said so). Routing is a
synthetic trace (routing.synthesize: popularity skew, temporal locality, affinity) through
offload.route_by_trace; batch B decodes B interleaved requests, one token each per step.

Configurations (same budget: 25% of the experts' bytes on the GPU):
  gpu-cache+pcie         offload's LRU slot cache, misses copied over PCIe (apply_offload's path)
  gpu-cache+cpu-hosts    the same cache inside offload.tiered (dispatch='split', granularity='slice'):
                         every expert is also on a CPU host; hits run from the cache, and each miss
                         is split over its ffn columns: [0, c) copied over PCIe (to a staging
                         buffer, not into the cache) and computed on the GPU, [c, I) on its host,
                         c from the calibrated cost model so that copies and hosts end together
                         (c == I: a whole copy into the cache)
  gpu-cache+cpu-hosts/whole  the same with granularity='expert': each miss copied whole or computed
                         whole on a host (the previous version; the gain of the split is the gap)
  static-tier+cpu-hosts  the tier plan (placement.cpu_tier, solved on a training half of the
                         trace): its GPU experts resident, the rest always computed on the hosts
  cpu-hosts-only         every expert on the CPU hosts, only the routers on the GPU

CPU hosts are Ray actors when Ray is installed and --ray is given; otherwise (the H200 machine
has no Ray) in-process hosts, one Python thread each, torch's process-wide thread count split
between them (--host-backend thread, the default), or child processes (--host-backend process:
serve.cpu_host_pool.ProcessHost, own torch threads pinned to their own cores, experts read from a
safetensors file this script writes to --scratch, as a serving host reads its checkpoint) —
said in the output. Thread and process hosts take their rows in shared buffers (the call
carries ids, weights and slices only); the hand-off (an empty call) is printed at start-up. Floors printed beside each row: PCIe =
bytes copied per token / measured pinned bandwidth; CPU = the CPU's work per token by the
measured cost model (expert reads at the measured 1-token time + token-slots at the measured
per-token rate, all cores); split floor (gpu-cache+cpu-hosts) = Σ over layer calls of the cost
model's max(copy engine, busiest host) for the split it chose. A line under each split row gives
experts split per step, slice MiB copied, the per-call submit / wait / host-compute times and the
cache hit ratio (partly copied experts do not enter the cache, so it is lower than PCIe's).

Measured with the slice split on a single-H200 machine (16 cores; 2026-11-28, BENCHMARKS.md 5b),
tokens/s, batch 1 / 8 / 32: gpu-cache+pcie 4.86 / 6.74 / 24.26; gpu-cache+cpu-hosts (slices)
3.70 (0.76x) / 9.48 (1.41x) / 35.16 (1.45x); gpu-cache+cpu-hosts/whole 4.32 / 9.58 / 33.86. At
batch 1 the host computed its column slices 3.4x slower than its cost model (a 1-row hand-off of
1/8 of an expert took 1.74 ms against 0.74 ms of compute), and copies and host reads share host
DRAM: ~82 GB/s together against 53 GB/s for copies alone (BENCHMARKS.md 3c), which caps what any
split on one machine can gain at batch 1 below the issue's 1.5x. The trace simulation that
predicted ~1.43x before overheads (4 layers, 2 of 8 slots: 0.98 misses per layer at 5.95 ms
whole, 1.29 at 4.16 ms split) assumed both run at full speed side by side.

Measured on the H200 machine with the whole-expert split (today's gpu-cache+cpu-hosts/whole row,
2026-11-28; Mixtral shapes, 4 of 32 layers run, x8 scaled; thread
hosts (the default; the machine has no Ray); static tier plan in closed form since it has no
OR-Tools; `python benchmarks/cpu_tier.py`, 64 s), tokens/s:
                        gpu-cache+pcie  gpu-cache+cpu-hosts  static-tier+cpu-hosts  cpu-hosts-only
  batch 1                    4.81             4.22                  2.23                1.74
  batch 8                    6.84             9.76 (1.43x)          5.95                4.26
  batch 32                  24.43            32.57 (1.33x)         18.91               15.64
(1 host of 16 threads; with 2 hosts of 8 threads: 5.13/3.73, 6.78/8.10, 24.58/30.81; 1 host of
14 threads, 2 cores left to the driver: 4.90/4.35, 6.76/9.10.) On the 4 x H200 host (64 cores,
host of 16 threads, batch 1 / 8): thread hosts 4.09/3.84 (0.94x), 7.05/10.72 (1.52x); child-
process hosts 3.85/1.02, 7.07/2.28 — before they were pinned apart from the driver, whose 64
OpenMP threads spun on the hosts' cores; the pinned version (now the process backend) was not
measured on a GPU machine (device time ran out).
The issue's target (>= 1.5x at batch 1) was NOT met by that whole-expert split: on this host one Mixtral expert costs about
the same on the CPU (6.8 ms at 1 token in a host) as over PCIe (6.1 ms), so at batch 1 (about
one miss per layer) the split rarely has two misses to share, and the tiered layer's own
overheads (device->host copy of x, the host hand-off) cost more than it saves: 237 ms/step
against floors of 143 ms (PCIe) and 80 ms (CPU); both read host DRAM (92 GB/s copy, ANCHORS.md),
so running them side by side is not free either (not measured separately). From batch 8 on,
copies and hosts work side by side and the GPU cache + CPU hosts win by 1.3-1.5x.
A static split (the tier plan) loses at every batch on a single machine: its CPU share is too
large for one CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.offload import SHAPES, build, check_backend, host_available_bytes, pick_backend  # noqa: E402
from offload import CostModel, HostExpertStore, OffloadConfig, route_by_trace  # noqa: E402
from offload.apply import install  # noqa: E402
from offload.tiered import TierRuntimeConfig, apply_cpu_tier  # noqa: E402
from routing import synthesize  # noqa: E402
from serve.cpu_host_pool import HostPoolConfig, _timed, start_hosts  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(blocks, trace, batch, warmup, device, dtype):
    """Decode steps of `batch` tokens over the trace; seconds for the steps after warm-up."""
    D = blocks[0].router.gate.in_features
    steps = trace.num_tokens // batch
    x = torch.randn(batch, D, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(1))
    t0 = None
    stack = _Stack(blocks)
    with torch.no_grad(), route_by_trace(stack, trace, with_logits=False):
        for s in range(steps):
            if s == warmup:
                sync(device)
                t0 = time.perf_counter()
            h = x
            for b in blocks:
                ids, w, _ = b.router(h)
                h = F.rms_norm(h + b.experts(h, ids, w), (D,))
        sync(device)
    return time.perf_counter() - t0, steps - warmup


class _OneGPUPlan:
    """Where OR-Tools is missing (the H200 machine): the tier program's optimum for ONE GPU rank in
    closed form. With one rank the hop term vanishes and every expert's CPU cost is independent,
    so the optimum puts the experts of largest CPU cost (placement.cpu_tier.cpu_costs: load x
    per-token + steps used x per-call) on the GPU up to its capacity; hosts take the rest, least
    CPU time first. Same views as TieredPlan that apply_cpu_tier uses."""

    def __init__(self, trace, batch, gpu_experts, hosts, cost):
        ids = trace.expert_ids.astype(np.int64)
        L, T, K = ids.shape
        E = trace.num_experts
        load = np.stack([np.bincount(ids[l][ids[l] >= 0], minlength=E) for l in range(L)])
        step = np.repeat(np.arange(-(-T // batch)), batch)[:T, None].repeat(K, 1)
        uses = np.stack([np.bincount(np.unique(step * E + ids[l]) % E, minlength=E) for l in range(L)])
        cc = load * cost.cpu_per_token_s + uses * cost.cpu_base_s
        self.table = np.full((L, E), -1, dtype=np.int64)
        order = np.argsort(-cc.reshape(-1), kind="stable")
        busy = np.zeros(hosts)
        for flat in order[gpu_experts:]:
            h = int(np.argmin(busy))
            self.table.reshape(-1)[flat] = h
            busy[h] += cc.reshape(-1)[flat]
        self.num_hosts, self.num_layers, self.num_experts = hosts, L, E

    def check_compatible(self, L, E):
        assert (L, E) == (self.num_layers, self.num_experts)

    def host_table(self):
        return self.table

    def experts_on_host(self, h):
        return [(int(l), int(e)) for l, e in np.argwhere(self.table == h)]


def tier_plan(train, batch, gpu_bytes, eb, hosts, L, E, cost, D, elem):
    """The tier program's plan on the training half of the trace (one GPU rank)."""
    from placement.cpu_tier import CPUTierCost, TierConfig, TierStats, solve_cpu_tier
    tcost = CPUTierCost(latency_s=200e-6, bytes_per_s=10e9, cpu_base_s=cost.cpu_base_s,
                        cpu_per_token_s=cost.cpu_per_token_s, row_bytes=2 * D * elem)
    tcfg = TierConfig(gpu_bytes=[gpu_bytes], host_bytes=[-(-L * E // hosts) * eb] * hosts,
                      expert_bytes=eb, cost=tcost, tokens_per_step=batch, time_limit_s=10)
    try:
        plan = solve_cpu_tier(TierStats.from_trace(train, tokens_per_step=batch), tcfg)
    except ModuleNotFoundError as e:  # ortools (placement's solver) is not installed here
        return _OneGPUPlan(train, batch, gpu_bytes // eb, hosts, cost), f"closed form, one GPU ({e.name} missing)"
    return plan, f"CP-SAT {plan.solver_status}"


def _plain_experts(blocks, store, E, backend):
    """Experts modules over the store's (pinned host) tensors again, no copy: what a loaded model has."""
    for i, b in enumerate(blocks):
        ex = torch.nn.Module()
        ex.w13 = torch.nn.Parameter(store.layers[i][0], requires_grad=False)
        ex.w2 = torch.nn.Parameter(store.layers[i][1], requires_grad=False)
        ex.num_experts, ex.backend = E, backend
        b.experts = ex


class _Stack:
    def __init__(self, blocks):
        self._b = blocks

    def moe_blocks(self):
        return self._b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4, help="MoE layers run (RAM and time; scaled to full depth)")
    ap.add_argument("--budget", type=float, default=0.25, help="share of the experts' bytes on the GPU")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--hosts", type=int, default=1,
                    help="CPU hosts (one per NUMA node is the natural choice; the H200 host has 16 cores)")
    ap.add_argument("--host-threads", type=int, default=0,
                    help="torch threads per host (0: the cores left after --driver-cores, split over the hosts)")
    ap.add_argument("--driver-cores", type=int, default=0,
                    help="cores left to the driver (GPU launches, copies, gathering)")
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per batch size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ray", action="store_true", help="CPU hosts as Ray actors (needs ray)")
    ap.add_argument("--host-backend", default="thread", choices=["process", "thread"],
                    help="without Ray: hosts as child processes (own threads and cores, experts read from a "
                         "safetensors file written to --scratch) or as threads of this process")
    ap.add_argument("--scratch", default="/tmp/moeflow-cpu-tier", help="where the process hosts' checkpoint goes")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--replicas", type=int, default=1,
                    help="gpu-cache+cpu-hosts: hosts holding each expert; a miss's host part is divided between them")
    ap.add_argument("--align", type=int, default=0,
                    help="ffn columns per step of a split expert's slice (0: 128, or I/8 for smaller experts)")
    ap.add_argument("--configs", default="all",
                    help="comma list of the tier rows to run (gpu-cache+pcie always runs): gpu-cache+cpu-hosts, "
                         "gpu-cache+cpu-hosts/whole, static-tier+cpu-hosts, cpu-hosts-only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    every = ("gpu-cache+cpu-hosts", "gpu-cache+cpu-hosts/whole", "static-tier+cpu-hosts", "cpu-hosts-only")
    only = every if args.configs == "all" else tuple(c.strip() for c in args.configs.split(","))
    bad = [c for c in only if c not in every]
    if bad:
        raise SystemExit(f"unknown --configs {bad}; choose from {', '.join(every)}")
    key = "tiny" if args.smoke else args.model
    shape = SHAPES[key]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    E, K, D, I, L_full = shape["E"], shape["K"], shape["D"], shape["I"], shape["layers"]
    elem = torch.empty((), dtype=dtype).element_size()
    eb = 3 * D * I * elem
    args.align = args.align or min(128, max(1, I // 8))
    ram_layers = max(1, int(0.35 * host_available_bytes() // (E * eb)))  # store + hosts' own copies
    L = max(2, min(L_full, args.layers, ram_layers))
    scale = L_full / L
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"== {shape['name']} shapes: E={E} top-{K} hidden {D} ffn {I}, {dtype}; expert {eb / 2 ** 20:.1f} MiB; "
          f"{L} of {L_full} MoE layers run, per-token figures scaled x{scale:.2f}; device {device}; {cores} cores ==")

    t = time.perf_counter()
    blocks = build(shape, L, device, dtype, pin=device.type == "cuda").moe_blocks()
    store = HostExpertStore([(b.experts.w13.data, b.experts.w2.data) for b in blocks])
    cost = CostModel.calibrate(device, *store.get(0, 0))
    print(f"  built {store.nbytes() / 2 ** 30:.1f} GiB of random experts in {time.perf_counter() - t:.1f} s; "
          f"measured: {cost.describe()}")
    backend = check_backend(pick_backend(args.backend, device), store, device, dtype)

    use_ray = False
    if args.ray:
        try:
            import ray
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            use_ray = True
        except ImportError:
            print(f"  (--ray given but ray is not installed: {args.host_backend} hosts instead)")
    kind = "ray" if use_ray else args.host_backend
    driver_cores = max(1, args.driver_cores) if kind == "process" else args.driver_cores
    threads = args.host_threads or max(1, (cores - driver_cores) // args.hosts)
    hdtype = {torch.bfloat16: "bfloat16"}.get(dtype, "float32")
    ckpt = None
    if kind == "thread":
        torch.set_num_threads(threads)  # one process: the hosts' threads share torch's pool size
        print(f"  CPU hosts: {args.hosts} in-process thread hosts (no Ray here), torch threads {threads} "
              f"(({cores} cores - {driver_cores} for the driver) / {args.hosts} hosts; process-wide, the GPU "
              "paths use it too)")
    else:
        # the hosts read their experts from a checkpoint's memory map, as in serving
        from safetensors.torch import save_file
        t = time.perf_counter()
        ckpt = Path(args.scratch)
        ckpt.mkdir(parents=True, exist_ok=True)
        save_file({f"model.layers.{i}.mlp.experts.{n}": w.contiguous() for i, (a, b) in enumerate(store.layers)
                   for n, w in (("gate_up_proj", a), ("down_proj", b))}, str(ckpt / "model.safetensors"))
        ckpt = str(ckpt)
        where = "Ray actors" if kind == "ray" else "child processes (no Ray here)"
        print(f"  CPU hosts: {args.hosts} {where}, {threads} torch threads each; experts read from a "
              f"safetensors file written in {time.perf_counter() - t:.1f} s")
    layer_ids = list(range(L))

    pin = kind == "process"
    if pin:
        # the driver keeps the first cores and few torch threads; each host gets its own cores:
        # OpenMP teams that share cores spin against each other and a matmul waits on its slowest thread
        torch.set_num_threads(driver_cores)
        host_cores = tuple(range(driver_cores, cores))[:threads * args.hosts]

    def new_hosts(n):
        return start_hosts(HostPoolConfig(num_hosts=n, backend=kind, num_cpus=threads, threads=threads,
                                          dtype=hdtype, pin=pin, cores=host_cores if pin else None))

    # what an expert costs on ONE host (its share of the cores), measured in a host: the split of
    # misses between copies and hosts must use the hosts' rate, not the whole machine's
    probe = new_hosts(1)[0]
    if ckpt:
        probe.call("load_checkpoint", ckpt, layer_ids, [(0, 0)])
    else:
        w13_0, w2_0 = store.get(0, 0)
        probe.call("add_experts", 0, [0], w13_0[None], w2_0[None])
    t_host = probe.call("measure", 0, 0, (1, 8))
    # the hand-off: an empty call, and a 1-row compute_shared of a 1/8 slice (what a batch-1 layer sends)
    handoff = min(_timed(lambda: probe.call("ping", None)) for _ in range(20))
    if probe.shares_memory:
        probe.buffers(1, D, store.dtype)
        sl = np.array([[0, I - I // 8, I]])
        one = min(_timed(lambda: probe.call("compute_shared", 0, 1, np.array([[0, -1]]), np.ones((1, 2), np.float32),
                                            sl)) for _ in range(5))
        print(f"  host hand-off ({kind}): empty call {handoff * 1e6:.0f} us; 1 row x 1/8 of an expert in shared "
              f"buffers {one * 1e3:.3f} ms (1/8 of the 1-token expert time: {t_host[1] / 8 * 1e3:.3f} ms)")
    else:
        print(f"  host hand-off ({kind}): empty call {handoff * 1e6:.0f} us")
    probe.kill()
    per_tok = max((t_host[8] - t_host[1]) / 7, 1e-9)
    copy_rate = cost.copy_bytes_per_s
    if args.smoke:  # a CPU "device" copies in microseconds: price a copy like the H200's (copy ~ host) so the split runs
        copy_rate = eb / t_host[1]
        print(f"  (smoke: copies priced at the 1-token host time, {copy_rate / 1e9:.2f} GB/s, as on the H200)")
    host_cost = CostModel(copy_bytes_per_s=copy_rate, cpu_base_s=max(t_host[1] - per_tok, 0.0),
                          cpu_per_token_s=per_tok)
    print(f"  one host ({threads} threads): expert {t_host[1] * 1e3:.3f} ms at 1 token, {t_host[8] * 1e3:.3f} ms at 8 "
          f"(the cost model of the split and of the CPU floors)")
    cost = host_cost
    budget_bytes = int(args.budget * L * E * eb)
    slots = max(1, int(args.budget * E))
    rows = []
    hdr = (f"  {'batch':>5} {'config':<26} {'tok/s':>9} {'tok/s/req':>9} {'ms/step':>9} {'ms/layer':>8} "
           f"{'PCIe floor':>10} {'CPU floor':>9} {'split flr':>10} {'cpu %':>6}")
    for B in [int(b) for b in args.batches.split(",")]:
        n = (args.warmup + args.steps) * B
        full = synthesize(num_layers=L, num_experts=E, top_k=K, num_requests=2 * B, tokens_per_request=n // B,
                          popularity_skew=shape["skew"], temporal_locality=0.3, affinity=0.5, seed=args.seed + B)
        req = full.request_ids_or_default()
        trace, train = full.select_tokens(req % 2 == 0), full.select_tokens(req % 2 == 1)
        print(f"\n  batch {B}: synthetic trace (skew {shape['skew']}, locality 0.3, affinity 0.5), "
              f"{args.warmup} warm-up + {args.steps} timed steps; GPU budget {args.budget:.0%} "
              f"({budget_bytes / 2 ** 30:.1f} GiB, {slots} of {E} slots per layer)")
        print(hdr)

        def emit(label, secs, steps, pcie_bytes, cpu_s_model, cpu_frac, split_s=None):
            ms = secs / steps * 1e3 * scale
            r = dict(batch=B, config=label, tokens_per_s=B * 1e3 / ms, tokens_per_s_per_request=1e3 / ms,
                     ms_per_step=ms, ms_per_layer=ms / L_full,
                     pcie_floor_ms=pcie_bytes / steps / cost.copy_bytes_per_s * 1e3 * scale,
                     cpu_floor_ms=cpu_s_model / steps * 1e3 * scale, cpu_fraction=cpu_frac,
                     split_floor_ms=split_s / steps * 1e3 * scale if split_s is not None else float("nan"))
            rows.append(r)
            print(f"  {B:>5} {label:<26} {r['tokens_per_s']:>9.2f} {r['tokens_per_s_per_request']:>9.2f} "
                  f"{ms:>9.1f} {r['ms_per_layer']:>8.2f} {r['pcie_floor_ms']:>9.1f}ms {r['cpu_floor_ms']:>7.1f}ms "
                  f"{r['split_floor_ms']:>9.1f}ms {100 * cpu_frac:>5.1f}%")

        # 1. GPU cache + PCIe copies
        cfg = OffloadConfig(slots_per_layer=slots, device=str(device), calibrate=False, policy="lru", driver="host")
        cache = install(blocks, store, cfg, device=device, top_k=K, slots=slots, backend=backend, cost=cost)
        secs, steps = decode(blocks, trace, B, args.warmup, device, dtype)
        st = cache.stats()  # counted over warm-up and timed steps: per step, times the timed steps
        emit("gpu-cache+pcie", secs, steps, st["bytes_copied"] * steps / (steps + args.warmup), 0.0, 0.0)
        print(f"  {'':>5} (cache hit ratio {st['hit_ratio']:.2f})")
        del cache
        # 2. GPU cache + CPU hosts: the same LRU cache; every expert also on a host; a step's
        #    misses shared between PCIe copies and the hosts by the calibrated cost model
        # 3. the static tier plan: its GPU experts resident, the rest on the hosts
        # 4. every expert on the hosts
        configs = [("gpu-cache+cpu-hosts", None, "slice"), ("gpu-cache+cpu-hosts/whole", None, "expert"),
                   ("static-tier+cpu-hosts", budget_bytes, None), ("cpu-hosts-only", 0, None)]
        for label, gpu_bytes, granularity in configs:
            if label not in only:
                continue
            plan, how = tier_plan(train, B, gpu_bytes or 0, eb, args.hosts, L, E, cost, D, elem)
            if gpu_bytes:
                print(f"  {'':>5} (static tier plan: {how})")
            hosts = new_hosts(args.hosts)
            cache = None
            if gpu_bytes is None:
                cache = install(blocks, store, cfg, device=device, top_k=K, slots=slots, backend=backend, cost=cost)
                tcfg = TierRuntimeConfig(keep_source=False, dispatch="split", granularity=granularity, align=args.align,
                                         replicas=args.replicas if granularity == "slice" else 1)
            else:
                _plain_experts(blocks, store, E, backend)
                tcfg = TierRuntimeConfig(keep_source=False)
            rt = apply_cpu_tier(_Stack(blocks), plan, hosts, tcfg, device=device, checkpoint=ckpt)
            secs, steps = decode(blocks, trace, B, args.warmup, device, dtype)
            s = rt.stats()
            per = steps / (steps + args.warmup)  # counters cover warm-up and timed steps
            if granularity == "slice":  # a host computes a share of an expert: the cost model's own sum
                cpu_model = s["model_host_s"] * per
            else:
                cpu_model = (s["cpu_expert_calls"] * cost.cpu_base_s + s["cpu_pairs"] * cost.cpu_per_token_s) * per
            copied = (cache.stats()["bytes_copied"] + s["slice_bytes_copied"]) * per if cache is not None else 0
            emit(label, secs, steps, copied, cpu_model, s["cpu_fraction"],
                 s["model_floor_s"] * per if granularity == "slice" else None)
            if granularity == "slice":
                print(f"  {'':>5} (split: {s['split_experts'] * per / steps:.2f} experts split per step, "
                      f"{s['slice_bytes_copied'] * per / steps / 2 ** 20:.0f} MiB of slices copied per step; "
                      f"per layer call: submit {s['submit_s'] / s['calls'] * 1e3:.3f} ms, waiting for hosts "
                      f"{s['wait_s'] / s['calls'] * 1e3:.3f} ms, host compute {s['host_compute_s'] / s['calls'] * 1e3:.3f} ms"
                      f"; cache hit ratio {cache.stats()['hit_ratio']:.2f}; measured / cost model: host "
                      f"x{s['host_scale']:.2f}, copies x{s['copy_scale']:.2f})")
            for h in hosts:
                h.kill()
            del rt, hosts, cache
        _plain_experts(blocks, store, E, backend)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("\n  summary (tokens/s, full depth):")
    for B in sorted({r["batch"] for r in rows}):
        by = {r["config"]: r["tokens_per_s"] for r in rows if r["batch"] == B}
        ratios = "".join(f"; {k} / gpu-cache+pcie = {by[k] / by['gpu-cache+pcie']:.2f}x"
                         for k in ("gpu-cache+cpu-hosts", "gpu-cache+cpu-hosts/whole") if k in by)
        print(f"    batch {B:>3}: " + ", ".join(f"{k} {v:.2f}" for k, v in by.items()) + ratios)
    return rows


if __name__ == "__main__":
    main()
