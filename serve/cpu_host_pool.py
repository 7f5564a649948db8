"""Driving CPU expert hosts (serve.cpu_host): child-process hosts without Ray, the client that
turns a dead host into ``HostDied``, and starting a pool of them.

    hosts = start_hosts(HostPoolConfig(num_hosts=2, threads_per_host=8))   # Ray actors, or threads
    y, seconds = hosts[0].call("compute", layer, x, ids, w)
    cost = probe_cost(hosts[0], layer, expert, hidden_size)                # what a token costs there

``start_hosts`` makes N hosts as Ray actors (no GPU, fractional CPUs allowed) or, when Ray is
missing or ``backend='thread'``, as in-process hosts each served by one Python thread, or as
child processes (``backend='process'``); all are driven through ``HostClient``.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from serve.cpu_host import _DTYPES, CPUExpertHost, HostConfig, HostDied


# --- a host in its own process without Ray ---------------------------------------------------------
def _host_main(conn, host_id: int, config: HostConfig) -> None:
    host = CPUExpertHost(host_id, config, pin_process=True)  # its own process: own threads and cores
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        method, args = msg
        try:
            conn.send(("ok", getattr(host, method)(*args)))
        except Exception as e:  # noqa: BLE001 - the caller re-raises it
            conn.send(("err", e))


class ProcessHost:
    """CPUExpertHost in a child process (torch.multiprocessing, spawn), for machines without Ray.

    Calls go over a pipe; tensors among the arguments travel as shared-memory handles
    (torch.multiprocessing's pickler), numpy arrays by value. The child has its own torch
    thread pool and core mask, which threads of one process cannot have (torch's thread count
    is process-wide). One call at a time (the HostClient's single worker thread)."""

    def __init__(self, host_id: int, config: HostConfig):
        import torch.multiprocessing as tmp
        ctx = tmp.get_context("spawn")
        self.host_id = host_id
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_host_main, args=(child, host_id, config), daemon=True,
                                name=f"moeflow-cpu-host-{host_id}")
        self.proc.start()
        child.close()

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args):
            try:
                self.conn.send((method, args))
                status, value = self.conn.recv()
            except (EOFError, OSError, BrokenPipeError) as e:
                raise HostDied(self.host_id, e) from e
            if status == "err":
                raise value
            return value
        return call

    def terminate(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)
        self.conn.close()


# --- driving hosts: Ray actors, child processes or in-process threads ------------------------------
def _ray_errors() -> tuple[type, ...]:
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
    except ImportError:
        return ()
    return (RayActorError, ActorUnavailableError)


class HostClient:
    """One host seen from the driver: `submit(method, *args)` then `wait(pending)`.

    Ray actor or in-process host, the same calls; a dead host raises HostDied from either.
    Picklable when it wraps a Ray actor (ranks of the expert-parallel runtime receive them).
    """

    def __init__(self, host_id: int, actor=None, local: CPUExpertHost | ProcessHost | None = None):
        if (actor is None) == (local is None):
            raise ValueError("a HostClient wraps exactly one of a Ray actor or a CPUExpertHost / ProcessHost")
        self.host_id, self.actor, self.local = host_id, actor, local
        self.kind = "ray" if actor is not None else "process" if isinstance(local, ProcessHost) else "thread"
        self._pool: ThreadPoolExecutor | None = None
        self._dead = False
        self._bufs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def alive(self) -> bool:
        return not self._dead

    def __getstate__(self):
        if self.local is not None:
            raise ValueError(f"a {self.kind} host cannot be sent to another process; use Ray hosts")
        return {"host_id": self.host_id, "actor": self.actor}

    def __setstate__(self, d):
        self.__init__(d["host_id"], actor=d["actor"])

    def submit(self, method: str, *args):
        """Start a call; a dead host's failure shows at `wait` (like a Ray call to a dead actor)."""
        if self._dead:
            f: Future = Future()
            f.set_exception(HostDied(self.host_id))
            return f
        if self.actor is not None:
            return getattr(self.actor, method).remote(*args)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cpu-host-{self.host_id}")
        return self._pool.submit(getattr(self.local, method), *args)

    def wait(self, pending, timeout: float | None = None):
        if isinstance(pending, Future):
            if self._dead and not pending.done():
                raise HostDied(self.host_id)
            try:
                return pending.result(timeout)
            except HostDied:
                self._dead = True  # a child process that is gone
                raise
        import ray
        try:
            return ray.get(pending, timeout=timeout)
        except _ray_errors() as e:
            self._dead = True
            raise HostDied(self.host_id, e) from e

    def call(self, method: str, *args, timeout: float | None = None):
        return self.wait(self.submit(method, *args), timeout)

    @property
    def shares_memory(self) -> bool:
        """Whether rows can be handed over in buffers the host reads in place (thread and
        process hosts: `buffers` + compute_shared); Ray actors get wire arrays instead."""
        return self.kind != "ray"

    def buffers(self, rows: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The [capacity >= rows, hidden] input and output buffers this host reads and writes in
        place; made (in shared memory for a child process, whose handles travel once) and
        attached on first use, doubled when a call needs more rows. Call between calls only."""
        if not self.shares_memory:
            raise ValueError("a Ray host takes rows as wire arrays (compute), not shared buffers")
        if self._dead:
            raise HostDied(self.host_id)
        b = self._bufs
        if b is None or b[0].shape[0] < rows or b[0].shape[1] != hidden or b[0].dtype != dtype:
            cap = max(rows, 2 * b[0].shape[0] if b is not None and b[0].shape[1] == hidden else 8)
            x, y = torch.zeros(cap, hidden, dtype=dtype), torch.zeros(cap, hidden, dtype=dtype)
            if self.kind == "process":
                x.share_memory_()
                y.share_memory_()
            self.call("attach", x, y)
            self._bufs = b = (x, y)
        return b

    def kill(self) -> None:
        """Stop the host (tests, shutdown); later calls raise HostDied."""
        self._dead = True
        if self.actor is not None:
            import ray
            ray.kill(self.actor, no_restart=True)
        else:
            if isinstance(self.local, ProcessHost):
                self.local.terminate()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        self.local = None  # an in-process host's experts are freed with it
        self._bufs = None


@dataclass(frozen=True)
class HostPoolConfig:
    """How `start_hosts` makes hosts. backend: 'ray' | 'process' | 'thread' | 'auto' (Ray when
    importable and initialised, else threads); 'process': child processes without Ray; num_cpus: the Ray CPU resource of each actor (fractional
    is fine); threads/cores/dtype: each host's HostConfig (cores split evenly when `pin`)."""
    num_hosts: int = 2
    backend: str = "auto"
    num_cpus: float = 1.0
    threads: int = 1
    pin: bool = False
    dtype: str = "float32"
    cores: tuple[int, ...] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_hosts < 1:
            raise ValueError(f"num_hosts must be >= 1, got {self.num_hosts}")
        if self.backend not in ("ray", "process", "thread", "auto"):
            raise ValueError(f"backend must be 'ray', 'process', 'thread' or 'auto', got {self.backend!r}")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0, got {self.num_cpus}")
        HostConfig(threads=self.threads, dtype=self.dtype)


def resolve_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    try:
        import ray
    except ImportError:
        return "thread"
    return "ray" if ray.is_initialized() else "thread"


def start_hosts(config: HostPoolConfig) -> list[HostClient]:
    """Start `num_hosts` hosts and wait until each answers `ready()`."""
    backend = resolve_backend(config.backend)
    cores = list(config.cores) if config.cores is not None else list(range(os.cpu_count() or 1))
    per = max(1, len(cores) // config.num_hosts)
    cfgs = [HostConfig(threads=config.threads, dtype=config.dtype,
                       cores=tuple(cores[h * per:(h + 1) * per]) or None if config.pin else None)
            for h in range(config.num_hosts)]
    if backend == "ray":
        import ray
        if not ray.is_initialized():
            raise ValueError("backend='ray' needs ray.init() first (or backend='thread' for in-process hosts)")
        cls = ray.remote(CPUExpertHost)
        clients = [HostClient(h, actor=cls.options(num_cpus=config.num_cpus, num_gpus=0, max_restarts=0)
                              .remote(h, cfgs[h])) for h in range(config.num_hosts)]
    elif backend == "process":
        clients = [HostClient(h, local=ProcessHost(h, cfgs[h])) for h in range(config.num_hosts)]
    else:
        # in one process the threads and cores are the process's: leave them as they are
        clients = [HostClient(h, local=CPUExpertHost(h, cfgs[h], pin_process=False)) for h in range(config.num_hosts)]
    for c in clients:
        c.call("ready", timeout=120)
    return clients


def probe_cost(client: HostClient, layer: int, expert: int, hidden_size: int, repeat: int = 5):
    """Measure what a token sent to this host costs (placement.cpu_tier.CPUTierCost): the
    round-trip latency of an empty call, the transfer rate of a 1 MiB array, and the CPU time of
    one held expert at 1 and 8 tokens."""
    from placement.cpu_tier import CPUTierCost

    def best(fn):
        fn()
        return min(_timed(fn) for _ in range(repeat))
    lat = best(lambda: client.call("ping", None))
    blob = np.zeros(1 << 20, dtype=np.uint8)
    t_blob = best(lambda: client.call("ping", blob))
    rate = blob.nbytes * 2 / max(t_blob - lat, 1e-6)  # there and back
    times = client.call("measure", layer, expert, (1, 8))
    per_tok = max((times[8] - times[1]) / 7.0, 1e-9)
    elem = torch.empty((), dtype=_DTYPES[client.call("ready")["dtype"]]).element_size()
    return CPUTierCost(latency_s=lat, bytes_per_s=rate, cpu_base_s=max(times[1] - per_tok, 0.0),
                       cpu_per_token_s=per_tok, row_bytes=2 * hidden_size * elem)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
