"""``moe serve [MODEL]``: the OpenAI-compatible server on Ray Serve.

The hub (``moe/cli.py``) calls ``register(subparsers)``; the sub-command's handler is stored as
``func`` in the parsed namespace and returns an exit code. ``python -m serve.cli`` works too.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from serve.api import ServeLimits


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve a model with an OpenAI-compatible API on Ray Serve",
        description="Serve MODEL (a checkpoint directory, 'tiny', or the embedded default when omitted) at "
                    "http://HOST:PORT/v1 with /v1/completions, /v1/chat/completions, /v1/models, /health and "
                    "/metrics (Prometheus). Listens on 127.0.0.1 unless --host says otherwise. With --api-key, every "
                    "/v1 route needs 'Authorization: Bearer KEY'; /health and /metrics stay open for probes "
                    "and scrapers.")
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory or 'tiny' (default: embedded model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MOEFLOW_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $MOEFLOW_API_KEY, else no key)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (auto: a GPU per replica when there is one)")
    p.add_argument("--dtype", default=None, help="weights dtype, e.g. bfloat16 (default: the checkpoint's)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="expert computation: triton (fused kernels; decode steps replay from CUDA graphs) or torch "
                        "(the reference); auto (default): triton on a GPU, torch on the CPU")
    p.add_argument("--no-warm-up", action="store_true",
                   help="on a GPU, skip the replica's warm-up at load (throwaway prompts of every length class up to "
                        "--max-prompt-tokens and every decode graph: ~15 s on a fresh machine, ~3 s once Triton's "
                        "cache is warm); without it the first requests compile kernels (seconds each, BENCHMARKS 8d)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: directory name)")
    p.add_argument("--num-replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per model replica")
    p.add_argument("--max-batch-size", type=int, default=8, help="running batch per replica")
    p.add_argument("--max-len", type=int, default=2048, help="prompt + completion tokens per request")
    from moe.cli import prefill_chunk_arg
    p.add_argument("--prefill-chunk", default="auto", type=prefill_chunk_arg, metavar="N|auto|off",
                   help="prompt tokens a step feeds, across its rows, first come first served (chunked prefill); "
                        "auto (default): the largest power of two whose step (beside --max-batch-size rows decoding) "
                        "fits --offload-reserve with --gpu-memory, or the GPU's free memory; whole prompts where "
                        "they fit and on the CPU; off: whole prompts")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk after the first (default 1; more saves CPU on fast steps)")
    d = ServeLimits()
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="largest max_tokens a client may ask for")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency, help="requests in flight (429 beyond)")
    p.add_argument("--max-waiting", type=int, default=d.max_waiting, help="queued requests per replica (429 beyond)")
    from offload.cli_args import add_offload_args
    add_offload_args(p)  # --gpu-memory, --offload-policy, ... exactly as `moe generate` has them
    p.add_argument("--cpu-hosts", type=int, default=0, metavar="N",
                   help="start N CPU expert hosts per replica (Ray actors holding every expert in RAM); the GPU "
                        "cache's misses are shared between PCIe copies and the hosts (needs --gpu-memory)")
    p.add_argument("--cpu-host-cpus", type=float, default=1.0, help="CPUs Ray reserves per CPU expert host")
    p.add_argument("--cpu-host-threads", type=int, default=1, help="torch threads of each CPU expert host")
    p.add_argument("--ep-ranks", type=int, default=0, metavar="N",
                   help="host the experts on N expert-parallel Ray actors per replica (one GPU each; CPU actors "
                        "with gloo where there is no GPU) instead of in the replica")
    p.add_argument("--ep-mode", default="coherent", choices=["coherent", "standard", "adaptive"],
                   help="coherent: ExFlow's one all-to-all per layer (default); standard: dispatch + combine; "
                        "adaptive: Tutel-style layer whose strategy (ep/dp/tp/blends) is chosen per step")
    p.add_argument("--ep-decode", default="auto", choices=["auto", "home", "replicated"],
                   help="decode steps on the ranks: home = ExFlow's decoding (each row's attention on its home "
                        "rank), replayed from CUDA graphs on GPUs; replicated = every rank runs the whole step; "
                        "auto (default): home, or replicated for --ep-mode adaptive")
    p.add_argument("--placement-plan", default=None, metavar="PLAN.json",
                   help="expert placement from `moe place TRACE --gpus N --out PLAN.json` (default round robin)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace):
    from serve.app import ServeConfig
    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         max_body_bytes=args.max_body_bytes, max_concurrency=args.max_concurrency,
                         max_waiting=args.max_waiting)
    return ServeConfig(model=args.model, served_model_name=args.served_model_name, host=args.host, port=args.port,
                       api_key=args.api_key, device=args.device, dtype=args.dtype, backend=args.backend,
                       warm_up=not args.no_warm_up,
                       gpu_memory=args.gpu_memory,
                       offload_policy=args.offload_policy, offload_prefetch=args.offload_prefetch,
                       cpu_fallback=args.cpu_fallback, offload_from_disk=args.offload_from_disk,
                       offload_probes=args.offload_probes, offload_predictor=args.offload_predictor,
                       offload_prefetch_budget=args.offload_prefetch_budget,
                       max_batch_size=args.max_batch_size, max_len=args.max_len, stream_interval=args.stream_interval,
                       prefill_chunk=args.prefill_chunk,
                       num_replicas=args.num_replicas,
                       replica_cpus=args.replica_cpus, cpu_hosts=args.cpu_hosts, cpu_host_cpus=args.cpu_host_cpus,
                       cpu_host_threads=args.cpu_host_threads, ep_ranks=args.ep_ranks, ep_mode=args.ep_mode,
                       ep_decode=args.ep_decode,
                       placement_plan=args.placement_plan, limits=limits,
                       offload_options=_offload_options(args))


def _offload_options(args: argparse.Namespace) -> dict:
    """The OffloadConfig fields the flags set away from their defaults (ServeConfig has no field of its own
    for them), as SETTING_DEFAULTS names the defaults."""
    from offload.cli_args import SETTING_DEFAULTS
    fields = {"expert_slices": "expert_slices", "offload_lfu_half_life": "lfu_half_life",
              "offload_pack_experts": "pack_experts", "offload_driver": "driver", "offload_reserve": "reserve_bytes"}
    return {field: getattr(args, dest) for dest, field in fields.items()
            if getattr(args, dest) != SETTING_DEFAULTS[dest]}


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not _is_loopback(cfg.host) and not cfg.api_key:
        print(f"moe serve: warning: listening on {cfg.host} without an API key; anyone who can reach this "
              "port can use the model (pass --api-key)", file=sys.stderr)
    from serve.app import check_offload_budget, run_server
    check_offload_budget(cfg)  # a budget too small, said before Ray starts and the replicas load
    run_server(cfg, blocking=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
