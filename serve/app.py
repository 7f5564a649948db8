"""The Ray Serve application: an OpenAI-compatible ingress in front of model replicas.

    client ──HTTP──▶ Serve proxy ──▶ OpenAIIngress (FastAPI: auth, limits, validation, SSE, /metrics)
                                         │  handle.options(stream=True).generate.remote(request)
                                         ▼
                                     ModelReplica (engine + continuous-batching loop; 1 GPU or CPU)

``build_app(args)`` is the application builder: ``serve run serve.app:build_app model=...``,
``serve run serve/config.yaml`` and ``moe serve`` all go through it. ``run_server(config)``
starts Serve on the configured host and port (127.0.0.1 unless told otherwise).
"""
# no `from __future__ import annotations`: FastAPI must see the real Request class in route signatures
import asyncio
import hmac
import os
import signal
import time
import weakref
from dataclasses import asdict, dataclass, field

from ray import serve

from serve.api import (SSE_DONE, ApiError, GenerationRequest, ServeLimits, completion_response, models_response,
                       parse_chat, parse_completion, parse_json_body, sse, stream_chunk, usage_chunk)
from serve.engine_deployment import ModelReplica
from serve.metrics import OUTCOMES, RequestTimer, ServeMetrics

@dataclass
class ServeConfig:
    """Settings of one ``moe serve`` / ``serve run`` application.

    model: checkpoint directory, "tiny" (untrained, built on the fly) or None (the embedded default).
    engine_factory: "module:function" returning a ``LoadedEngine`` from the replica spec, to serve
        something other than ``moe.Engine`` (tests use a stand-in).
    gpu_memory: GPU memory budget (e.g. "24GiB", or a fraction such as 0.3); when set, experts are
        offloaded (offload.apply_offload) with offload_policy, offload_prefetch, cpu_fallback and,
        with offload_from_disk, the checkpoint's memory-mapped safetensors as the host store.
    replica_cpus / ingress_cpus: Ray CPU reservations (fractions are fine).
    stream_interval: tokens per streamed chunk after the first (1: every token, like OpenAI).
    cpu_hosts: CPU expert hosts (serve.cpu_host) each replica starts — Ray actors with
        cpu_host_cpus CPUs and cpu_host_threads torch threads; every expert is also held by a host,
        and the misses of the GPU expert cache (so gpu_memory is required) are shared between PCIe
        copies and the hosts (offload.tiered, dispatch='split').
    ep_ranks: host the experts on this many expert-parallel Ray actors per replica (one GPU each,
        or CPU actors with gloo; placement/runtime.py) driven by the replica's engine
        (serve.ep_model); 0 keeps the model in the replica. ep_mode: 'coherent' (ExFlow, one
        all-to-all per layer) or 'standard'; placement_plan: a PlacementPlan JSON from `moe place`
        (default round robin); ep_cpus_per_rank / ep_threads: each rank actor's CPUs and threads;
        ep_decode: 'home' (ExFlow's decoding, from CUDA graphs on GPUs), 'replicated', or 'auto'
        (home, replicated for ep_mode 'adaptive'); placement.runtime.EPConfig.decode.
    """
    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "auto"
    dtype: str | None = None
    gpu_memory: str | None = None
    backend: str = "auto"  # expert computation: 'auto' (triton on a GPU, torch on the CPU), 'torch' or 'triton'
    warm_up: bool = True  # on a GPU, Engine.warm_up at load: no kernel compiles or graph captures inside requests
    offload_policy: str = "lfu"
    offload_prefetch: str = "none"
    cpu_fallback: bool = False
    offload_from_disk: bool = False
    offload_probes: str | None = None  # fitted probes file, for offload_prefetch="probe"
    offload_predictor: str | None = None  # `moe predictor train` file, for the predictor policy / prefetch
    offload_prefetch_budget: float | None = None
    offload_options: dict = field(default_factory=dict)  # more OffloadConfig fields, e.g. slots_per_layer
    cpu_hosts: int = 0
    cpu_host_cpus: float = 1.0
    cpu_host_threads: int = 1
    ep_ranks: int = 0
    ep_mode: str = "coherent"
    placement_plan: str | None = None
    ep_cpus_per_rank: float = 0.5
    ep_threads: int = 1
    ep_decode: str = "auto"
    max_batch_size: int = 8
    max_len: int = 2048
    # prompt tokens a step feeds across its rows (Engine(prefill_chunk=...)): 'auto' = the largest power of two whose
    # activations fit the offload reserve, or a GPU's free memory (offload.auto_prefill_chunk); None = whole prompts
    prefill_chunk: int | str | None = "auto"
    stream_interval: int = 1
    num_replicas: int = 1
    replica_cpus: float = 1.0
    ingress_cpus: float = 0.1
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 60.0
    engine_factory: str | None = None
    app_name: str = "moeflow"
    route_prefix: str = "/"
    limits: ServeLimits = field(default_factory=ServeLimits)

    def __post_init__(self):
        if isinstance(self.limits, dict):
            self.limits = ServeLimits(**self.limits)
        if not (0 < int(self.port) < 65536):
            raise ValueError(f"port ({self.port}) must be in 1..65535")
        self.port = int(self.port)
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device ({self.device!r}) must be 'auto', 'cpu' or 'cuda'")
        from kernels import BACKENDS
        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend ({self.backend!r}) must be 'auto', 'torch' or 'triton'")
        if self.backend == "triton" and self.device == "cpu":
            raise ValueError("backend 'triton' needs a CUDA device; use backend 'torch' (or 'auto') with device 'cpu'")
        for name in ("max_batch_size", "max_len", "num_replicas", "stream_interval"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a positive integer")
            setattr(self, name, int(getattr(self, name)))
        from moe.generate import prefill_chunk_setting
        self.prefill_chunk = prefill_chunk_setting(self.prefill_chunk)
        for name in ("offload_probes", "offload_predictor"):  # absolute: a replica may run in another directory
            f = getattr(self, name)
            if f is not None:
                if not os.path.isfile(f):
                    raise ValueError(f"{name} file {f!r} not found (from `moe predictor train`)")
                setattr(self, name, os.path.abspath(f))
        if self.gpu_memory is not None or self.offload_options:
            self.offload_config("cpu")  # offload's own checks, with its messages
        else:
            from offload.cli_args import settings_given
            given = settings_given(self)
            if given:
                raise ValueError(f"{', '.join(given)} set without offloading: they configure the GPU expert cache, "
                                 "which gpu_memory turns on (e.g. --gpu-memory 24GiB)")
        self.cpu_hosts = int(self.cpu_hosts)
        if self.cpu_hosts < 0:
            raise ValueError(f"cpu_hosts ({self.cpu_hosts}) must be >= 0")
        if self.cpu_hosts and self.offload_config("cpu") is None:
            raise ValueError(f"cpu_hosts={self.cpu_hosts} needs an expert cache to share misses with: also set "
                             "gpu_memory (e.g. --gpu-memory 24GiB)")
        if self.cpu_host_cpus <= 0 or int(self.cpu_host_threads) < 1:
            raise ValueError(f"cpu_host_cpus ({self.cpu_host_cpus}) must be > 0 and cpu_host_threads "
                             f"({self.cpu_host_threads}) >= 1")
        self.ep_ranks = int(self.ep_ranks)
        if self.ep_ranks < 0:
            raise ValueError(f"ep_ranks ({self.ep_ranks}) must be >= 0 (0: no expert parallelism)")
        if self.ep_ranks:
            if self.gpu_memory is not None or self.offload_options or self.cpu_hosts:
                raise ValueError("ep_ranks spreads the experts over GPU ranks; it does not combine with gpu_memory "
                                 "(offloading) or cpu_hosts in one replica: choose one of them")
            self.expert_parallel()  # its own checks (mode, plan file, resources), with their messages
        if self.api_key is not None and not str(self.api_key):
            raise ValueError("api_key is empty; leave it unset to serve without a key")

    @classmethod
    def from_args(cls, args: dict) -> "ServeConfig":
        """From ``serve run`` args (strings from the command line are converted); unknown keys are refused."""
        known = {f for f in cls.__dataclass_fields__}
        bad = set(args) - known - set(ServeLimits.__dataclass_fields__)
        if bad:
            raise ValueError(f"unknown application args {sorted(bad)}; known: {sorted(known)} and the limits "
                             f"{sorted(ServeLimits.__dataclass_fields__)}")
        kw = {k: v for k, v in args.items() if k in known}
        limits = dict(kw.pop("limits", {}) or {})
        limits.update({k: int(v) for k, v in args.items() if k in ServeLimits.__dataclass_fields__})
        for k in ("port", "max_batch_size", "max_len", "num_replicas", "stream_interval", "cpu_hosts",
                  "cpu_host_threads", "ep_ranks", "ep_threads"):
            if k in kw:
                kw[k] = int(kw[k])
        for k in ("replica_cpus", "ingress_cpus", "health_check_period_s", "health_check_timeout_s", "cpu_host_cpus",
                  "ep_cpus_per_rank", "offload_prefetch_budget"):
            if k in kw and kw[k] is not None:
                kw[k] = float(kw[k])
        for k in ("cpu_fallback", "offload_from_disk"):
            if isinstance(kw.get(k), str):
                kw[k] = kw[k].lower() in ("1", "true", "yes")
        return cls(limits=ServeLimits(**limits), **kw)

    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model in (None, "tiny"):
            return "moeflow-" + ("tiny" if self.model == "tiny" else "default")
        return os.path.basename(os.path.normpath(self.model))

    def offload_config(self, device: str) -> dict | None:
        """Keyword arguments of offload.OffloadConfig, or None when experts stay resident."""
        if self.gpu_memory is None and not self.offload_options:
            return None
        from offload import OffloadConfig
        from offload.cli_args import check_files, offload_objects
        kw = dict(gpu_memory=self.gpu_memory, policy=self.offload_policy, prefetch=self.offload_prefetch,
                  cpu_fallback=bool(self.cpu_fallback), device=device,
                  store="disk" if self.offload_from_disk else "memory",
                  checkpoint=self.model if self.offload_from_disk else None,
                  decode_batch=int(self.max_batch_size))  # (driver='auto' weighs the rows of a step)
        if self.offload_prefetch_budget is not None:
            kw["prefetch_budget"] = float(self.offload_prefetch_budget)
        kw.update(self.offload_options)
        check_files(kw["policy"], kw["prefetch"], self.offload_probes, self.offload_predictor)
        OffloadConfig(**kw, **offload_objects(self.offload_probes, self.offload_predictor))  # its checks, here
        return kw

    def offload_files(self) -> dict:
        """The files the replica loads into OffloadConfig (offload.cli_args.offload_objects)."""
        return {"probes_file": self.offload_probes, "predictor_file": self.offload_predictor}

    def expert_parallel(self) -> dict | None:
        """Keyword arguments of serve.ep_model.EPServeSettings, or None without expert parallelism."""
        if not self.ep_ranks:
            return None
        from serve.ep_model import EPServeSettings
        kw = dict(ranks=self.ep_ranks, mode=self.ep_mode, plan=self.placement_plan,
                  cpus_per_rank=float(self.ep_cpus_per_rank), torch_threads=int(self.ep_threads),
                  decode=self.ep_decode)
        EPServeSettings(**kw)
        return kw

    def replica_spec(self, device: str) -> dict:
        return {"model": self.model, "device": device, "dtype": self.dtype, "backend": self.backend,
                "warm_up": bool(self.warm_up),
                "max_batch_size": self.max_batch_size, "max_len": self.max_len, "prefill_chunk": self.prefill_chunk,
                "limits": self.limits.to_dict(),
                "engine_factory": self.engine_factory,
                "stream_interval": self.stream_interval,
                "offload": self.offload_config(device), "offload_files": self.offload_files(),
                "cpu_hosts": {"num_hosts": self.cpu_hosts, "num_cpus": self.cpu_host_cpus,
                              "threads": int(self.cpu_host_threads)} if self.cpu_hosts else None,
                "expert_parallel": self.expert_parallel(),
                "torch_threads": max(1, int(self.replica_cpus))}


def _has_gpu() -> bool:
    import ray
    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch
    return torch.cuda.is_available()


def _outcome(reason: str | None) -> str:
    return reason if reason in OUTCOMES else "stop"


def make_ingress_class():
    """Build the FastAPI app and the ingress class (a factory: no module-level app object)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="moeflow", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc):  # 404 / 405 in OpenAI's error shape
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                     code="not_found" if exc.status_code == 404 else None).to_dict(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(ApiError(400, str(exc)).to_dict(), status_code=400)

    def error_response(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.to_dict(), status_code=e.status, headers=headers)

    class OpenAIIngress:
        def __init__(self, replica, config: dict):
            self.replica = replica
            self.cfg = ServeConfig(**config)
            self.limits = self.cfg.limits
            self.served = [self.cfg.model_name()]
            self.metrics = ServeMetrics()
            self.in_flight = 0
            self.created = int(time.time())

        # ---- checks ------------------------------------------------------------------------
        def _auth(self, request: Request) -> None:
            if self.cfg.api_key is None:
                return
            got = request.headers.get("authorization", "")
            scheme, _, token = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     self.cfg.api_key.encode()):
                raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                               "authentication_error", code="invalid_api_key")

        async def _body(self, request: Request) -> dict:
            cl = request.headers.get("content-length")
            if cl is not None and cl.isdigit() and int(cl) > self.limits.max_body_bytes:
                raise ApiError(413, f"request body is {cl} bytes; the limit is {self.limits.max_body_bytes} bytes",
                               code="body_too_large")
            raw = bytearray()
            async for chunk in request.stream():  # bounded read: a chunked body cannot exceed the limit
                raw += chunk
                if len(raw) > self.limits.max_body_bytes:
                    break
            return parse_json_body(bytes(raw), self.limits)

        # ---- routes ------------------------------------------------------------------------
        @app.get("/health")
        async def health(self):
            try:
                await asyncio.wait_for(self.replica.info.remote(), timeout=10)
            except Exception as e:  # noqa: BLE001 - any failure to reach the replica means unhealthy
                return JSONResponse({"status": "unavailable", "reason": repr(e)[:200]}, status_code=503)
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(self, request: Request):
            try:
                self._auth(request)
            except ApiError as e:
                return error_response(e)
            return models_response(self.served, self.created)

        @app.get("/metrics")
        async def metrics(self):
            # a handle call reaches one replica of Serve's choosing: ask as many times as there are
            # replicas, twice over, so that every replica is very likely heard from on each scrape
            calls = [self.replica.snapshot.remote() for _ in range(2 * self.cfg.num_replicas)]
            done = await asyncio.gather(*(asyncio.wait_for(c, timeout=5) for c in calls), return_exceptions=True)
            self.metrics.engine.update([d for d in done if isinstance(d, dict)], time.time())
            return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.post("/v1/completions")
        async def completions(self, request: Request):
            return await self._generate(request, "completion")

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request):
            return await self._generate(request, "chat")

        # ---- generation --------------------------------------------------------------------
        async def _generate(self, request: Request, kind: str):
            endpoint = "completions" if kind == "completion" else "chat"
            start = time.perf_counter()
            try:
                self._auth(request)
                if self.in_flight >= self.limits.max_concurrency:
                    raise ApiError(429, f"the server is handling {self.in_flight} requests, its concurrency "
                                   f"limit; retry later", "rate_limit_error", code="too_many_requests")
            except ApiError as e:
                self.metrics.finish(endpoint, "rejected")
                return error_response(e)
            # take the slot before the first await, so requests arriving together cannot all pass the check
            self.in_flight += 1
            self.metrics.in_flight.inc()
            released = False

            def release(outcome: str):
                nonlocal released
                if not released:
                    released = True
                    self.in_flight -= 1
                    self.metrics.in_flight.dec()
                    self.metrics.finish(endpoint, outcome)

            try:
                body = await self._body(request)
                parse = parse_completion if kind == "completion" else parse_chat
                req = parse(body, self.served, self.limits)
            except ApiError as e:
                release("rejected" if e.status == 413 else "invalid")
                return error_response(e)
            except BaseException:
                release("abort")
                raise

            gen = self.replica.options(stream=True).generate.remote(req.to_dict())
            try:
                first = await gen.__anext__()
            except Exception as e:  # noqa: BLE001 - the replica died or is unreachable
                release("error")
                return error_response(_replica_error(e))
            except BaseException:
                gen.cancel()
                release("abort")
                raise
            if first["type"] == "error":
                release("rejected" if first["status"] == 429 else "invalid")
                return JSONResponse({"error": first["error"]}, status_code=first["status"])
            n_prompt = first["prompt_tokens"]
            self.metrics.prompt_tokens.inc(n_prompt)
            timer = RequestTimer(self.metrics, start)
            if req.stream:
                body = self._sse(req, gen, timer, n_prompt, release)
                # a client that leaves before the first chunk means the generator never starts and its
                # `finally` never runs: release the slot and cancel the replica call when it is collected
                weakref.finalize(body, _abandon, gen, release)
                return StreamingResponse(body,
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            try:
                text, reason, err = await self._collect(request, gen, timer)
            except BaseException:
                gen.cancel()
                release("abort")
                raise
            if err is not None:
                release("error")
                return error_response(err)
            timer.on_finish(time.perf_counter())
            release(_outcome(reason))
            return completion_response(req, text, reason, n_prompt, timer.tokens)

        async def _collect(self, request: Request, gen, timer: RequestTimer):
            """Gather a non-streamed completion; abort it when the client goes away meanwhile."""
            pieces, reason = [], None

            async def drain():
                nonlocal reason
                async for ev in gen:
                    if ev["type"] == "error":
                        return ApiError.from_dict(ev["status"], ev)
                    timer.on_output(time.perf_counter(), ev["num_tokens"])
                    pieces.append(ev["text"])
                    if ev["finished"]:
                        reason = ev["finish_reason"]
                return None

            task = asyncio.ensure_future(drain())
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=1.0)
                    if done:
                        break
                    if await request.is_disconnected():
                        task.cancel()
                        gen.cancel()
                        raise asyncio.CancelledError("client disconnected")
                err = task.result()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the replica died mid-request
                err = _replica_error(e)
            return "".join(pieces), reason, err

        async def _sse(self, req: GenerationRequest, gen, timer: RequestTimer, n_prompt: int, release):
            outcome = "abort"  # unless the stream reaches its end, the client left
            try:
                if req.kind == "chat":
                    yield sse(stream_chunk(req, None, None, role=True))
                try:
                    async for ev in gen:
                        if ev["type"] == "error":
                            outcome = "error"
                            yield sse({"error": ev["error"]})
                            break
                        timer.on_output(time.perf_counter(), ev["num_tokens"])
                        if ev["text"] or ev["finished"]:
                            yield sse(stream_chunk(req, ev["text"], ev["finish_reason"] if ev["finished"] else None))
                        if ev["finished"]:
                            outcome = _outcome(ev["finish_reason"])
                except Exception as e:  # noqa: BLE001 - the replica died mid-stream: tell the client cleanly
                    outcome = "error"
                    yield sse(_replica_error(e).to_dict())
                if outcome != "error" and req.include_usage:
                    yield sse(usage_chunk(req, n_prompt, timer.tokens))
                yield SSE_DONE
            finally:
                if outcome == "abort":
                    gen.cancel()  # propagates to the replica, which drops the request from the batch
                elif outcome != "error":  # latency of completed requests only
                    timer.on_finish(time.perf_counter())
                release(outcome)

    return app, OpenAIIngress


def _abandon(gen, release) -> None:
    gen.cancel()
    release("abort")  # a no-op when the stream ran to its end and released already


def _replica_error(e: BaseException) -> ApiError:
    return ApiError(503, f"the model replica failed while serving this request ({type(e).__name__}); "
                         "it is being restarted, retry the request", "server_error", code="replica_failed")


def build_app(args: dict | ServeConfig | None = None):
    """Application builder for ``serve run serve.app:build_app`` and ``serve/config.yaml``."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_args(dict(args or {}))
    device = cfg.device
    if device == "auto":
        device = "cuda" if _has_gpu() else "cpu"
    # with expert parallelism the rank actors take the GPUs; the replica only drives them
    gpus = 1 if device.startswith("cuda") and not cfg.ep_ranks else 0
    limits = cfg.limits
    replica = serve.deployment(ModelReplica, name="ModelReplica").options(
        num_replicas=cfg.num_replicas,
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": gpus},
        # above our own queue bound, so the replica answers 429 itself instead of Serve queueing silently
        max_ongoing_requests=cfg.max_batch_size + limits.max_waiting + 8,
        health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
    )
    app, ingress_cls = make_ingress_class()
    ingress = serve.deployment(serve.ingress(app)(ingress_cls), name="OpenAIIngress").options(
        ray_actor_options={"num_cpus": cfg.ingress_cpus},
        max_ongoing_requests=limits.max_concurrency + 32,
    )
    config = asdict(cfg)
    config["limits"] = limits.to_dict()
    return ingress.bind(replica.bind(cfg.replica_spec(device)), config)


def check_offload_budget(cfg: ServeConfig) -> None:
    """moe serve, before Ray starts: a byte budget (--gpu-memory 24GiB) that cannot hold one layer's active experts
    beside the dense weights, the replica's KV cache and the reserve is refused here, in one line, from the model's
    shapes (engine_deployment.replica_offload_config), not by each replica Ray Serve starts. A fraction of the
    GPU (--gpu-memory 0.3) is left to the replica, which checks it on its own GPU."""
    import torch

    from offload.config import OffloadConfig
    from serve.engine_deployment import model_dir, replica_offload_config, resolve_device
    spec = cfg.replica_spec(resolve_device(cfg.device))
    off = spec.get("offload")
    if not off or spec.get("expert_parallel") or off.get("gpu_memory") is None:
        return
    if isinstance(OffloadConfig(gpu_memory=off["gpu_memory"]).gpu_memory, float):  # ('0.3' is a fraction too)
        return
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    replica_offload_config(spec, model_dir(spec), dtype, "torch")  # (the bytes do not depend on the backend)


def run_server(cfg: ServeConfig, blocking: bool = True):
    """Start Ray (if needed) and Serve on cfg.host:cfg.port and deploy the application."""
    import ray
    if not ray.is_initialized():
        # no Ray dashboard; a loopback-only server also keeps Ray's node address on loopback
        loopback = cfg.host in ("127.0.0.1", "localhost", "::1")
        ray.init(include_dashboard=False, ignore_reinit_error=True,
                 **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    handle = serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    if blocking:
        print(f"moeflow: serving {cfg.model_name()} on http://{cfg.host}:{cfg.port}/v1 "
              f"(API key {'required' if cfg.api_key else 'not required'}); Ctrl-C stops", flush=True)

        def _stop(signum, frame):  # SIGTERM (systemd, docker stop, kill) shuts down like Ctrl-C
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, _stop)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("moeflow: shutting down", flush=True)
            serve.shutdown()
            ray.shutdown()
    return handle
