"""One decode step with ExFlow's token homes: attention of a row runs only where the row lives.

Shape legend: B = batch rows (one new token each), D = hidden size, K = experts per token,
V = vocabulary, n = rows on this rank, H/d = KV heads / head size, P = ranks.

runtime.py replicates the dense part on every rank and re-gathers each MoE layer's output.
This step does what ExFlow does in decoding instead. Every rank keeps the whole context (its
KV cache holds every row), but each row's hidden state lives on one *home* rank, the only one
that runs its attention, router and shared experts. Per MoE layer:

    home ──(one all-to-all: normed input, residual, expert ids, weights, destination)──► expert ranks
    expert ranks ──(partial sums; none for top-1 in context-coherent mode)──► destination

The destination is the origin (standard EP: every layer goes back, two all-to-alls) or the
rank carrying most of the row's routing weight (context-coherent: the row stays where its
expert ran). At the end of the step the rows' logits and, for every layer, the new token's
keys/values computed by its home at that layer are all-gathered, so every cache is whole
again (ExFlow's end-of-forward all-gather); the standard mode needs the keys/values only on
the origin, but gathers them too so that every rank can switch mode at any step.

Messages are rows of bytes (hidden states, ids, weights packed together), so one all-to-all
carries everything; each (source, destination) pair has B fixed slots (a row sends at most
one message to a rank), so no count exchange precedes it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import kernels

from .collectives import exchange_counts, gather_sizes
from .runtime import ExpertParallelExperts, TokenState


def _pack(*parts: torch.Tensor) -> torch.Tensor:
    """Rows of several tensors (any dtypes, same first dim) as one uint8 [n, bytes] tensor."""
    n = parts[0].shape[0]
    cols = []
    for p in parts:
        width = p.element_size()
        for s in p.shape[1:]:
            width *= s
        cols.append(p.contiguous().view(torch.uint8).reshape(n, width))
    return torch.cat(cols, 1)


def _unpack(buf: torch.Tensor, specs: list[tuple[torch.dtype, tuple]]) -> list[torch.Tensor]:
    n, out, off = buf.shape[0], [], 0
    for dtype, shape in specs:
        width = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            width *= s
        # a fresh, packed buffer: a slice at an odd offset or stride cannot be reinterpreted
        col = torch.empty((n, width), dtype=torch.uint8, device=buf.device).copy_(buf[:, off:off + width])
        out.append(col.view(dtype).reshape((n,) + shape))
        off += width
    return out


def _a2a_rows(buf: torch.Tensor, dest_N: torch.Tensor, P: int, group, cap: int = 0
              ) -> tuple[torch.Tensor, list[int]]:
    """Send row i of ``buf`` to rank dest_N[i]; returns (received rows by source rank, send counts).

    cap > 0: every (source, destination) pair exchanges exactly ``cap`` slots (a flag byte marks
    the used ones), so no count exchange precedes the data: one all-to-all, not two. Decoding
    knows a bound (each row sends at most one message to a rank), and at decode sizes the
    latency of a second collective costs more than the padding."""
    order = torch.argsort(dest_N, stable=True)
    send = torch.bincount(dest_N, minlength=P)
    if cap:
        assert int(send.max()) <= cap if len(dest_N) else True, "a rank sends at most `cap` rows to another"
        slot = torch.arange(len(dest_N), device=buf.device) - torch.cumsum(send, 0)[dest_N[order]] + send[dest_N[order]]
        padded = buf.new_zeros((P * cap, buf.shape[1] + 1))
        idx = dest_N[order] * cap + slot
        padded[idx, 1:] = buf[order]
        padded[idx, 0] = 1
        out = torch.empty_like(padded)
        dist.all_to_all_single(out, padded, group=group)
        return out[out[:, 0] == 1, 1:], send.tolist()
    recv = exchange_counts(send, group)
    out = buf.new_empty((int(recv.sum()), buf.shape[1]))
    dist.all_to_all_single(out, buf[order].contiguous(), output_split_sizes=recv.tolist(),
                           input_split_sizes=send.tolist(), group=group)
    return out, send.tolist()


def _gather_rows(buf: torch.Tensor, group) -> torch.Tensor:
    sizes = gather_sizes(buf.shape[0], buf.device, group)
    P = len(sizes)
    out = buf.new_empty((sum(sizes), buf.shape[1]))
    me = dist.get_rank(group)
    dist.all_to_all_single(out, buf.repeat(P, 1), output_split_sizes=sizes,
                           input_split_sizes=[buf.shape[0]] * P, group=group)
    assert out[sum(sizes[:me]):sum(sizes[:me + 1])].shape[0] == buf.shape[0]
    return out


class _KVRecorder:
    """Cache proxy: remembers the new keys/values each attention layer writes."""

    def __init__(self, cache):
        self.cache = cache
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer, k, v, num_slots):
        self.kv[layer] = (k, v)
        return self.cache.update(layer, k, v, num_slots)


def _moe_rows(layer, h_nD: torch.Tensor, rows_n: torch.Tensor, origin_n: torch.Tensor, st: TokenState,
              batch_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MoE half of one decoder layer for the rows homed here; returns the rows that end up
    here: (x_mD after the layer, their row ids, their origins)."""
    block, experts = layer.mlp, layer.mlp.experts
    assert isinstance(experts, ExpertParallelExperts)
    me, P, group = st.rank, st.world, st.group
    dev, D = h_nD.device, h_nD.shape[1]
    hn_nD = layer.post_attention_layernorm(h_nD)
    st.rows_N = rows_n  # names the rows of this call for a router keyed by row (trace_routing.py)
    try:
        ids_nK, w_nK, _ = block.router(hn_nD)
    finally:
        st.rows_N = None
    K = ids_nK.shape[1]
    home_n = torch.full_like(rows_n, me)
    r_nK = experts._slot_ranks(ids_nK, home_n)
    dest_n = experts._new_home(r_nK, w_nK, home_n) if st.mode == "coherent" else origin_n
    # one message per (row, distinct rank of its experts); the destination always gets one
    # (it needs the residual), even when none of the row's experts is there
    on_nP = torch.zeros(len(rows_n), P + 1, dtype=torch.bool, device=dev)
    on_nP.scatter_(1, torch.where(r_nK >= 0, r_nK, P), True)
    on_nP = on_nP[:, :P]
    on_nP[torch.arange(len(rows_n), device=dev), dest_n] = True
    msg_i, msg_r = on_nP.nonzero(as_tuple=True)
    buf = _pack(hn_nD[msg_i], h_nD[msg_i], ids_nK[msg_i].to(torch.int32), r_nK[msg_i].to(torch.int32),
                w_nK[msg_i].float(), torch.stack([rows_n[msg_i], dest_n[msg_i], origin_n[msg_i]], 1).to(torch.int64))
    got, sent = _a2a_rows(buf, msg_r, P, group, cap=batch_rows)
    st.counters["all_to_all_calls"] += 1
    st.counters["dispatch_rows"] += sum(sent) - sent[me]
    dt = h_nD.dtype
    hn, h, ids, rr, w, meta = _unpack(got, [(dt, (D,)), (dt, (D,)), (torch.int32, (K,)), (torch.int32, (K,)),
                                           (torch.float32, (K,)), (torch.int64, (3,))])
    row, dest, origin = meta[:, 0], meta[:, 1], meta[:, 2]
    ids_loc = torch.where(rr == me, experts.local_of_E[ids.long().clamp(min=0)], -1)
    y = kernels.get_backend(experts.backend)(hn, experts.w13, experts.w2, ids_loc, w.to(dt))
    # partial sums to the destinations (each source sent a row to the destination, so the
    # destination holds the row's residual; its own partial is added there)
    away = dest != me
    if st.mode == "standard" or K > 1:
        got2, sent2 = _a2a_rows(_pack(y[away], row[away][:, None]), dest[away], P, group, cap=batch_rows)
        st.counters["all_to_all_calls"] += 1
        st.counters["combine_rows"] += sum(sent2) - sent2[me]
        y2, row2 = _unpack(got2, [(dt, (D,)), (torch.int64, (1,))])
        row2 = row2[:, 0]
    else:  # top-1, context-coherent: the destination is the expert's rank: nothing moves back
        assert not bool(away.any())
        y2, row2 = y[:0], row[:0]
    here = ~away
    mine = row[here]  # rows now homed here (one message per row reaches its destination)
    pos = torch.full((int(row.max()) + 1 if len(row) else 1,), -1, dtype=torch.long, device=dev)
    pos[mine] = torch.arange(len(mine), device=dev)
    acc = y[here].index_add(0, pos[row2], y2) if len(row2) else y[here]
    if block.shared_experts is not None:
        shared = block.shared_experts(hn[here])
        if block.shared_expert_gate is not None:
            shared = torch.sigmoid(block.shared_expert_gate(hn[here])) * shared
        acc = acc + shared
    st.counters["layers"] += 1
    return h[here] + acc, mine, origin[here]


@torch.no_grad()
def decode_step(model, cache, ids_B1: torch.Tensor, st: TokenState) -> torch.Tensor:
    """Logits [B, 1, V] of one decode step (every rank returns the same), advancing ``cache``."""
    B = ids_B1.shape[0]
    me, P, group = st.rank, st.world, st.group
    dev = ids_B1.device
    pos_BT, mask, windowed, num_slots = model._positions_and_masks(B, 1, cache, None)
    x_BD = model.embed(ids_B1)[:, 0]
    cos, sin = model.rotary(pos_BT, x_BD.dtype)
    rows = torch.arange(B, device=dev)
    rows = rows[rows % P == me]  # each row starts on its origin, b mod P
    origin = rows % P
    x = x_BD[rows]
    rec = _KVRecorder(cache)
    homes: dict[int, torch.Tensor] = {}  # layer -> rows homed here during its attention
    full_D = x_BD.new_zeros(B, x_BD.shape[1])
    for layer in model.layers:
        m = windowed[layer.window] if layer.window else mask
        # attention of the whole batch shape (the cache writes every row's slot; rows homed
        # elsewhere carry stale values and are overwritten by the gather below)
        full = full_D.index_copy(0, rows, x)[:, None]
        a = layer.attn(layer.input_layernorm(full), cos, sin, m, rec, num_slots)[:, 0]
        homes[layer.layer_idx] = rows
        h = x + a[rows]
        if hasattr(layer.mlp, "router"):
            x, rows, origin = _moe_rows(layer, h, rows, origin, st, B)
        else:
            x = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = model.lm_head(model.norm(x)).float()
    # every rank gets every row's logits and the keys/values each home computed
    layers = sorted(rec.kv)
    parts = [logits, rows[:, None]]
    got = _gather_rows(_pack(*parts), group)
    V = logits.shape[1]
    lg, rw = _unpack(got, [(torch.float32, (V,)), (torch.int64, (1,))])
    out = logits.new_empty(B, V).index_copy(0, rw[:, 0], lg)
    for li in layers:
        k, v = rec.kv[li]
        r = homes[li]
        kk, vv = k[r], v[r]  # [n, H, 1, d]
        g = _gather_rows(_pack(kk, vv, r[:, None]), group)
        k2, v2, r2 = _unpack(g, [(kk.dtype, tuple(kk.shape[1:])), (vv.dtype, tuple(vv.shape[1:])), (torch.int64, (1,))])
        cache.update(li, k.new_empty(k.shape).index_copy(0, r2[:, 0], k2),
                     v.new_empty(v.shape).index_copy(0, r2[:, 0], v2), num_slots)
    st.counters["all_gather_calls"] += 1 + len(layers)
    cache.advance(None, 1)
    return out[:, None].to(model.dtype)
