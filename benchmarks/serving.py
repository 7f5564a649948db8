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
  (run it inside `unshare -n sh -c 'ip link set lo up; ...'` where Ray must not bind outside addresses)

Reading the overhead: the in-process floor runs the load generator and the engine in one process;
the serve backend adds the Serve proxy, the ingress and Ray's own daemons as processes. On a
machine with few cores and fast steps (the tiny model on CPU) their CPU time competes with the
engine and dominates the difference; --stream-interval N (tokens per streamed chunk) cuts the
per-token Ray hops. The serve backend needs ray[serve]; inprocess and url do not.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

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
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "max_batch_size": args.max_batch_size,
            "stream_interval": args.stream_interval,
            "max_len": args.input_len + args.output_len + 8, "limits": limits.to_dict(),
            "offload": None if not args.gpu_memory else {"gpu_memory": args.gpu_memory,
                                                     "device": resolve_device(args.device),
                                                     "policy": args.offload_policy, "prefetch": args.offload_prefetch},
            "torch_threads": max(1, int(args.replica_cpus))}


async def run_inprocess(args, prompts) -> dict:
    from serve.api import parse_completion
    from serve.engine_deployment import ModelReplica

    rep = ModelReplica(_spec(args))
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

    await drive(one, prompts[:min(4, len(prompts))], math.inf, args.max_concurrency, args.seed)  # warm-up
    results, duration = await drive(one, prompts, args.request_rate, args.max_concurrency, args.seed)
    rep.loop.shutdown()
    return summarize("inprocess", results, duration)


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
        results, duration = await drive(lambda p: one(client, p), prompts, args.request_rate, args.max_concurrency,
                                        args.seed)
    return summarize(name, results, duration)


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
    cfg = ServeConfig(model=args.model, device=args.device, dtype=args.dtype, gpu_memory=args.gpu_memory,
                      offload_policy=args.offload_policy, offload_prefetch=args.offload_prefetch,
                      max_batch_size=args.max_batch_size, max_len=spec["max_len"], replica_cpus=args.replica_cpus,
                      stream_interval=args.stream_interval,
                      api_key=args.api_key, limits=spec["limits"], port=port)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="moeflow-bench", route_prefix="/")
    return f"http://127.0.0.1:{port}", cfg.model_name()


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("inprocess", "serve", "both", "url"), default="both")
    p.add_argument("--url", default=None, help="base URL of a running server (backend url)")
    p.add_argument("--served-model", default=None, help="model id to send (backend url)")
    p.add_argument("--model", default=None, help="checkpoint dir, 'tiny', or empty for the embedded default")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
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
    args = p.parse_args(argv)
    if args.backend == "url" and not args.url:
        p.error("--backend url needs --url")

    prompts = make_prompts(args.num_prompts, args.input_len, vocab_size(args), args.seed)
    print(f"workload: {args.num_prompts} requests, {args.input_len} prompt + {args.output_len} output tokens, "
          f"rate {args.request_rate}/s, concurrency <= {args.max_concurrency}, batch {args.max_batch_size}",
          flush=True)
    out = []
    if args.backend in ("inprocess", "both"):
        import torch
        torch.set_num_threads(max(1, int(args.replica_cpus)))
        out.append(asyncio.run(run_inprocess(args, prompts)))
        print_summary(out[-1])
    if args.backend in ("serve", "both"):
        url, model = start_serve(args)
        try:
            out.append(asyncio.run(run_http(url, args, prompts, "serve", model)))
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args) | {"request_rate": str(args.request_rate)}, "results": out}, f, indent=1)
    return 0 if all(r.get("failed", 0) == 0 for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
