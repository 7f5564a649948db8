"""Experts split between this process's device and CPU expert hosts (serve.cpu_host).

Shape legend: T = tokens, D = hidden, K = experts per token, E = experts, n = local experts,
J = 2*I, I = expert ffn size, N = rows sent to one host.

    rt = apply_cpu_tier(model, tiered_plan, hosts)     # hosts: serve.cpu_host_pool.start_hosts(...)
    model(ids)                                          # same logits as before
    rt.stats()                                          # tokens and seconds per tier

Per MoE layer (TieredExperts, a drop-in for block.experts):

    routing ids ─► owner table [E]: -1 = here, h = host h
        ├─► submit: rows of the tokens using host h's experts ──► host h computes (its CPU threads)
        ├─► inner module (the expert-parallel ranks' experts, when wrapped)    ┐ overlapped with
        ├─► local experts on this device (kernels backend)                     ┘ the hosts' work
        └─► gather the hosts' partial sums ─► y_TD = inner + local + Σ hosts

Remote calls go first, so the hosts compute while the device does the local experts; the one
device->host copy of x happens before the local kernel is queued. A host that dies (its call
raises HostDied) has all its experts re-homed — to the live host holding the fewest bytes
(filled from the checkpoint's memory map when there is one, else from the source store), or
into this device's local experts when no host is left or ``rehome='local'`` — and the layer's
host part is recomputed with the new owners; nothing partial of the failed attempt is kept, so
the output is exactly what it would have been.

Inside the expert-parallel runtime (placement.runtime), every rank holds the whole batch: each
rank sends only the tokens t with t mod P == rank to the hosts and one all-reduce sums the
hosts' part, so a host sees each token once.

GPU cache + CPU hosts, misses split over the ffn dimension (dispatch='split', granularity='slice';
every expert is also on a host):

    ids, weights, x ─► pinned host buffers, ONE host sync per layer call
    misses ─► split_misses (cost model): expert e copies columns [0, c_e), its host does [c_e, I)
        ├─► hosts: rows + (e, c_e, I) per split expert      (thread/process hosts: shared buffers)
        ├─► copy stream: gate rows, up rows, w2^T rows of [0, c_e) ─► device staging buffer
        ├─► inner (the cache): hits, and misses copied whole (c_e == I) into their slots
        └─► y = inner + staged slices (the device waits on the copy event) + Σ hosts
A partly copied expert is not put in the cache (its slots hold whole experts only; a cold
cache's empty slots are filled with whole copies first); w2 is kept a second time on the host,
transposed (w2t), so that a column slice is one contiguous copy. With adapt, the cost model's
host and copy times are scaled by what recent calls measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kernels import get_backend

from .store import DiskExpertStore, ExpertStore, HostExpertStore
from .tiered_slices import SliceBuffers, SliceSplit

REHOME = ("auto", "host", "local")


@dataclass(frozen=True)
class TierRuntimeConfig:
    """rehome: where a dead host's experts go ('auto': another live host, else this device;
    'host': another live host or fail; 'local': this device). max_retries: host failures one
    layer call survives. keep_source: keep the CPU-hosted experts' weights in this process
    (when there is no checkpoint to re-read them from) so that a dead host's experts can be
    re-homed; off, a host death without a checkpoint is an error.
    dispatch: 'static' — the plan says who computes each expert; 'split' — with an offload
    cache as the inner module (offload.apply.install before apply_cpu_tier), hits are computed
    from the cache and misses shared between PCIe copies and the hosts (GPU cache + CPU hosts).
    granularity (with dispatch='split'): 'expert' — each miss is copied whole into the cache or
    computed whole on its host; 'slice' — each miss is split over its ffn columns, [0, c) copied
    to a staging buffer and computed on the device, [c, I) on its host, c chosen so that the copy
    engine and the hosts finish together (offload.cpu_compute.split_misses; c a multiple of
    `align`, c == I a whole copy into the cache). A partly copied expert is NOT put in the cache.
    adapt (granularity='slice'): scale the cost model's host and copy times by what recent calls
    measured (host-reported seconds, CUDA events around the slice copies; a moving average) —
    copies and hosts read the same host DRAM at once, so each runs slower than calibrated alone.
    replicas (granularity='slice'): each CPU-tier expert is held by this many hosts (its plan's
    host and the next ones), and a miss's host part [c, I) is divided between them (one host per
    NUMA node: a batch-1 miss then reads every node's memory at once); a dead replica is simply
    dropped. Costs replicas x the CPU tier's host RAM."""
    rehome: str = "auto"
    dispatch: str = "static"
    granularity: str = "expert"
    align: int = 128
    adapt: bool = True
    replicas: int = 1
    max_retries: int = 3
    timeout_s: float | None = None
    keep_source: bool = True

    def __post_init__(self):
        if self.rehome not in REHOME:
            raise ValueError(f"rehome must be one of {REHOME}, got {self.rehome!r}")
        if self.dispatch not in ("static", "split"):
            raise ValueError(f"dispatch must be 'static' (the plan's owners) or 'split' (cache hits local, misses "
                             f"split between copies and hosts), got {self.dispatch!r}")
        if self.granularity not in ("expert", "slice"):
            raise ValueError(f"granularity must be 'expert' (whole misses copied or on a host) or 'slice' (each miss "
                             f"split over its ffn columns), got {self.granularity!r}")
        if self.granularity == "slice" and self.dispatch != "split":
            raise ValueError("granularity='slice' splits cache misses: it needs dispatch='split'")
        if self.align < 1:
            raise ValueError(f"align (ffn columns per slice step) must be >= 1, got {self.align}")
        if self.replicas < 1 or (self.replicas > 1 and self.granularity != "slice"):
            raise ValueError(f"replicas must be >= 1 and > 1 only with granularity='slice' (a miss's host part "
                             f"divided between its replicas), got {self.replicas} with {self.granularity!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


@dataclass
class _TierCounters:
    local_pairs: int = 0
    inner_pairs: int = 0
    host_pairs: dict = field(default_factory=dict)  # host -> (token, slot) pairs sent
    host_rows: int = 0
    host_expert_calls: int = 0  # (call, expert) pairs computed on hosts: each reads the expert once
    host_bytes: int = 0
    local_s: float = 0.0  # device work queued and run on this process (synchronised)
    wait_s: float = 0.0  # blocked waiting for hosts after the local work
    submit_s: float = 0.0
    host_compute_s: float = 0.0  # what the hosts report
    calls: int = 0
    retries: int = 0
    rehomed: int = 0
    split_experts: int = 0  # misses computed partly on the device, partly on a host (granularity='slice')
    slice_bytes: int = 0  # bytes of those experts' slices copied to the staging buffer
    model_copy_s: float = 0.0  # the cost model's copy-engine time of the misses (whole copies + slices)
    model_host_s: float = 0.0  # its host time (all hosts)
    model_floor_s: float = 0.0  # Σ over layer calls of max(copy engine, busiest host): the split's floor


def _weight_wire(client):
    """How expert weights travel to a host: numpy for Ray actors (object store, zero-copy reads);
    the tensor itself for a child process (torch.multiprocessing sends a shared-memory handle)
    or an in-process host."""
    if client.kind == "ray":
        from serve.cpu_host import to_wire
        return to_wire
    return lambda t: t


class TierRuntime(SliceBuffers):
    """State shared by the TieredExperts of one model: hosts, owner tables, counters."""

    def __init__(self, hosts: list, host_of_LE: np.ndarray, config: TierRuntimeConfig, source: ExpertStore | None,
                 checkpoint: str | None, layer_ids: list[int], host_dtype: torch.dtype, share=None):
        self.hosts = list(hosts)
        self.host_of = np.array(host_of_LE, dtype=np.int64)  # [L, E]; -1 = not on a host
        L, E = self.host_of.shape
        self.holds = np.zeros((L, E, len(hosts)), dtype=bool)  # [L, E, H]: which hosts hold a copy
        for r in range(config.replicas):
            l_, e_ = np.nonzero(self.host_of >= 0)
            self.holds[l_, e_, (self.host_of[l_, e_] + r) % max(len(hosts), 1)] = True
        self.cfg = config
        self.source, self.checkpoint, self.layer_ids = source, checkpoint, list(layer_ids)
        self.host_dtype = host_dtype
        self.share = share  # (rank, world, group) inside the expert-parallel runtime
        self.layers: list[TieredExperts] = []
        self.counters = _TierCounters()
        self.dead: set[int] = set()
        self.w2t: list[torch.Tensor] = []  # granularity='slice': each layer's w2 as [E, I, D] (pinned on CUDA)
        self._stage: torch.Tensor | None = None  # device staging rows of the copied slices
        self._pinned: dict[str, torch.Tensor] = {}  # device->host buffers of ids, weights and x
        self.scale = {"host": 1.0, "copy": 1.0}  # measured / predicted seconds (adapt)
        self.last_host_s: dict[int, float] = {}  # seconds each host reported for its last call
        self._copy_probe = None  # (start, end events, predicted unscaled seconds) of the last slice copies

    # --- failures ---------------------------------------------------------------------------
    def host_died(self, host: int) -> None:
        """Re-home every expert of `host` (all layers) and mark it dead."""
        if host in self.dead:
            return
        self.dead.add(host)
        self.holds[:, :, host] = False
        moved = np.argwhere(self.host_of == host)
        if len(moved):  # an expert another live host holds a replica of moves there, nothing to copy
            kept = self.holds[moved[:, 0], moved[:, 1]].any(1)
            for l, e in moved[kept]:
                self.host_of[l, e] = int(np.flatnonzero(self.holds[l, e])[0])
            moved = moved[~kept]
        live = [h for h in range(len(self.hosts)) if h not in self.dead and self.hosts[h].alive]
        target = None
        if self.cfg.rehome != "local" and live:
            sizes = {}
            for h in live:
                try:
                    sizes[h] = self.hosts[h].call("nbytes", timeout=self.cfg.timeout_s)
                except Exception:  # noqa: BLE001 - a second dead host is found by its own call later
                    continue
            target = min(sizes, key=sizes.get) if sizes else None
        if target is None and self.cfg.rehome == "host":
            raise RuntimeError(f"CPU host {host} died and no live host is left to take its {len(moved)} experts; "
                               "use rehome='auto' or 'local' to stream them to this device")
        if len(moved) and self.checkpoint is None and self.source is None:
            raise RuntimeError(f"CPU host {host} died and its experts cannot be re-homed: no checkpoint and no "
                               "source store (apply_cpu_tier(..., checkpoint=DIR) or keep_source=True)")
        if target is not None:
            self._to_host(target, [(int(l), int(e)) for l, e in moved])
            if len(moved):
                self.host_of[moved[:, 0], moved[:, 1]] = target
                self.holds[moved[:, 0], moved[:, 1], target] = True
        else:
            for l in np.unique(moved[:, 0]) if len(moved) else []:
                es = [int(e) for e in moved[moved[:, 0] == l, 1]]
                self.layers[int(l)].add_local(es, [self._weights(int(l), e) for e in es])
                self.host_of[l, es] = -1
                self.holds[l, es] = False
        self.counters.rehomed += len(moved)

    def _weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is None:
            self.source = DiskExpertStore(self.checkpoint, self.layer_ids, dtype=self.host_dtype)
        return self.source.get(layer, expert)

    def _to_host(self, h: int, experts: list[tuple[int, int]]) -> None:
        client = self.hosts[h]
        if self.checkpoint is not None:
            client.call("load_checkpoint", self.checkpoint, self.layer_ids, experts, timeout=self.cfg.timeout_s)
            return
        wire = _weight_wire(client)
        for l in sorted({l for l, _ in experts}):
            es = [e for ll, e in experts if ll == l]
            w = [self._weights(l, e) for e in es]
            client.call("add_experts", l, es, wire(torch.stack([a for a, _ in w])),
                        wire(torch.stack([b for _, b in w])), timeout=self.cfg.timeout_s)

    # --- figures ----------------------------------------------------------------------------
    def stats(self) -> dict:
        c = self.counters
        host_pairs = sum(c.host_pairs.values())
        total = c.local_pairs + c.inner_pairs + host_pairs
        return {"local_pairs": c.local_pairs, "gpu_rank_pairs": c.inner_pairs, "cpu_pairs": host_pairs,
                "cpu_pairs_per_host": dict(sorted(c.host_pairs.items())),
                "cpu_fraction": host_pairs / total if total else 0.0, "cpu_rows": c.host_rows,
                "cpu_expert_calls": c.host_expert_calls,
                "cpu_bytes_sent": c.host_bytes, "local_s": c.local_s, "wait_s": c.wait_s, "submit_s": c.submit_s,
                "host_compute_s": c.host_compute_s, "calls": c.calls, "retries": c.retries,
                "rehomed_experts": c.rehomed, "dead_hosts": sorted(self.dead),
                "experts_on_hosts": int((self.host_of >= 0).sum()), "split_experts": c.split_experts,
                "slice_bytes_copied": c.slice_bytes, "model_copy_s": c.model_copy_s,
                "model_host_s": c.model_host_s, "model_floor_s": c.model_floor_s,
                "host_scale": self.scale["host"], "copy_scale": self.scale["copy"]}

    def reset_stats(self) -> None:
        self.counters = _TierCounters()


class TieredExperts(SliceSplit, nn.Module):
    """Drop-in for block.experts: forward(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD."""

    def __init__(self, layer: int, num_experts: int, runtime: TierRuntime, w13_nJD: torch.Tensor,
                 w2_nDI: torch.Tensor, local_ids: list[int], backend: str = "torch", inner: nn.Module | None = None):
        super().__init__()
        self.layer, self.runtime, self.backend = layer, runtime, backend
        self._num_experts = num_experts
        self.w13 = nn.Parameter(w13_nJD, requires_grad=False)
        self.w2 = nn.Parameter(w2_nDI, requires_grad=False)
        local_of = torch.full((num_experts,), -1, dtype=torch.long)
        if local_ids:
            local_of[torch.as_tensor(local_ids)] = torch.arange(len(local_ids))
        self.register_buffer("local_of_E", local_of.to(w13_nJD.device), persistent=False)
        self.local_ids = list(local_ids)
        self.inner = inner  # experts of other GPU ranks' (expert-parallel module), never on a host

    @property
    def num_experts(self) -> int:
        return self._num_experts

    def extra_repr(self) -> str:
        on_host = int((self.runtime.host_of[self.layer] >= 0).sum())
        return f"layer={self.layer}, local={self.local_ids}, on_hosts={on_host}, backend={self.backend!r}"

    def add_local(self, expert_ids: list[int], weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Stream re-homed experts into this device's local set."""
        dev, dt = self.w13.device, self.w13.dtype
        w13 = torch.cat([self.w13.data] + [a.to(dev, dt)[None] for a, _ in weights])
        w2 = torch.cat([self.w2.data] + [b.to(dev, dt)[None] for _, b in weights])
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        for e in expert_ids:
            self.local_of_E[e] = len(self.local_ids)
            self.local_ids.append(int(e))

    # --- the host part ----------------------------------------------------------------------
    def _submit(self, x_TD, ids_np, w_np, x_cpu, owner_E):
        """Send each host the rows of its tokens (ids of other owners masked to -1)."""
        from serve.cpu_host import to_wire
        rt = self.runtime
        t0 = time.perf_counter()
        own_TK = np.where(ids_np >= 0, owner_E[ids_np.clip(0)], -1)
        T = ids_np.shape[0]
        mine_T = np.ones(T, dtype=bool)
        if rt.share is not None and rt.share[1] > 1:
            mine_T = np.arange(T) % rt.share[1] == rt.share[0]
        pending = []
        for h in np.unique(own_TK[own_TK >= 0]).tolist():
            sel_TK = own_TK == h
            rows = np.flatnonzero(sel_TK.any(1) & mine_T)
            if not len(rows):
                continue
            if x_cpu[0] is None:  # the one device->host copy of this layer's input
                x_cpu[0] = x_TD.detach().to("cpu", rt.host_dtype)
            ids_NK = np.where(sel_TK[rows], ids_np[rows], -1)
            x_ND = to_wire(x_cpu[0][rows])
            pending.append((h, rows, rt.hosts[h].submit("compute", self.layer, x_ND, ids_NK, w_np[rows]), False))
            c = rt.counters
            c.host_pairs[h] = c.host_pairs.get(h, 0) + int(sel_TK[rows].sum())
            c.host_rows += len(rows)
            c.host_expert_calls += len(np.unique(ids_NK[ids_NK >= 0]))
            c.host_bytes += x_ND.nbytes
        rt.counters.submit_s += time.perf_counter() - t0
        return pending

    def _gather(self, pending, T, D):
        from serve.cpu_host import from_wire
        rt = self.runtime
        y_TD = torch.zeros(T, D, dtype=rt.host_dtype)
        t0 = time.perf_counter()
        for h, rows, fut, shared in pending:
            out = rt.hosts[h].wait(fut, rt.cfg.timeout_s)
            if shared:  # compute_shared wrote the rows into the host's output buffer
                y_ND, secs = rt.hosts[h].buffers(len(rows), D, rt.host_dtype)[1][:len(rows)], out
            else:
                y_ND, secs = from_wire(out[0], rt.host_dtype), out[1]
            y_TD.index_add_(0, torch.from_numpy(rows), y_ND)
            rt.counters.host_compute_s += secs
            rt.last_host_s[h] = secs
        rt.counters.wait_s += time.perf_counter() - t0
        return y_TD

    def _local(self, x_TD, topk_ids_TK, topk_weights_TK, owner_E):
        if not self.local_ids:
            return None
        own_E = torch.as_tensor(owner_E, device=topk_ids_TK.device)
        ids = topk_ids_TK.clamp(min=0)
        here = (topk_ids_TK >= 0) & (own_E[ids] < 0) & (self.local_of_E[ids] >= 0)
        if not bool(here.any()):
            return None
        self.runtime.counters.local_pairs += int(here.sum())
        loc_TK = torch.where(here, self.local_of_E[ids], -1)
        return get_backend(self.backend)(x_TD, self.w13, self.w2, loc_TK, topk_weights_TK)

    def _owners(self, ids_np: np.ndarray) -> np.ndarray:
        """[E] who computes each expert in this call: -1 here (local or inner), h host h.

        dispatch='split' with an offload cache as the inner module: an expert resident in the
        cache is computed there; the step's misses are shared between PCIe copies into the cache
        and the hosts by the cache's cost model so that both finish together (the two are
        separate resources; offload/cost_model.py)."""
        rt = self.runtime
        owner_E = rt.host_of[self.layer].copy()
        cache = getattr(self.inner, "cache", None)
        if rt.cfg.dispatch != "split" or cache is None:
            return owner_E
        flat = ids_np[ids_np >= 0]
        experts, counts = np.unique(flat, return_counts=True)
        misses = []
        for e, n in zip(experts.tolist(), counts.tolist()):
            if owner_E[e] < 0:
                continue
            if cache.is_resident(self.layer, e):
                owner_E[e] = -1
            else:
                misses.append((e, n))
        if misses:
            to_copy, _, _ = self.inner.cost_model.split(misses, cache.store.expert_bytes, reuse=cache.reuse_estimate())
            owner_E[to_copy] = -1
        return owner_E

    # --- granularity='slice': every miss split over its ffn columns ---------------------------
    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        if rt.cfg.granularity == "slice":
            return self._forward_slices(x_TD, topk_ids_TK, topk_weights_TK)
        T, D = x_TD.shape
        E = self.num_experts
        ids_np = topk_ids_TK.detach().cpu().numpy().astype(np.int64)
        if ids_np.size and ids_np.max() >= E:
            raise ValueError(f"expert id {int(ids_np.max())} out of range for {E} experts")
        w_np = topk_weights_TK.detach().float().cpu().numpy()
        rt.counters.calls += 1
        x_cpu = [None]
        owner_E = self._owners(ids_np)
        pending = self._submit(x_TD, ids_np, w_np, x_cpu, owner_E)  # hosts start now
        t0 = time.perf_counter()
        y_TD = torch.zeros_like(x_TD)
        if self.inner is not None:
            # the inner module's experts: neither on a host nor local here (fixed for the call, so
            # the inner module, which may run collectives, is called exactly once)
            ids = topk_ids_TK.clamp(min=0)
            own_E = torch.as_tensor(owner_E, device=topk_ids_TK.device)
            inner_TK = torch.where((topk_ids_TK >= 0) & (own_E[ids] < 0) & (self.local_of_E[ids] < 0),
                                   topk_ids_TK, -1)
            rt.counters.inner_pairs += int((inner_TK >= 0).sum())
            y_TD = y_TD + self.inner(x_TD, inner_TK, topk_weights_TK)
        for attempt in range(rt.cfg.max_retries + 1):
            y_loc = self._local(x_TD, topk_ids_TK, topk_weights_TK, owner_E)
            rt.counters.local_s += time.perf_counter() - t0
            try:
                y_host = self._gather(pending, T, D)
                break
            except Exception as err:  # noqa: BLE001 - only HostDied is handled, the rest re-raised
                from serve.cpu_host import HostDied
                if not isinstance(err, HostDied) or attempt == rt.cfg.max_retries:
                    raise
                rt.counters.retries += 1
                rt.host_died(err.host_id)
                # recompute the whole host part and the local part (which may now hold the dead
                # host's experts); the failed attempt's partial sums are dropped. Experts this call
                # sent to hosts follow their new owner; the inner module's were done already
                owner_E = np.where(owner_E >= 0, rt.host_of[self.layer], owner_E)
                pending = self._submit(x_TD, ids_np, w_np, x_cpu, owner_E)
                t0 = time.perf_counter()
        if rt.share is not None and rt.share[1] > 1:
            import torch.distributed as dist
            dist.all_reduce(y_host, group=rt.share[2])
        if y_loc is not None:
            y_TD = y_TD + y_loc
        return y_TD + y_host.to(x_TD.device, x_TD.dtype)


def apply_cpu_tier(model: nn.Module, plan, hosts: list, config: TierRuntimeConfig | None = None,
                   checkpoint: str | None = None, host_dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> TierRuntime:
    """Put the plan's CPU-hosted experts on `hosts` and replace every block.experts by a
    TieredExperts; returns the TierRuntime (also `model.cpu_tier`).

    plan: placement.cpu_tier.TieredPlan (host h = its host index; every GPU-tier expert stays in
    this process, on the model's device — or, when block.experts is already the expert-parallel
    module of placement.runtime or offload's cached experts, in that module, wrapped as `inner`).
    device: where the local experts go (default: where the model's experts are).
    checkpoint: the model directory; hosts then read their experts from its memory map and a
    dead host's experts are re-read from it. Without it the hosts get the model's tensors.
    """
    cfg = config or TierRuntimeConfig()
    blocks = list(model.moe_blocks())
    if not blocks:
        raise ValueError("the model has no MoE blocks to tier")
    if any(isinstance(b.experts, TieredExperts) for b in blocks):
        raise ValueError("the model already has a CPU tier; apply_cpu_tier once")
    E = blocks[0].experts.num_experts
    plan.check_compatible(len(blocks), E)
    if plan.num_hosts != len(hosts):
        raise ValueError(f"the plan places experts on {plan.num_hosts} CPU hosts but {len(hosts)} were given; "
                         f"start {plan.num_hosts} hosts (serve.cpu_host_pool.start_hosts)")
    ref = blocks[0].experts
    ep_mode = hasattr(ref, "state") and hasattr(ref.state, "world")  # placement.runtime's rank module
    cache_mode = hasattr(ref, "cache") and hasattr(ref, "store")  # offload's cached experts
    if cfg.dispatch == "split" and not cache_mode:
        raise ValueError("dispatch='split' shares cache misses between copies and hosts: install offload's cache "
                         "first (offload.apply.install / apply_offload), then apply_cpu_tier")
    if cache_mode:
        store = ref.store
        if cfg.dispatch == "split" and getattr(store, "slices", 1) != 1:
            # the tier reads residency and weights per whole expert; units of a sliced store are not
            raise ValueError(f"dispatch='split' needs a cache of whole experts, the store has expert_slices="
                             f"{store.slices}; use expert_slices=1 (granularity='slice' splits misses itself)")
        if cfg.dispatch == "split" and hasattr(store, "packed"):
            # it copies column slices of each missed expert straight from host memory, which a packed expert is not
            raise ValueError("dispatch='split' copies column slices of bfloat16 experts from host memory; the cache's "
                             "experts are packed (pack_experts; 'auto', the default, packs bfloat16 experts of 10 MiB "
                             "or more on a GPU): offload with pack_experts=False (--offload-pack-experts off) to "
                             "split misses")
        dt = store.dtype
        dev = torch.device(device) if device is not None else torch.device(ref.cache.device)
        (J, D), I = store.w13_shape, store.w2_shape[1]
    else:
        p0 = next(iter(ref.parameters()))
        dt = p0.dtype
        dev = torch.device(device) if device is not None else p0.device
        J, D = ref.w13.shape[1:]
        I = ref.w2.shape[2]
    host_dtype = host_dtype or dt
    host_of = plan.host_table()
    layer_ids = [getattr(b, "layer_idx", i) for i, b in enumerate(blocks)]
    share = None
    if ep_mode:
        st = ref.state
        share = (st.rank, st.world, st.group)
        if checkpoint is None:
            raise ValueError("under the expert-parallel runtime the ranks do not hold the CPU tier's weights: "
                             "give checkpoint=<model directory> for the hosts to read them from")

    def weights(l: int, es: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if cache_mode:
            pairs = [store.get(l, e) for e in es]
            return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])
        ex = blocks[l].experts
        return ex.w13.detach()[es], ex.w2.detach()[es]

    if cfg.replicas > len(hosts):
        raise ValueError(f"replicas={cfg.replicas} needs at least as many CPU hosts, got {len(hosts)}")
    # fill the hosts: from the memory map, or from the model's tensors (layer by layer); with
    # replicas, host h also holds the experts of hosts h-1, ..., h-(replicas-1)
    for h, client in enumerate(hosts):
        mine = sorted({x for r in range(cfg.replicas) for x in plan.experts_on_host((h - r) % len(hosts))})
        if not mine:
            continue
        if checkpoint is not None:
            client.call("load_checkpoint", checkpoint, layer_ids, mine, timeout=cfg.timeout_s)
        else:
            for l in sorted({l for l, _ in mine}):
                es = [e for ll, e in mine if ll == l]
                w13, w2 = weights(l, es)
                wire = _weight_wire(client)
                client.call("add_experts", l, es, wire(w13.to(host_dtype)), wire(w2.to(host_dtype)),
                            timeout=cfg.timeout_s)
    source = None
    if cache_mode:
        source = store  # the offload store holds every expert already
    elif checkpoint is None and cfg.keep_source:
        # the CPU tier's weights stay where the model had them (no new copy) for re-homing
        source = HostExpertStore([(b.experts.w13.detach().to("cpu", host_dtype),
                                   b.experts.w2.detach().to("cpu", host_dtype)) for b in blocks])
    rt = TierRuntime(hosts, host_of, cfg, source, checkpoint, layer_ids, host_dtype, share)
    if cfg.granularity == "slice":  # the split is sized by the cache's cost model (install always makes one)
        rt.build_w2t(store, pin=dev.type == "cuda")
    for l, b in enumerate(blocks):
        ex = b.experts
        backend = getattr(ex, "backend", "torch")
        if ep_mode or cache_mode:
            # every expert not on a host is the inner module's; re-homed ones land in the own set
            w13 = torch.empty(0, J, D, dtype=dt, device=dev)
            w2 = torch.empty(0, D, I, dtype=dt, device=dev)
            b.experts = TieredExperts(l, E, rt, w13, w2, [], backend, inner=ex)
        else:
            ids = [e for e in range(E) if host_of[l, e] < 0]
            w13 = ex.w13.detach()[ids].to(dev).clone()
            w2 = ex.w2.detach()[ids].to(dev).clone()
            b.experts = TieredExperts(l, E, rt, w13, w2, ids, backend)
        rt.layers.append(b.experts)
    model.cpu_tier = rt
    return rt
