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

import kernels
from moe.cuda_graph import DecodeGraphs
from moe.kv_cache import KVCache

from .collectives import all_reduce, all_to_all_single
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
    """The parts of ``_pack``'s rows again. A part whose byte offset and the row width are both
    multiples of its element size is a view (no kernel); pack the widest types first to get that."""
    n, out, off = buf.shape[0], [], 0
    row = buf.stride(0)
    for dtype, shape in specs:
        size = dtype.itemsize
        width = size
        for s in shape:
            width *= s
        col = buf[:, off:off + width]
        if (buf.storage_offset() + off) % size or row % size or buf.stride(1) != 1:
            # a slice at an odd offset or stride cannot be reinterpreted: copy it into a packed buffer
            col = torch.empty((n, width), dtype=torch.uint8, device=buf.device).copy_(col)
        out.append(col.view(dtype).reshape((n,) + shape))
        off += width
    return out


def _a2a_slots(send_PBW: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of fixed slots: ``send_PBW[p]`` goes to rank p; returns [P, B, W] by source."""
    send_PBW = send_PBW.contiguous()
    # contiguous both: empty_like would copy the strides of a transposed mask's broadcast, and
    # the collective writes raw memory in row-major order
    out = torch.empty(send_PBW.shape, dtype=send_PBW.dtype, device=send_PBW.device)
    all_to_all_single(out, send_PBW, group=group)
    return out


def _send_home_rows(buf_BW: torch.Tensor, to_BP: torch.Tensor, group, arange_B: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Send row b of ``buf_BW`` to every rank p with ``to_BP[b, p]``; returns (the rows received,
    slot b holding row b's message or zeros, [B, W]; whether row b's message came, [B]).

    Every row is sent by one rank only (its home), so slot b is used by at most one source and
    the received rows merge into B slots without compaction (no host sync)."""
    flag_PB = to_BP.T
    send = torch.cat([flag_PB[..., None].to(torch.uint8),
                      torch.where(flag_PB[..., None], buf_BW[None], 0)], 2)  # [P, B, 1 + W]
    recv = _a2a_slots(send, group)
    got_PB = recv[:, :, 0] != 0
    src_B = got_PB.to(torch.int32).argmax(0)  # the one source of row b (0, all zeros, if none)
    return recv[src_B, arange_B, 1:], got_PB.any(0)


class _KVRecorder:
    """Cache proxy: remembers the new keys/values each attention layer writes."""

    def __init__(self, cache):
        self.cache = cache
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer, k, v, num_slots):
        self.kv[layer] = (k, v)
        return self.cache.update(layer, k, v, num_slots)


class _StepConsts:
    """Tensors every MoE layer of one decode step uses, made once per step (each is a launch)."""

    def __init__(self, B: int, st: TokenState, device):
        self.arange_B = torch.arange(B, device=device)
        self.arange_P = torch.arange(st.world, device=device)
        self.here_B = torch.full((B,), st.rank, dtype=torch.long, device=device)
        self.away_P = self.arange_P != st.rank
        self.sent: list[torch.Tensor] = []      # per layer: to_BP, the dispatch messages (counted once per step)
        self.returned: list[torch.Tensor] = []  # per layer with a combine: back_BP


def _moe_rows(layer, h_BD: torch.Tensor, home_B: torch.Tensor, origin_B: torch.Tensor, st: TokenState,
              c: _StepConsts, valid_B: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE half of one decoder layer for the rows homed here (``home_B``).

    Returns (x_BD after the layer, the rows homed here now [B]); x_BD is meaningful only on those
    rows. Leaves the layer's dispatch (and combine) messages in ``c`` for the step's counters.
    valid_B: rows taking part in the step; the others (idle serving rows) take no expert, so they
    stay home and send nothing to another rank."""
    block, experts = layer.mlp, layer.mlp.experts
    assert isinstance(experts, ExpertParallelExperts)
    me, P, group = st.rank, st.world, st.group
    dev, (B, D), dt = h_BD.device, h_BD.shape, h_BD.dtype
    hn_BD = layer.post_attention_layernorm(h_BD)
    ids_BK, w_BK, _ = block.router(hn_BD)  # every row: only the home rows' routes are sent
    if valid_B is not None:
        ids_BK = torch.where(valid_B[:, None], ids_BK, -1)
    K = ids_BK.shape[1]
    r_BK = experts._slot_ranks(ids_BK, c.here_B)
    dest_B = experts._new_home(r_BK, w_BK, c.here_B) if st.mode == "coherent" else origin_B
    # one message per (home row, distinct rank of its experts); the destination always gets one
    # (it needs the residual), even when none of the row's experts is there
    to_BP = torch.zeros(B, P + 1, dtype=torch.bool, device=dev)
    to_BP.scatter_(1, torch.where(r_BK >= 0, r_BK, P), True)
    to_BP = to_BP[:, :P]
    to_BP.scatter_(1, dest_B[:, None], True)  # a fill, not an indexed write of a host scalar: capturable
    to_BP &= home_B[:, None]
    # widest types first, so that every part of a received row is a view (see _unpack)
    ints = torch.cat([ids_BK, r_BK, dest_B[:, None]], 1).to(torch.int32)
    buf = _pack(w_BK.float(), ints, hn_BD, h_BD)
    got, valid_B = _send_home_rows(buf, to_BP, group, c.arange_B)
    st.counters["all_to_all_calls"] += 1
    c.sent.append(to_BP)
    w, ints, hn, h = _unpack(got, [(torch.float32, (K,)), (torch.int32, (2 * K + 1,)), (dt, (D,)), (dt, (D,))])
    ids, rr, dest = ints[:, :K], ints[:, K:2 * K], ints[:, 2 * K].long()
    run_BK = valid_B[:, None] & (rr == me)
    ids_loc = torch.where(run_BK, experts.local_of_E[ids.long().clamp(min=0)], -1)
    y = kernels.get_backend(experts.backend)(hn, experts.w13, experts.w2, ids_loc, w.to(dt))
    # partial sums to the destinations (each source sent a row to the destination, so the
    # destination holds the row's residual; its own partial is added there)
    if st.mode == "standard" or K > 1:
        back_BP = (valid_B & (dest != me))[:, None] & (dest[:, None] == c.arange_P)
        y2_PBD = _a2a_slots(torch.where(back_BP.T[..., None], y[None], 0), group)  # zeros in unused slots
        st.counters["all_to_all_calls"] += 1
        c.returned.append(back_BP)
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

    parts: (x, home) pairs, home a boolean mask over x's leading dims (e.g. [B], or [L, B] for
    L layers' stacked keys); each row is homed on exactly one rank and the others add exact
    zeros, so the sum is that rank's row, value for value (in a dtype holding every part)."""
    dt = torch.float32
    for x, _ in parts:
        dt = torch.promote_types(dt, x.dtype)
    flat = [torch.where(m.view(m.shape + (1,) * (x.dim() - m.dim())), x, 0).reshape(-1).to(dt) for x, m in parts]
    buf = torch.cat(flat)
    all_reduce(buf, group=group)
    out = buf.split([f.numel() for f in flat])
    return [o.view(x.shape).to(x.dtype) for o, (x, _) in zip(out, parts)]


@torch.no_grad()
def decode_step(model, cache, ids_B1: torch.Tensor, st: TokenState, num_slots: int | None = None,
                moved_2: torch.Tensor | None = None, valid_B1: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, 1, V] of one decode step (every rank returns the same), advancing ``cache``.

    ``num_slots`` (the attention slots, known to the caller) and ``moved_2`` (a device tensor
    [2] the step's dispatched / combined rows are added to, instead of the host counters): with
    both, the step reads nothing on the host, so it can be captured in a CUDA graph
    (``HomeDecodeGraphs``). ``valid_B1``: the rows taking part (a serving batch's idle rows do
    not): as in the model's forward, only they advance in the cache, and the others route to no
    expert; their logits are meaningless."""
    B = ids_B1.shape[0]
    me, P, group = st.rank, st.world, st.group
    dev = ids_B1.device
    valid_B = None if valid_B1 is None else valid_B1.to(device=dev, dtype=torch.bool).reshape(B)
    pos_BT, mask, windowed, num_slots = model._positions_and_masks(
        B, 1, cache, None if valid_B is None else valid_B[:, None], num_slots)
    x = model.embed(ids_B1)[:, 0]
    cos, sin = model.rotary(pos_BT, x.dtype)
    c = _StepConsts(B, st, dev)
    origin_B = c.arange_B % P
    home_B = origin_B == me  # each row starts on its origin, b mod P
    rec = _KVRecorder(cache)
    homes: dict[int, torch.Tensor] = {}  # layer -> rows homed here during its attention
    for layer in model.layers:
        m = layer.pick_mask(mask, windowed)
        # attention of the whole batch (the cache writes every row's slot; rows homed elsewhere
        # carry stale values and are overwritten after the loop)
        a = layer.attn(layer.input_layernorm(x[:, None]), cos, sin, m, rec, num_slots)[:, 0]
        homes[layer.layer_idx] = home_B
        h = x + a
        if hasattr(layer.mlp, "router"):
            x, home_B = _moe_rows(layer, h, home_B, origin_B, st, c, valid_B)
        else:
            x = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = model.lm_head(model.norm(x)).float()
    # every rank gets every row's logits and the keys/values each home computed
    # layers whose keys/values have the same shapes travel stacked: [n, B, ...] with masks [n, B]
    by_shape: dict[tuple, list[int]] = {}
    for li in sorted(rec.kv):
        k, v = rec.kv[li]
        by_shape.setdefault((k.shape, v.shape, k.dtype, v.dtype), []).append(li)
    groups = list(by_shape.values())
    parts = [(logits, home_B)]
    for lis in groups:
        mask = torch.stack([homes[li] for li in lis])
        parts += [(torch.stack([rec.kv[li][0] for li in lis]), mask), (torch.stack([rec.kv[li][1] for li in lis]), mask)]
    got = _sum_home_rows(parts, group)
    for g, lis in enumerate(groups):
        for j, li in enumerate(lis):
            cache.update(li, got[1 + 2 * g][j], got[2 + 2 * g][j], num_slots)
    st.counters["all_gather_calls"] += 1
    # rows sent away (dispatch, combine), counted for the whole step at once
    none = torch.zeros((), dtype=torch.long, device=dev)
    step_2 = torch.stack([(torch.stack(c.sent) & c.away_P).sum() if c.sent else none,
                          torch.stack(c.returned).sum() if c.returned else none])
    if moved_2 is not None:
        moved_2 += step_2  # read by the caller when it wants them (HomeDecodeGraphs.flush_counters)
    else:
        dispatch, combine = step_2.tolist()  # the step's one host sync of this module
        st.counters["dispatch_rows"] += dispatch
        st.counters["combine_rows"] += combine
    cache.advance(None if valid_B is None else valid_B[:, None], 1)
    return got[0][:, None].to(model.dtype)


class HomeDecodeGraphs(DecodeGraphs):
    """Home-only decode steps (``decode_step``) of one rank replayed from CUDA graphs, one graph per
    attention-slot bucket, captured on first use: ``moe.cuda_graph.DecodeGraphs``' capture and
    buckets, with this module's step.

        graphs = HomeDecodeGraphs(model, cache, state)           # every rank, NCCL group, triton experts
        logits_B1V = graphs.step(ids_B1, valid_B1, max_length)   # every rank, together

    A step of ExFlow's decoding is hundreds of small kernels, one or two all-to-alls per MoE layer
    and one all-reduce, at fixed shapes with no host sync (``decode_step``); eagerly its launches,
    not the GPU, set its time (BENCHMARKS 6b, 6c). Captured, a step is one replay. The all-to-alls
    and the end-of-step all-reduce are captured with the kernels, so every rank must capture and
    replay the same steps together (they do: every rank runs every step). Capturing runs one step
    eagerly first (kernels compile, NCCL's communicator is made outside the capture) and restores
    the cache's lengths, the counters and the moved-rows sums, so it changes nothing the caller
    sees. The host counters (all-to-all calls, layers, all-gathers) grow per replay by what one
    step counts; the rows moved are summed on the device and added to the host counters by
    ``flush_counters`` (``greedy`` calls it once at the end)."""

    def __init__(self, model, cache, st: TokenState, bucket: int | None = None):
        if cache.device.type != "cuda":
            raise ValueError(f"HomeDecodeGraphs captures CUDA graphs; the cache is on {cache.device}")
        for b in model.moe_blocks():
            ex = b.experts
            if not isinstance(ex, ExpertParallelExperts) or ex.backend != "triton":
                raise ValueError(f"MoE layer {b.layer_idx}: only expert-parallel experts with the 'triton' backend "
                                 "run without host syncs (EPConfig(backend='triton'))")
        self.st = st
        self._moved_2 = torch.zeros(2, dtype=torch.long, device=cache.device)
        self._counted: dict[int, dict] = {}  # slot bucket -> host counter increments of one step
        self._setup(model, cache, bucket or KVCache.SLOT_BUCKET, capture=True)

    def _forward(self, num_slots: int) -> torch.Tensor:
        before = dict(self.st.counters)
        out = decode_step(self.model, self.cache, self._ids_B1, self.st, num_slots, self._moved_2, self._valid_B1)
        self._step_counted = {k: self.st.counters[k] - before[k] for k in before}
        return out

    def _capture(self, num_slots: int):
        """DecodeGraphs' capture (it restores the cache's lengths), with the counters and the
        moved-rows sums restored too: the eager warm-up step really ran."""
        moved, before = self._moved_2.clone(), dict(self.st.counters)
        try:
            graph_out = super()._capture(num_slots)
            self._counted[num_slots] = self._step_counted
            return graph_out
        finally:
            self._moved_2.copy_(moved)
            self.st.counters.update(before)

    @torch.no_grad()
    def capture_for(self, ids_B1: torch.Tensor, valid_B1: torch.Tensor, max_length: int) -> bool:
        """``step``'s first half: take the step's inputs and capture the graph of this length's slot
        bucket if it is not captured yet (its warm-up step runs on these inputs); True if it was
        captured now. Every rank must call it for the same lengths (the capture runs collectives);
        a failure raises ``GraphCaptureError`` with the cache as it was."""
        num_slots = self._inputs(ids_B1, valid_B1, max_length)
        if num_slots in self._graphs:
            return False
        self._captured(num_slots)
        return True

    @torch.no_grad()
    def step(self, ids_B1: torch.Tensor, valid_B1: torch.Tensor, max_length: int) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step, advancing the cache as ``decode_step`` does.
        valid_B1: the rows taking part (see ``decode_step``); max_length: the longest row's current
        length (the caller's host-side count). The logits live in the graph's output buffer,
        overwritten by the next step of the same bucket."""
        num_slots = self._inputs(ids_B1, valid_B1, max_length)
        graph, out = self._captured(num_slots)
        graph.replay()
        for k, v in self._counted[num_slots].items():
            self.st.counters[k] += v
        return out

    def flush_counters(self) -> None:
        """Add the rows moved since the last flush to the host counters (one host sync)."""
        dispatch, combine = self._moved_2.tolist()
        self.st.counters["dispatch_rows"] += dispatch
        self.st.counters["combine_rows"] += combine
        self._moved_2.zero_()
