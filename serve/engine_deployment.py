"""The model replica: where the model and its engine live, and the loop that drives them.

``EngineLoop`` is continuous batching on top of the engine contract (``add_request``, ``abort``,
``step``, ``has_unfinished``): one asyncio task calls ``engine.step()`` again and again in a single
worker thread (so the event loop stays free to accept and stream requests) and, between two steps,
hands the engine the requests that arrived and the aborts of clients that left. Requests therefore
join and leave the running batch at every step. The engine is only ever touched from that one
thread, so it need not be thread-safe.

``ModelReplica`` is the Ray Serve deployment body (a plain class; ``serve/app.py`` wraps it with
``serve.deployment``, so this module does not import Ray and the in-process benchmark can use it on
a machine without Ray). It tokenizes, applies the chat template, checks prompt length against the
limits and the engine's context, and streams events to the ingress:
``{"type": "start", "prompt_tokens": n}``, then ``{"type": "delta", "text", "num_tokens",
"finished", "finish_reason"}``..., or a single ``{"type": "error", "status", "error": {...}}``.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from serve.api import ApiError, ServeLimits
from serve.metrics import ExpertLoadCounter, collect_component_stats

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The replica already holds its running batch plus ``max_waiting`` queued requests."""


class EngineFailedError(RuntimeError):
    """``engine.step()`` raised; the replica is unhealthy and Serve will replace it."""


@dataclass(eq=False)  # identity semantics: slots live in sets and lists
class _Slot:
    """One request's state inside the loop."""
    prompt: Any
    params: Any
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    rid: Any = None
    cancelled: bool = False
    finished: bool = False
    got_output: bool = False


_END = object()


class EngineLoop:
    """Continuous batching over an engine that follows the moe.Engine contract."""

    def __init__(self, engine, max_batch_size: int, max_waiting: int):
        if max_batch_size <= 0 or max_waiting < 0:
            raise ValueError(f"max_batch_size ({max_batch_size}) must be > 0 and max_waiting ({max_waiting}) >= 0")
        self.engine = engine
        self.capacity = max_batch_size + max_waiting
        self.max_batch_size = max_batch_size
        self.failed: BaseException | None = None
        self.steps = 0
        self.step_seconds = 0.0
        self._active: set[_Slot] = set()          # every request not yet finished
        self._slots: dict[Any, _Slot] = {}        # engine request id -> slot
        self._to_add: list[_Slot] = []
        self._to_abort: list[Any] = []
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeflow-engine")
        self._task: asyncio.Task | None = None

    # ---- request side (event loop) ------------------------------------------------------------
    def submit(self, prompt, params) -> _Slot:
        if self.failed is not None:
            raise EngineFailedError(f"the engine failed earlier: {self.failed!r}")
        if len(self._active) >= self.capacity:
            raise QueueFullError(f"the replica holds {len(self._active)} requests (running batch + queue "
                                 f"bound = {self.capacity}); retry later")
        slot = _Slot(prompt, params)
        self._active.add(slot)
        self._to_add.append(slot)
        self._ensure_running()
        self._wake.set()
        return slot

    async def stream(self, slot: _Slot) -> AsyncIterator[Any]:
        """Yield the engine's RequestOutputs for ``slot`` until it finishes; raise if the engine fails."""
        try:
            while True:
                item = await slot.events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not slot.finished:
                self.abort(slot)

    async def stream_chunks(self, slot: _Slot) -> AsyncIterator[list]:
        """Like ``stream``, but each item is every output that has arrived since the last one.

        When the consumer falls behind (a busy replica event loop, a slow network), tokens travel
        together in one message instead of one Ray message per token.
        """
        try:
            while True:
                items = [await slot.events.get()]
                while not slot.events.empty():
                    items.append(slot.events.get_nowait())
                outs = []
                for item in items:
                    if item is _END or isinstance(item, BaseException):
                        if outs:
                            yield outs
                        if item is _END:
                            return
                        raise item
                    outs.append(item)
                yield outs
        finally:
            if not slot.finished:
                self.abort(slot)

    def abort(self, slot: _Slot) -> None:
        """Stop a request (client gone); the engine drops it before its next step."""
        if slot.finished or slot.cancelled:
            return
        slot.cancelled = True
        self._active.discard(slot)
        if slot in self._to_add:
            self._to_add.remove(slot)
        elif slot.rid is not None:
            self._slots.pop(slot.rid, None)
            self._to_abort.append(slot.rid)
            self._wake.set()
        # rid None and not in _to_add: it is being added right now; _dispatch sees `cancelled`

    def counts(self) -> tuple[int, int]:
        """(running, waiting): a request waits until it has produced its first token."""
        running = sum(1 for s in self._slots.values() if s.got_output)
        return running, len(self._active) - running

    # ---- engine side --------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        has_work = False
        while True:
            if not (self._to_add or self._to_abort or has_work):
                self._wake.clear()
                await self._wake.wait()
                continue
            adds, self._to_add = self._to_add, []
            aborts, self._to_abort = self._to_abort, []
            try:
                added, outs, has_work = await loop.run_in_executor(self._pool, self._step_sync, adds, aborts)
            except Exception as e:  # the engine's state is unknown now: fail everyone, report unhealthy
                log.exception("engine step failed")
                self.failed = e
                err = EngineFailedError(f"the engine failed: {e!r}")
                for s in list(self._slots.values()) + adds:
                    s.events.put_nowait(err)
                self._slots.clear()
                self._active.clear()
                return
            self._dispatch(added, outs)

    def _step_sync(self, adds: list[_Slot], aborts: list[Any]):
        added = []
        for slot in adds:
            try:
                added.append((slot, self.engine.add_request(slot.prompt, slot.params), None))
            except (ValueError, TypeError) as e:  # this request's own fault: only it fails
                added.append((slot, None, e))
        for rid in aborts:
            self.engine.abort(rid)
        outs = []
        if self.engine.has_unfinished():
            t0 = time.perf_counter()
            outs = self.engine.step()
            self.step_seconds += time.perf_counter() - t0
            self.steps += 1
        return added, outs, self.engine.has_unfinished()

    def _dispatch(self, added, outs) -> None:
        for slot, rid, err in added:
            if err is not None:
                slot.finished = True
                self._active.discard(slot)
                slot.events.put_nowait(ApiError(400, f"the engine refused the request: {err}"))
                continue
            slot.rid = rid
            if slot.cancelled:  # the client left while the request was being added
                self._to_abort.append(rid)
                self._wake.set()
            else:
                self._slots[rid] = slot
        for out in outs:
            slot = self._slots.get(out.request_id)
            if slot is None:  # aborted meanwhile
                continue
            slot.got_output = True
            slot.events.put_nowait(out)
            if out.finished:
                slot.finished = True
                del self._slots[out.request_id]
                self._active.discard(slot)
                slot.events.put_nowait(_END)

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- loading ---------------------------------------------------------------------------------------

@dataclass
class LoadedEngine:
    """What a replica needs: the engine, its tokenizer, and (optionally) the model for statistics."""
    engine: Any
    tokenizer: Any
    model: Any = None
    max_len: int = 2048
    strategy: str = "single"
    closers: list = field(default_factory=list)  # what close() stops: CPU hosts, expert-parallel ranks

    def close(self) -> None:
        """Stop the actors / threads this engine started (they hold Ray CPUs and GPUs)."""
        while self.closers:
            self.closers.pop()()


def default_model_path() -> str:
    """The embedded default model if it has been built, else "tiny" (an untrained one made on the fly)."""
    from moe.tiny import ASSETS_DEFAULT, default_model_is_embedded
    return str(ASSETS_DEFAULT) if default_model_is_embedded() else "tiny"


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _import(spec: str) -> Callable:
    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise ValueError(f"engine_factory {spec!r} must look like 'package.module:function'")
    return getattr(importlib.import_module(mod), name)


def moe_api():
    """(Engine, Tokenizer, SamplingParams) from the moe package (top level once it exports them)."""
    import moe
    try:
        return moe.Engine, moe.Tokenizer, moe.SamplingParams
    except AttributeError:
        from moe.generate import Engine
        from moe.sampling import SamplingParams
        from moe.tokenizer import Tokenizer
        return Engine, Tokenizer, SamplingParams


def model_dir(spec: dict) -> str:
    """The model directory a replica loads (the default model, or "tiny" made on the fly)."""
    path = spec.get("model") or default_model_path()
    if path == "tiny":
        from moe.tiny import ensure_tiny_model
        path = str(ensure_tiny_model())
    return path


def replica_offload_config(spec: dict, path: str, dtype, backend: str):
    """The OffloadConfig of a replica's spec (None without offloading), checked against the model's shapes before
    any weight is read (offload.apply.check_budget on moe.checkpoint.model_skeleton): a budget that cannot hold one
    layer's active experts fails here. The engine's KV cache (max_batch_size rows of max_len, made up front) is
    taken from the budget first. ``moe serve`` runs it before Ray starts, the replica again before it loads."""
    if not spec.get("offload"):
        return None
    import moe
    from offload import OffloadConfig
    from offload.apply import check_budget, kv_cache_bytes
    from offload.cli_args import offload_objects
    skeleton = moe.checkpoint.model_skeleton(path, dtype, backend)
    kv = kv_cache_bytes(skeleton.config, int(spec.get("max_batch_size", 8)), int(spec.get("max_len", 2048)),
                        skeleton.dtype)
    cfg = OffloadConfig(**{"kv_cache_bytes": kv, **spec["offload"]}, **offload_objects(**(spec.get("offload_files")
                                                                                          or {})))
    check_budget(skeleton, cfg)
    return cfg


def load_engine(spec: dict) -> LoadedEngine:
    """Build the engine a replica serves from its spec (see ``serve.app.ServeConfig``)."""
    if spec.get("engine_factory"):
        return _import(spec["engine_factory"])(spec)
    import torch
    import moe
    Engine, Tokenizer, _ = moe_api()
    path = model_dir(spec)
    device = resolve_device(spec.get("device", "auto"))
    if spec.get("torch_threads"):
        # match intra-op threads to the CPUs Ray reserved: more threads than cores makes OpenMP
        # barriers spin against other processes (a 4x64 index_add took 0.2 s with 2 threads on a
        # loaded 2-core machine, 10 us with 1)
        torch.set_num_threads(int(spec["torch_threads"]))
    dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
    ep = spec.get("expert_parallel")
    from kernels import resolve_backend
    backend = resolve_backend(spec.get("backend") or "auto", device)  # (refuses triton off a CUDA device)
    # expert-parallel: the ranks take the weights from a host copy, then the replica drops it; offloaded: the
    # weights load into host memory and apply_offload moves the dense part (the experts may not fit the device)
    # (the expert-parallel host copy keeps the torch experts, as before: the ranks are given `backend`)
    # built, and its budget checked on the model's shapes, before the weights load
    offload_cfg = replica_offload_config(spec, path, dtype, backend) if not ep else None
    model = moe.load_model(path, dtype=dtype, device="cpu" if ep or spec.get("offload") else device,
                           backend="torch" if ep else backend)
    tok = Tokenizer.from_dir(path)
    strategy = "single"
    closers: list = []
    if ep:
        if spec.get("offload") or spec.get("cpu_hosts"):
            raise ValueError("expert_parallel does not combine with offload or cpu_hosts in one replica")
        from serve.ep_model import EPServeSettings, start_expert_parallel
        model = start_expert_parallel(model, EPServeSettings(**ep), device, backend=backend)
        closers.append(model.shutdown)
        strategy = model.stats()["strategy"]
    elif spec.get("offload"):
        # offloading is a step applied to a built model (offload/ owns what it does)
        from offload import apply_offload
        model = apply_offload(model, offload_cfg)
        log.info("replica offload: %s; %s", model.offload_cache.describe(), model.offload_cache.driver_choice)
        strategy = "offload"
        if spec.get("cpu_hosts"):
            model, hosts = _attach_cpu_hosts(model, spec["cpu_hosts"], path)
            closers += [h.kill for h in hosts]
            strategy = "offload+cpu-hosts"
    elif spec.get("cpu_hosts"):
        raise ValueError("cpu_hosts needs an expert cache to share misses with: set gpu_memory too")
    max_len = int(spec.get("max_len", 2048))
    rows = int(spec.get("max_batch_size", 8))
    trained = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if trained and max_len > trained:  # requests past the trained context are served, but their text degrades
        log.warning("replica max_len %d exceeds the model's context of %d tokens (max_position_embeddings): text "
                    "past it is unreliable; lower --max-len to %d", max_len, trained, trained)
    chunk = spec.get("prefill_chunk", "auto")
    if chunk == "auto":  # a prefill's activations inside the offload reserve, or the GPU's free memory
        from offload import auto_prefill_chunk
        chunk = auto_prefill_chunk(model, rows, max_len) if not ep else None
        if chunk is not None:
            log.info("replica prefill: at most %d prompt tokens a step, first come first served (a step beside %d "
                     "rows decoding inside %s)", chunk, rows - 1,
                     f"the {offload_cfg.reserve_bytes}-byte offload reserve" if offload_cfg is not None
                     else "the GPU's free memory")
    try:
        engine = Engine(model, tok, max_batch_size=rows, max_len=max_len, prefill_chunk=chunk)
        if engine.device.type == "cuda" and spec.get("warm_up", True):
            # the kernels compile and the decode graphs capture now, not inside the first requests' latency
            t0, top = time.perf_counter(), ServeLimits(**spec.get("limits", {})).max_prompt_tokens
            steps = engine.warm_up(max_prompt=top)
            log.info("replica warm-up: %d steps (prompts of 1 to %d tokens), %d decode graphs captured, %.1f s",
                     steps, min(top, max_len - 2), len(engine.captured_graphs), time.perf_counter() - t0)
    except BaseException:
        for close in reversed(closers):  # the hosts / ranks started above must not outlive a failed load
            close()
        raise
    return LoadedEngine(engine, tok, model, max_len, strategy, closers)


def _attach_cpu_hosts(model, hosts_spec: dict, path: str):
    """Start the replica's CPU expert hosts (Ray actors inside Serve, threads without Ray) and put
    every expert on one of them; offload.tiered then shares each step's cache misses between PCIe
    copies and the hosts. The hosts read their experts from the checkpoint's memory map."""
    from offload import TierRuntimeConfig, apply_cpu_tier
    from placement.cpu_tier import TieredPlan
    from serve.cpu_host_pool import HostPoolConfig, start_hosts

    n = int(hosts_spec["num_hosts"])
    blocks = model.moe_blocks()
    # hosts compute in the experts' own dtype, so their share equals what the GPU would compute
    host_dtype = str(blocks[0].experts.store.dtype).removeprefix("torch.")
    hosts = start_hosts(HostPoolConfig(num_hosts=n, backend="auto", num_cpus=float(hosts_spec["num_cpus"]),
                                       threads=int(hosts_spec["threads"]), dtype=host_dtype))
    plan = TieredPlan.on_hosts(len(blocks), model.config.num_experts, n)
    apply_cpu_tier(model, plan, hosts, TierRuntimeConfig(dispatch="split"), checkpoint=str(path))
    return model, hosts


def _replica_id() -> str:
    """Serve's id of this replica (short), or the process id outside Serve."""
    try:
        from ray import serve
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - not inside Serve (in-process benchmark, tests) or no Ray at all
        return f"pid{os.getpid()}"


# ---- the replica -----------------------------------------------------------------------------------

class ModelReplica:
    """Serve deployment body: one model, one engine, one loop (one GPU when there is one)."""

    def __init__(self, spec: dict):
        self.spec = dict(spec)
        self.limits = ServeLimits(**spec.get("limits", {}))
        self.loaded = load_engine(self.spec)
        self.max_len = self.loaded.max_len
        self.loop = EngineLoop(self.loaded.engine, int(spec.get("max_batch_size", 8)), self.limits.max_waiting)
        self.expert_load = ExpertLoadCounter.attach(self.loaded.model)
        self.started = time.time()
        self.replica_id = _replica_id()
        # tokens per streamed message after the first: each message is a Ray hop replica -> ingress
        # -> proxy, so when steps are fast (small models, CPUs) sending every token costs real CPU
        self.stream_interval = int(spec.get("stream_interval", 1))
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval ({self.stream_interval}) must be >= 1 (1: send every token)")

    def shutdown(self) -> None:
        """Stop the batching loop and whatever the engine started (CPU hosts, expert-parallel ranks)."""
        self.loop.shutdown()
        self.loaded.close()

    def __del__(self):  # Serve stops a replica by dropping it: its hosts / ranks go with it
        loaded = getattr(self, "loaded", None)
        if loaded is not None and getattr(loaded, "closers", None):
            try:
                loaded.close()
            except Exception:  # noqa: BLE001 - interpreter or Ray shutting down; nothing left to free
                pass

    # Serve calls this every health_check_period_s; raising makes the controller replace the replica
    def check_health(self) -> None:
        if self.loop.failed is not None:
            raise EngineFailedError(f"engine failed: {self.loop.failed!r}")

    def info(self) -> dict:
        return {"max_len": self.max_len, "pid": os.getpid(), "started": self.started}

    def snapshot(self) -> dict:
        """Everything /metrics reports about the engine side (read at scrape time)."""
        running, waiting = self.loop.counts()
        snap = {"replica": self.replica_id, "running": running, "waiting": waiting, "steps": self.loop.steps,
                "step_seconds": self.loop.step_seconds, "strategy": self.loaded.strategy,
                "components": collect_component_stats(self.loaded.model, self.loaded.engine)}
        if self.expert_load is not None:
            snap["expert_load"] = self.expert_load.snapshot()
        return snap

    def _prompt(self, req: dict):
        """(engine prompt, prompt token count); raises ApiError for over-long prompts."""
        tok = self.loaded.tokenizer
        if req.get("messages") is not None:
            try:
                prompt = tok.apply_chat_template(req["messages"])
            except Exception as e:  # a template may raise on role orders it does not accept
                raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        else:
            prompt = req["prompt"]
        # strings go to the engine as text so it tokenizes exactly as moe.generate does
        n = len(tok.encode(prompt)) if isinstance(prompt, str) else len(prompt)
        limit = min(self.limits.max_prompt_tokens, self.max_len - 1)
        if n > limit:
            raise ApiError(400, f"the prompt has {n} tokens; the limit is {limit} tokens. Shorten the prompt.",
                           param="messages" if req.get("messages") is not None else "prompt",
                           code="context_length_exceeded")
        return prompt, n

    def _params(self, req: dict, n_prompt: int):
        room = self.max_len - n_prompt
        max_tokens = req.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(self.limits.max_tokens, room)
        elif max_tokens > room:
            raise ApiError(400, f"this model's maximum context length is {self.max_len} tokens; the request "
                           f"asks for {n_prompt + max_tokens} ({n_prompt} in the prompt, {max_tokens} in the "
                           "completion). Reduce max_tokens or the prompt.", param="max_tokens",
                           code="context_length_exceeded")
        top_k = req.get("top_k") or 0
        return moe_api()[2](max_new_tokens=max_tokens, temperature=req.get("temperature", 1.0),
                                  top_p=req.get("top_p", 1.0), top_k=max(top_k, 0), seed=req.get("seed"),
                                  stop=tuple(req.get("stop") or ()), ignore_eos=bool(req.get("ignore_eos")))

    async def generate(self, req: dict) -> AsyncIterator[dict]:
        """Stream one request's events; see the module docstring for their shapes."""
        slot = None
        try:
            prompt, n_prompt = self._prompt(req)
            params = self._params(req, n_prompt)
            slot = self.loop.submit(prompt, params)
        except ApiError as e:
            yield {"type": "error", "status": e.status, **e.to_dict()}
            return
        except QueueFullError as e:
            yield {"type": "error", "status": 429, **ApiError(429, str(e), "rate_limit_error",
                                                              code="queue_full").to_dict()}
            return
        except ValueError as e:  # SamplingParams refused a value the API layer let through
            yield {"type": "error", "status": 400, **ApiError(400, str(e)).to_dict()}
            return
        except EngineFailedError as e:  # until Serve's health check replaces this replica
            yield {"type": "error", "status": 503, **ApiError(503, f"{e}; the replica is being replaced, retry",
                                                              "server_error", code="replica_failed").to_dict()}
            return
        try:  # from here on, leaving this generator early (client gone) must abort the request
            yield {"type": "start", "prompt_tokens": n_prompt}
            pending, sent_first = [], False
            async for outs in self.loop.stream_chunks(slot):
                pending += outs
                last = outs[-1]
                n = sum(len(o.new_token_ids) for o in pending)
                # the first token goes out at once (TTFT); later ones every `stream_interval` tokens
                if sent_first and n < self.stream_interval and not last.finished:
                    continue
                yield {"type": "delta", "text": "".join(o.new_text for o in pending), "num_tokens": n,
                       "finished": bool(last.finished), "finish_reason": last.finish_reason}
                pending, sent_first = [], True
        except ApiError as e:
            yield {"type": "error", "status": e.status, **e.to_dict()}
        except EngineFailedError as e:
            yield {"type": "error", "status": 500, **ApiError(500, str(e), "server_error").to_dict()}
        finally:
            # on client disconnect Serve cancels this generator: drop the request from the batch
            self.loop.abort(slot)
