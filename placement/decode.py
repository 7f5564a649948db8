"""One decode step with ExFlow's token homes: attention of a row runs only where the row lives.

Shape legend: B = batch rows (one new token each), D = hidden size, K = experts per token,
V = vocabulary, P = ranks, W = bytes (or values) of one packed row, H/d = KV heads / head size.

runtime.py replicates the dense part on every rank and re-gathers each MoE layer's output.
This step does what ExFlow does in decoding instead. Every rank keeps the whole context (its
KV cache holds every row), but each row's hidden state lives on one *home* rank, the one whose
attention, router and shared experts count for it. Per MoE layer:

    home ──(one all-to-all: normed input, residual, expert ids, weights, destination)──► expert ranks
    expert ranks ──(partial sums; none for top-1 in context-coherent mode)──► destination

The destination is the origin (standard EP: every layer goes back, two all-to-alls) or the
rank carrying most of the row's routing weight (context-coherent: the row stays where its
expert ran). At the end of the step the rows' logits and, for every layer, the new token's
keys/values computed by its home at that layer are summed over the ranks in ONE all-reduce
(every rank contributes its home rows, zeros elsewhere), so every cache is whole again
(ExFlow's end-of-forward all-gather); the standard mode needs the keys/values only on the
origin, but gathers them too so that every rank can switch mode at any step.

Host syncs. Only a row's home knows where the row goes next (home-only routing), so the
receivers cannot know how many rows arrive, and a count exchange or a compaction by a boolean
index would each make the host wait for the GPU. Instead every rank works on all B rows of the
batch at fixed shapes, with a mask ``home_B`` of the rows it owns: rows owned elsewhere carry
stale (finite) values that are never read. Decoding is memory bound on the weights, so running
attention, router, shared experts and head on B rows instead of the owned ones costs little
next to a sync. Slot b of every (source, destination) pair of an all-to-all belongs to row b
(a row sends at most one message to a rank, and only its home sends it); a flag byte marks the
used slots. The expert kernel sees the B rows, rows without a local expert as id -1 (they
contribute zero). So this module syncs once per step (the traffic counters, summed on the
device, read in one ``.tolist()``) and never per layer; what remains elsewhere: the KV cache's
room check and slot count (moe/kv_cache.py, once per step each) and the "torch" expert
backend's loop over used experts (one sync per MoE layer plus one per used expert; the
"triton" backend has none).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import kernels

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
        width = dtype.itemsize
        for s in shape:
            width *= s
        # a fresh, packed buffer: a slice at an odd offset or stride cannot be reinterpreted
        col = torch.empty((n, width), dtype=torch.uint8, device=buf.device).copy_(buf[:, off:off + width])
        out.append(col.view(dtype).reshape((n,) + shape))
        off += width
    return out


def _a2a_slots(send_PBW: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of fixed slots: ``send_PBW[p]`` goes to rank p; returns [P, B, W] by source."""
    send_PBW = send_PBW.contiguous()
    # contiguous both: empty_like would copy the strides of a transposed mask's broadcast, and
    # the collective writes raw memory in row-major order
    out = torch.empty(send_PBW.shape, dtype=send_PBW.dtype, device=send_PBW.device)
    dist.all_to_all_single(out, send_PBW, group=group)
    return out


def _send_home_rows(buf_BW: torch.Tensor, to_BP: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Send row b of ``buf_BW`` to every rank p with ``to_BP[b, p]``; returns (the rows received,
    slot b holding row b's message or zeros, [B, W]; whether row b's message came, [B]).

    Every row is sent by one rank only (its home), so slot b is used by at most one source and
    the received rows merge into B slots without compaction (no host sync)."""
    B = buf_BW.shape[0]
    flag_PB = to_BP.T
    send = torch.cat([flag_PB[..., None].to(torch.uint8),
                      torch.where(flag_PB[..., None], buf_BW[None], 0)], 2)  # [P, B, 1 + W]
    recv = _a2a_slots(send, group)
    got_PB = recv[:, :, 0] != 0
    src_B = got_PB.to(torch.int32).argmax(0)  # the one source of row b (0, all zeros, if none)
    return recv[src_B, torch.arange(B, device=buf_BW.device), 1:], got_PB.any(0)


class _KVRecorder:
    """Cache proxy: remembers the new keys/values each attention layer writes."""

    def __init__(self, cache):
        self.cache = cache
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer, k, v, num_slots):
        self.kv[layer] = (k, v)
        return self.cache.update(layer, k, v, num_slots)


def _moe_rows(layer, h_BD: torch.Tensor, home_B: torch.Tensor, origin_B: torch.Tensor, st: TokenState,
              moved_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE half of one decoder layer for the rows homed here (``home_B``).

    Returns (x_BD after the layer, the rows homed here now [B]); x_BD is meaningful only on those
    rows. Adds the rows sent to other ranks (dispatch, combine) to ``moved_2`` on the device."""
    block, experts = layer.mlp, layer.mlp.experts
    assert isinstance(experts, ExpertParallelExperts)
    me, P, group = st.rank, st.world, st.group
    dev, (B, D), dt = h_BD.device, h_BD.shape, h_BD.dtype
    hn_BD = layer.post_attention_layernorm(h_BD)
    ids_BK, w_BK, _ = block.router(hn_BD)  # every row: only the home rows' routes are sent
    K = ids_BK.shape[1]
    here_B = torch.full_like(origin_B, me)
    r_BK = experts._slot_ranks(ids_BK, here_B)
    dest_B = experts._new_home(r_BK, w_BK, here_B) if st.mode == "coherent" else origin_B
    # one message per (home row, distinct rank of its experts); the destination always gets one
    # (it needs the residual), even when none of the row's experts is there
    to_BP = torch.zeros(B, P + 1, dtype=torch.bool, device=dev)
    to_BP.scatter_(1, torch.where(r_BK >= 0, r_BK, P), True)
    to_BP = to_BP[:, :P]
    to_BP[torch.arange(B, device=dev), dest_B] = True
    to_BP &= home_B[:, None]
    buf = _pack(hn_BD, h_BD, ids_BK.to(torch.int32), r_BK.to(torch.int32), w_BK.float(), dest_B[:, None])
    got, valid_B = _send_home_rows(buf, to_BP, group)
    st.counters["all_to_all_calls"] += 1
    away_P = torch.arange(P, device=dev) != me
    moved_2[0] += (to_BP & away_P).sum()
    hn, h, ids, rr, w, dest = _unpack(got, [(dt, (D,)), (dt, (D,)), (torch.int32, (K,)), (torch.int32, (K,)),
                                          (torch.float32, (K,)), (torch.int64, (1,))])
    dest = dest[:, 0]
    run_BK = valid_B[:, None] & (rr == me)
    ids_loc = torch.where(run_BK, experts.local_of_E[ids.long().clamp(min=0)], -1)
    y = kernels.get_backend(experts.backend)(hn, experts.w13, experts.w2, ids_loc, w.to(dt))
    # partial sums to the destinations (each source sent a row to the destination, so the
    # destination holds the row's residual; its own partial is added there)
    if st.mode == "standard" or K > 1:
        back_BP = (valid_B & (dest != me))[:, None] & (dest[:, None] == torch.arange(P, device=dev))
        y2_PBD = _a2a_slots(torch.where(back_BP.T[..., None], y[None], 0), group)  # zeros in unused slots
        st.counters["all_to_all_calls"] += 1
        moved_2[1] += back_BP.sum()
        acc = y + y2_PBD.sum(0)
    else:  # top-1, context-coherent: the destination is the expert's rank: nothing moves back
        acc = y
    if block.shared_experts is not None:
        shared = block.shared_experts(hn)
        if block.shared_expert_gate is not None:
            shared = torch.sigmoid(block.shared_expert_gate(hn)) * shared
        acc = acc + shared
    st.counters["layers"] += 1
    return h + acc, valid_B & (dest == me)


def _sum_home_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], group) -> list[torch.Tensor]:
    """Every rank's rows of each part where its mask is set, in ONE all-reduce.

    parts: (x_B..., home_B) pairs; each row is homed on exactly one rank and the others add
    exact zeros, so the sum is that rank's row, value for value (in a dtype holding every part)."""
    dt = torch.float32
    for x, _ in parts:
        dt = torch.promote_types(dt, x.dtype)
    B = parts[0][0].shape[0]
    flat = [torch.where(m.view((B,) + (1,) * (x.dim() - 1)), x, 0).reshape(B, -1).to(dt) for x, m in parts]
    buf = torch.cat(flat, 1)
    dist.all_reduce(buf, group=group)
    out = buf.split([f.shape[1] for f in flat], 1)
    return [o.reshape(x.shape).to(x.dtype) for o, (x, _) in zip(out, parts)]


@torch.no_grad()
def decode_step(model, cache, ids_B1: torch.Tensor, st: TokenState) -> torch.Tensor:
    """Logits [B, 1, V] of one decode step (every rank returns the same), advancing ``cache``."""
    B = ids_B1.shape[0]
    me, P, group = st.rank, st.world, st.group
    dev = ids_B1.device
    pos_BT, mask, windowed, num_slots = model._positions_and_masks(B, 1, cache, None)
    x = model.embed(ids_B1)[:, 0]
    cos, sin = model.rotary(pos_BT, x.dtype)
    origin_B = torch.arange(B, device=dev) % P
    home_B = origin_B == me  # each row starts on its origin, b mod P
    rec = _KVRecorder(cache)
    homes: dict[int, torch.Tensor] = {}  # layer -> rows homed here during its attention
    moved_2 = torch.zeros(2, dtype=torch.long, device=dev)  # dispatch, combine rows sent away
    for layer in model.layers:
        m = windowed[layer.window] if layer.window else mask
        # attention of the whole batch (the cache writes every row's slot; rows homed elsewhere
        # carry stale values and are overwritten after the loop)
        a = layer.attn(layer.input_layernorm(x[:, None]), cos, sin, m, rec, num_slots)[:, 0]
        homes[layer.layer_idx] = home_B
        h = x + a
        if hasattr(layer.mlp, "router"):
            x, home_B = _moe_rows(layer, h, home_B, origin_B, st, moved_2)
        else:
            x = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = model.lm_head(model.norm(x)).float()
    # every rank gets every row's logits and the keys/values each home computed
    layers = sorted(rec.kv)
    parts = [(logits, home_B)] + [(t, homes[li]) for li in layers for t in rec.kv[li]]
    got = _sum_home_rows(parts, group)
    for i, li in enumerate(layers):
        cache.update(li, got[1 + 2 * i], got[2 + 2 * i], num_slots)
    st.counters["all_gather_calls"] += 1
    dispatch, combine = moved_2.tolist()  # the step's one host sync of this module
    st.counters["dispatch_rows"] += dispatch
    st.counters["combine_rows"] += combine
    cache.advance(None, 1)
    return got[0][:, None].to(model.dtype)
