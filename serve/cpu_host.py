"""CPU expert hosts: processes with no GPU that hold experts in RAM and compute them (Fiddler's
idea, spread over the machines of a Ray cluster).

Shape legend: N = rows (tokens) sent to a host, K = experts per token, D = hidden,
J = 2*I (gate rows then up rows), I = expert ffn size.

    host = CPUExpertHost(HostConfig(threads=8, cores=(0..7)))        # or ray.remote(CPUExpertHost)
    host.load_checkpoint(model_dir, layer_ids, [(layer, expert), ...])  # reads only these experts
    host.add_experts(layer, [e, ...], w13_nJD, w2_nDI)                 # or from given tensors
    y_ND, seconds = host.compute(layer, x_ND, ids_NK, w_NK)            # ids of other experts = -1
    host.compute(layer, x_ND, ids_NK, w_NK, cols=[[e, a, b]])          # expert e over ffn [a, b) only
    host.attach(x_buf, y_buf); host.compute_shared(layer, n, ids_NK, w_NK, cols)  # rows in place

Filling: from the checkpoint's safetensors memory map (offload.store.DiskExpertStore reads one
expert's slice of the fused [E, 2I, D] tensor, or the per-expert tensors), expert by expert, so a
host reads exactly its experts and nobody holds a second full copy of the model.

Transport. Activations travel as numpy arrays (bf16 viewed as int16, since numpy has no bf16),
never as pickled torch tensors. Ray passes an argument or a return value of at most 100 KiB
(its ``max_direct_call_object_size``) inline in the task message, skipping the object store;
bigger ones go through the node's shared-memory object store, which the actor reads without a
copy (numpy views into shared memory) when it runs on the same node. Only the rows of the tokens
that use the host's experts are sent, so a decode step (one row per sequence) is a few KiB to a
few hundred KiB: inline for small batches, one shared-memory write for large ones. Thread and
child-process hosts take rows in place instead: `HostClient.buffers` makes an input and an
output buffer once (shared memory for a child, whose handles cross the pipe once), and each call
(`compute_shared`) then carries only the layer, the row count, ids, weights and ffn slices.

Compute: the plain SwiGLU reference (kernels.expert_mlp_reference) expert by expert on the host's
torch threads (``torch.set_num_threads``), the process pinned to given cores with
``os.sched_setaffinity`` when asked (one host per NUMA node or core group). The weighted combine
is kernels.moe_experts_reference's, so a host's share equals what the reference computes for it.

``serve.cpu_host_pool.start_hosts`` makes N hosts as Ray actors (no GPU, fractional CPUs allowed)
or, when Ray is missing or ``backend='thread'``, as in-process hosts each served by one Python
thread (torch releases the GIL inside its kernels, so they still compute in parallel); all are
driven through ``serve.cpu_host_pool.HostClient``, which turns a dead actor into ``HostDied``.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from kernels import expert_mlp_reference

_NP_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.float16, torch.float32: torch.float32}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HostDied(RuntimeError):
    """A CPU expert host is gone (its actor died or was killed); its experts must be re-homed."""

    def __init__(self, host_id: int, cause: BaseException | None = None):
        super().__init__(f"CPU expert host {host_id} died ({type(cause).__name__ if cause else 'killed'})")
        self.host_id = host_id


# --- wire format --------------------------------------------------------------------------------
def to_wire(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array without a copy (bf16 as its int16 bits)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    view = _NP_VIEW.get(t.dtype)
    if view is None:
        return t.contiguous().numpy()
    return t.contiguous().view(view).numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor view of a wire array. Arrays Ray hands over from shared memory are read-only;
    they are only ever read (inputs of a matmul, or added into a fresh tensor), so no copy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == torch.bfloat16:
        return t.view(torch.bfloat16)
    return t if t.dtype == dtype else t.to(dtype)


@dataclass(frozen=True)
class HostConfig:
    """threads: torch threads of the host; cores: CPU ids to pin it to (None: not pinned);
    dtype: the dtype experts are kept and computed in ('bfloat16', 'float16', 'float32')."""
    threads: int = 1
    cores: tuple[int, ...] | None = None
    dtype: str = "float32"

    def __post_init__(self):
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.cores is not None:
            have = os.cpu_count() or 1
            bad = [c for c in self.cores if not 0 <= int(c) < have]
            if not self.cores or bad:
                raise ValueError(f"cores {self.cores} must be a non-empty set of CPU ids in 0..{have - 1}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class _Counters:
    calls: int = 0
    rows: int = 0
    pairs: int = 0
    compute_s: float = 0.0
    bytes_in: int = 0


class CPUExpertHost:
    """Experts of any layers in CPU memory, computed on this process's CPU threads.

    Wrapped by ``ray.remote`` (``start_hosts``) it is an actor; used directly it is the
    in-process host of the thread fallback. Experts are kept one tensor pair per expert so that
    re-homing can add or drop single experts without repacking.
    """

    def __init__(self, host_id: int = 0, config: HostConfig | None = None, pin_process: bool = True):
        self.host_id = host_id
        self.config = cfg = config or HostConfig()
        self.dtype = cfg.torch_dtype
        self.experts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.counters = _Counters()
        self._lock = threading.Lock()
        if pin_process:  # an actor owns its process: set its threads and cores once
            torch.set_num_threads(cfg.threads)
            if cfg.cores is not None and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, set(int(c) for c in cfg.cores))

    # --- filling ---------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint: str, layer_ids: list[int], experts: list[tuple[int, int]]) -> int:
        """Read exactly `experts` [(moe layer, expert)] from the checkpoint's memory-mapped
        safetensors; `layer_ids`: the decoder layer index of each MoE layer. Returns bytes held."""
        from offload.store import DiskExpertStore

        store = DiskExpertStore(checkpoint, list(layer_ids), dtype=self.dtype)
        for l, e in experts:
            if not 0 <= l < store.num_layers or not 0 <= e < store.num_experts:
                raise ValueError(f"expert ({l}, {e}) outside the checkpoint's {store.num_layers} MoE layers x "
                                 f"{store.num_experts} experts")
            w13, w2 = store.get(l, e)  # one expert's slice, read from the memory map
            with self._lock:
                self.experts[(int(l), int(e))] = (w13.contiguous(), w2.contiguous())
        return self.nbytes()

    def add_experts(self, layer: int, expert_ids: list[int], w13_nJD, w2_nDI) -> int:
        """Hold the given experts of `layer` (tensors or wire arrays); an expert held already is kept."""
        if not isinstance(w13_nJD, torch.Tensor):
            w13_nJD, w2_nDI = from_wire(w13_nJD, self.dtype), from_wire(w2_nDI, self.dtype)
        if w13_nJD.shape[0] != len(expert_ids) or w2_nDI.shape[0] != len(expert_ids):
            raise ValueError(f"{len(expert_ids)} expert ids but weights for {w13_nJD.shape[0]}/{w2_nDI.shape[0]}")
        with self._lock:
            for i, e in enumerate(expert_ids):
                key = (int(layer), int(e))
                if key not in self.experts:  # idempotent: several ranks may re-home the same expert here
                    self.experts[key] = (w13_nJD[i].to(self.dtype).clone(), w2_nDI[i].to(self.dtype).clone())
        return self.nbytes()

    def drop_experts(self, experts: list[tuple[int, int]]) -> int:
        with self._lock:
            for key in experts:
                self.experts.pop((int(key[0]), int(key[1])), None)
        return self.nbytes()

    # --- compute ---------------------------------------------------------------------------
    def compute(self, layer: int, x_ND, ids_NK, w_NK, cols=None) -> tuple[np.ndarray, float]:
        """y_ND (wire array, the host's dtype) = Σ over (row, slot) with a held expert of
        w · expert(x); slots with id -1 belong elsewhere. An id this host does not hold is an
        error (never a silent zero): the caller's routing table is stale.

        cols: optional [M, 3] int array of (expert, a, b): those experts are computed over ffn
        columns [a, b) only (offload.cpu_compute.expert_mlp_slice; the device does the rest);
        experts not listed are computed whole."""
        t0 = time.perf_counter()
        x_ND = from_wire(x_ND, self.dtype) if not isinstance(x_ND, torch.Tensor) else x_ND.to(self.dtype)
        y_ND = self._compute(layer, x_ND, ids_NK, w_NK, cols)
        return to_wire(y_ND), time.perf_counter() - t0

    def _compute(self, layer: int, x_ND: torch.Tensor, ids_NK, w_NK, cols) -> torch.Tensor:
        from offload.cpu_compute import expert_mlp_slice

        t0 = time.perf_counter()
        ids_NK = torch.as_tensor(np.asarray(ids_NK), dtype=torch.long)
        w_NK = torch.as_tensor(np.asarray(w_NK))
        N, K = ids_NK.shape
        y_ND = torch.zeros_like(x_ND)
        flat_ids, flat_w = ids_NK.reshape(-1), w_NK.reshape(-1)
        used = torch.unique(flat_ids[flat_ids >= 0]).tolist()
        missing = [e for e in used if (layer, e) not in self.experts]
        if missing:
            raise ValueError(f"host {self.host_id} does not hold experts {missing} of MoE layer {layer}")
        part = {int(e): (int(a), int(b)) for e, a, b in np.asarray(cols).reshape(-1, 3)} if cols is not None else {}
        with torch.no_grad():
            for e in used:  # ascending, like the reference
                pos = (flat_ids == e).nonzero(as_tuple=True)[0]
                tok = pos // K
                w13_JD, w2_DI = self.experts[(layer, e)]
                a, b = part.get(e, (0, w2_DI.shape[1]))
                out = expert_mlp_slice(x_ND[tok], w13_JD, w2_DI, a, b)
                y_ND = y_ND.index_add(0, tok, out * flat_w[pos, None].to(out.dtype))
        c = self.counters
        c.calls += 1
        c.rows += N
        c.pairs += int((flat_ids >= 0).sum())
        c.compute_s += time.perf_counter() - t0
        c.bytes_in += x_ND.numel() * x_ND.element_size()
        return y_ND

    # --- the shared-buffer hand-off (thread and process hosts) ------------------------------
    def attach(self, x_buf: torch.Tensor, y_buf: torch.Tensor) -> int:
        """Use these [capacity, D] tensors for `compute_shared`'s input and output rows: the
        driver's own tensors for a thread host, shared-memory ones (sent once, as handles) for
        a child process, so that a step's call carries only ids, weights and slices."""
        if x_buf.shape != y_buf.shape or x_buf.dim() != 2:
            raise ValueError(f"x and y buffers must both be [capacity, D], got {tuple(x_buf.shape)} and "
                             f"{tuple(y_buf.shape)}")
        self._x_buf, self._y_buf = x_buf, y_buf
        return x_buf.shape[0]

    def compute_shared(self, layer: int, n: int, ids_NK, w_NK, cols=None) -> float:
        """compute() on the first n rows of the attached x buffer, writing y's first n rows;
        returns the seconds spent."""
        t0 = time.perf_counter()
        xb = getattr(self, "_x_buf", None)
        if xb is None or n > xb.shape[0]:
            raise ValueError(f"compute_shared of {n} rows needs attach() of buffers with >= {n} rows first "
                             f"(attached: {None if xb is None else xb.shape[0]})")
        y_ND = self._compute(layer, xb[:n].to(self.dtype), ids_NK, w_NK, cols)
        self._y_buf[:n].copy_(y_ND)
        return time.perf_counter() - t0

    def measure(self, layer: int, expert: int, tokens: tuple[int, ...] = (1, 8), repeat: int = 3) -> dict:
        """Seconds for one held expert at each token count (best of `repeat`, after a warm-up)."""
        if (layer, expert) not in self.experts:
            raise ValueError(f"host {self.host_id} does not hold expert ({layer}, {expert}) to measure")
        w13_JD, w2_DI = self.experts[(layer, expert)]
        out = {}
        with torch.no_grad():
            for n in tokens:
                x = torch.randn(n, w13_JD.shape[1]).to(self.dtype)
                expert_mlp_reference(x, w13_JD, w2_DI)
                best = float("inf")
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    expert_mlp_reference(x, w13_JD, w2_DI)
                    best = min(best, time.perf_counter() - t0)
                out[int(n)] = best
        return out

    # --- health ----------------------------------------------------------------------------
    def ready(self) -> dict:
        return {"host_id": self.host_id, "pid": os.getpid(), "experts": len(self.experts), "bytes": self.nbytes(),
                "threads": torch.get_num_threads(), "dtype": self.config.dtype,
                "cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}

    def health(self) -> dict:
        return {"ok": True, "host_id": self.host_id, **self.counters.__dict__}

    def held(self) -> list[tuple[int, int]]:
        return sorted(self.experts)

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.experts.values())

    def ping(self, payload=None):
        """Echo (for measuring the round-trip latency and transfer rate at start-up)."""
        return payload
