"""ExpertCache: a fixed pool of preallocated expert slots per MoE layer on the device.

    cache.observe(layer, ids_NK)          the step's routing at this layer (policies count it)
    cache.ensure(layer, experts) -> slots the experts are in these slots; on CUDA the compute
                                          stream is made to wait for their copies (events), the
                                          host never blocks on a hit
    cache.prefetch(layer, experts)        start copies on the side stream; never blocks
    cache.release(layer, slots)           the compute stream's last use of the slots (an event
                                          that a later copy into them waits on)
    cache.stats() -> dict

Slot pools per layer: w13 [S, 2I, D] and w2 [S, D, I]. Copies come from an ExpertStore (pinned
host memory or disk) and run on one side CUDA stream, so prefetches and demand copies share the
copy engine in issue order. From a packed store (PackedHostExpertStore, 12 bits a weight) a copy
lands in one of STAGES staging buffers and is decoded into the slot on a second stream, so the copy
engine never waits for a decode. On a CPU "device" the
pool is a CPU tensor and copies are synchronous: the same code path, so tests exercise it.

Shape legend: S = slots per layer, J = 2*I, D = hidden, I = expert ffn size, N = tokens, K = top-k.
"""
from __future__ import annotations

import numpy as np
import torch

from kernels.unpack import Unpacker, kernel_runs_on, unpack_bf16_reference

from .policies import Policy
from .store import ExpertStore


STAGES = 2  # staging buffers of the packed copy path: a copy lands in one while the previous one decodes

# the current stream's raw handle in one C call (what Triton's launcher reads); absent from CPU-only builds
_raw_current_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def prefetch_phrase(c: dict) -> str:
    """What describe() says of prefetching, from stats(): how many experts were prefetched, how many of them were
    used, and how much of what was not cached they brought ahead of time ('' when nothing was prefetched)."""
    if not c.get("prefetches"):
        return ""
    return (f", {c['prefetches']} of them prefetched ({100 * c['prefetch_precision']:.0f}% used; they brought "
            f"{100 * c['prefetch_recall']:.0f}% of the uncached uses ahead of time)")


class ExpertCache:
    def __init__(self, store: ExpertStore, slots_per_layer: int, policy: Policy, device: str | torch.device = "cpu"):
        if slots_per_layer < 1:
            raise ValueError(f"slots_per_layer must be >= 1, got {slots_per_layer}")
        self.store, self.policy = store, policy
        self.device = torch.device(device)
        self.num_layers, self.num_experts = store.num_layers, store.num_experts
        self.slots = min(slots_per_layer, store.num_experts)
        L, S = self.num_layers, self.slots
        self.pool_w13 = [torch.empty((S, *store.w13_shape), dtype=store.dtype, device=self.device) for _ in range(L)]
        self.pool_w2 = [torch.empty((S, *store.w2_shape), dtype=store.dtype, device=self.device) for _ in range(L)]
        self.expert_in = [[-1] * S for _ in range(L)]        # slot -> expert
        self.slot_of: list[dict[int, int]] = [{} for _ in range(L)]  # expert -> slot
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._streams: dict[tuple[int, int], torch.cuda.Stream] = {}  # (device, raw handle) -> its Stream object
        self._ready = [[None] * S for _ in range(L)]  # event: copy into the slot done
        self._waited = [[None] * S for _ in range(L)]  # the stream (id) that has waited for that event
        self._free = [[None] * S for _ in range(L)]   # event: compute's last read of the slot done
        self._locked: list[set[int]] = [set() for _ in range(L)]   # experts in use by the current call
        self._unused_prefetch: list[set[int]] = [set() for _ in range(L)]
        self.step = [-1] * L
        self._copied_this_step = [False] * L
        self.clock = 0
        self._request: list[set[int]] = [set() for _ in range(L)]  # experts of the ensure call in progress
        # device copy of slot_of per layer: one buffer for good (graph pieces read it at a fixed address),
        # rewritten in place when the layer's residents changed (_table_stale)
        self._slot_table = [torch.full((self.num_experts + 1,), -1, dtype=torch.long, device=self.device)
                            for _ in range(L)]
        self._table_stale = [False] * L
        self._last_copy = [None] * L  # event of the last copy into the layer (copies are in issue order)
        self._pending = [set() for _ in range(L)]  # slots whose copy has not been seen landed (in_flight)
        self.changes = [0] * L  # per layer: how many times its residents changed (a load or a clear)
        # a packed store (PackedHostExpertStore): copies land in a ring of STAGES staging buffers on the copy
        # stream and are decoded from there into the slot on a second stream (the decode stream), so the copy
        # engine fills the next stage while one decodes; a copy into a stage waits for that stage's last
        # decode. (The Triton decode on a GPU, and under the interpreter on the CPU so that CPU tests run this
        # path; else the torch reference straight from the host buffer.)
        self._packed = getattr(store, "packed", None)
        self._unpack = None
        self.decode_stream = None
        if self._packed is not None and kernel_runs_on(self.device):
            stages = [torch.empty(store.max_packed_bytes, dtype=torch.uint8, device=self.device)
                      for _ in range(STAGES if self.cuda else 1)]
            self._unpack = Unpacker(stages, {(layer, s): (self.pool_w13[layer][s], self.pool_w2[layer][s])
                                             for layer in range(L) for s in range(S)})
            self.decode_stream = torch.cuda.Stream(self.device) if self.cuda else None
            self._stage_free = [None] * len(stages)  # event: the stage's last decode done
            self._next_stage = 0
        policy.bind(L, self.num_experts)
        self.reset_stats()

    # --- bookkeeping ------------------------------------------------------------------------
    def reset_stats(self) -> None:
        for unused in getattr(self, "_unused_prefetch", []):
            unused.clear()  # earlier prefetches count as plain residents from here on
        self.counters = dict(hits=0, misses=0, prefetches=0, useful_prefetches=0, bytes_copied=0,
                             copies=0, cpu_computed=0, evictions=0)

    def reuse_estimate(self) -> float:
        """Share of accesses that found their expert resident (since the last reset): how likely
        a copied expert is to be used again while it stays."""
        acc = self.counters["hits"] + self.counters["misses"]
        return self.counters["hits"] / acc if acc else 0.0

    def stats(self) -> dict:
        c = dict(self.counters)
        acc = c["hits"] + c["misses"]
        c["hit_ratio"] = c["hits"] / acc if acc else 0.0
        c["prefetch_precision"] = c["useful_prefetches"] / c["prefetches"] if c["prefetches"] else 0.0
        # of the accesses that were not already resident on their own, the share prefetch covered
        need = c["useful_prefetches"] + c["misses"]
        c["prefetch_recall"] = c["useful_prefetches"] / need if need else 0.0
        return c

    def describe(self) -> str:
        """One line for a user: the slots, how the experts travel, and what the counters say so far."""
        c = self.stats()
        how = "packed to 12 bits a weight" if self._packed is not None else f"{str(self.store.dtype)[6:]}"
        acc = c["hits"] + c["misses"]
        return (f"offload: {self.slots} of {self.num_experts} experts per layer on {self.device.type}, copied "
                f"{how}; {acc} expert uses, {100 * c['hit_ratio']:.1f}% hits, {c['copies']} copies "
                f"({c['bytes_copied'] / 1e6:.1f} MB)" + prefetch_phrase(c)
                + (f", {c['cpu_computed']} computed on the CPU" if c["cpu_computed"] else ""))

    def resident(self, layer: int) -> list[int]:
        return [e for e in self.expert_in[layer] if e >= 0]

    def is_resident(self, layer: int, expert: int) -> bool:
        return expert in self.slot_of[layer]

    def slot_table(self, layer: int, exclude: set[int] | frozenset = frozenset()) -> torch.Tensor:
        """int64 [num_experts + 1] on the device: the slot of each resident expert, -1 elsewhere (the
        last entry is -1, so an id of -1 maps to -1). ``table[ids]`` turns routing ids into slot ids
        without a host round trip; re-sent only after the layer's residents changed. ``exclude``:
        residents written as -1 too (experts whose copies are still running); the next call then
        sends the whole table again."""
        t = self._slot_table[layer]
        if self._table_stale[layer] or exclude:
            lut = np.full(self.num_experts + 1, -1, dtype=np.int64)
            for e, s in self.slot_of[layer].items():
                if e not in exclude:
                    lut[e] = s
            src = torch.from_numpy(lut)
            # from pinned memory, on the current stream: asynchronous, ordered before what reads the table,
            # and the host buffer is kept until the copy is done
            t.copy_(src.pin_memory() if self.cuda else src, non_blocking=self.cuda)
            self._table_stale[layer] = bool(exclude)
        return t

    def in_flight(self, layer: int) -> set[int]:
        """The layer's resident experts whose copies have not landed yet (asks the events; never
        blocks). Always empty on a CPU device, where copies are synchronous."""
        pending = self._pending[layer]
        if not pending:
            return set()
        out = set()
        for s in list(pending):
            ev = self._ready[layer][s]
            if ev is None or ev.query():
                pending.discard(s)
            elif self.expert_in[layer][s] >= 0:
                out.add(self.expert_in[layer][s])
        return out

    def slot_table_buffer(self, layer: int) -> torch.Tensor:
        """The layer's slot table as it stands (no refresh): for code that is being captured into a
        CUDA graph, where a refresh would be recorded too; call slot_table() before, outside it."""
        return self._slot_table[layer]

    def await_copies(self, layer: int) -> None:
        """Make the current stream wait for every copy issued so far into the layer's slots (one event:
        the copy stream runs them in issue order). Before a kernel that reads the slots through the
        slot table without ensure(), e.g. inside a CUDA-graph piece (moe.cuda_graph)."""
        ev = self._last_copy[layer]
        if self.cuda and ev is not None:
            self.current_stream().wait_event(ev)

    def current_stream(self) -> torch.cuda.Stream:
        """The device's current stream. torch.cuda.current_stream() builds a new Stream object at every call
        (7-9 us of host time on the H200 machine, run s24-l, against ~1 for the raw handle); an offloaded
        layer asks several times (its waits, its release, each copy), so the object of each stream seen is
        kept, keyed by its handle."""
        if _raw_current_stream is None:
            return torch.cuda.current_stream(self.device)
        idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
        key = (idx, _raw_current_stream(idx))
        s = self._streams.get(key)
        if s is None:
            s = self._streams[key] = torch.cuda.current_stream(idx)
        return s

    def pool(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool_w13[layer], self.pool_w2[layer]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool_w13 + self.pool_w2)

    # --- the step protocol -------------------------------------------------------------------
    def observe(self, layer: int, ids_NK) -> None:
        """The routing of the current step at `layer`, before any ensure of that step."""
        self.step[layer] += 1
        self._copied_this_step[layer] = False
        self.policy.observe(layer, self.step[layer], np.asarray(ids_NK))

    def count_cpu(self, layer: int, experts: list[int]) -> None:
        """Misses served by computing on the CPU (no slot involved)."""
        self.counters["misses"] += len(experts)
        self.counters["cpu_computed"] += len(experts)

    def ensure(self, layer: int, experts: list[int], wait: bool = True) -> list[int]:
        """Slots holding `experts` (copied in if needed); the compute stream waits for the copies.

        wait=False: only reserve the slots and queue the copies; call `wait(layer, slots)` right
        before the kernel that reads them (so earlier kernels need not wait for these copies).
        """
        if len(experts) > self.slots:
            raise ValueError(f"ensure({layer}, {len(experts)} experts) exceeds the {self.slots} slots of the layer; "
                             "ask in rounds of at most `cache.slots` experts")
        locked = self._locked[layer]
        locked.update(experts)
        self._request[layer] = set(experts)
        slots = []
        for e in experts:
            s = self.slot_of[layer].get(e)
            if s is not None:
                self.counters["hits"] += 1
                if e in self._unused_prefetch[layer]:
                    self._unused_prefetch[layer].discard(e)
                    self.counters["useful_prefetches"] += 1
            else:
                self.counters["misses"] += 1
                s = self._load(layer, e, avoid=self._request[layer])
            self.clock += 1
            self.policy.touch(layer, e, self.clock)
            slots.append(s)
        if wait:
            self.wait(layer, slots)
        return slots

    def wait(self, layer: int, slots: list[int]) -> None:
        """Make the compute stream wait for the copies into these slots (the host goes on).

        A stream that already waited for a slot's copy is ordered after it for good, so it does
        not wait again (a warm cache's hits then cost no wait call at all)."""
        if self.cuda:
            cur = self.current_stream()
            sid = cur.cuda_stream
            waited = self._waited[layer]
            for s in slots:
                ev = self._ready[layer][s]
                if ev is not None and waited[s] != sid:
                    cur.wait_event(ev)
                    waited[s] = sid

    def release(self, layer: int, slots: list[int], last: bool = True) -> None:
        """Mark the end of the compute stream's use of these slots (call after launching the kernel).

        Within one step the experts of earlier rounds stay locked (`last=False`) so that a later
        round prefers other victims; `last=True` ends the step's locks.
        """
        if self.cuda and slots:
            ev = torch.cuda.Event()  # one event marks the end of every listed slot's use
            ev.record(self.current_stream())
            for s in slots:
                self._free[layer][s] = ev
        self._request[layer] = set()
        if last:
            self._locked[layer].clear()

    def prefetch(self, layer: int, experts: list[int]) -> int:
        """Start copying the experts not yet resident; returns how many copies were issued."""
        issued = 0
        avoid = set(experts)  # never evict one of the experts being prefetched together
        for e in experts:
            if e in self.slot_of[layer]:
                continue
            if self._pick_slot(layer, avoid) is None:
                break  # every slot is in use right now
            self._load(layer, e, avoid)
            self._unused_prefetch[layer].add(e)
            self.counters["prefetches"] += 1
            issued += 1
        return issued

    # --- slots and copies --------------------------------------------------------------------
    def _pick_slot(self, layer: int, avoid: set[int]) -> int | None:
        ex = self.expert_in[layer]
        for s, e in enumerate(ex):
            if e < 0:
                return s
        candidates = [e for e in ex if e not in self._locked[layer] and e not in avoid]
        if not candidates:  # a step needing more experts than slots: reuse those of its earlier rounds
            candidates = [e for e in ex if e not in self._request[layer] and e not in avoid]
        if not candidates:
            return None
        return self.slot_of[layer][self.policy.victim(layer, candidates, self.step[layer])]

    def _load(self, layer: int, expert: int, avoid: set[int]) -> int:
        s = self._pick_slot(layer, avoid)
        if s is None:
            raise RuntimeError(f"no evictable slot in layer {layer} (all {self.slots} in use)")
        old = self.expert_in[layer][s]
        if old >= 0:
            del self.slot_of[layer][old]
            self._unused_prefetch[layer].discard(old)
            self.policy.evicted(layer, old)
            self.counters["evictions"] += 1
        self.expert_in[layer][s] = expert
        self.slot_of[layer][expert] = s
        self._table_stale[layer] = True
        self.changes[layer] += 1
        self._copy_in(layer, expert, s)
        self.counters["copies"] += 1
        self.counters["bytes_copied"] += self.store.copy_nbytes(layer, expert)
        self._copied_this_step[layer] = True
        return s

    def _copy_in(self, layer: int, expert: int, s: int) -> None:
        if self._packed is not None:
            buf, base, n_esc = self._packed(layer, expert)
        else:
            w13, w2 = self.store.get(layer, expert)
        if not self.cuda:
            d13, d2 = self.pool_w13[layer][s], self.pool_w2[layer][s]
            if self._unpack is not None:  # the kernel, interpreted
                self._unpack((layer, s), buf, base, n_esc)
            elif self._packed is not None:
                unpack_bf16_reference(buf, base, n_esc, d13, d2)
            else:
                d13.copy_(w13)
                d2.copy_(w2)
            return
        if self.copy_stream.device_index != torch.cuda.current_device():
            with torch.cuda.device(self.copy_stream.device):  # set_stream would leave the current device changed
                return self._copy_in(layer, expert, s)
        prev = self.current_stream()
        try:  # set_stream, not torch.cuda.stream(): a tenth of its host time (~1 us against ~9, run s23-e)
            if self._packed is not None:
                ev = self._copy_packed(layer, s, buf, base, n_esc)
            else:
                torch.cuda.set_stream(self.copy_stream)
                d13, d2 = self.pool_w13[layer][s], self.pool_w2[layer][s]  # (packed: the Unpacker's views)
                if self._free[layer][s] is not None:
                    self.copy_stream.wait_event(self._free[layer][s])  # do not overwrite a slot still being read
                pinned = w13.is_pinned()
                d13.copy_(w13, non_blocking=pinned)
                d2.copy_(w2, non_blocking=pinned)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
        finally:
            torch.cuda.set_stream(prev)
        self._ready[layer][s] = ev
        self._waited[layer][s] = None
        self._last_copy[layer] = ev
        self._pending[layer].add(s)

    def _copy_packed(self, layer: int, s: int, buf: torch.Tensor, base: int, n_esc: int) -> torch.cuda.Event:
        """Copy stream: the packed buffer into the next stage (after that stage's last decode). Decode
        stream: after that copy and after the compute's last read of slot s, decode into the slot. Returns
        the decode's event (the decode stream runs in issue order, so the layer's last such event covers
        all of its earlier copies too)."""
        r = self._next_stage
        self._next_stage = (r + 1) % len(self._unpack.stages)
        torch.cuda.set_stream(self.copy_stream)  # (the caller restores the current stream)
        if self._stage_free[r] is not None:
            self.copy_stream.wait_event(self._stage_free[r])
        self._unpack.load(r, buf)
        landed = torch.cuda.Event()
        landed.record(self.copy_stream)
        torch.cuda.set_stream(self.decode_stream)
        self.decode_stream.wait_event(landed)
        if self._free[layer][s] is not None:
            self.decode_stream.wait_event(self._free[layer][s])  # do not overwrite a slot still being read
        self._unpack.decode(r, (layer, s), base, n_esc)
        ev = torch.cuda.Event()
        ev.record(self.decode_stream)
        self._stage_free[r] = ev
        return ev

    def _streams_idle(self) -> bool:
        return self.copy_stream.query() and (self.decode_stream is None or self.decode_stream.query())

    def clear(self) -> None:
        """Forget every resident expert (counters kept): the 'no cache' baseline calls it each step."""
        for layer in range(self.num_layers):
            for e in self.resident(layer):
                self.policy.evicted(layer, e)
            self.expert_in[layer] = [-1] * self.slots
            self.slot_of[layer].clear()
            self._table_stale[layer] = True
            self.changes[layer] += 1
            self._unused_prefetch[layer].clear()

    def copies_in_flight(self, layer: int) -> bool:
        """Whether copies are still queued or running on the copy engine (never blocks).

        On the CPU copies are synchronous, so this is whether `layer`'s current step copied
        anything (the simulator's time model says the same: the engine is then still busy).
        """
        if self.cuda:
            return not self._streams_idle()
        return self._copied_this_step[layer]

    def pending_copies(self) -> bool:
        """True while a copy on the side stream has not finished (never blocks)."""
        return self.cuda and not self._streams_idle()
