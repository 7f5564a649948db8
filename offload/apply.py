"""apply_offload: turn a loaded model into one whose experts live off the device.

    model = apply_offload(model, OffloadConfig(gpu_memory="24GiB", policy="lru", cpu_fallback=True))
    model.offload_cache.stats()

Each `block.experts` (forward(x_TD, topk_ids_TK, topk_weights_TK) -> y_TD) is replaced by an
`OffloadedExperts` of the same signature; the model code does not change. Per call:

    routing ids ─► cache.observe ─► hits / misses ─► cost model: copy or CPU (split so both end together)
       ─► cache.ensure (rounds of <= S experts) ─► kernel on the slot pool with ids remapped to slots
       ─► prefetch for layer l+1 (predictor, or layer l+1's router applied to this layer's input)
       ─► CPU experts from the host store ─► y_TD = GPU part + CPU part

`route_by_trace` replaces the routers' outputs by a RoutingTrace (forward hooks), so that
random-weight models of real shapes see realistic routing.

Shape legend: T = tokens, D = hidden, K = experts per token, E = experts, S = slots per layer.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from kernels import get_backend

from .cache import STAGES, ExpertCache
from .config import AUTO_DEVICE_MAX_EXPERT, PACK_AUTO_FROM, PACK_AUTO_FROM_DEVICE, OffloadConfig, parse_bytes
from .cost_model import CostModel
from .cpu_compute import cpu_experts
from .device_cache import DeviceExpertCache, DeviceOffloadedExperts
from .policies import count_ids, make_policy
from .prefetch import (CopyBudget, Lookahead, ProbeRouter, attention_routers, default_threshold, guess_count,
                       guessed_experts, reads_point_c, release_router, router_guess)
from .slices import check_slices, expand_ids, expand_weights, unit_trace, units_of
from .store import DiskExpertStore, ExpertStore, HostExpertStore, PackedHostExpertStore


class OffloadedExperts(nn.Module):
    """Drop-in for block.experts: experts from an ExpertCache, misses copied or computed on the CPU."""

    def __init__(self, layer: int, cache: ExpertCache, top_k: int, backend: str = "torch",
                 cost_model: CostModel | None = None, cpu_fallback: bool = False,
                 next_router: nn.Module | None = None, lookahead: Lookahead | None = None,
                 predictor_prefetch: bool = False, prefetch_k: int = 0, miss_split: str = "reuse",
                 copy_budget: CopyBudget | None = None, attention_source=None, guess_source: str = ""):
        super().__init__()
        # the predictor's lookahead reads point C (routing.AttentionLookahead): this layer's AttentionRouter onto
        # the next MoE layer gives it the next layer's logits (None at the last layer); lookahead_features()
        self._attention_source = [attention_source]  # a list: not a child module (it runs layer l+1's attention)
        self.copy_budget = copy_budget  # shared by every layer (one copy engine); None: prefetch when idle
        self.miss_split = miss_split
        self.layer, self.cache, self.top_k = layer, cache, top_k
        self.backend = backend
        self.cost_model, self.cpu_fallback = cost_model, cpu_fallback
        if cpu_fallback and cost_model is None:
            raise ValueError("cpu_fallback needs a cost_model to decide copy or CPU")
        self._next_router = [next_router]  # a list: not registered as a child module (it belongs to layer l+1)
        self.lookahead, self.predictor_prefetch = lookahead, predictor_prefetch
        self.prefetch_k = prefetch_k or top_k  # the predictor's prefetch: experts per token
        # the next router's guesses per token (guess_source: OffloadConfig.prefetch, whose default count it sets)
        self.guess_k = guess_count(prefetch_k, top_k, guess_source)
        self.slices = cache.store.slices  # G: the cache holds units, G per expert (offload/slices.py)
        self.num_experts = cache.num_experts // self.slices
        self._prepared_at: int | None = None  # cache.changes[layer] at the last prepare_speculation()
        self._left_out: set[int] = set()  # experts that speculation's table left out (copies still running)

    @property
    def store(self) -> ExpertStore:
        return self.cache.store

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, slots={self.cache.slots}, experts={self.num_experts}, slices={self.slices}, "
                f"backend={self.backend}")

    def set_next_router(self, router: nn.Module | None) -> None:
        """What guesses layer l+1's experts from this layer's input for prefetch: anything with a
        router's call shape, forward(x_TD) -> (_, _, logits_TE) (layer l+1's router, a probe, a
        recorded guess: placement.trace_routing.TraceLookahead). None: no next-layer prefetch."""
        if self._next_router[0] is not self._attention_source[0]:  # (the predictor may still read point C through it)
            release_router(self._next_router[0], router)
        self._next_router = [router]

    def _expert_resident(self, layer: int, expert: int) -> bool:
        return all(self.cache.is_resident(layer, u) for u in units_of([expert], self.slices))

    def guess_next(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """The next router's guess of layer l+1's experts for these tokens, ids [T, k] on the device
        (None without a next router). No host sync, so it can sit inside a CUDA graph: graph pieces
        compute it beside the routing and hand it to forward(guess_host=) with the ids, instead of the
        host launching the router and reading its answer back between pieces."""
        router = self._next_router[0]
        if router is None or self.layer + 1 >= self.cache.num_layers:
            return None
        return router_guess(router, x_TD, self.guess_k)

    @property
    def lookahead_attention(self) -> bool:
        """Whether the predictor's lookahead reads point C (then lookahead_features() hands it C's logits)."""
        return self.lookahead is not None and self.lookahead.reads_attention

    def lookahead_features(self, x_TD: torch.Tensor) -> torch.Tensor | None:
        """What the predictor reads beside this layer's routing when its lookahead source is point C
        (routing.AttentionLookahead): the hidden state with C's logits of the next layer appended ([T, D + E]; zeros
        at the last layer), computed on the device with no host sync, so a graph piece can compute it beside the
        routing (moe.cuda_graph). None for any other predictor (it reads the hidden state itself)."""
        if not self.lookahead_attention:
            return None
        src = self._attention_source[0]
        with torch.no_grad():
            if src is None:  # the last MoE layer: nothing ahead
                c_TE = torch.zeros(x_TD.shape[0], self.num_experts, device=x_TD.device)
            else:
                c_TE = src.forward(x_TD)[2].float()
            return torch.cat([x_TD.float(), c_TE], dim=-1)

    def _prefetch_next(self, x_TD: torch.Tensor, ids_np: np.ndarray, guess_np: np.ndarray | None = None,
                       features: torch.Tensor | None = None) -> None:
        """ids_np: this layer's expert ids (not units); predictions and guesses are experts, copied as units.
        guess_np: guess_next()'s ids already on the host (else the next router runs here); features:
        lookahead_features()'s answer already computed (else computed here)."""
        nxt = self.layer + 1
        cache, G = self.cache, self.slices
        hidden = None
        if self.lookahead is not None and self.lookahead.wants_hidden:  # (a small copy; ids_np already synced)
            if features is None:
                features = self.lookahead_features(x_TD)
            hidden = (x_TD if features is None else features).detach().to("cpu", torch.float32).numpy()
        predicted = self.lookahead is not None and self.lookahead.observe(self.layer, ids_np, hidden)
        budget = self.copy_budget
        if budget is not None:
            budget.tick()
        # the predictor's guesses queue behind this layer's demand copies: within the copy budget when
        # one is set, else only when the copy engine is idle (never ahead of a demand copy either way)
        if predicted and self.predictor_prefetch and (budget is not None or not cache.copies_in_flight(self.layer)):
            for j in self.lookahead.targets(self.layer):
                want = self.lookahead.to_prefetch(j, self.prefetch_k * len(ids_np), cache.slots // G,
                                                  self._expert_resident)
                if budget is not None:
                    want = want[:budget.available()]
                issued = cache.prefetch(j, units_of(want, G))
                if budget is not None:
                    budget.spend(issued / G)
        if nxt >= cache.num_layers:
            return
        if self._next_router[0] is not None:
            # mixtral-offloading's speculation: layer l+1's gate on layer l's input (or a probe, or a guess)
            guess = guess_np if guess_np is not None else self.guess_next(x_TD).cpu().numpy()
            self.cache.prefetch(nxt, units_of(guessed_experts(guess, self.cache.slots // G), G))

    def _kernel(self, x_TD, ids_TK, topk_weights_TK):
        pool13, pool2 = self.cache.pool(self.layer)
        return get_backend(self.backend)(x_TD, pool13, pool2, ids_TK, topk_weights_TK)

    def _remap(self, ids_np: np.ndarray, rounds: list[list[int]], slots: list[list[int]], device) -> torch.Tensor:
        """ids_RTK: for each round, the token's slot where its expert is in that round, else -1.

        Built on the host (the ids are there already) and sent in one copy from pinned memory, so
        the host never waits for the compute stream here (a pageable copy would).
        """
        out = np.full((len(rounds), *ids_np.shape), -1, dtype=np.int64)
        for r, (chunk, sl) in enumerate(zip(rounds, slots)):
            lut = np.full(self.cache.num_experts + 1, -1, dtype=np.int64)  # units; index -1 hits the last entry
            lut[np.asarray(chunk, dtype=np.int64)] = sl
            out[r] = lut[ids_np]
        t = torch.from_numpy(out)
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    # --- speculation: the all-resident case computed before the host has looked at the ids ---------
    def can_speculate(self) -> bool:
        return self.slices == 1

    def can_run_ahead(self) -> bool:
        """Whether forward(..., speculated=, ids_host=) reads nothing from the device but the ids it
        is handed: no next-layer gate and no predictor (their guesses come back to the host) and no
        CPU fallback (the input goes to the host). Only then may the caller queue the next layer's
        work before this call without the call waiting for that work (moe.cuda_graph's run-ahead)."""
        return (self.can_speculate() and self._next_router[0] is None and self.lookahead is None
                and not self.cpu_fallback)

    def prepare_speculation(self) -> None:
        """Right before work that runs speculate()'s kernel: the slot table made current and the
        current stream ordered after the copies into the slots it names. A speculation is kept only
        if the layer's residents have not changed since and it left out none of the routed experts
        (forward checks).

        Experts whose copies are still running (prefetched one layer ahead) are left out of the
        table, so the work before the kernel (the piece: attention, router) is not held up by
        those copies but runs beside them. When the routing then picks one of them, the
        speculation is dropped and forward waits for that copy alone."""
        cache, layer = self.cache, self.layer
        pending = cache.in_flight(layer)
        cache.slot_table(layer, exclude=pending)
        if pending:
            cache.wait(layer, [s for e, s in cache.slot_of[layer].items() if e not in pending])
        else:
            cache.await_copies(layer)
        self._prepared_at = cache.changes[layer]
        self._left_out = pending

    def speculate(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        """The output if every routed expert is resident: ids mapped to slots on the device (the
        others to -1, contributing zero) and the kernel on the slot pool. No host sync, so it can
        sit inside a CUDA graph; forward(..., speculated=y) then takes y when the host finds every
        expert resident (the same kernel on the same inputs as its own), else computes as usual.
        Call prepare_speculation() before the work that runs it."""
        ids = topk_ids_TK if topk_ids_TK.dtype == torch.long else topk_ids_TK.long()
        # the buffer as prepare_speculation() left it: no refresh here, which a capture would record.
        # torch.take: one plain gather (advanced indexing cost ~3x its host time on the H200 machine)
        return self._kernel(x_TD, torch.take(self.cache.slot_table_buffer(self.layer), ids), topk_weights_TK)

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                speculated: torch.Tensor | None = None, ids_host: np.ndarray | None = None,
                guess_host: np.ndarray | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """speculated: speculate()'s output for these inputs, kept when every routed expert is
        resident and the residents have not changed since prepare_speculation() (with misses to copy
        it stands for the hits' part, so only the copied experts' kernel runs); ids_host: the
        routing ids already on the host (the caller copied them), else they are read here;
        guess_host: guess_next()'s answer for these inputs on the host, else computed here;
        features: lookahead_features()'s answer for these inputs (a graph piece computed it), else computed here."""
        cache, layer = self.cache, self.layer
        if speculated is not None and self._prepared_at != cache.changes[layer]:
            speculated = None  # a copy into the layer since: the table the speculation read is stale
        expert_ids_np = topk_ids_TK.detach().cpu().numpy() if ids_host is None else ids_host
        # from here on "expert" means a unit of the cache (the expert itself when expert_slices is 1)
        ids_np = expand_ids(expert_ids_np, self.slices)
        topk_weights_TK = expand_weights(topk_weights_TK, self.slices)
        counts = count_ids(ids_np)  # {unit: pairs routed to it}, ascending
        if counts and next(reversed(counts)) >= cache.num_experts:
            raise ValueError(f"expert id {next(reversed(counts)) // self.slices} out of range for "
                             f"{self.num_experts} experts")
        if speculated is not None and self._left_out and not self._left_out.isdisjoint(counts):
            speculated = None  # a routed expert was still being copied when the table was made
        cache.observe(layer, ids_np)
        resident = cache.slot_of[layer]
        hits = [e for e in counts if e in resident]
        misses = [(e, n) for e, n in counts.items() if e not in resident]
        to_cpu: list[int] = []
        to_copy = [e for e, _ in misses]
        if self.cpu_fallback and misses:
            reuse = cache.reuse_estimate() if self.miss_split == "reuse" else 0.0
            to_copy, to_cpu, _ = self.cost_model.split(misses, self.store.expert_bytes, reuse=reuse)
        if to_cpu:  # the one host sync of x, before the GPU work is queued so the two overlap
            x_cpu = x_TD.detach().to("cpu", self.store.dtype)
            ids_cpu, w_cpu = torch.from_numpy(ids_np), topk_weights_TK.detach().cpu()
        y_TD = None  # the first part computed is the sum so far: no zeros tensor and add per call
        gpu = hits + to_copy
        S = cache.slots
        if gpu and not to_copy and self.slices == 1 and len(gpu) <= S:
            # every expert resident (the common case once the cache is warm): ids map to slots
            # through the layer's device-side table, one gather instead of a host-built copy
            # the guess of the next layer before the stream waits for this layer's copies: a guess read back
            # to the host (a router's or a probe's) then does not wait for them too
            sl = cache.ensure(layer, hits, wait=False)
            # copies into later layers: this table stays as is
            self._prefetch_next(x_TD, expert_ids_np, guess_host, features)
            cache.wait(layer, sl)
            if speculated is None:  # else computed already, from the same table state (see speculate)
                cache.slot_table(layer)  # made current for speculate()'s gather
                speculated = self.speculate(x_TD, topk_ids_TK, topk_weights_TK)
            y_TD = speculated
            cache.release(layer, sl)
        elif gpu and len(gpu) <= S:
            # hits' kernel first (no copy to wait for), then the copied experts' once they land
            rounds = [r for r in (hits, to_copy) if r]
            slots = [cache.ensure(layer, r, wait=False) for r in rounds]
            self._prefetch_next(x_TD, expert_ids_np, guess_host, features)  # queued behind this layer's demand copies
            # a kept speculation is the hits' round already: the same kernel on the same slot ids (the table
            # it read maps exactly the hits, the misses to -1, and the residents have not changed since),
            # computed inside the piece; only the copied experts' round is left to launch
            done = 1 if speculated is not None and hits and self.slices == 1 else 0
            y_TD = speculated if done else None
            ids_RTK = self._remap(ids_np, rounds[done:], slots[done:], x_TD.device)
            for r, sl in enumerate(slots[done:]):
                cache.wait(layer, sl)
                part = self._kernel(x_TD, ids_RTK[r], topk_weights_TK)
                y_TD = part if y_TD is None else y_TD + part
            cache.release(layer, [s for sl in slots for s in sl])
        else:
            # a step needing more experts than slots: rounds of at most S, reusing the slots
            rounds = [gpu[i:i + S] for i in range(0, len(gpu), S)]
            for r, chunk in enumerate(rounds):
                sl = cache.ensure(layer, chunk)
                if r == 0:
                    self._prefetch_next(x_TD, expert_ids_np, guess_host, features)
                ids_TK = self._remap(ids_np, [chunk], [sl], x_TD.device)[0]
                part = self._kernel(x_TD, ids_TK, topk_weights_TK)
                y_TD = part if y_TD is None else y_TD + part
                cache.release(layer, sl, last=r == len(rounds) - 1)
            if not rounds:
                self._prefetch_next(x_TD, expert_ids_np, guess_host, features)
        if y_TD is None:
            y_TD = torch.zeros_like(x_TD)
        if to_cpu:
            cache.count_cpu(layer, to_cpu)
            t0 = time.perf_counter()
            y_cpu = cpu_experts(x_cpu, ids_cpu, w_cpu, to_cpu, self.store, layer)
            self.cost_model.observe_cpu([counts[e] for e in to_cpu], time.perf_counter() - t0)
            y_TD = y_TD + y_cpu.to(x_TD.device, x_TD.dtype)
        return y_TD


# --- budget -----------------------------------------------------------------------------------
def _device_total_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_available_bytes() -> int:
    """Host memory the kernel reports available (MemAvailable), else the physical total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _is_mla(config) -> bool:
    """Whether a config (a MoEConfig, or one read elsewhere) has DeepSeek's multi-head latent attention."""
    return bool(getattr(config, "kv_lora_rank", None) and getattr(config, "qk_nope_head_dim", None))


def kv_cache_bytes(config, batch_size: int, max_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes moe's KVCache takes for `batch_size` rows of `max_len` tokens (every layer's K and V).

    config: a MoEConfig (GQA: 2 * kv_heads * head_dim per token and layer; MLA caches the
    decompressed K (nope + rope) and V of every head).
    """
    if batch_size < 0 or max_len < 0:
        raise ValueError(f"batch_size ({batch_size}) and max_len ({max_len}) must be >= 0")
    if _is_mla(config):
        per = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        per = 2 * config.num_key_value_heads * head_dim
    elem = torch.empty((), dtype=dtype).element_size()
    from moe.kv_cache import KVCache
    slots = KVCache.storage_slots(max_len) if max_len else 0
    return int(per * config.num_hidden_layers * batch_size * slots * elem)


# the aligned layout of the fused expert kernels pads each expert's rows to the row block (at most 128 rows)
_ALIGN_BLOCK = 128


def prefill_activation_bytes(config, rows: int, tokens: int, slots: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """An upper bound of the device memory one forward of ``rows`` x ``tokens`` new tokens takes beyond the
    weights and the KV cache, attending to ``slots`` key slots: what --offload-reserve must hold for a prefill.

    Per token: the residual stream and its norm (3 D), attention's projections (q, k, v and the heads'
    output; MLA's decompressed heads and latent), the larger of an MoE layer (each of top-k rows' ffn
    activations and output, K (I + D), plus shared experts' gate and up) and a dense layer's MLP (3 ffn),
    the router's fp32 logits and softmax (8 bytes an expert), and the attention mask ([rows, 1, tokens,
    slots], boolean and additive). Per call: the padding rows of the experts' aligned layout (up to 127 a
    expert, each with its ffn activation and output) and one row of logits per sequence (fp32). Per row: what a
    packed step's attention keeps of its run until the pieces merge (``_attention_scratch``; 0 for runs that are not
    cut: every one of 2048 tokens or more at the published shapes).

    s31-b measured one forward of two layers of the Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V2-Lite and
    OLMoE shapes at 128-8192 tokens, 1 and 4 rows, 0-16384 cached tokens, resident and offloaded, on
    an H200 (bf16): this bound lies 1.03-1.65x above every measured peak of 2048 tokens or more, and up to 4.8x
    above the fine-grained shapes' at 128-512 tokens, where the padding term (127 rows an expert, the 128-row
    blocks of large calls) overstates what their smaller row blocks pad (tests/offload/test_prefill_chunk.py).
    """
    return _activation_bytes(config, rows, tokens, slots, dtype) + rows * _attention_scratch(config, tokens, slots)


def _activation_bytes(config, rows: int, tokens: int, slots: int, dtype: torch.dtype) -> int:
    """prefill_activation_bytes without the attention's scratch (which a step counts run by run)."""
    if rows < 0 or tokens < 0 or slots < 0:
        raise ValueError(f"rows ({rows}), tokens ({tokens}) and slots ({slots}) must be >= 0")
    elem = torch.empty((), dtype=dtype).element_size()
    D, H = config.hidden_size, config.num_attention_heads
    if _is_mla(config):
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        attn = 2 * H * qk + 2 * H * config.v_head_dim + config.kv_lora_rank + config.qk_rope_head_dim
    else:
        head_dim = getattr(config, "head_dim", None) or D // H
        G = getattr(config, "num_key_value_heads", None) or H
        attn = 2 * H * head_dim + 2 * G * head_dim
    E, K, I = config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size
    shared = (getattr(config, "n_shared_experts", None) or 0) * I + (
        getattr(config, "shared_expert_intermediate_size", None) or 0)
    mlp = K * (I + D) + 2 * shared
    dense_layers = getattr(config, "first_k_dense_replace", 0) or getattr(config, "mlp_only_layers", None)
    if dense_layers:
        mlp = max(mlp, 3 * (getattr(config, "intermediate_size", None) or I))
    per_token = (3 * D + attn + mlp) * elem + 8 * E + slots * (elem + 1)
    per_call = E * (_ALIGN_BLOCK - 1) * (I + D) * elem + rows * config.vocab_size * 4
    n = rows * tokens
    return int(n * per_token + (per_call if n else 0))


def _attention_scratch(config, tokens: int, slots: int) -> int:
    """What a packed step's attention keeps of one run of ``tokens`` tokens until its pieces merge
    (kernels.packed_attention.scratch_bytes_bound): where the engine packs every multi-token step (a GPU), a short
    run at a long context is cut in pieces, each with partial results in fp32."""
    from kernels.packed_attention import scratch_bytes_bound
    H = config.num_attention_heads
    if _is_mla(config):
        G, e = H, config.v_head_dim  # MLA: every head its own decompressed key/value head
    else:
        G = getattr(config, "num_key_value_heads", None) or H
        e = getattr(config, "head_dim", None) or config.hidden_size // H
    return scratch_bytes_bound(H, G, e, tokens, slots)


def step_activation_bytes(config, rows: int, chunk: int, slots: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """An upper bound of one engine step's activations where ``chunk`` prompt tokens are fed beside the other
    ``rows - 1`` rows decoding (Engine(prefill_chunk=chunk) packs the step: chunk + rows - 1 tokens, a row's
    logits each): ``prefill_activation_bytes`` of those tokens as one row, plus the other rows' logits, with the
    attention's scratch of the chunk's run and of each decoding row's, not of one run of them all."""
    if rows < 1 or chunk < 0:
        raise ValueError(f"rows ({rows}) must be >= 1 and chunk ({chunk}) >= 0")
    return (_activation_bytes(config, 1, chunk + rows - 1, slots, dtype) + _attention_scratch(config, chunk, slots)
            + (rows - 1) * (_attention_scratch(config, 1, slots) + config.vocab_size * 4))


def prefill_chunk_for(config, reserve_bytes: int, rows: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                      smallest: int = 16) -> int | None:
    """The prompt tokens a step may feed (``Engine(prefill_chunk=...)``: a budget across its rows) so that a step's
    activations stay inside ``reserve_bytes``: None where every row's whole prompt of max_len fits in one step
    (``prefill_activation_bytes`` of rows x max_len), else the largest power of two whose step, packed beside the
    other rows decoding, fits (``step_activation_bytes``), at least ``smallest`` (a reserve too small for even that
    gets it: the caller's reserve is then short, which those functions can show). Before session 32 the chunk was
    each row's, so the bound counted rows x chunk tokens and an 8-row replica got an eighth of the chunk."""
    if prefill_activation_bytes(config, rows, max_len, max_len, dtype) <= reserve_bytes:
        return None
    chunk = smallest
    while chunk * 2 < rows * max_len and step_activation_bytes(config, rows, chunk * 2, max_len, dtype) <= reserve_bytes:
        chunk *= 2
    return chunk


def auto_prefill_chunk(model, rows: int, max_len: int, reserve_bytes: int | None = None,
                       free_share: float = 0.9) -> int | None:
    """What ``--prefill-chunk auto`` feeds per step (``Engine(prefill_chunk=...)``), or None for whole prompts.

    Offloaded (the model has an ``offload_cache``): the chunk whose activations fit ``reserve_bytes``, by default the
    reserve of the OffloadConfig apply_offload applied (``prefill_chunk_for``). Resident on a CUDA device: the chunk whose activations fit ``free_share`` of the
    device's free memory less the engine's KV cache (``rows`` x ``max_len``, allocated at its first forward), so a
    prompt longer than what fits runs in chunks instead of running out of memory. On the CPU: None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    dtype = getattr(model, "dtype", torch.bfloat16)
    if getattr(model, "offload_cache", None) is not None:
        if reserve_bytes is None and getattr(model, "offload_config", None) is not None:
            reserve_bytes = model.offload_config.reserve_bytes
        if reserve_bytes is None:
            raise ValueError("auto_prefill_chunk: an offloaded model needs its budget's reserve_bytes")
        return prefill_chunk_for(config, reserve_bytes, rows, max_len, dtype)
    device = getattr(model, "device", None)
    if not isinstance(device, torch.device) or device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    room = int(free_share * (free - kv_cache_bytes(config, rows, max_len, dtype)))
    return prefill_chunk_for(config, max(room, 0), rows, max_len, dtype)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def plan_slots(cfg: OffloadConfig, *, device: torch.device, dense_bytes: int, expert_bytes: int,
               num_layers: int, num_experts: int, top_k: int) -> int:
    """Slots per layer from the budget: dense weights, KV cache and reserve are taken first.
    With expert slices, expert_bytes / num_experts / top_k are those of units (slices.py)."""
    if cfg.slots_per_layer is not None:
        return min(cfg.slots_per_layer, num_experts)
    g = cfg.gpu_memory
    budget = int(g * _device_total_bytes(device)) if isinstance(g, float) else parse_bytes(g)
    left = budget - dense_bytes - cfg.kv_cache_bytes - cfg.reserve_bytes
    need = top_k * expert_bytes
    f = _fmt_bytes
    detail = (f"budget {f(budget)} - dense weights {f(dense_bytes)} - KV cache {f(cfg.kv_cache_bytes)} - "
              f"reserve {f(cfg.reserve_bytes)} = {f(left)} for experts")
    if left < need:
        raise ValueError(f"gpu_memory={g!r} cannot hold one layer's {top_k} active experts "
                         f"({f(need)} at {f(expert_bytes)} each): {detail}. "
                         "Raise gpu_memory, or lower reserve_bytes (--offload-reserve) or kv_cache_bytes (moe "
                         "serve's --max-len / --max-batch-size)")
    slots = left // (num_layers * expert_bytes)
    if slots < 1:
        raise ValueError(f"gpu_memory={g!r} gives {f(left)} for experts, less than one {f(expert_bytes)} slot "
                         f"for each of the {num_layers} MoE layers ({f(num_layers * expert_bytes)}): {detail}. "
                         "Raise gpu_memory")
    return int(min(slots, num_experts))


# --- apply ------------------------------------------------------------------------------------
def _top_k(model, block) -> int:
    cfg = getattr(model, "config", None)
    for name in ("num_experts_per_tok", "top_k"):
        if cfg is not None and getattr(cfg, name, None):
            return int(getattr(cfg, name))
    for obj in (block.router, block):
        if getattr(obj, "top_k", None):
            return int(obj.top_k)
    raise ValueError("cannot tell the model's top-k: give model.config.num_experts_per_tok")


def _check_predictor(predictor, num_layers: int, num_experts: int) -> None:
    shape = (getattr(predictor, "num_layers", None), getattr(predictor, "num_experts", None))
    if predictor is not None and None not in shape and shape != (num_layers, num_experts):
        raise ValueError(f"the predictor was trained on the routing of {shape[0]} MoE layers x {shape[1]} experts; "
                         f"this model has {num_layers} x {num_experts}: train one on this model's trace "
                         "(`moe predictor train TRACE`, the trace recorded from this model)")


def resolve_pack(cfg: OffloadConfig, *, expert_dtype: torch.dtype, expert_bytes: int, device: torch.device,
                 use_disk: bool) -> bool:
    """Whether the experts are packed (kernels/unpack.py): pack_experts as given when True or False;
    'auto' packs bfloat16 experts of PACK_AUTO_FROM bytes or more on a GPU, from host memory, whole and
    without cpu_fallback (where packing measured a win: BENCHMARKS 3n)."""
    if cfg.pack_experts != "auto":
        return bool(cfg.pack_experts)
    # the device driver decodes in its fill kernel with no host work a copy: packed paid there at Qwen3's 9.4 MB
    # experts too (0.88-0.89x the unpacked step, BENCHMARKS 3p), where on the host path it did not (3n)
    least = PACK_AUTO_FROM_DEVICE if cfg.driver == "device" else PACK_AUTO_FROM
    return (device.type == "cuda" and expert_dtype == torch.bfloat16 and expert_bytes >= least
            and not cfg.pack_clashes(use_disk))


def device_driver_refusal(cfg: OffloadConfig, *, device: torch.device, backend: str, use_disk: bool) -> str | None:
    """Why driver='device' cannot run this offload, or None where it can: a CUDA device, the triton experts (a
    decode step then captures as one CUDA graph), experts in host memory and none of the settings it refuses
    (OffloadConfig.device_clashes)."""
    if device.type != "cuda":
        return f"the device driver runs on a CUDA device, not {device.type}"
    if backend != "triton":
        return f"the device driver runs the triton experts, not {backend!r} (--backend triton)"
    if use_disk:
        return "the device driver reads experts from host memory, these are read from disk"
    clash = cfg.device_clashes()
    return f"the device driver does not do {', '.join(clash)}" if clash else None


def device_driver_runs(cfg: OffloadConfig, *, device: torch.device, backend: str, use_disk: bool) -> bool:
    """Whether driver='device' can run this offload (device_driver_refusal says why not)."""
    return device_driver_refusal(cfg, device=device, backend=backend, use_disk=use_disk) is None


def driver_choice(cfg: OffloadConfig, *, device: torch.device, backend: str, use_disk: bool, expert_bytes: int,
                  slots: int, top_k: int, expert_dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(driver, why): cfg.driver when 'host' or 'device' ('as given'). 'auto' takes 'device' where it can run
    (device_driver_refusal) and where it measured faster than the host path (BENCHMARKS 3q): experts of at most
    AUTO_DEVICE_MAX_EXPERT bytes (fine-grained: the host path's per-layer work shows there), and either a decode
    step of cfg.decode_batch rows whose top-k fit the slots in one round, or experts that pack_experts='auto'
    packs under the device driver and not under the host's (``expert_dtype`` given; PACK_AUTO_FROM_DEVICE <=
    bytes < PACK_AUTO_FROM: a quarter fewer bytes outweigh the copy engine's faster reads, Qwen3 at 8 rows
    0.80x). Copy-bound steps otherwise (Mixtral's experts; OLMoE at 4 and 8 rows, or 10% of its experts:
    1.03-1.11x) go faster by the copy engine: 'host'."""
    if cfg.driver != "auto":
        return cfg.driver, "as given"
    why_not = device_driver_refusal(cfg, device=device, backend=backend, use_disk=use_disk)
    if why_not is not None:
        return "host", why_not
    mib = expert_bytes / (1 << 20)
    if expert_bytes > AUTO_DEVICE_MAX_EXPERT:
        return "host", (f"experts of {mib:.1f} MiB (over {AUTO_DEVICE_MAX_EXPERT >> 20} MiB) make copy-bound steps, "
                        "where the copy engine reads faster")
    rows = f"{cfg.decode_batch} row{'s' if cfg.decode_batch > 1 else ''} x top-{top_k}"
    if cfg.decode_batch * top_k <= slots:
        return "device", f"a decode step's experts ({rows}) fit the {slots} slots in one round"
    packs = {d: expert_dtype is not None and resolve_pack(dataclasses.replace(cfg, driver=d), expert_dtype=expert_dtype,
                                                          expert_bytes=expert_bytes, device=device, use_disk=use_disk)
             for d in ("device", "host")}
    if packs["device"] and not packs["host"]:
        return "device", f"it packs these {mib:.1f} MiB experts to 12 bits a weight and the host path would not"
    return "host", f"{rows} outnumber the {slots} slots: copy-bound steps in rounds, where the copy engine reads faster"


def resolve_driver(cfg: OffloadConfig, **kw) -> str:
    """The driver an offload runs with (driver_choice, without the reason)."""
    return driver_choice(cfg, **kw)[0]


def packed_staging(packed: bool, expert_bytes: int, device: torch.device) -> tuple[int, int]:
    """(bytes of one staging buffer, how many) that packed experts set aside on the device before the
    slots: ~4/5 of an expert each (a packed one is ~3/4), STAGES of them on a GPU (the copy engine
    fills one while another decodes, offload.cache), one elsewhere; (0, 0) when not packed."""
    if not packed:
        return 0, 0
    return expert_bytes * 4 // 5 + (1 << 20), STAGES if device.type == "cuda" else 1


def _model_bytes(model: nn.Module, blocks: list) -> tuple[int, int]:
    """(bytes of one expert, bytes of everything else: dense weights, shared experts, buffers) as the budget
    counts them."""
    w13 = blocks[0].experts.w13
    expert_bytes = (w13[0].numel() + blocks[0].experts.w2[0].numel()) * w13.element_size()
    expert_params = {id(p) for b in blocks for p in b.experts.parameters()}
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_params)
    dense_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return expert_bytes, dense_bytes


def check_budget(model: nn.Module, cfg: OffloadConfig) -> int:
    """Before the weights load: the slots a layer that cfg's budget gives ``model`` (its parameters may sit on
    the meta device, moe.checkpoint.model_skeleton), planned as the device driver plans them, with nothing set
    aside. A budget that cannot hold one layer's active experts even so raises plan_slots' error, the one
    apply_offload would raise after the load, and a checkpoint of tens of GB is not read first. (A budget this
    passes can still be refused after the load, where the host path's staging buffers for packed copies do not
    fit beside the slots and the device driver cannot run.)"""
    blocks = list(model.moe_blocks())
    if not blocks:
        raise ValueError("the model has no MoE blocks to offload")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    G = cfg.expert_slices
    expert_bytes, dense_bytes = _model_bytes(model, blocks)
    return plan_slots(cfg, device=device, dense_bytes=dense_bytes, expert_bytes=expert_bytes // G,
                      num_layers=len(blocks), num_experts=blocks[0].experts.w13.shape[0] * G,
                      top_k=_top_k(model, blocks[0]) * G)


def apply_offload(model: nn.Module, cfg: OffloadConfig) -> nn.Module:
    """Replace every block.experts by an OffloadedExperts; the rest of the model moves to the device.

    Returns the model; `model.offload_cache` is the ExpertCache (stats(), reset_stats()), `model.offload_config` cfg.
    """
    if not isinstance(cfg, OffloadConfig):
        raise ValueError(f"apply_offload needs an OffloadConfig, got {type(cfg).__name__}")
    blocks = list(model.moe_blocks())
    if not blocks:
        raise ValueError("the model has no MoE blocks to offload")
    if any(isinstance(b.experts, (OffloadedExperts, DeviceOffloadedExperts)) for b in blocks):
        raise ValueError("the model is already offloaded; apply_offload once")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for but CUDA is not available; use device='cpu'")
    G = cfg.expert_slices
    top_k = _top_k(model, blocks[0])
    w13 = blocks[0].experts.w13
    E, expert_dtype = w13.shape[0], w13.dtype
    check_slices(w13.shape[1] // 2, G)
    _check_predictor(cfg.predictor, len(blocks), E)  # before any expert leaves the model
    if cfg.prefetch == "attention" or reads_point_c(cfg.predictor):
        for r in attention_routers(model):  # (the same: a model point C cannot run on is refused while it is whole)
            release_router(r)
    del w13  # hold no reference to an original: each layer's is freed as soon as the store has it
    expert_bytes, dense_bytes = _model_bytes(model, blocks)
    expert_total = expert_bytes * E * len(blocks)
    use_disk = cfg.store == "disk" or (cfg.store == "auto" and cfg.checkpoint is not None
                                       and expert_total > 0.8 * host_available_bytes())
    backend = cfg.backend or getattr(blocks[0].experts, "backend", None) or "torch"
    auto = cfg.driver == "auto"
    if auto:  # (the slots as the device driver would have them: it sets no staging aside)
        device_slots = plan_slots(cfg, device=device, dense_bytes=dense_bytes, expert_bytes=expert_bytes // G,
                                  num_layers=len(blocks), num_experts=E * G, top_k=top_k * G)
        driver, why = driver_choice(cfg, device=device, backend=backend, use_disk=use_disk, expert_bytes=expert_bytes,
                                    slots=device_slots, top_k=top_k, expert_dtype=expert_dtype)
        cfg = dataclasses.replace(cfg, driver=driver)
    if use_disk and cfg.driver == "device":
        raise ValueError(f"driver='device' reads the experts from host memory, but they would not fit there "
                         f"({_fmt_bytes(expert_total)}; store='auto' chose the disk): offload with driver='host'")
    if use_disk and cfg.pack_experts is True:
        raise ValueError(f"pack_experts keeps the experts in host memory, but they would not fit there "
                         f"({_fmt_bytes(expert_total)}; store='auto' chose the disk): offload without pack_experts")
    packed = resolve_pack(cfg, expert_dtype=expert_dtype, expert_bytes=expert_bytes, device=device, use_disk=use_disk)
    staging, n_stages = packed_staging(packed and cfg.driver == "host", expert_bytes, device)  # (device: none)
    # the cache's units: G slices of each expert, each 1/G of its bytes, G per routed expert
    try:  # the buffers packed copies land in (~3/4 of an expert each) count first
        slots = plan_slots(cfg, device=device, dense_bytes=dense_bytes + n_stages * staging,
                           expert_bytes=expert_bytes // G, num_layers=len(blocks), num_experts=E * G, top_k=top_k * G)
    except ValueError:
        # 'auto' chose the host path, whose staging buffers leave too little; the device driver sets none aside
        if not (auto and n_stages and device_driver_runs(cfg, device=device, backend=backend, use_disk=use_disk)):
            raise
        cfg = dataclasses.replace(cfg, driver="device")
        why = "the host path's staging buffers for packed copies leave the budget too little; the device sets none"
        packed = resolve_pack(cfg, expert_dtype=expert_dtype, expert_bytes=expert_bytes, device=device,
                              use_disk=use_disk)
        slots = device_slots

    def release(i):  # drop layer i's original experts as soon as the store holds them
        blocks[i].experts = None

    if use_disk:
        store: ExpertStore = DiskExpertStore(cfg.checkpoint, [getattr(b, "layer_idx", i) for i, b in enumerate(blocks)],
                                             dtype=expert_dtype, slices=G)
        for i in range(len(blocks)):
            release(i)
    elif packed:
        store = PackedHostExpertStore.from_blocks(blocks, release=release, pin=device.type == "cuda")
        if cfg.driver == "host" and store.max_packed_bytes > staging:  # many exponents outside one window
            warnings.warn(f"packed experts take up to {_fmt_bytes(store.max_packed_bytes)} (of {_fmt_bytes(expert_bytes)} "
                          f"unpacked), more than the {_fmt_bytes(staging)} the budget set aside for each of the "
                          f"{n_stages} staging buffers: the device holds the difference beyond gpu_memory", stacklevel=2)
    else:
        store = HostExpertStore.from_blocks(blocks, release=release, pin=device.type == "cuda", slices=G)
    model.to(device)  # what is left is the dense part (and shared experts)

    cache = install(blocks, store, cfg, device=device, top_k=top_k, slots=slots, backend=backend, model=model)
    model.offload_cache = cache
    model.offload_config = cfg  # (its reserve bounds a prefill's activations: auto_prefill_chunk)
    # what driver='auto' took and why (moe generate prints it beside the cache's describe())
    cache.driver_choice = f"driver auto -> {cfg.driver}: {why}" if auto else f"driver {cfg.driver}"
    return model


def install(blocks, store: ExpertStore, cfg: OffloadConfig, *, device: torch.device, top_k: int, slots: int,
            backend: str = "torch", cost: CostModel | None = None, model: nn.Module | None = None) -> ExpertCache:
    """Make the cache over `store` and put an OffloadedExperts into each block (the originals are gone).

    Used by apply_offload, and by benchmarks that try several configurations over one store.
    `cost`: a calibrated CostModel to reuse; else calibrated here (cpu_fallback) or from cfg's rates.
    The store's slices (store.slices) must be cfg.expert_slices; slots and the cost model count units.
    `model`: the model the blocks belong to (prefetch='attention' runs its decoder layers' attention).
    """
    if cfg.driver == "auto":
        cfg = dataclasses.replace(cfg, driver=resolve_driver(cfg, device=device, backend=backend,
                                                             use_disk=isinstance(store, DiskExpertStore),
                                                             expert_bytes=store.expert_bytes, slots=slots, top_k=top_k))
    if cfg.driver == "device":
        return _install_device(blocks, store, cfg, device=device, top_k=top_k, slots=slots, backend=backend,
                               model=model)
    G = store.slices
    if G != cfg.expert_slices:
        raise ValueError(f"the store holds experts in {G} slices but the config asks expert_slices="
                         f"{cfg.expert_slices}; build the store with slices={cfg.expert_slices}")
    if cost is None:
        if cfg.cpu_fallback and cfg.calibrate:
            cost = CostModel.calibrate(device, *store.get(0, 0))
        else:
            D, I = store.w2_shape
            cost = CostModel.from_rates(cfg.copy_gbps, cfg.cpu_gflops, store.expert_bytes, 6.0 * D * I)
    E = store.num_experts // G  # the model's experts (the predictor's and the trace's ids)
    lookahead = None
    _check_predictor(cfg.predictor, len(blocks), E)
    if cfg.predictor is not None and (cfg.policy == "predictor" or cfg.prefetch == "predictor"):
        lookahead = Lookahead(cfg.predictor, len(blocks), E, every=cfg.predict_every,
                              threshold=default_threshold(cfg.prefetch_threshold, cfg.prefetch_budget,
                                                          cfg.policy == "predictor"))
    policy = make_policy(cfg.policy, lookahead=lookahead, trace=None if cfg.trace is None else unit_trace(cfg.trace, G),
                         tokens_per_step=cfg.trace_batch, slices=G, lfu_half_life=cfg.lfu_half_life)
    cache = ExpertCache(store, slots, policy, device)
    cache.cost_model = cost
    budget = None
    if cfg.prefetch_budget is not None and cfg.prefetch == "predictor":
        budget = CopyBudget(cfg.prefetch_budget, cfg.predict_every)
    routers = _next_routers(cfg, blocks, store, device, model)
    sources = [None] * len(blocks)
    if lookahead is not None and lookahead.reads_attention:  # the predictor reads point C: one router a layer
        sources = routers if cfg.prefetch == "attention" else _attention_sources(blocks, model)
    for i, (b, nxt, src) in enumerate(zip(blocks, routers, sources)):
        b.experts = OffloadedExperts(i, cache, top_k, backend=backend, cost_model=cost, cpu_fallback=cfg.cpu_fallback,
                                     next_router=nxt, lookahead=lookahead, predictor_prefetch=cfg.prefetch == "predictor",
                                     prefetch_k=cfg.prefetch_k, miss_split=cfg.miss_split, copy_budget=budget,
                                     attention_source=src, guess_source=cfg.prefetch)
    return cache


def _attention_sources(blocks, model) -> list:
    """Per MoE block, the AttentionRouter onto the next MoE block (None for the last): point C, run by the model's own
    layers, for prefetch='attention' and for a predictor whose lookahead reads it (routing.AttentionLookahead)."""
    if model is None:
        raise ValueError("point C runs the next layer's attention: pass install(..., model=) the model the blocks "
                         "belong to (apply_offload does)")
    for b in blocks:  # an earlier install's routers on the same model (benchmarks re-install over one store)
        old = getattr(b, "experts", None)
        release_router(getattr(old, "_next_router", [None])[0])
        release_router(getattr(old, "_attention_source", [None])[0])
    routers = attention_routers(model)
    if len(routers) != len(blocks) or any(r is not None and r.layers[r.src].mlp is not b
                                           for r, b in zip(routers, blocks)):
        raise ValueError("point C: the blocks given are not the model's MoE blocks in order")
    return routers


def _next_routers(cfg: OffloadConfig, blocks, store: ExpertStore, device: torch.device, model=None) -> list:
    """Per MoE layer, what guesses the next layer's experts for prefetch (None: nothing): layer l+1's router
    (next_layer_gate), layer l+1's attention and router on layer l's pre-expert residual (attention: needs the
    model) or the fitted probe l -> l+1 (probe, checked against the model first)."""
    if cfg.prefetch == "attention":
        return _attention_sources(blocks, model)
    if cfg.prefetch == "probe":
        D = store.w2_shape[0]
        if cfg.probes.num_layers != len(blocks) or cfg.probes.hidden_size != D:
            raise ValueError(f"the probes were fitted for {cfg.probes.num_layers} MoE layers of hidden size "
                             f"{cfg.probes.hidden_size}, this model has {len(blocks)} of {D}: fit them on its own "
                             "recorded hidden states")
    routers = [None] * len(blocks)
    for i in range(len(blocks) - 1):
        if cfg.prefetch == "next_layer_gate":
            routers[i] = blocks[i + 1].router
        elif cfg.prefetch == "probe":
            routers[i] = ProbeRouter(cfg.probes, i, device)
    return routers


def _install_device(blocks, store: ExpertStore, cfg: OffloadConfig, *, device: torch.device, top_k: int, slots: int,
                    backend: str, model=None) -> DeviceExpertCache:
    """install() for driver='device': one DeviceExpertCache (which refuses stores it cannot read), a
    DeviceOffloadedExperts in each block."""
    routers = _next_routers(cfg, blocks, store, device, model)
    cache = DeviceExpertCache(store, slots, cfg.policy, device, lfu_half_life=cfg.lfu_half_life)
    for i, (b, nxt) in enumerate(zip(blocks, routers)):
        b.experts = DeviceOffloadedExperts(i, cache, top_k, backend=backend, next_router=nxt, prefetch_k=cfg.prefetch_k,
                                           guess_source=cfg.prefetch)
    return cache


# --- trace-driven routing -----------------------------------------------------------------------
class TraceCursor:
    """Where each MoE layer is in the trace (tokens consumed so far)."""

    def __init__(self, num_layers: int, start: int):
        self.position = [start] * num_layers


@contextmanager
def route_by_trace(model: nn.Module, trace, start_token: int = 0, with_logits: bool = True):
    """Within the block, each router returns the trace's next T choices instead of its own.

    The trace is consumed in order, T tokens per router call (T = that call's token count); the
    routing weights are the router's own top-k weights (realistic magnitudes) when the trace's
    top-k equals the model's, else the trace's weights, else uniform.

    Each layer's ids (and weights) go to the router's device once, at its first call; a call then
    takes a slice of them, so the hook adds no host-to-device copy (and no sync) to the step.
    with_logits=False: the routers' third output (logits) is None instead of logits rebuilt from
    the trace's choices (-1e4 off the chosen experts, log(weight) on them); decode benchmarks use
    it to keep three device ops per layer call out of the figures. Code that reads the logits
    (training losses) must leave it True.
    """
    blocks = list(model.moe_blocks())
    if trace.num_layers < len(blocks):
        raise ValueError(f"the trace has {trace.num_layers} MoE layers but the model has {len(blocks)}; "
                         "use a trace of the same model shape")
    cursor = TraceCursor(len(blocks), start_token)
    on_device: dict = {}  # (layer, device) -> (ids_NK int64, weights_NK float32 or None)
    has_drops = bool((trace.expert_ids[:len(blocks)] < 0).any())

    def layer_tensors(i, dev):
        got = on_device.get((i, dev))
        if got is None:
            ids = torch.from_numpy(trace.expert_ids[i].astype(np.int64)).to(dev)
            wts = None if trace.weights is None else torch.from_numpy(trace.weights[i].astype(np.float32)).to(dev)
            got = on_device[(i, dev)] = (ids, wts)
        return got

    def make_hook(i):
        def hook(module, inputs, out):
            ids_TK, w_TK, logits_TE = out
            T = ids_TK.shape[0]
            c = cursor.position[i]
            if c + T > trace.num_tokens:
                raise ValueError(f"routing trace exhausted at MoE layer {i}: needs tokens {c}..{c + T} "
                                 f"but holds {trace.num_tokens}; use a longer trace or fewer steps")
            if logits_TE.shape[1] != trace.num_experts:
                raise ValueError(f"trace has {trace.num_experts} experts, the model's router {logits_TE.shape[1]}")
            dev = ids_TK.device
            all_ids, all_w = layer_tensors(i, dev)
            tid_TK = all_ids[c:c + T]
            if tid_TK.shape == ids_TK.shape:
                tw_TK = w_TK
            elif all_w is not None:
                tw_TK = all_w[c:c + T]
            else:
                tw_TK = torch.full(tid_TK.shape, 1.0 / tid_TK.shape[1], device=dev)
            tw_TK = tw_TK.to(torch.float32)
            if has_drops:
                tw_TK = torch.where(tid_TK >= 0, tw_TK, 0.0)
            lg_TE = None
            if with_logits:
                lg_TE = torch.full_like(logits_TE, -1e4)
                lg_TE.scatter_(1, tid_TK.clamp(min=0), torch.log(tw_TK.clamp(min=1e-9)))
            cursor.position[i] = c + T
            return tid_TK, tw_TK, lg_TE
        return hook

    handles = [b.router.register_forward_hook(make_hook(i)) for i, b in enumerate(blocks)]
    try:
        yield cursor
    finally:
        for h in handles:
            h.remove()
