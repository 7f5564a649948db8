"""The sub-expert split of the CPU tier (offload/tiered.py, dispatch='split', granularity='slice').

A missed expert's ffn columns [0, c) are copied (gate rows, up rows and rows of w2 transposed)
into a device staging buffer and computed there, while its host(s) compute [c, I); the two
partial outputs add (offload.cpu_compute: expert_mlp_slice is the plain reference, split_misses
chooses every c so that the copy engine and the hosts finish together). Two mixins keep this
path apart from the whole-expert tier: SliceBuffers for TierRuntime (the transposed w2, the
staging and pinned buffers, the rates learned from measured calls) and SliceSplit for
TieredExperts (the forward of one layer call).

Shape legend: T = tokens, D = hidden, K = experts per token, E = experts, I = expert ffn size,
C = columns of a slice, N = rows sent to one host.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from .cpu_compute import Miss, expert_mlp_slice, expert_mlp_slice_t, split_misses
from .store import ExpertStore


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on the device without a host wait (pinned, non_blocking)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class SliceBuffers:
    """TierRuntime's state and helpers for the slice split (mixed into TierRuntime)."""

    def learn(self, kind: str, measured_s: float, predicted_s: float, rate: float = 0.2) -> None:
        """Move scale[kind] toward measured / predicted (unscaled cost-model seconds); calls
        predicted under 0.1 ms are mostly fixed overhead and say little about the rate."""
        if not self.cfg.adapt or predicted_s < 1e-4 or measured_s <= 0:
            return
        ratio = min(max(measured_s / predicted_s, 0.25), 4.0)
        self.scale[kind] += rate * (ratio - self.scale[kind])

    def learn_copies(self) -> None:
        """The last slice copies' measured time (their events are done after the call's sync)."""
        probe, self._copy_probe = self._copy_probe, None
        if probe is not None and probe[1].query():
            self.learn("copy", probe[0].elapsed_time(probe[1]) / 1e3, probe[2])

    # --- granularity='slice' buffers ------------------------------------------------------------
    def build_w2t(self, store: ExpertStore, pin: bool) -> None:
        """w2 transposed, expert by expert: a slice of ffn columns is then D-contiguous rows, one
        plain async copy (a column slice of [D, I] would be gathered on the CPU first). Costs a
        third of the experts' bytes of host RAM more."""
        D, I = store.w2_shape
        for l in range(store.num_layers):
            t = torch.empty(store.num_experts, I, D, dtype=store.dtype, pin_memory=pin)
            for e in range(store.num_experts):
                t[e].copy_(store.get(l, e)[1].t())
            self.w2t.append(t)

    def staging(self, rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[>= rows, D] on the device, reused by every layer (grown, never shrunk). Reuse is safe:
        a layer's copies into it are queued after that layer's one host sync, which comes after
        the previous layer's reads of it (its output feeds this layer's router)."""
        st = self._stage
        if st is None or st.shape[0] < rows or st.device != device or st.dtype != dtype:
            self._stage = None  # free the old one first: it may be a few hundred MiB
            self._stage = st = torch.empty(rows, hidden, dtype=dtype, device=device)
        return st

    def to_host(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Queue t's copy into a pinned host buffer (non_blocking); valid after the caller syncs."""
        if t.device.type != "cuda":
            return t.detach().to(dtype)
        buf = self._pinned.get(name)
        if buf is None or buf.numel() < t.numel():
            buf = self._pinned[name] = torch.empty(max(t.numel(), 1024), dtype=dtype, pin_memory=True)
        out = buf[:t.numel()].view(t.shape)
        out.copy_(t.detach().to(dtype), non_blocking=True)
        return out


class SliceSplit:
    """TieredExperts' forward with misses split over the ffn dimension (mixed into TieredExperts)."""

    def _forward_slices(self, x_TD, topk_ids_TK, topk_weights_TK):
        """Hits and whole copies through the cache (inner); each split miss: columns [0, c) from
        the staging buffer on the device, [c, I) on its host; misses left whole on a host too.
        One host sync per call (ids, weights and x copied to pinned buffers together)."""
        from serve.cpu_host import HostDied
        rt, cache, layer = self.runtime, self.inner.cache, self.layer
        T, D = x_TD.shape
        E = self.num_experts
        ids_h = rt.to_host("ids", topk_ids_TK, torch.int64)
        w_h = rt.to_host("w", topk_weights_TK, torch.float32)
        x_h = rt.to_host("x", x_TD, rt.host_dtype)
        if x_TD.device.type == "cuda":
            torch.cuda.current_stream(x_TD.device).synchronize()  # the one sync: routing decides what moves
        ids_np, w_np = ids_h.numpy().copy(), w_h.numpy().copy()  # the pinned buffers are the next layer's
        if ids_np.size and ids_np.max() >= E:
            raise ValueError(f"expert id {int(ids_np.max())} out of range for {E} experts")
        c = rt.counters
        c.calls += 1
        rt.learn_copies()
        I = cache.store.w2_shape[1]
        cost = self.inner.cost_model
        owner_E = rt.host_of[layer]
        experts, counts = np.unique(ids_np[ids_np >= 0], return_counts=True)
        hs, cs = rt.scale["host"], rt.scale["copy"]
        # a miss's host part is divided evenly between the hosts holding it: the group works as one
        # host that is len(group) times faster
        group = {int(e): tuple(np.flatnonzero(rt.holds[layer, e]).tolist()) for e in experts}
        misses = [Miss(int(e), group[int(e)], hs * cost.cpu_s(int(n)) / len(group[int(e)]))
                  for e, n in zip(experts, counts) if owner_E[e] >= 0 and group[int(e)]
                  and not cache.is_resident(layer, int(e))]
        copy_s = cost.copy_s(cache.store.expert_bytes)
        # slots still empty (a cold cache) cost no eviction: fill them with whole copies, the misses
        # of most tokens first; the rest is split behind those copies
        free = cache.slots - len(cache.resident(layer))
        misses.sort(key=lambda m: (-m.host_s, m.expert))
        fill, misses = misses[:max(free, 0)], misses[max(free, 0):]
        sp = split_misses(misses, cs * copy_s, I, rt.cfg.align, copy_backlog_s=len(fill) * cs * copy_s)
        sp.copy_cols.update({m.expert: I for m in fill})
        c.model_copy_s += sp.copy_s
        c.model_host_s += sum(sp.host_s.values())
        c.model_floor_s += sp.makespan_s
        cols_E = np.full(E, I, dtype=np.int64)  # ffn columns [0, cols) computed on the device
        for e, col in sp.copy_cols.items():
            cols_E[e] = col
        pending = self._submit_cols(ids_np, w_np, x_h, self._host_ranges(experts, cols_E, I))  # hosts start first
        part = [(e, col) for e, col in sorted(sp.copy_cols.items()) if 0 < col < I]
        staged = None
        if part:  # then the slices' copies
            staged = self._stage_slices(part, I, D, x_TD.device, sum(col for _, col in part) / I * copy_s)
        on_host = [e for e, col in sp.copy_cols.items() if col < I]
        if on_host:
            cache.count_cpu(layer, on_host)  # misses the cache did not copy (its hit ratio stays honest)
        dev_NK = np.where((ids_np >= 0) & (cols_E[ids_np.clip(0)] == I), ids_np, -1)
        c.inner_pairs += int((dev_NK >= 0).sum())
        t0 = time.perf_counter()
        y_TD = self.inner(x_TD, _to_device(dev_NK, x_TD.device), topk_weights_TK)  # hits and whole copies
        if staged is not None:
            y_TD = y_TD + self._staged_part(x_TD, topk_weights_TK, ids_np, part, staged)
        c.local_s += time.perf_counter() - t0  # queueing the device's part (the inner module syncs once)
        for attempt in range(rt.cfg.max_retries + 1):
            try:
                y_host = self._gather(pending, T, D)
                break
            except HostDied as err:
                if attempt == rt.cfg.max_retries:
                    raise
                rt.counters.retries += 1
                rt.host_died(err.host_id)
                # the failed attempt's partial sums are dropped; every host part is recomputed by
                # its (new) owner, or on this device when it was re-homed here
                pending = self._submit_cols(ids_np, w_np, x_h, self._host_ranges(experts, cols_E, I))
        if attempt == 0:  # a retried call's times say nothing about the rate
            for g, pred in sp.host_s.items():
                rt.learn("host", max(rt.last_host_s.get(h, 0.0) for h in g), pred / hs)
        y_TD = y_TD + y_host.to(x_TD.device, x_TD.dtype)
        here = [int(e) for e in experts if cols_E[e] < I and not rt.holds[layer, e].any()]
        if here:  # re-homed into this device mid-call: their host part from the local copies
            y_TD = y_TD + self._local_cols(x_TD, topk_weights_TK, ids_np, here, cols_E, I)
        return y_TD

    def _host_ranges(self, experts, cols_E, I) -> dict:
        """{host: {expert: (a, b)}}: the ffn columns each live holder computes of each expert whose
        host part [cols, I) is not empty, the part divided between the holders in `align` steps."""
        rt = self.runtime
        out: dict[int, dict[int, tuple[int, int]]] = {}
        for e in experts:
            c = int(cols_E[e])
            hs = np.flatnonzero(rt.holds[self.layer, e]).tolist()
            if c >= I or not hs:
                continue
            k, al = len(hs), rt.cfg.align
            cuts = [c + int(round(j * (I - c) / k / al)) * al for j in range(k)] + [I]
            for h, a, b in zip(hs, cuts, cuts[1:]):
                if a < b:
                    out.setdefault(h, {})[int(e)] = (a, b)
        return out

    def _submit_cols(self, ids_np, w_np, x_h, ranges):
        """Each host: the rows of its tokens whose experts it computes columns [a, b) of."""
        from serve.cpu_host import HostDied, to_wire
        rt = self.runtime
        t0 = time.perf_counter()
        pending = []
        for h, part in sorted(ranges.items()):
            es = np.array(sorted(part), dtype=np.int64)
            sel_TK = (ids_np >= 0) & np.isin(ids_np, es)
            rows = np.flatnonzero(sel_TK.any(1))
            ids_NK = np.where(sel_TK[rows], ids_np[rows], -1)
            cols = np.array([[e, *part[int(e)]] for e in es], dtype=np.int64)
            client = rt.hosts[h]
            if client.shares_memory:
                try:
                    xb, yb = client.buffers(len(rows), x_h.shape[1], rt.host_dtype)
                    torch.index_select(x_h, 0, torch.from_numpy(rows), out=xb[:len(rows)])
                except HostDied:
                    pass  # the host is marked dead: the submit below fails, and its wait re-homes
                fut = client.submit("compute_shared", self.layer, len(rows), ids_NK, w_np[rows], cols)
            else:
                xb = to_wire(x_h[torch.from_numpy(rows)])
                fut = client.submit("compute", self.layer, xb, ids_NK, w_np[rows], cols)
            pending.append((h, rows, fut, client.shares_memory))
            c = rt.counters
            c.host_pairs[h] = c.host_pairs.get(h, 0) + int(sel_TK[rows].sum())
            c.host_rows += len(rows)
            c.host_expert_calls += len(np.unique(ids_NK[ids_NK >= 0]))
            c.host_bytes += len(rows) * x_h.shape[1] * x_h.element_size()
        rt.counters.submit_s += time.perf_counter() - t0
        return pending

    def _stage_slices(self, part, I, D, device, predicted_s):
        """Queue the copies of each split expert's columns [0, c) (gate rows, up rows, w2^T rows:
        three contiguous pinned copies each) into the staging buffer, on the cache's copy stream."""
        rt, cache = self.runtime, self.inner.cache
        store = cache.store
        buf = rt.staging(3 * sum(col for _, col in part), D, store.dtype, device)
        stream = cache.copy_stream
        offs, r = [], 0
        timed = stream is not None and rt.cfg.adapt
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            if timed:
                start = torch.cuda.Event(enable_timing=True)
                start.record(stream)
            for e, col in part:
                w13_JD = store.get(self.layer, e)[0]
                w2t_ID = rt.w2t[self.layer][e]
                nb = w13_JD.is_pinned()
                buf[r:r + col].copy_(w13_JD[:col], non_blocking=nb)
                buf[r + col:r + 2 * col].copy_(w13_JD[I:I + col], non_blocking=nb)
                buf[r + 2 * col:r + 3 * col].copy_(w2t_ID[:col], non_blocking=w2t_ID.is_pinned())
                offs.append(r)
                r += 3 * col
            done = None
            if stream is not None:
                done = torch.cuda.Event(enable_timing=timed)
                done.record(stream)
                if timed:
                    rt._copy_probe = (start, done, predicted_s)
        rt.counters.split_experts += len(part)
        rt.counters.slice_bytes += r * D * buf.element_size()
        return buf, offs, done

    def _staged_part(self, x_TD, w_TK, ids_np, part, staged):
        """Σ over the split experts' tokens of w · (their columns [0, c) from the staging buffer)."""
        buf, offs, done = staged
        if done is not None:
            torch.cuda.current_stream(x_TD.device).wait_event(done)  # the device waits, not the host
        K = ids_np.shape[1]
        flat = ids_np.reshape(-1)
        pos_of = [np.flatnonzero(flat == e) for e, _ in part]
        pos_all = _to_device(np.concatenate(pos_of), x_TD.device)
        w_flat = w_TK.reshape(-1)
        y_TD = torch.zeros_like(x_TD)
        s = 0
        for (e, col), r, p in zip(part, offs, pos_of):
            pos = pos_all[s:s + len(p)]
            s += len(p)
            tok = pos // K
            out = expert_mlp_slice_t(x_TD[tok].to(buf.dtype), buf[r:r + col], buf[r + col:r + 2 * col],
                                     buf[r + 2 * col:r + 3 * col])
            y_TD.index_add_(0, tok, (out * w_flat[pos, None].to(out.dtype)).to(y_TD.dtype))
        return y_TD

    def _local_cols(self, x_TD, w_TK, ids_np, experts, cols_E, I):
        """Columns [cols, I) of experts re-homed into this device (their local copies)."""
        K = ids_np.shape[1]
        flat = ids_np.reshape(-1)
        w_flat = w_TK.reshape(-1)
        y_TD = torch.zeros_like(x_TD)
        for e in experts:
            pos = _to_device(np.flatnonzero(flat == e), x_TD.device)
            tok = pos // K
            loc = int(self.local_of_E[e])
            out = expert_mlp_slice(x_TD[tok].to(self.w13.dtype), self.w13[loc], self.w2[loc], int(cols_E[e]), I)
            y_TD.index_add_(0, tok, (out * w_flat[pos, None].to(out.dtype)).to(y_TD.dtype))
        return y_TD
