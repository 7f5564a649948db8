"""Serving benchmark: TTFT, TPOT, ITL, end-to-end latency and throughput, like ``vllm bench serve``,
and the cost of Ray Serve (HTTP, proxy, ingress, SSE) over the same engine driven in-process.

Backends:
  inprocess  the model replica's code (continuous-batching loop) called directly in this process:
             the floor a server cannot beat. Needs torch and moe, not Ray.
  serve      Ray Serve started here (the moeflow application on 127.0.0.1), driven over HTTP with
             streaming, exactly as a client would.
  both       inprocess, then serve, then the overhead of serve over the floor (target <= 10%).
  url        any OpenAI-compatible server already running at --url (vLLM, SGLang, moeflow elsewhere).

Prompts are random token ids (seeded), sent as token-id prompts with ``ignore_eos`` so every request
produces exactly --output-len tokens. Arrivals are Poisson at --request-rate (inf: all at once),
with at most --max-concurrency in flight.

  CPU, tiny model (a minute):
    python benchmarks/serving.py --model tiny --device cpu --backend both --num-prompts 32 \
        --input-len 32 --output-len 32 --max-batch-size 8
  GPU (offloading):  python benchmarks/serving.py --model DIR --device cuda --gpu-memory 24GiB --backend both
  GPU, real-size shapes with random weights (no checkpoint to download): writes a checkpoint of Mixtral-8x7B
  shapes with --random-layers decoder layers to --scratch, then serves it with 25% of its experts' bytes on the GPU:
    python benchmarks/serving.py --random-model mixtral --random-layers 4 --expert-budget 0.25 --device cuda
  (run it inside `unshare -n sh -c 'ip link set lo up; ...'` where Ray must not bind outside addresses)
  Expert-parallel decode variants on 2 GPUs (the rank actors' output reaches this process's stderr;
  MOEFLOW_EP_TRACE=1 makes each rank print entering and leaving its calls, to find a stalled one):
    python benchmarks/serving.py --random-model qwen3 --random-layers 2 --device cuda --backend inprocess \
        --ep-ranks 2 --ep-decode replicated,home-eager,home --input-len 32 --output-len 64 --num-prompts 16

Reading the overhead: the in-process floor runs the load generator and the engine in one process;
the serve backend adds the Serve proxy, the ingress and Ray's own daemons as processes. On a
machine with few cores and fast steps (the tiny model on CPU) their CPU time competes with the
engine and dominates the difference; --stream-interval N (tokens per streamed chunk) cuts the
per-token Ray hops. The serve backend needs ray[serve]; inprocess and url do not.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def summarize(name: str, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_len for r in ok)
    ttft = [r.ttft * 1e3 for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1]
    itl = [x * 1e3 for r in ok for x in r.itl]
    e2e = [r.e2e * 1e3 for r in ok]
    s = {"backend": name, "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
         "request_throughput": len(ok) / duration, "output_throughput": out_tok / duration,
         "total_token_throughput": (in_tok + out_tok) / duration, "total_input_tokens": in_tok,
         "total_output_tokens": out_tok}
    for key, xs in (("ttft_ms", ttft), ("tpot_ms", tpot), ("itl_ms", itl), ("e2el_ms", e2e)):
        s[f"mean_{key}"] = statistics.fmean(xs) if xs else float("nan")
        s[f"median_{key}"] = statistics.median(xs) if xs else float("nan")
        s[f"p99_{key}"] = _pct(xs, 99)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        s["errors"] = errors[:5]
    return s


def print_summary(s: dict) -> None:
    print(f"{'=' * 16} Serving Benchmark Result: {s['backend']} {'=' * 16}")
    rows = [("Successful requests", s["completed"], "d"), ("Failed requests", s["failed"], "d"),
            ("Benchmark duration (s)", s["duration_s"], ".2f"), ("Total input tokens", s["total_input_tokens"], "d"),
            ("Total generated tokens", s["total_output_tokens"], "d"),
            ("Request throughput (req/s)", s["request_throughput"], ".2f"),
            ("Output token throughput (tok/s)", s["output_throughput"], ".2f"),
            ("Total token throughput (tok/s)", s["total_token_throughput"], ".2f")]
    for key, title in (("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"), ("itl_ms", "ITL (ms)"),
                       ("e2el_ms", "E2E latency (ms)")):
        rows += [(f"Mean {title}", s[f"mean_{key}"], ".2f"), (f"Median {title}", s[f"median_{key}"], ".2f"),
                 (f"P99 {title}", s[f"p99_{key}"], ".2f")]
    for title, v, fmt in rows:
        print(f"{title:<40}{v:>14{fmt}}")
    if s.get("engine"):
        e = s["engine"]
        line = (f"engine: {e['steps']:.0f} steps, {e['step_seconds']:.2f} s inside engine.step() "
                f"({e['step_seconds'] / max(s['duration_s'], 1e-9):.0%} of the run), "
                f"{s['total_output_tokens'] / max(e['steps'], 1):.2f} output tokens per step")
        if "rank_step_seconds" in e:  # expert-parallel: the rest of a step is the engine and the Ray calls
            n = max(e["steps"], 1)
            line += (f"; rank 0 inside its steps {1e3 * e['rank_step_seconds'] / n:.2f} ms of the engine's "
                     f"{1e3 * e['step_seconds'] / n:.2f} ms per step")
        if "misses" in e:
            looks = e["hits"] + e["misses"]
            gb = e.get("bytes_copied", 0) / 1e9 / max(e["steps"], 1)
            line += f"; expert cache: hit ratio {e['hits'] / max(looks, 1):.3f}, {gb:.2f} GB copied per step"
            if s.get("copy_gbps"):
                line += (f" (floor {1e3 * gb / s['copy_gbps']:.0f} ms/step at the measured {s['copy_gbps']:.1f} GB/s; "
                         f"measured {1e3 * e['step_seconds'] / max(e['steps'], 1):.0f} ms/step)")
        print(line)
    for e in s.get("errors", []):
        print("error:", e)


# ---- workload ----------------------------------------------------------------------------------------

def make_prompts(n: int, input_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo = min(10, vocab - 1)  # skip the special tokens at the start of most vocabularies
    return [[rng.randrange(lo, vocab) for _ in range(input_len)] for _ in range(n)]


async def drive(one, prompts, rate: float, max_concurrency: int, seed: int) -> tuple[list[RequestResult], float]:
    """Send every prompt (Poisson arrivals at ``rate``/s) through ``one(prompt) -> RequestResult``."""
    rng = random.Random(seed + 1)
    sem = asyncio.Semaphore(max_concurrency)

    async def limited(p):
        async with sem:
            return await one(p)

    tasks = []
    t0 = time.perf_counter()
    for p in prompts:
        tasks.append(asyncio.ensure_future(limited(p)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def _request(prompt: list[int], output_len: int, model: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


# ---- backends ----------------------------------------------------------------------------------------

def _spec(args) -> dict:
    from serve.api import ServeLimits
    from serve.engine_deployment import resolve_device
    limits = ServeLimits(max_prompt_tokens=args.input_len + 1, max_tokens=args.output_len,
                         max_concurrency=max(args.max_concurrency, 1) + 8, max_waiting=args.num_prompts)
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "backend": args.expert_backend,
            "max_batch_size": args.max_batch_size,
            "stream_interval": args.stream_interval, "warm_up": not args.no_warm_up,
            "max_len": args.input_len + args.output_len + 8, "limits": limits.to_dict(),
            "offload": None if not args.gpu_memory else {"gpu_memory": args.gpu_memory,
                                                     "device": resolve_device(args.device),
                                                     "policy": args.offload_policy, "prefetch": args.offload_prefetch},
            "expert_parallel": _ep_settings(args),
            "torch_threads": max(1, int(args.replica_cpus))}


# --ep-decode variants: (EPServeSettings.decode, .cuda_graph, .greedy_tokens); "-logits": greedy steps fetch
# rank 0's logits as before session 19 instead of its token ids (the A/B of that change)
EP_DECODES = {"replicated": ("replicated", False, True), "home-eager": ("home", False, True), "home": ("home", True, True),
              "home-logits": ("home", True, False), "home-eager-logits": ("home", False, False)}


def _ep_settings(args) -> dict | None:
    """serve.ep_model.EPServeSettings of the run (--ep-ranks), or None."""
    if not args.ep_ranks:
        return None
    decode, graphs, tokens = EP_DECODES[args.ep_decode]
    shared = {"comm": "gloo", "gpus_per_rank": 1.0 / args.ep_ranks} if args.ep_share_gpu else {}
    return {"ranks": args.ep_ranks, "mode": args.ep_mode, "plan": args.placement_plan, "cpus_per_rank": 0.5,
            "torch_threads": 1, "decode": decode, "cuda_graph": graphs, "greedy_tokens": tokens} | shared


async def run_inprocess(args, prompts) -> dict:
    from serve.api import parse_completion
    from serve.engine_deployment import ModelReplica

    if args.ep_ranks:
        import ray
        if not ray.is_initialized():  # the rank actors (one GPU each where there are GPUs)
            ray.init(num_cpus=max(2, args.ep_ranks + 1), include_dashboard=False, log_to_driver=True,
                     _node_ip_address="127.0.0.1")
    t_load = time.perf_counter()
    rep = ModelReplica(_spec(args))
    print(f"in-process replica loaded in {time.perf_counter() - t_load:.2f} s"
          f"{' (with its warm-up)' if not args.no_warm_up and rep.loaded.engine.device.type == 'cuda' else ''}",
          flush=True)
    limits = rep.limits

    async def one(prompt) -> RequestResult:
        req = parse_completion(_request(prompt, args.output_len, "m"), ["m"], limits).to_dict()
        res = RequestResult(False, len(prompt))
        t0 = last = time.perf_counter()
        async for ev in rep.generate(req):
            now = time.perf_counter()
            if ev["type"] == "error":
                res.error = ev["error"]["message"]
                return res
            if ev["type"] != "delta":
                continue
            res.output_tokens += ev["num_tokens"]
            res.text += ev["text"]
            # count a piece when a client would see one: text, or the final chunk (as over SSE)
            if ev["text"] or ev["finished"]:
                if res.ttft == 0.0:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
        res.e2e = time.perf_counter() - t0
        res.ok = True
        return res

    # warm-up with a full batch, so that each batch size's kernels and graphs are built before the timing. With
    # 4 prompts, the first of several --ep-decode variants read a TTFT of 2546 ms against 688 (BENCHMARKS 6f),
    # likely building batches 5-8 in its timed run; not yet rerun on GPUs with this warm-up
    # --cold: no such wave, so the timed requests are a fresh replica's first (what Engine.warm_up is for)
    if not args.cold:
        await drive(one, prompts[:min(max(4, args.max_batch_size), len(prompts))], math.inf, args.max_concurrency,
                    args.seed)
    model = rep.loaded.model
    before = _engine_counters(rep.snapshot(), model)
    compiled = _compiled_kernels()
    with _compiles_seen() as seen:
        results, duration = await drive(one, prompts, args.request_rate, args.max_concurrency, args.seed)
    after = _engine_counters(rep.snapshot(), model)
    new = sorted(v for k, v in _compiled_kernels().items() if k not in compiled)
    if new:  # what a warm-up at load (Engine.warm_up) did not compile: it compiled inside the timed requests
        names = ", ".join(f"{n} x{new.count(n)}" for n in dict.fromkeys(new))
        print(f"Triton kernels compiled during the timed requests: {len(new)} ({names})", flush=True)
        for r in seen:  # which specialisation each was (the call's arguments as Triton keys them)
            print(f"  {r}", flush=True)
    rep.shutdown()
    name = "inprocess" if not args.ep_ranks else f"inprocess ep{args.ep_ranks} {args.ep_mode} decode={args.ep_decode}"
    s = summarize(name, results, duration)
    s["texts"] = [r.text if r.ok else None for r in results]  # None: failed (nothing to compare)
    s["engine"] = {k: after[k] - before.get(k, 0.0) for k in after}
    return s


@contextlib.contextmanager
def _compiles_seen():
    """The kernels Triton compiles inside the block, as it describes each (name, launch options and every argument's
    type and specialisation, one line), from its jit_cache_hook; empty where this Triton has none."""
    seen: list[str] = []
    try:
        from triton import knobs
        old = knobs.runtime.jit_cache_hook
    except Exception:  # noqa: BLE001 - an older Triton
        yield seen
        return

    def hook(*args, **kw):
        name = " ".join(str(kw.get("repr", "")).split()).split("(")[0]
        seen.append(f"{name} {' '.join(str(kw.get('key', '')).split())[:600]}")
        return False  # compile as usual
    knobs.runtime.jit_cache_hook = hook
    try:
        yield seen
    finally:
        knobs.runtime.jit_cache_hook = old


def _compiled_kernels() -> dict[str, str]:
    """Triton's on-disk cache: entry -> kernel name, for each compiled kernel (a .cubin / .hsaco in it)."""
    root = os.environ.get("TRITON_CACHE_DIR")
    if not root:
        try:
            from triton import knobs
            root = knobs.cache.dir
        except Exception:  # noqa: BLE001 - an older Triton: its default place
            root = str(Path.home() / ".triton" / "cache")
    out = {}
    if os.path.isdir(root):
        for entry in os.listdir(root):
            try:
                names = os.listdir(os.path.join(root, entry))
            except OSError:
                continue
            binary = [n for n in names if n.endswith((".cubin", ".hsaco"))]
            if binary:
                out[entry] = binary[0].rsplit(".", 1)[0]
    return out


# the engine-side counters of a run (the measured part only): steps, seconds inside engine.step(),
# and the offload cache's hits / misses / bytes — the same figures /metrics exports, so both backends
# can be read side by side (more steps or slower steps in one of them say where its time went)
_COUNTERS = {"steps": "moeflow_engine_steps", "step_seconds": "moeflow_engine_step_seconds",
             "hits": "moeflow_expert_cache_hits", "misses": "moeflow_expert_cache_misses",
             "bytes_copied": "moeflow_host_to_device_bytes"}


def _engine_counters(snap: dict, model=None) -> dict:
    out = {"steps": float(snap["steps"]), "step_seconds": float(snap["step_seconds"])}
    if model is not None and hasattr(model, "runtime"):  # expert-parallel: rank 0's own time in its steps
        out["rank_step_seconds"] = float(model.stats()["rank_step_seconds"])
    for k in ("hits", "misses", "bytes_copied"):
        if k in snap.get("components", {}):
            out[k] = float(snap["components"][k])
    return out


async def _scrape(client, url: str, headers: dict) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = await client.get(url + "/metrics", headers=headers)
    r.raise_for_status()
    sums: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for smp in fam.samples:
            sums[smp.name] = sums.get(smp.name, 0.0) + float(smp.value)
    out = {}
    for k, name in _COUNTERS.items():
        v = sums.get(name + "_total", sums.get(name))
        if v is not None:
            out[k] = v
    return out


async def run_http(url: str, args, prompts, name: str, model: str) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def one(client, prompt) -> RequestResult:
        res = RequestResult(False, len(prompt))
        t0 = last = time.perf_counter()
        try:
            async with client.stream("POST", url + "/v1/completions", json=_request(prompt, args.output_len, model),
                                     headers=headers) as r:
                if r.status_code != 200:
                    res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return res
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        res.error = chunk["error"]["message"]
                        return res
                    if chunk.get("usage"):
                        res.output_tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices"):
                        if res.ttft == 0.0:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
        except httpx.HTTPError as e:
            res.error = repr(e)
            return res
        res.e2e = time.perf_counter() - t0
        res.ok = True
        return res

    limits = httpx.Limits(max_connections=args.max_concurrency + 8, max_keepalive_connections=args.max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        await drive(lambda p: one(client, p), prompts[:min(4, len(prompts))], math.inf, args.max_concurrency,
                    args.seed)
        before = await _scrape(client, url, headers) if name == "serve" else None
        results, duration = await drive(lambda p: one(client, p), prompts, args.request_rate, args.max_concurrency,
                                        args.seed)
        after = await _scrape(client, url, headers) if name == "serve" else None
    s = summarize(name, results, duration)
    if after:
        s["engine"] = {k: after[k] - before.get(k, 0.0) for k in after}
    return s


def start_serve(args) -> tuple[str, str]:
    """Start Ray and the moeflow Serve application on 127.0.0.1 (a free port); return (url, model id)."""
    import ray
    from ray import serve

    from serve.app import ServeConfig, build_app

    spec = _spec(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    cfg = ServeConfig(model=args.model, device=args.device, dtype=args.dtype, backend=args.expert_backend,
                      gpu_memory=args.gpu_memory,
                      offload_policy=args.offload_policy, offload_prefetch=args.offload_prefetch,
                      max_batch_size=args.max_batch_size, max_len=spec["max_len"], replica_cpus=args.replica_cpus,
                      stream_interval=args.stream_interval,
                      api_key=args.api_key, limits=spec["limits"], port=port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="moeflow-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", cfg.model_name()


RANDOM_SHAPES = {
    # real models' layer shapes; the vocabulary is the embedded default's (its tokenizer serves the text)
    "mixtral": dict(model_type="mixtral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336),
    "qwen3": dict(model_type="qwen3_moe", hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                  head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
}


def write_random_model(name: str, layers: int, scratch: str, device: str) -> str:
    """A checkpoint of a real model's shapes (``layers`` decoder layers, random bf16 weights) plus the embedded
    default's tokenizer, written to ``scratch``; returns its directory. Weights are drawn on ``device`` (fast on a
    GPU) and saved shard by shard."""
    import shutil

    import torch

    from moe import MoEConfig, MoEForCausalLM, save_pretrained
    from serve.engine_deployment import default_model_path

    if name not in RANDOM_SHAPES:
        raise ValueError(f"--random-model must be one of {sorted(RANDOM_SHAPES)}, got {name!r}")
    src = default_model_path()
    with open(os.path.join(src, "config.json")) as f:
        dflt = json.load(f)
    out = os.path.join(scratch, f"{name}-{layers}L")
    cfg = MoEConfig.tiny(RANDOM_SHAPES[name]["model_type"]).replace(
        **RANDOM_SHAPES[name], num_hidden_layers=layers, intermediate_size=RANDOM_SHAPES[name]["moe_intermediate_size"],
        vocab_size=dflt["vocab_size"], bos_token_id=dflt.get("bos_token_id"), eos_token_id=dflt.get("eos_token_id"),
        max_position_embeddings=4096)
    t0 = time.perf_counter()
    dev = "cuda" if device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    model = MoEForCausalLM(cfg, dtype=torch.bfloat16, device="meta")
    model.to_empty(device=dev)
    model.reset_rotary(dev)
    model.init_weights(std=0.02, seed=0)
    save_pretrained(model, out, max_shard_bytes=4 << 30)
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, fname), os.path.join(out, fname))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    print(f"random {name} shapes, {layers} layers: {nbytes / 2**30:.1f} GiB written to {out} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return out


def weight_bytes(model_dir: str, elem_bytes: int | None = None) -> tuple[int, int, int]:
    """(dense, embedding table, routed experts) bytes of the checkpoint's model, counted on a build on
    the meta device (no weights read); elem_bytes: bytes per weight (None: the checkpoint's dtype)."""
    import torch

    from moe import MoEConfig, MoEForCausalLM

    cfg = MoEConfig.from_pretrained(model_dir)
    model = MoEForCausalLM(cfg, dtype=torch.bfloat16, device="meta")
    e = elem_bytes or torch.empty((), dtype=cfg.torch_dtype).element_size()
    expert = sum(p.numel() for b in model.moe_blocks() for p in b.experts.parameters())
    embed = model.embed.weight.numel()
    return e * (sum(p.numel() for p in model.parameters()) - expert - embed), e * embed, e * expert


def expert_budget_bytes(model_dir: str, share: float, batch: int, max_len: int) -> str:
    """--gpu-memory that leaves ``share`` of the experts' bytes on the GPU beside the dense weights and KV cache."""
    import torch

    from moe import MoEConfig
    from offload.apply import kv_cache_bytes

    cfg = MoEConfig.from_pretrained(model_dir)
    dense, embed, expert = weight_bytes(model_dir, elem_bytes=2)
    dense += embed
    kv = kv_cache_bytes(cfg, batch, max_len, torch.bfloat16)
    total = dense + kv + share * expert + (256 << 20)  # 256 MiB of head room for activations
    print(f"GPU budget: dense {dense / 2**30:.2f} GiB + KV {kv / 2**30:.2f} GiB + {share:.0%} of experts "
          f"({share * expert / 2**30:.2f} of {expert / 2**30:.2f} GiB) + 0.25 GiB = {total / 2**30:.2f} GiB",
          flush=True)
    return f"{total / 2**30:.3f}GiB"


def pinned_copy_gbps(nbytes: int = 256 << 20) -> float:
    """Host (pinned) -> GPU copy bandwidth measured here, GB/s (offload's own measurement): the floor
    of an offloaded step is the bytes it copies over this."""
    import torch

    from offload.cost_model import copy_bytes_per_s

    return copy_bytes_per_s("cuda", torch.empty(nbytes, dtype=torch.uint8)) / 1e9


def ep_step_floor_ms(model_dir: str, ranks: int, batch: int, gbps: float) -> tuple[float, float]:
    """(ms, MB per GPU) of one decode step of --max-batch-size rows at the measured bandwidth: every
    rank reads the dense weights (attention, norms, head: it runs every row; B embedding rows, not
    the table) and its share of the distinct experts the rows route to, estimated for uniform
    routing as E * (1 - (1 - K/E)^B) per MoE layer."""
    from moe import MoEConfig
    cfg = MoEConfig.from_pretrained(model_dir)
    E, K = cfg.num_experts, cfg.num_experts_per_tok
    layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    dense, _, experts = weight_bytes(model_dir)
    distinct = E * (1 - (1 - K / E) ** batch)
    step_bytes = dense + layers * distinct * experts / max(1, E * layers) / ranks
    return 1e3 * step_bytes / (gbps * 1e9), step_bytes / 1e6


def vocab_size(args) -> int:
    if args.vocab_size:
        return args.vocab_size
    path = args.model
    if path in (None, "tiny"):
        from serve.engine_deployment import default_model_path
        path = default_model_path() if path is None else "tiny"
        if path == "tiny":
            from moe.tiny import ensure_tiny_model
            path = str(ensure_tiny_model())
    with open(os.path.join(path, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


def compare_ep_variants(out: list[dict]) -> None:
    """The expert-parallel decode variants side by side, each against the first: throughput, time per
    output token, and how many requests generated the same text (greedy; bf16 sums in another order
    may flip a near tie)."""
    base = out[0]
    print("=" * 16, "expert-parallel decode variants (same prompts, one run each)", "=" * 16)
    print(f"{'variant':<44}{'out tok/s':>11}{'mean TPOT ms':>14}{'vs first':>10}{'same text':>11}")
    for r in out:
        # a request that failed in either run generated nothing to compare
        ok = [a is not None and b is not None and a == b for a, b in zip(r["texts"], base["texts"])]
        ratio = (f"{r['output_throughput'] / base['output_throughput']:>9.2f}x" if base["output_throughput"] > 0
                 else f"{'-':>10}")
        failed = f"  ({r['failed']} failed)" if r.get("failed") else ""
        print(f"{r['backend']:<44}{r['output_throughput']:>11.1f}{r['mean_tpot_ms']:>14.2f}"
              f"{ratio}{sum(ok):>6d}/{len(base['texts'])}{failed}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("inprocess", "serve", "both", "url"), default="both")
    p.add_argument("--url", default=None, help="base URL of a running server (backend url)")
    p.add_argument("--served-model", default=None, help="model id to send (backend url)")
    p.add_argument("--model", default=None, help="checkpoint dir, 'tiny', or empty for the embedded default")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--cold", action="store_true",
                   help="in-process replica: time the first requests it serves (no warm-up wave of the benchmark's "
                        "own before the timing); with --no-warm-up, what a replica without Engine.warm_up shows "
                        "its first users")
    p.add_argument("--no-warm-up", action="store_true",
                   help="in-process replica: skip its warm-up at load (Engine.warm_up: kernels compile and decode "
                        "graphs capture before the first request, on a GPU)")
    p.add_argument("--expert-backend", default="auto", choices=("auto", "torch", "triton"),
                   help="the replica's expert backend (ServeConfig.backend; auto: triton on a GPU, torch on the CPU)")
    p.add_argument("--gpu-memory", default=None, help="offload experts into this much GPU memory, e.g. 24GiB")
    p.add_argument("--offload-policy", default="lru")
    p.add_argument("--offload-prefetch", default="none")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed chunk after the first")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=None, help="for random prompts (default: the model's)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--random-model", default=None, choices=sorted(RANDOM_SHAPES),
                   help="write and serve a checkpoint of this real model's shapes with random weights")
    p.add_argument("--random-layers", type=int, default=4, help="decoder layers of --random-model")
    p.add_argument("--scratch", default="/tmp/moeflow-bench", help="where --random-model writes its checkpoint")
    p.add_argument("--ep-ranks", type=int, default=0,
                   help="experts on this many expert-parallel Ray actors (one GPU each; backend inprocess)")
    p.add_argument("--ep-mode", default="coherent", choices=("coherent", "standard"))
    p.add_argument("--ep-decode", default="home",
                   help="comma-separated decode variants of the ranks, each a run of its own on the same prompts: "
                        f"{', '.join(EP_DECODES)} (home = ExFlow's decoding from CUDA graphs on GPUs; -logits: "
                        "greedy steps return rank 0's logits, not its token ids, as before session 19)")
    p.add_argument("--placement-plan", default=None, help="PlacementPlan JSON for --ep-ranks (default round robin)")
    p.add_argument("--ep-share-gpu", action="store_true",
                   help="the --ep-ranks ranks share one GPU, joined by gloo through host memory (NCCL refuses two "
                        "ranks on one device): the ranks' logic on a one-GPU machine, not its speed")
    p.add_argument("--expert-budget", type=float, default=None,
                   help="set --gpu-memory so that this share of the experts' bytes fits beside the dense weights")
    args = p.parse_args(argv)
    if args.backend == "url" and not args.url:
        p.error("--backend url needs --url")
    ep_variants = [v.strip() for v in args.ep_decode.split(",") if v.strip()]
    if args.ep_ranks:
        if args.backend != "inprocess":
            p.error("--ep-ranks is measured with --backend inprocess (the replica's engine driving the rank actors)")
        if args.gpu_memory or args.expert_budget is not None:
            p.error("--ep-ranks spreads the experts over GPUs; it does not combine with offloading")
        if args.ep_share_gpu and any(EP_DECODES[v][1] for v in ep_variants if v in EP_DECODES):
            p.error("--ep-share-gpu moves collectives through host memory, which CUDA graphs cannot capture: "
                    "use --ep-decode replicated,home-eager")
        bad = [v for v in ep_variants if v not in EP_DECODES]
        if bad or not ep_variants:
            p.error(f"--ep-decode takes a comma-separated list of {list(EP_DECODES)}, got {args.ep_decode!r}")
    if args.random_model:
        if args.model:
            p.error("--random-model writes its own checkpoint: drop --model")
        if args.random_layers < 1:
            p.error(f"--random-layers must be >= 1, got {args.random_layers}")
        args.model = write_random_model(args.random_model, args.random_layers, args.scratch, args.device)
    if args.expert_budget is not None:
        if args.gpu_memory:
            p.error("give --gpu-memory or --expert-budget, not both")
        if not 0.0 < args.expert_budget <= 1.0:
            p.error(f"--expert-budget is a share of the experts' bytes in (0, 1], got {args.expert_budget}")
        if args.model in (None, "tiny"):
            p.error("--expert-budget needs a checkpoint directory (--model DIR or --random-model)")
        args.gpu_memory = expert_budget_bytes(args.model, args.expert_budget, args.max_batch_size,
                                              args.input_len + args.output_len + 8)

    if args.backend in ("serve", "both"):
        from ray import serve  # noqa: F401  (fail now, not after the in-process half, when Serve is missing)
    prompts = make_prompts(args.num_prompts, args.input_len, vocab_size(args), args.seed)
    print(f"workload: {args.num_prompts} requests, {args.input_len} prompt + {args.output_len} output tokens, "
          f"rate {args.request_rate}/s, concurrency <= {args.max_concurrency}, batch {args.max_batch_size}",
          flush=True)
    out = []
    gbps = None
    if args.gpu_memory and args.device in ("cuda", "auto"):
        import torch
        if torch.cuda.is_available():
            gbps = pinned_copy_gbps()
            print(f"pinned host->GPU copy: {gbps:.1f} GB/s (the offloaded steps' floor is bytes copied / this)")
    if args.ep_ranks and args.device in ("cuda", "auto") and args.model not in (None, "tiny"):
        import torch
        if torch.cuda.is_available():
            from benchmarks.decode import measure_bandwidth
            hbm = measure_bandwidth(torch.device("cuda")) / 1e9
            ms, mb = ep_step_floor_ms(args.model, args.ep_ranks, args.max_batch_size, hbm)
            print(f"GPU memory: {hbm:.0f} GB/s (device copy); decode step floor {ms:.3f} ms ({mb:.0f} MB per GPU: dense "
                  f"weights + its share of the distinct experts of {args.max_batch_size} rows, uniform routing) = "
                  f"{1e3 * args.max_batch_size / ms:.0f} tok/s", flush=True)
    if args.backend in ("inprocess", "both"):
        import torch
        torch.set_num_threads(max(1, int(args.replica_cpus)))
        for v in (ep_variants if args.ep_ranks else [args.ep_decode]):
            args.ep_decode = v
            out.append(asyncio.run(run_inprocess(args, prompts)) | {"copy_gbps": gbps})
            print_summary(out[-1])
        if args.ep_ranks:
            compare_ep_variants(out)
    if args.backend in ("serve", "both"):
        url, model = start_serve(args)
        try:
            out.append(asyncio.run(run_http(url, args, prompts, "serve", model)) | {"copy_gbps": gbps})
        finally:
            from ray import serve
            serve.shutdown()
        print_summary(out[-1])
    if args.backend == "url":
        out.append(asyncio.run(run_http(args.url.rstrip("/"), args, prompts, "url", args.served_model or "default")))
        print_summary(out[-1])
    if args.backend == "both":
        floor, srv = out
        over = {"output_throughput_loss_pct": 100 * (1 - srv["output_throughput"] / floor["output_throughput"]),
                "mean_ttft_overhead_ms": srv["mean_ttft_ms"] - floor["mean_ttft_ms"],
                "mean_tpot_overhead_pct": 100 * (srv["mean_tpot_ms"] / floor["mean_tpot_ms"] - 1),
                "mean_e2el_overhead_pct": 100 * (srv["mean_e2el_ms"] / floor["mean_e2el_ms"] - 1)}
        out.append({"backend": "overhead(serve vs inprocess floor)", **over})
        print("=" * 16, "Ray Serve over the in-process floor (target <= 10%)", "=" * 16)
        for k, v in over.items():
            print(f"{k:<40}{v:>14.2f}")
    for r in out:
        r.pop("texts", None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args) | {"request_rate": str(args.request_rate)}, "results": out}, f, indent=1)
    return 0 if all(r.get("failed", 0) == 0 for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
