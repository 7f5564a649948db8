"""Decode steps replayed from CUDA graphs: one graph per attention-slot bucket, captured on first use.

A decode step of a resident model is hundreds of small kernels (norms, projections, rotary, the
router, the expert kernels); at one to a few tokens per row their launch cost, not the GPU, sets
the step time. The forward with an explicit ``num_slots`` reads no device value on the host
(``MoEForCausalLM.forward``), and the ``"triton"`` expert backend neither, so one step [B, 1] can
be captured once and replayed.

    graphs = DecodeGraphs(model, cache)                       # cache = model.new_cache(B, max_len)
    logits_B1V = graphs.step(input_B1, valid_B1, max_length)  # max_length: the longest row, host-side

Attention reads ``num_slots`` cache slots, a static shape of the graph: the step rounds
``max_length + 1`` up to a multiple of ``bucket`` (slots past a row's length are masked, so the
result does not change) and keeps one graph per bucket, all in one memory pool. Capturing runs the
step once eagerly first (compilation, library handles) and then restores the cache's lengths, so
capturing changes nothing the caller sees; the written key/value slots are rewritten by the real
step. The static input buffers are copied into before each replay; the returned logits live in the
graph's output buffer and are overwritten by the next step.

What cannot be captured is refused with the reason (``graph_support``): a model on the CPU, an
expert backend that syncs with the host (``"torch"``), experts offloaded to host memory (their
cache decisions run on the host). A capture that fails anyway (some op of a model family that
reads a device value on the host) raises ``GraphCaptureError`` with the cache restored; the
``Engine`` then warns and decodes eagerly from that step on.
"""
from __future__ import annotations

import inspect

import torch

from .kv_cache import KVCache
from .layers import Experts


def graph_support(model: torch.nn.Module) -> str | None:
    """None when decode steps of ``model`` can be captured, else the reason they cannot."""
    dev = getattr(model, "device", None)
    if not isinstance(dev, torch.device) or dev.type != "cuda":
        return f"the model is on {dev}, not a CUDA device"
    try:
        takes_slots = "num_slots" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes_slots = False
    if not takes_slots:
        return f"{type(model).__name__}.forward takes no num_slots (the sync-free forward a graph needs)"
    blocks = model.moe_blocks() if hasattr(model, "moe_blocks") else []
    for block in blocks:
        experts = block.experts
        if type(experts) is not Experts:
            return (f"MoE layer {block.layer_idx} runs {type(experts).__name__} (offloaded, tiered or expert-parallel "
                    "experts decide on the host); only resident experts can be captured")
        if experts.backend != "triton":
            return (f"MoE layer {block.layer_idx} uses expert backend {experts.backend!r}; only 'triton' runs without "
                    "host syncs (model.set_backend('triton'))")
        if any(p.device.type != "cuda" for p in experts.parameters()):
            return f"MoE layer {block.layer_idx} has expert weights outside GPU memory"
    return None


class GraphCaptureError(RuntimeError):
    """Capturing a decode step failed (a host sync or an unsupported op inside the step); the cache
    is as it was before the step, so the caller can run the step eagerly instead."""


class DecodeGraphs:
    """CUDA graphs of one-token decode steps of ``model`` over ``cache`` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, bucket: int = 256):
        reason = graph_support(model)
        if reason is not None:
            raise ValueError(f"cannot capture decode steps in CUDA graphs: {reason}")
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        self.model, self.cache, self.bucket = model, cache, bucket
        B, dev = cache.batch_size, cache.device
        self._ids_B1 = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self._valid_B1 = torch.zeros(B, 1, dtype=torch.bool, device=dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def slots_for(self, max_length: int) -> int:
        need = max_length + 1
        if need > self.cache.max_len:
            raise ValueError(f"KV cache full: a row would hold {need} tokens but max_len is {self.cache.max_len}; "
                             "create the cache with a larger max_len (prompt + max_new_tokens)")
        return min(-(-need // self.bucket) * self.bucket, self.cache.max_len)

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def _forward(self, num_slots: int) -> torch.Tensor:
        return self.model(self._ids_B1, cache=self.cache, valid_BT=self._valid_B1, num_slots=num_slots)

    def _capture(self, num_slots: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of one step and its output buffer; the cache's lengths are as before, whether
        the capture succeeds or raises (the warm-up step advanced them)."""
        lengths = self.cache.lengths.clone()
        try:
            side = torch.cuda.Stream(self.cache.device)
            side.wait_stream(torch.cuda.current_stream(self.cache.device))
            with torch.cuda.stream(side):
                self._forward(num_slots)  # compile kernels and create handles outside the capture
                self.cache.lengths.copy_(lengths)
            torch.cuda.current_stream(self.cache.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a server's other threads (metrics, request handling) may touch CUDA meanwhile
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._forward(num_slots)
            return graph, out
        finally:
            self.cache.lengths.copy_(lengths)

    @torch.inference_mode()
    def step(self, input_B1: torch.Tensor, valid_B1: torch.Tensor, max_length: int) -> torch.Tensor:
        """Logits [B, 1, V] of one decode step; advances the cache like ``model(...)`` would.

        input_B1 / valid_B1: the next token of each row and whether the row takes part;
        max_length: the longest row's current length (the caller's host-side count).
        """
        if tuple(input_B1.shape) != tuple(self._ids_B1.shape) or tuple(valid_B1.shape) != tuple(self._valid_B1.shape):
            raise ValueError(f"decode step inputs must be {tuple(self._ids_B1.shape)}, got {tuple(input_B1.shape)} "
                             f"and {tuple(valid_B1.shape)}")
        num_slots = self.slots_for(max_length)
        self._ids_B1.copy_(input_B1)
        self._valid_B1.copy_(valid_B1)
        if num_slots not in self._graphs:
            try:
                self._graphs[num_slots] = self._capture(num_slots)
            except Exception as e:  # noqa: BLE001 - reported with its cause; _capture restored the cache
                raise GraphCaptureError(f"capturing a decode step ({num_slots} slots) failed: "
                                        f"{type(e).__name__}: {e}") from e
        graph, out = self._graphs[num_slots]
        graph.replay()
        return out
