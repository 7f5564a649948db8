"""Expert parallelism on Ray actors: one actor per rank, each holding only its experts.

Shape legend: T = tokens of the batch (B*T of the model, flattened), K = experts per token,
D = hidden size, E = experts per layer, P = ranks, C = copies of an expert, N = rows.

    driver: ExpertParallelRuntime(model, plan, EPConfig(mode=...))
        ├─ placement group of P bundles (one per rank; PACK, so several machines work too)
        └─ P EPWorker actors, joined in one torch.distributed group (gloo on CPU, NCCL on GPU;
              EPConfig(comm='gloo', gpus_per_rank=0.5): ranks sharing a GPU, collectives via the host)
              each: the model's dense part (embeddings, attention, norms, routers, shared
              experts, head) and, per MoE layer, ExpertParallelExperts with ONLY the experts
              the plan puts on it (replicas included)

Every rank keeps the whole context: it runs the dense part on every token of the batch, so
its KV cache is complete and the routing (router output) is known everywhere. The routed
experts are where ranks differ. Each token has a *home* rank whose copy of its hidden state
is the one that moves; per MoE layer (the model of placement/metrics.py, message for message):

    standard EP     home = origin (token index mod P) at every layer
                    dispatch all-to-all: home -> each distinct rank holding one of its experts
                    combine  all-to-all: partial sums -> back to the origin
    context-coherent (ExFlow)
                    dispatch all-to-all: current home -> its experts' ranks
                    the token's new home is the rank carrying most of its routing weight; only
                    partial sums from other ranks move there (top-1: none, and the combine
                    all-to-all is skipped: one all-to-all per layer)

after which the destination ranks hold the layer's output and one all-gather gives it back
to every rank, so that the replicated dense part (the "whole context") continues. Splits are
computed by every rank from the same routing, so no count exchange is needed, and a collective
that would move nothing on any rank is skipped on all of them. That routing is rank 0's, broadcast
at each MoE layer (``same_routing``): the replicated dense part is not bitwise alike on every rank
(the H200's cuDNN attention differs from run to run in the last bits), and ranks splitting by
routings that differ would call collectives of different sizes: NCCL hangs, gloo aborts.

This replicated path serves prefill (several new tokens of a row attend to each other) and
any forward. It costs a per-layer all-gather and redundant attention in BOTH modes; its
all-to-all traffic, the part placement changes, is ExFlow's row for row (tested against
metrics.py). Decoding as ExFlow does it, attention only on a row's home and one all-gather of
the new keys/values per step, is placement/decode.py (``EPWorker.greedy(home_only=True)``).

``apply_placement(model, plan, rank, ...)`` is the per-rank step (replaces ``block.experts``,
the contract seam); ``ExpertParallelRuntime`` builds the actors and runs forwards in them.
"""
from __future__ import annotations

import functools
import os
import socket
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import kernels

from .collectives import all_gather_v, all_reduce, all_to_all_v, broadcast
from .plan import PlacementPlan

MODES = ("standard", "coherent")
PARALLEL = ("placement", "adaptive")
DECODES = ("auto", "home", "replicated")
COMMS = ("auto", "nccl", "gloo")


def check_decode(decode: str, adaptive: bool, name: str = "decode") -> None:
    """Raise unless ``decode`` (EPConfig.decode, called ``name`` in the message) is one of DECODES and
    fits the layer: 'home' places each row by the plan, which the adaptive layer has not."""
    if decode not in DECODES:
        raise ValueError(f"{name} must be one of {DECODES}, got {decode!r}")
    if decode == "home" and adaptive:
        raise ValueError(f"{name} 'home' places each row by the plan and the adaptive layer has none; "
                         f"use {name} 'replicated' or 'auto'")


@dataclass(frozen=True)
class EPConfig:
    mode: str = "coherent"  # 'standard' (two all-to-alls per layer) or 'coherent' (ExFlow)
    device: str = "cpu"  # 'cpu' (gloo) or 'cuda' (NCCL, one GPU per actor)
    cpus_per_actor: float = 0.1
    backend: str = "torch"  # expert kernel backend inside each rank
    torch_threads: int = 1
    # 'placement': experts where the PlacementPlan puts them (ExpertParallelExperts, the modes above);
    # 'adaptive': the adaptive layer's one layout (placement/adaptive.py: contiguous expert units per
    # rank, every strategy from it, chosen per call or fixed with set_strategy); the plan then only
    # gives the number of ranks
    parallel: str = "placement"
    # serving's decode steps (``step`` with one new token per row): 'home' runs ExFlow's decoding
    # (decode.py: each row's attention on its home rank, no host sync), replayed from CUDA graphs
    # when cuda_graph and the ranks are GPUs with the triton experts; 'replicated' runs the whole
    # forward on every rank (what prefill steps always do); 'auto': home under a plan, replicated
    # for the adaptive layer (which has no homes)
    decode: str = "auto"
    cuda_graph: bool = True
    # the ranks' process group: 'auto' is NCCL on GPUs and gloo on CPUs; 'gloo' on GPUs moves every
    # collective through host memory (slow), which lets ranks share a GPU (gpus_per_rank < 1: NCCL
    # refuses two ranks on one device); serving's home decode steps then run eagerly (a collective
    # staged through the host cannot be captured in a CUDA graph)
    comm: str = "auto"
    gpus_per_rank: float = 1.0  # Ray's GPU share per rank actor (device='cuda')

    def __post_init__(self):
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        check_decode(self.decode, self.parallel == "adaptive")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.cpus_per_actor <= 0 or self.torch_threads < 1:
            raise ValueError(f"cpus_per_actor ({self.cpus_per_actor}) must be > 0 and torch_threads "
                             f"({self.torch_threads}) >= 1")
        if self.comm not in COMMS:
            raise ValueError(f"comm must be one of {COMMS}, got {self.comm!r}")
        if self.comm == "nccl" and self.device != "cuda":
            raise ValueError("comm='nccl' joins GPU ranks; CPU ranks use gloo: set comm='auto' or device='cuda'")
        if not 0 < self.gpus_per_rank <= 1:
            raise ValueError(f"gpus_per_rank must be in (0, 1], got {self.gpus_per_rank}")
        if self.gpus_per_rank < 1 and self.process_group() != "gloo":
            raise ValueError(f"gpus_per_rank={self.gpus_per_rank} puts ranks on a shared GPU, which NCCL refuses; "
                             "set comm='gloo' (collectives through host memory) or give each rank a GPU")
        if self.comm == "gloo" and self.device == "cuda" and self.parallel == "adaptive":
            raise ValueError("the adaptive layer's collectives need NCCL on GPUs: use comm='auto' with one GPU per rank")
        kernels.get_backend(self.backend)

    def process_group(self) -> str:
        """The torch.distributed backend the ranks join."""
        return ("nccl" if self.device == "cuda" else "gloo") if self.comm == "auto" else self.comm


def _traced(fn):
    """With MOEFLOW_EP_TRACE=1 in the environment (Ray's workers inherit it), a rank prints when it
    enters and leaves the method, with the call's number and its tensors' shapes: a collective that
    never completes shows as ranks inside a call the others have left, or never entered."""
    @functools.wraps(fn)
    def traced(self, *args, **kwargs):
        if os.environ.get("MOEFLOW_EP_TRACE", "") in ("", "0"):
            return fn(self, *args, **kwargs)
        self._trace_calls = n = getattr(self, "_trace_calls", 0) + 1
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        tag = f"[ep-trace rank {self.rank}] {fn.__name__} #{n}"
        print(f"{tag} enter {time.strftime('%H:%M:%S')} {shapes}", flush=True)
        t0 = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            print(f"{tag} leave after {time.perf_counter() - t0:.3f} s", flush=True)
    return traced


def pack_result(t: torch.Tensor) -> tuple:
    """A rank's result as Ray moves it fastest: a numpy array (zero-copy; a torch tensor is pickled),
    bf16 as its int16 bits (``serve.cpu_host``'s wire), with its dtype's name. Measured on the dev
    machine (2 cores), rank 0 returning [8, 1, 4096] bf16 logits to the driver: 2.7 ms a call as
    float32 torch, 1.3 ms this way."""
    from serve.cpu_host import to_wire
    return str(t.dtype).removeprefix("torch."), to_wire(t)


def unpack_result(w: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``pack_result`` sent, in its own dtype or ``dtype``, in memory of its own (Ray's
    arrays are read-only): one copy, the conversion's where there is one."""
    from serve.cpu_host import from_wire
    name, arr = w
    t = from_wire(arr, getattr(torch, name))
    out = t if dtype is None else t.to(dtype)
    return out.clone() if out.data_ptr() == t.data_ptr() else out


@dataclass
class TokenState:
    """Shared by the MoE layers of one rank: where each token lives, and traffic counters."""
    rank: int
    world: int
    mode: str
    group: object = None
    home_T: torch.Tensor | None = None
    origin_T: torch.Tensor | None = None
    counters: dict = field(default_factory=lambda: dict(dispatch_rows=0, combine_rows=0, allgather_rows=0,
                                                        all_to_all_calls=0, all_gather_calls=0, layers=0))
    # MOEFLOW_EP_CHECK=1 when the rank's layers were placed: check_agreement at every replicated layer
    check: bool = field(default_factory=lambda: os.environ.get("MOEFLOW_EP_CHECK", "") not in ("", "0"))


def same_routing(ids_TK: torch.Tensor, weights_TK: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's routing (expert ids and weights) on every rank of ``group``, in one broadcast (ids as
    float32: exact below 2**24 experts; bf16 / fp16 weights round-trip float32 exactly)."""
    K = ids_TK.shape[1]
    buf = torch.cat([ids_TK.detach().to(torch.float32), weights_TK.detach().to(torch.float32)], 1)
    broadcast(buf, group=group)
    w = buf[:, K:].to(weights_TK.dtype)
    if weights_TK.requires_grad:  # rank 0's values, this rank's gradient path (as without the broadcast)
        w = weights_TK + (w - weights_TK).detach()
    return buf[:, :K].to(ids_TK.dtype), w


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as int64 [rows, words] (rows = the leading dim; bools as bytes)."""
    t = t.detach().contiguous()
    t = t.view(torch.uint8) if t.dtype == torch.bool else t
    word = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(word).reshape(t.shape[0], -1).to(torch.int64)


def check_agreement(st: TokenState, where: str, **tensors: torch.Tensor) -> None:
    """Raise on every rank if the ranks hold different ``tensors``, naming ``where`` and the rows.

    A diagnostic for the replicated part of a forward, on with MOEFLOW_EP_CHECK=1: it reports the
    first place where the ranks' copies of a replicated tensor part, down to the last bit. Since the
    routing is broadcast from rank 0 (same_routing) such drift no longer desynchronises the
    collectives, and drift is what cuDNN attention produces on the H200 (BENCHMARKS 6e), so the
    check stops at harmless drift too: it is for finding where ranks part, not for production runs.
    One all-reduce of bitwise fingerprints; on a mismatch, a second one finds the rows."""
    names = list(tensors)
    rows = [_bits(t) for t in tensors.values()]
    # position-weighted sums of the bit patterns (int64, wrapping): equal tensors, equal sums
    fp_NR = torch.stack([(b * torch.arange(1, b.shape[1] + 1, device=b.device)).sum(1) for b in rows])
    fp = torch.cat([fp_NR.sum(1), torch.tensor([fp_NR.shape[1]], device=fp_NR.device)])
    both = torch.cat([fp, -fp])
    all_reduce(both, op=dist.ReduceOp.MAX, group=st.group)
    hi, lo = both[:len(fp)], -both[len(fp):]
    if torch.equal(hi, lo):
        return
    if hi[-1] != lo[-1]:
        bad_rows = "the ranks' row counts differ"
    else:  # which rows: the largest and smallest of every rank's per-row fingerprints
        ext = torch.cat([fp_NR, -fp_NR])
        all_reduce(ext, op=dist.ReduceOp.MAX, group=st.group)
        diff = (ext[:len(names)] != -ext[len(names):]).any(0).nonzero().flatten().tolist()
        bad_rows = f"{len(diff)} of {fp_NR.shape[1]} rows differ here (first: {diff[:8]})"
    finite = {n: int((~torch.isfinite(t)).any(-1).sum()) for n, t in tensors.items() if t.is_floating_point()}
    differ = [n for n, h, l in zip(names, hi.tolist(), lo.tolist()) if h != l]
    raise RuntimeError(
        f"rank {st.rank}: the ranks hold different {differ} at {where}: {bad_rows}; rows with non-finite "
        f"values on this rank: {finite}. A replicated computation gave different results on different ranks "
        "(the collectives stay matched: every rank splits them by rank 0's routing)")


class ExpertParallelExperts(nn.Module):
    """Drop-in for ``block.experts`` on one rank: forward(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD."""

    def __init__(self, w13_nJD: torch.Tensor, w2_nDI: torch.Tensor, local_ids: list[int], copies_EC: torch.Tensor,
                 state: TokenState, first_layer: bool, backend: str = "torch", ranks_per_node: int = 0,
                 copy_choice: str = "spread", layer: int = 0):
        super().__init__()
        self.layer = layer  # the MoE layer's index, for error messages
        E = copies_EC.shape[0]
        self.w13 = nn.Parameter(w13_nJD)
        self.w2 = nn.Parameter(w2_nDI)
        local_of = torch.full((E,), -1, dtype=torch.long)
        local_of[torch.as_tensor(local_ids, dtype=torch.long)] = torch.arange(len(local_ids))
        self.register_buffer("local_of_E", local_of.to(w13_nJD.device), persistent=False)
        self.register_buffer("copies_EC", copies_EC.to(w13_nJD.device), persistent=False)
        self.local_ids = list(local_ids)
        # 0: one node (every copy is near every home)
        self.ranks_per_node = ranks_per_node if ranks_per_node > 0 else max(1, state.world)
        self.copy_choice = copy_choice  # PlacementPlan.copy_choice
        self.state = state
        self.first_layer = first_layer
        self.backend = backend

    @property
    def num_experts(self) -> int:
        return self.copies_EC.shape[0]

    def extra_repr(self) -> str:
        return f"rank={self.state.rank}/{self.state.world}, local_experts={self.local_ids}, backend={self.backend!r}"

    # --- routing bookkeeping (identical on every rank) -------------------------------------
    def _slot_ranks(self, ids_TK: torch.Tensor, home_T: torch.Tensor) -> torch.Tensor:
        """[T, K] rank running each slot (-1 for id -1): the copy on the home if any, else by the plan's
        copy_choice one by token index among the copies on the home's node (else among all), or the
        primary (metrics._slot_ranks, the same rule)."""
        valid = ids_TK >= 0
        e = ids_TK.clamp(min=0)
        if self.copies_EC.shape[1] == 1:  # no replicas (most plans): the one copy, in 3 launches not 12
            return torch.where(valid, self.copies_EC[:, 0][e], -1)
        cand = self.copies_EC[e]  # [T, K, C]
        at_home = (cand == home_T[:, None, None]).any(-1)
        if self.copy_choice == "home":  # the primary (copy 0) for tokens with no copy at home
            other = cand[..., 0]
        else:
            have = cand >= 0
            near = have & (cand // self.ranks_per_node == (home_T // self.ranks_per_node)[:, None, None])
            pool = torch.where(near.any(-1, keepdim=True), near, have)
            t = torch.arange(ids_TK.shape[0], device=ids_TK.device)[:, None]
            j = t % pool.sum(-1)  # [T, K]: the j-th copy of the pool, in copy order
            other = (cand * (pool & (pool.cumsum(-1) - 1 == j[..., None]))).sum(-1)
        return torch.where(valid, torch.where(at_home, home_T[:, None], other), -1)

    @staticmethod
    def _new_home(r_TK, w_TK, home_T):
        valid = r_TK >= 0
        same = (r_TK[:, :, None] == r_TK[:, None, :]) & valid[:, None, :]
        w = torch.where(valid, w_TK.detach().float(), 0.0)
        score = torch.where(valid, (same * w[:, None, :]).sum(2), -1.0)
        best = torch.argmax(score, dim=1)  # first maximum: ties go to the earlier slot
        h = r_TK.gather(1, best[:, None])[:, 0]
        return torch.where(valid.any(1), h, home_T)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        st, me, P = self.state, self.state.rank, self.state.world
        T, D = x_TD.shape
        dev = x_TD.device
        ids_TK = topk_ids_TK.to(dev)
        if self.first_layer or st.home_T is None or st.home_T.shape[0] != T:
            st.origin_T = torch.arange(T, device=dev) % P
            st.home_T = st.origin_T.clone()
        home_T = st.home_T
        if P > 1:
            # every rank splits its collectives by this routing, so every rank must hold the same:
            # rank 0's. Replicated computations are not bitwise alike everywhere (the H200's cuDNN
            # attention is not repeatable run to run, BENCHMARKS 6e), and a routing that differs
            # between ranks gives collectives of different sizes: NCCL hangs
            ids_TK, topk_weights_TK = same_routing(ids_TK, topk_weights_TK, st.group)
        if st.check:
            check_agreement(st, f"MoE layer {self.layer}", x=x_TD, ids=ids_TK, weights=topk_weights_TK, home=home_T)
        r_TK = self._slot_ranks(ids_TK, home_T)
        on_TP = torch.zeros(T, P + 1, dtype=torch.bool, device=dev)  # column P absorbs id -1
        on_TP.scatter_(1, torch.where(r_TK >= 0, r_TK, P), True)
        on_TP = on_TP[:, :P]  # [T, P] rank p runs some of token t's experts
        if st.mode == "coherent":
            dest_T = self._new_home(r_TK, topk_weights_TK, home_T)
        else:
            dest_T = st.origin_T
        # Every rank knows every token's home, ranks and destination, so each list of rows below is
        # a mask computed alike everywhere; their sizes travel to the host in ONE sync per layer,
        # and the rows are read from the masks by a stable sort (no per-rank boolean indexing,
        # each of which would wait for the GPU).
        p_P = torch.arange(P, device=dev)
        other_P1 = (p_P != me)[:, None]
        mine_T = on_TP[:, me]
        send_PT = (home_T == me)[None, :] & on_TP.T & other_P1        # rows homed here, to rank p
        recv_PT = (home_T[None, :] == p_P[:, None]) & mine_T[None, :] & other_P1  # from rank p
        csend_PT = mine_T[None, :] & (dest_T[None, :] == p_P[:, None]) & other_P1  # partial sums to p
        crecv_PT = on_TP.T & (dest_T == me)[None, :] & other_P1        # partial sums from p
        own_T = mine_T & (home_T == me)
        kept_T = mine_T & (dest_T == me)
        dmove = (on_TP & (p_P[None, :] != home_T[:, None])).any()
        cmove = (on_TP & (p_P[None, :] != dest_T[:, None])).any()
        n = torch.cat([send_PT.sum(1), recv_PT.sum(1), csend_PT.sum(1), crecv_PT.sum(1),
                       (dest_T[None, :] == p_P[:, None]).sum(1),
                       torch.stack([mine_T.sum(), own_T.sum(), kept_T.sum(), dmove.long(), cmove.long()])]).tolist()
        n_send, n_recv, n_csend, n_crecv, sizes = (n[i * P:(i + 1) * P] for i in range(5))
        n_mine, n_own, n_kept, dmove, cmove = n[5 * P:]

        def rows(mask: torch.Tensor, count: int) -> torch.Tensor:
            """Token index of the first ``count`` True entries of ``mask`` (row-major), in order."""
            flat = mask.reshape(-1)
            return torch.argsort((~flat).to(torch.int8), stable=True)[:count] % T

        send_rows = rows(send_PT, sum(n_send))   # by destination rank, then token
        recv_rows = rows(recv_PT, sum(n_recv))   # by source rank, then token
        mine = rows(mine_T, n_mine)
        pos = torch.full((T,), -1, dtype=torch.long, device=dev)
        pos[mine] = torch.arange(n_mine, device=dev)

        # dispatch: rows of tokens homed here go to the other ranks running their experts
        if dmove:
            x_recv = all_to_all_v(x_TD[send_rows], n_send, n_recv, st.group)
            st.counters["all_to_all_calls"] += 1
            st.counters["dispatch_rows"] += sum(n_send)
        else:
            x_recv = x_TD[:0]
        # the rows this rank computes: its own copies where the token is homed here, else what came
        own = rows(own_T, n_own)
        x_loc = x_TD.new_zeros(n_mine, D).index_copy(0, pos[own], x_TD[own]).index_copy(0, pos[recv_rows], x_recv)
        ids_loc = torch.where(r_TK[mine] == me, self.local_of_E[ids_TK[mine].clamp(min=0)], -1)
        y_loc = kernels.get_backend(self.backend)(x_loc, self.w13, self.w2, ids_loc, topk_weights_TK[mine])

        # combine: partial sums go to the destination (origin, or the new home)
        csend_rows = rows(csend_PT, sum(n_csend))
        crecv_rows = rows(crecv_PT, sum(n_crecv))
        if cmove:
            y_recv = all_to_all_v(y_loc[pos[csend_rows]], n_csend, n_crecv, st.group)
            st.counters["all_to_all_calls"] += 1
            st.counters["combine_rows"] += sum(n_csend)
        else:
            y_recv = y_loc[:0]
        # every rank continues the dense part on every token: gather the outputs back, rank by rank
        order = torch.argsort(dest_T, stable=True)  # tokens by destination rank, then index
        dests = order[sum(sizes[:me]):sum(sizes[:me + 1])]
        dpos = torch.full((T,), -1, dtype=torch.long, device=dev)
        dpos[dests] = torch.arange(len(dests), device=dev)
        kept = rows(kept_T, n_kept)
        y_own = y_loc.new_zeros(len(dests), D).index_add(0, dpos[kept], y_loc[pos[kept]]) \
            .index_add(0, dpos[crecv_rows], y_recv)
        y_all = all_gather_v(y_own, sizes, st.group)
        st.counters["all_gather_calls"] += 1
        st.counters["allgather_rows"] += len(dests)
        st.counters["layers"] += 1
        if st.mode == "coherent":
            st.home_T = dest_T
        return x_TD.new_zeros(T, D).index_copy(0, order, y_all.to(x_TD.dtype))


def _block_prefixes(model) -> dict[int, str]:
    blocks = {id(b): b for b in model.moe_blocks()}
    return {blocks[id(m)].moe_index: name for name, m in model.named_modules() if id(m) in blocks}


def copies_table(plan: PlacementPlan, layer: int) -> torch.Tensor:
    """[E, C] ranks holding each expert (primary first, -1 padded)."""
    copies = [plan.ranks_of(layer, e) for e in range(plan.num_experts)]
    C = max(len(c) for c in copies)
    out = torch.full((plan.num_experts, C), -1, dtype=torch.long)
    for e, c in enumerate(copies):
        out[e, :len(c)] = torch.tensor(c)
    return out


def _dense_part(model, prefixes: dict[int, str]) -> dict:
    """Every parameter and buffer but the routed experts' weights, on the CPU (what every rank gets)."""
    expert_keys = {f"{p}.experts.{w}" for p in prefixes.values() for w in ("w13", "w2")}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in expert_keys}


def split_state_dict(model, plan: PlacementPlan) -> tuple[dict, list[dict]]:
    """(dense parameters, per rank {prefix.experts.w13/w2: local slice}) — what each actor receives."""
    blocks = model.moe_blocks()
    plan.check_compatible(len(blocks), blocks[0].experts.num_experts if blocks else 0)
    prefixes = _block_prefixes(model)
    dense = _dense_part(model, prefixes)
    per_rank = []
    for r in range(plan.num_ranks):
        d = {}
        for b in blocks:
            ids = plan.experts_on(r, b.moe_index)
            d[f"{prefixes[b.moe_index]}.experts.w13"] = b.experts.w13.detach()[ids].cpu().clone()
            d[f"{prefixes[b.moe_index]}.experts.w2"] = b.experts.w2.detach()[ids].cpu().clone()
        per_rank.append(d)
    return dense, per_rank


def split_units(model, world: int) -> tuple[dict, list[dict]]:
    """Like ``split_state_dict`` for the adaptive layer: each rank's expert units (ShardLayout)."""
    from .adaptive import ShardLayout
    prefixes = _block_prefixes(model)
    dense = _dense_part(model, prefixes)
    per_rank = [{} for _ in range(world)]
    for b in model.moe_blocks():
        w13, w2 = b.experts.w13.detach().cpu(), b.experts.w2.detach().cpu()
        layout = ShardLayout(w13.shape[0], w13.shape[1] // 2, world)
        for r in range(world):
            u13, u2 = layout.shard(w13, w2, r)
            per_rank[r][f"{prefixes[b.moe_index]}.experts.w13"] = u13
            per_rank[r][f"{prefixes[b.moe_index]}.experts.w2"] = u2
    return dense, per_rank


def apply_adaptive_units(model, group, local_weights: dict, backend: str) -> TokenState:
    """Replace every ``block.experts`` by the adaptive layer on this rank's units, in the runtime's
    replicated context (every rank holds every token: ReplicatedTokensExperts). One chooser serves
    all layers, keyed by shape. Returns a TokenState (its counters stay zero: the adaptive layer
    keeps its own, read through ``adaptive_stats``)."""
    from .adaptive import AdaptiveMoEExperts, ReplicatedTokensExperts, StrategyChooser
    prefixes = _block_prefixes(model)
    chooser = StrategyChooser()
    dev = model.embed.weight.device
    for b in model.moe_blocks():
        E = b.experts.num_experts
        inner = AdaptiveMoEExperts(local_weights[f"{prefixes[b.moe_index]}.experts.w13"].to(dev),
                                   local_weights[f"{prefixes[b.moe_index]}.experts.w2"].to(dev), group=group,
                                   backend=backend, chooser=chooser, num_experts=E)
        b.experts = ReplicatedTokensExperts(inner)
    model.parallel_chooser = chooser
    return TokenState(dist.get_rank(group), dist.get_world_size(group), "adaptive", group)


def adaptive_stats(model) -> dict:
    """The adaptive layers' figures for counters(): strategy of the first layer's last call,
    dropped pairs and strategy switches summed over layers."""
    out = {"strategy": None, "dropped_tokens": 0, "strategy_switches": 0}
    for b in model.moe_blocks():
        st = b.experts.stats()
        if st and out["strategy"] is None:
            out["strategy"] = st["strategy"]
        out["dropped_tokens"] += int(st.get("dropped_tokens", 0))
        out["strategy_switches"] += int(st.get("strategy_switches", 0))
    return out


def apply_placement(model, plan: PlacementPlan, rank: int, mode: str = "coherent", group=None,
                    local_weights: dict | None = None, backend: str | None = None) -> TokenState:
    """Replace every ``block.experts`` of ``model`` by this rank's expert-parallel module.

    ``local_weights`` ({prefix.experts.w13/w2: [n_local, ...]}, from ``split_state_dict``) or,
    when None, slices of the model's own experts. Returns the rank's shared TokenState.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= rank < plan.num_ranks:
        raise ValueError(f"rank {rank} outside the plan's 0..{plan.num_ranks - 1}")
    blocks = model.moe_blocks()
    if not blocks:
        raise ValueError("the model has no MoE layers to place")
    plan.check_compatible(len(blocks), blocks[0].experts.num_experts)
    prefixes = _block_prefixes(model)
    state = TokenState(rank, plan.num_ranks, mode, group)
    for b in blocks:
        ids = plan.experts_on(rank, b.moe_index)
        if local_weights is not None:
            w13 = local_weights[f"{prefixes[b.moe_index]}.experts.w13"]
            w2 = local_weights[f"{prefixes[b.moe_index]}.experts.w2"]
        else:
            w13, w2 = b.experts.w13.detach()[ids].clone(), b.experts.w2.detach()[ids].clone()
        dev = model.embed.weight.device
        b.experts = ExpertParallelExperts(w13.to(dev), w2.to(dev), ids, copies_table(plan, b.moe_index), state,
                                          first_layer=b.moe_index == 0,
                                          backend=backend or getattr(b.experts, "backend", "torch"),
                                          ranks_per_node=plan.ranks_per_node, copy_choice=plan.copy_choice,
                                          layer=b.moe_index)
    return state


class _Vacant(nn.Module):
    """Stands in for a block's experts until apply_placement installs this rank's own."""

    def __init__(self, num_experts: int, backend: str):
        super().__init__()
        self.num_experts, self.backend = num_experts, backend

    def forward(self, *args):
        raise RuntimeError("experts not placed yet: call apply_placement first")


# --- Ray actors ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class EPWorker:
    """One rank: builds the model's dense part and its own experts, joins the process group."""

    def __init__(self, rank: int, world: int, cfg: EPConfig):
        torch.set_num_threads(cfg.torch_threads)
        self.rank, self.world, self.cfg = rank, world, cfg
        self.device = torch.device("cuda", 0) if cfg.device == "cuda" else torch.device("cpu")
        self.model = None
        self.state = None
        self.groups: dict[int, object] = {}  # n -> process group of ranks 0..n-1 (plans on fewer ranks)
        self.trace_spec = None  # trace_routing.TraceRoutingSpec installed at every load, or None
        self.serve_cache = None  # open_cache / step (serving); made again after every load
        self._serve_len: list[int] = []  # each serving row's length, counted on the host (graph buckets)
        self._serve_graphs: dict[str, object] = {}  # mode -> decode.HomeDecodeGraphs over serve_cache
        self._serve_graphs_off = ""  # why serving decodes eagerly (a capture failed), or ""
        self._serve_s = 0.0  # seconds inside step() (rank 0's include waiting for the GPU), for stats
        # greedy(graphs=True): (batch, max_len, mode) -> (its KV cache, decode.HomeDecodeGraphs), kept
        # so that later calls replay the graphs the first captured; dropped at every load
        self._home_graphs: dict[tuple, tuple] = {}

    def address(self) -> tuple[str, int]:
        import ray
        return ray.util.get_node_ip_address(), _free_port()

    @_traced
    def connect(self, rank: int, addr: str, port: int) -> None:
        self.rank = rank
        dist.init_process_group(self.cfg.process_group(), init_method=f"tcp://{addr}:{port}",
                                rank=self.rank, world_size=self.world)

    @_traced
    def load(self, hf_config: dict, dense: dict, local: dict, plan_dict: dict) -> int:
        """Build the dense model and this rank's experts (again, for another model or plan).

        A plan on n < world ranks runs on ranks 0..n-1 in their own process group (every rank
        takes part in making it, as torch.distributed requires); the others stay idle."""
        dtype = next(iter(dense.values())).dtype

        def fill(model, plan):
            missing, unexpected = model.load_state_dict(dense, strict=False)
            if missing or unexpected:
                raise ValueError(f"rank {self.rank}: state dict mismatch, missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
            return {k: v.to(dtype) for k, v in local.items()}
        return self._build(hf_config, plan_dict, dtype, fill)

    @_traced
    def load_seeded(self, hf_config: dict, plan_dict: dict, seed: int, std: float, dtype: str) -> int:
        """Like ``load`` for a random model (trace_routing.seeded_model): this rank draws its dense
        part and its own experts itself, so no weights travel."""
        from .trace_routing import expert_shapes, expert_weights, init_dense_seeded
        dt = getattr(torch, dtype)

        def fill(model, plan):
            init_dense_seeded(model, seed, std)
            blocks, prefixes = model.moe_blocks(), _block_prefixes(model)
            shapes = expert_shapes(model)
            local = {}
            for b in blocks:
                w13, w2 = expert_weights((len(blocks), model.config.num_experts), b.moe_index,
                                         plan.experts_on(self.rank, b.moe_index), shapes, seed, std, dt, self.device)
                local[f"{prefixes[b.moe_index]}.experts.w13"] = w13
                local[f"{prefixes[b.moe_index]}.experts.w2"] = w2
            return local
        return self._build(hf_config, plan_dict, dt, fill)

    def _build(self, hf_config: dict, plan_dict: dict, dtype: torch.dtype, fill) -> int:
        from moe import MoEConfig, MoEForCausalLM
        self.model = self.state = self.serve_cache = None
        self._home_graphs, self._serve_graphs, self._serve_len, self._serve_graphs_off = {}, {}, [], ""
        plan = PlacementPlan.from_dict(plan_dict)
        n = plan.num_ranks
        group = None
        if n < self.world:
            if n not in self.groups:
                self.groups[n] = dist.new_group(list(range(n)))
            group = self.groups[n]
        if self.rank >= n:
            return 0
        mcfg = MoEConfig.from_hf_dict(hf_config)
        # built on the meta device, the routed experts swapped for a vacant stand-in before any
        # memory is allocated: a rank never holds experts the plan puts elsewhere
        model = MoEForCausalLM(mcfg, backend=self.cfg.backend, dtype=dtype, device="meta")
        for b in model.moe_blocks():
            b.experts = _Vacant(b.experts.num_experts, self.cfg.backend)
        model.to_empty(device=self.device)
        local = fill(model, plan)
        model.reset_rotary(self.device)
        if self.cfg.parallel == "adaptive":
            self.state = apply_adaptive_units(model, group, local, self.cfg.backend)
        else:
            self.state = apply_placement(model, plan, self.rank, self.cfg.mode, group, local, self.cfg.backend)
        self.model = model.eval()
        if self.state.check and self.cfg.parallel == "placement":
            self._check_hooks()
        if self.trace_spec is not None:
            from .trace_routing import install_trace_routing
            install_trace_routing(self.model, self.trace_spec)
        return sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)

    def _check_hooks(self) -> None:
        """MOEFLOW_EP_CHECK=1: besides every MoE layer's input and routing (ExpertParallelExperts), check
        that the ranks agree on each decoder layer's input, its mask and KV cache rows, its attention's
        output and its MoE block's output (check_agreement; rows = batch rows), in replicated
        forwards of the whole model (decode.py's home-only steps differ by design)."""
        st = self.state
        whole = [False]  # inside a replicated forward of the whole model (decode.py's steps are home-only)
        self.model.register_forward_pre_hook(lambda m, a: whole.__setitem__(0, True))
        self.model.register_forward_hook(lambda m, a, out: whole.__setitem__(0, False))

        def check(where, **t):
            if whole[0]:
                check_agreement(st, where, **t)

        def pre(layer, args):
            x, cos, sin, mask = args[:4]
            cache = args[4] if len(args) > 4 else None
            t = dict(layer_input=x, cos=cos, sin=sin, mask=mask)
            kc = getattr(cache, "_k", None)
            if isinstance(kc, dict) and layer.layer_idx in kc:  # this layer's KV cache, once allocated
                t |= dict(k_cache=kc[layer.layer_idx], v_cache=cache._v[layer.layer_idx])
            if cache is not None:
                t |= dict(cache_lengths=cache.lengths[:, None])
            check(f"decoder layer {layer.layer_idx}", **t)

        for layer in self.model.layers:
            layer.register_forward_pre_hook(pre)
            layer.attn.register_forward_hook(
                lambda m, a, out: check(f"decoder layer {m.layer_idx}", attention_output=out))
            layer.mlp.register_forward_hook(
                lambda m, a, out, i=layer.layer_idx: check(f"decoder layer {i}", mlp_output=out))

    def set_trace_routing(self, spec) -> None:
        """Route by ``spec`` (trace_routing.TraceRoutingSpec) from the next ``load`` on."""
        self.trace_spec = spec

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.cfg.parallel == "adaptive":
            raise ValueError("the adaptive layer has no placement mode; choose its strategy with set_strategy")
        if self.state is not None:
            self.state.mode = mode

    @_traced
    @torch.no_grad()
    def forward(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor | None:
        if self.model is None:  # idle under a plan on fewer ranks
            return None
        out = self.model(input_ids_BT.to(self.device), valid_BT=None if valid_BT is None else valid_BT.to(self.device),
                         last_only=last_only)
        # every rank computed the same logits; only rank 0's travel back (a prefill's [B, T, V] is large)
        return pack_result(out) if self.rank == 0 else None

    @_traced
    @torch.no_grad()
    def greedy(self, input_ids_BT: torch.Tensor, max_new_tokens: int, home_only: bool = False,
               graphs: bool = False):
        """Greedy decoding with the KV cache: prefill, then one token per row per step.

        home_only: decode steps run each row's attention only on its home rank (decode.py,
        ExFlow's decoding); otherwise every step is a replicated forward. graphs (with home_only,
        CUDA, the triton experts): the decode steps are replayed from CUDA graphs
        (decode.HomeDecodeGraphs), the same numbers without the launches. Returns
        (tokens [B, n], logits of every decode step's input [B, n, V])."""
        from .decode import HomeDecodeGraphs, decode_step
        if self.model is None:
            return None
        if home_only and self.cfg.parallel == "adaptive":
            raise ValueError("home-only decoding places each row by the plan; the adaptive layer runs replicated "
                             "decoding (home_only=False)")
        if graphs and not home_only:
            raise ValueError("graphs=True replays ExFlow's home-only decode steps: pass home_only=True too")
        if graphs and self.cfg.process_group() != "nccl":
            raise ValueError("graphs=True needs GPU ranks joined by NCCL: a collective through host memory "
                             "(comm='gloo') cannot be captured; decode with graphs=False")
        ids = input_ids_BT.to(self.device)
        B, T = ids.shape
        replay = None
        if graphs:  # captured on the first call of this shape and mode, replayed by the later ones
            key = (B, T + max_new_tokens, self.state.mode)
            if key not in self._home_graphs:
                cache = self.model.new_cache(B, T + max_new_tokens)
                self._home_graphs[key] = (cache, HomeDecodeGraphs(self.model, cache, self.state))
            cache, replay = self._home_graphs[key]
            cache.reset()
        else:
            cache = self.model.new_cache(B, T + max_new_tokens)
        logits = self.model(ids, cache=cache, last_only=True)  # only the last position is read
        out, steps = [], [logits[:, -1:]]
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if i == 0 or not home_only:  # replicated logits: rank 0's tokens, as the serving engine feeds
                nxt = self._rank0_tokens(nxt)  # (home-only steps give every rank the same logits)
            out.append(nxt)
            if i == max_new_tokens - 1:
                break
            if replay is not None:  # every row is T + i long: the prompt has no padding
                logits = replay.step(nxt, torch.ones_like(nxt, dtype=torch.bool), T + i).clone()
            elif home_only:
                logits = decode_step(self.model, cache, nxt, self.state)
            else:
                logits = self.model(nxt, cache=cache)
            steps.append(logits[:, -1:])
        if replay is not None:
            replay.flush_counters()
        return torch.cat(out, 1).cpu(), torch.cat(steps, 1).cpu()

    def _rank0_tokens(self, nxt: torch.Tensor) -> torch.Tensor:
        """Rank 0's next tokens on every rank: a replicated forward's logits can differ in the last bits
        between ranks (same_routing says why), so a near tie can pick another token on another rank."""
        if self.state.world > 1:
            broadcast(nxt, group=self.state.group)
        return nxt

    @_traced
    def open_cache(self, batch_size: int, max_len: int) -> None:
        """A KV cache of ``batch_size`` rows kept on this rank between ``step`` calls (serving: the
        engine's continuous batch; every rank holds every row's context, as coherent mode needs)."""
        self.serve_cache = None if self.model is None else self.model.new_cache(batch_size, max_len)
        self._serve_len, self._serve_graphs = [0] * batch_size, {}

    def _home_decode(self) -> bool:
        """Serving's decode steps run ExFlow's home-only decoding (EPConfig.decode)."""
        return self.cfg.parallel == "placement" and self.cfg.decode in ("auto", "home")

    def _serve_graph(self):
        """This mode's HomeDecodeGraphs over the serving cache, or None where decode steps run eagerly."""
        if not (self.cfg.cuda_graph and self.cfg.device == "cuda" and self.cfg.backend == "triton"
                and self.cfg.process_group() == "nccl") or self._serve_graphs_off:
            return None
        mode = self.state.mode
        if mode not in self._serve_graphs:
            from .decode import HomeDecodeGraphs
            self._serve_graphs[mode] = HomeDecodeGraphs(self.model, self.serve_cache, self.state)
        return self._serve_graphs[mode]

    def _capture_together(self, replay, ids_B1: torch.Tensor, valid_B1: torch.Tensor, longest: int):
        """Capture ``replay``'s graph for a new slot bucket on every rank, and agree on the outcome:
        ``replay`` where every rank captured it, else None on every rank (serving decodes eagerly
        from then on). A rank replaying a graph while another runs the eager step would wait on
        collectives that never match."""
        from moe.cuda_graph import GraphCaptureError
        err = None
        try:
            replay.capture_for(ids_B1, valid_B1, longest)
        except GraphCaptureError as e:  # the cache is as it was
            err = e
        failed = torch.tensor([0 if err is None else 1], dtype=torch.int32, device=self.device)
        all_reduce(failed, group=self.state.group)
        if not int(failed.item()):
            return replay
        self._serve_graphs_off = str(err) if err is not None else "another rank's capture failed"
        warnings.warn(f"rank {self.rank}: serving decodes without CUDA graphs from now on: {self._serve_graphs_off}",
                      RuntimeWarning, stacklevel=3)
        return None

    @_traced
    @torch.no_grad()
    def step(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None, reset_rows: list[int],
             last_only: bool, argmax: bool = False) -> torch.Tensor | None:
        """One forward of the serving batch over the kept cache, after emptying ``reset_rows``.
        Every rank runs it (the all-to-alls need all of them); rank 0 returns the logits, or with
        ``argmax`` (needs ``last_only``) each row's greedy token [B, 1] (int64), taken on its device
        as the engine's sampler takes it (argmax of the float32 logits): 8 bytes a row to send back
        instead of a vocabulary's logits.

        A decode step (one token per row, last position only) runs ExFlow's home-only decoding
        where EPConfig.decode says so, replayed from CUDA graphs on GPUs (one per slot bucket of
        the longest row, counted here on the host); prefill steps are replicated forwards."""
        from .decode import decode_step
        if self.model is None:
            return None
        if self.serve_cache is None:
            raise ValueError("no serving cache on this rank: call open_cache(batch_size, max_len) first")
        if argmax and not last_only:
            raise ValueError("step(argmax=True) returns each row's next greedy token: it needs last_only=True")
        t0 = time.perf_counter()
        B, T = input_ids_BT.shape
        if reset_rows:
            self.serve_cache.reset(reset_rows)
            for r in reset_rows:
                self._serve_len[r] = 0
        valid_cpu = torch.ones(B, T, dtype=torch.bool) if valid_BT is None else valid_BT.to("cpu", torch.bool)
        ids, valid = input_ids_BT.to(self.device), valid_cpu.to(self.device)
        if T == 1 and last_only and self._home_decode() and bool(valid_cpu.any()):
            replay = self._serve_graph()
            if replay is not None:
                longest = max(n for n, v in zip(self._serve_len, valid_cpu[:, 0].tolist()) if v)
                if replay.slots_for(longest) not in replay.captured:  # a new bucket: alike on every rank
                    replay = self._capture_together(replay, ids, valid, longest)
            if replay is not None:
                out = replay.step(ids, valid, longest)
            else:
                out = decode_step(self.model, self.serve_cache, ids, self.state, valid_B1=valid)
        else:
            out = self.model(ids, cache=self.serve_cache, valid_BT=valid, last_only=last_only)
        for b, n in enumerate(valid_cpu.sum(1).tolist()):
            self._serve_len[b] += n
        if self.rank == 0 and argmax:
            out = out.float().argmax(-1)
        out = pack_result(out) if self.rank == 0 else None  # rank 0: the step's end on the GPU too
        self._serve_s += time.perf_counter() - t0
        return out

    def set_strategy(self, name: str | None) -> None:
        """parallel='adaptive': fix every layer's strategy ('ep:d2', 'dp', 'tp', 'ep+dp:g2', ...), or
        None to let the chooser pick per call; it takes effect at the next call, no weight moves."""
        from .adaptive import Strategy
        if self.cfg.parallel != "adaptive":
            raise ValueError("set_strategy needs the runtime started with EPConfig(parallel='adaptive')")
        fixed = None if name is None else Strategy.parse(name)
        for b in (self.model.moe_blocks() if self.model is not None else []):
            b.experts.inner.fixed = fixed

    def profile(self, method: str, *args, row_limit: int = 30) -> str | None:
        """Run ``method(*args)`` (every rank must, for the collectives) under torch.profiler on rank 0;
        rank 0 returns its operator table sorted by device (or CPU) time, the others None."""
        if self.rank != 0:
            getattr(self, method)(*args)
            return None
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cfg.device == "cuda" else [])
        with profile(activities=acts) as prof:
            getattr(self, method)(*args)
            if self.cfg.device == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if self.cfg.device == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=row_limit)

    def counters(self) -> dict | None:
        if self.state is None:
            return None
        for g in self._serve_graphs.values():  # rows the replayed decode steps moved, summed on the device
            g.flush_counters()
        out = dict(self.state.counters, serve_step_seconds=self._serve_s)
        if self.cfg.parallel == "adaptive":
            out.update(adaptive_stats(self.model))
        return out

    def reset_counters(self) -> None:
        for g in self._serve_graphs.values():  # rows moved by replayed steps: counted, then zeroed below
            g.flush_counters()
        for k in (self.state.counters if self.state is not None else ()):
            self.state.counters[k] = 0

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class ExpertParallelRuntime:
    """Driver side: P actors in a placement group, one forward at a time in all of them.

    ``model`` None: the actors start empty; give them a model with ``load`` or ``load_seeded``."""

    def __init__(self, model, plan: PlacementPlan, config: EPConfig | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            raise ValueError("Ray is not initialised: call ray.init() (or ray.init(address='auto') on a cluster) first")
        self.cfg = cfg = config or EPConfig()
        P = plan.num_ranks
        gpus = cfg.gpus_per_rank if cfg.device == "cuda" else 0
        bundle = {"CPU": cfg.cpus_per_actor} | ({"GPU": gpus} if gpus else {})
        self.pg = placement_group([bundle] * P, strategy="PACK")
        ray.get(self.pg.ready(), timeout=120)
        actor_cls = ray.remote(EPWorker)
        self.workers = [actor_cls.options(
            num_cpus=cfg.cpus_per_actor, num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
        ).remote(r, P, cfg) for r in range(P)]
        # ranks are node-major (the plan puts rank r on node r // (P / nodes)): number the
        # actors machine by machine, and check every machine holds one node's worth of them
        where = ray.get([w.address.remote() for w in self.workers])
        order = sorted(range(P), key=lambda r: (where[r][0], r))
        self.workers = [self.workers[r] for r in order]
        per_ip = {}
        for r in order:
            per_ip[where[r][0]] = per_ip.get(where[r][0], 0) + 1
        if plan.num_nodes > 1 and sorted(per_ip.values()) != [plan.ranks_per_node] * plan.num_nodes:
            raise ValueError(f"the plan wants {plan.num_nodes} nodes of {plan.ranks_per_node} ranks but Ray placed "
                             f"the actors {per_ip}; start the cluster with that many GPUs per machine")
        addr, port = where[order[0]]
        ray.get([w.connect.remote(rank, addr, port) for rank, w in enumerate(self.workers)])
        self.machines = [where[r][0] for r in order]
        self.plan = plan
        if model is not None:
            self.load(model, plan)

    def load(self, model, plan: PlacementPlan) -> None:
        """Give the ranks another model or plan; a plan on fewer ranks runs on the first ones."""
        import ray
        if plan.num_ranks > len(self.workers):
            raise ValueError(f"the plan has {plan.num_ranks} ranks but this runtime only {len(self.workers)}; "
                             "start an ExpertParallelRuntime with a plan on that many ranks")
        if self.cfg.parallel == "adaptive":
            if plan.num_ranks != len(self.workers):
                raise ValueError(f"parallel='adaptive' spreads every layer over all {len(self.workers)} ranks; "
                                 f"the plan has {plan.num_ranks}")
            dense, per_rank = split_units(model, plan.num_ranks)
        else:
            dense, per_rank = split_state_dict(model, plan)
        dense_ref = ray.put(dense)
        hf = model.config.to_hf_dict()
        self.plan = plan
        per_rank += [{}] * (len(self.workers) - plan.num_ranks)
        self.expert_params = ray.get([w.load.remote(hf, dense_ref, per_rank[r], plan.to_dict())
                                      for r, w in enumerate(self.workers)])[:plan.num_ranks]

    def load_seeded(self, config, plan: PlacementPlan, seed: int = 0, std: float = 0.02,
                    dtype: torch.dtype = torch.float32) -> None:
        """Load ``trace_routing.seeded_model(config, seed, std, dtype)`` without shipping weights:
        every rank draws its dense part and its own experts on its device."""
        import ray
        if self.cfg.parallel == "adaptive":
            raise ValueError("load_seeded draws the plan's experts per rank; with parallel='adaptive' give the "
                             "model to load() instead")
        if plan.num_ranks > len(self.workers):
            raise ValueError(f"the plan has {plan.num_ranks} ranks but this runtime only {len(self.workers)}")
        plan.check_compatible(sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers)),
                              config.num_experts)
        self.plan = plan
        hf, pd, name = config.to_hf_dict(), plan.to_dict(), str(dtype).removeprefix("torch.")
        self.expert_params = ray.get([w.load_seeded.remote(hf, pd, seed, std, name)
                                      for w in self.workers])[:plan.num_ranks]

    def set_trace_routing(self, spec) -> None:
        """Every rank routes by ``spec`` (trace_routing.TraceRoutingSpec) from the next load on."""
        self._all("set_trace_routing", spec)

    def _all(self, method: str, *args):
        import ray
        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def forward(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V], or [B, 1, V] with ``last_only`` (every rank computes them; rank 0's are returned)."""
        return unpack_result(self._all("forward", input_ids_BT.cpu(), None if valid_BT is None else valid_BT.cpu(),
                                    last_only)[0])

    def greedy(self, input_ids_BT: torch.Tensor, max_new_tokens: int, home_only: bool = False,
               graphs: bool = False):
        """(tokens [B, n], logits [B, n, V]) of greedy decoding; see EPWorker.greedy."""
        return self._all("greedy", input_ids_BT.cpu(), max_new_tokens, home_only, graphs)[0]

    def set_mode(self, mode: str) -> None:
        self._all("set_mode", mode)

    def set_strategy(self, name: str | None) -> None:
        """parallel='adaptive': every rank fixes this strategy from the next call (None: the chooser)."""
        self._all("set_strategy", name)

    def open_cache(self, batch_size: int, max_len: int) -> None:
        """Every rank keeps a KV cache of ``batch_size`` rows for ``step`` (serving)."""
        self._all("open_cache", batch_size, max_len)

    def step(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor | None = None, reset_rows=(),
             last_only: bool = False, argmax: bool = False) -> torch.Tensor:
        """One forward of a continuous batch over the ranks' kept caches (rows in ``reset_rows``
        emptied first): logits [B, T, V], or [B, 1, V] with ``last_only``; with ``argmax`` (and
        ``last_only``) each row's greedy next token [B, 1] instead, taken on rank 0."""
        out = self._all("step", input_ids_BT.cpu(), None if valid_BT is None else valid_BT.cpu(),
                        [int(r) for r in reset_rows], bool(last_only), bool(argmax))[0]
        return unpack_result(out) if argmax else unpack_result(out, torch.float32)

    def profile(self, method: str, *args) -> str:
        """Rank 0's torch.profiler operator table of one ``method`` call (e.g. 'forward', 'greedy')."""
        return self._all("profile", method, *args)[0]

    def counters(self) -> list[dict]:
        """Traffic counters of the ranks the current plan uses."""
        return self._all("counters")[:self.plan.num_ranks]

    def reset_counters(self) -> None:
        self._all("reset_counters")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group
        try:
            # leave the process groups where a rank still answers; a dead rank (the reason for many
            # shutdowns) has nothing to leave, and a peer stuck on it is killed below anyway
            for ref in [w.shutdown.remote() for w in self.workers]:
                try:
                    ray.get(ref, timeout=30)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    pass
        finally:
            for w in self.workers:
                ray.kill(w)
            remove_placement_group(self.pg)
