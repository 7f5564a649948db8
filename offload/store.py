"""Where offloaded experts live: host memory (pinned when CUDA is present) or disk.

    HostExpertStore.from_blocks(blocks, release)   moves each layer's w13/w2 out of a loaded model,
                                                   layer by layer, freeing the original after each
                                                   layer (`release`), so there are never two full copies
    DiskExpertStore(checkpoint_dir, layer_ids)     reads experts from memory-mapped safetensors
                                                   (safe_open), for when host RAM is short

Both give `get(layer, expert) -> (w13_JD, w2_DI)` CPU tensors; the host store's are views of
pinned memory, so host->device copies run asynchronously at the full PCIe rate (pageable memory
is three times slower on the H200 host, ANCHORS.md).

With `slices=G > 1` a store holds expert slices instead (offload/slices.py): `num_experts` counts
units (E*G), `get(layer, unit)` gives unit u = slice u % G of expert u // G, a SwiGLU expert of
ffn width I/G; the host store lays each unit out contiguously while it fills.

Shape legend: E = experts, J = 2*I (gate rows then up rows), D = hidden, I = expert ffn size.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch

from .pinned import host_empty


class ExpertStore:
    num_layers: int
    num_experts: int
    w13_shape: tuple[int, int]  # (J, D)
    w2_shape: tuple[int, int]   # (D, I)
    dtype: torch.dtype
    slices: int = 1  # G: num_experts counts units, experts * G (offload/slices.py)

    def get(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def expert_bytes(self) -> int:
        n = self.w13_shape[0] * self.w13_shape[1] + self.w2_shape[0] * self.w2_shape[1]
        return n * torch.empty((), dtype=self.dtype).element_size()

    @property
    def pinned(self) -> bool:
        return False

    def copy_nbytes(self, layer: int, expert: int) -> int:
        """Bytes one copy of the expert moves to the device."""
        return self.expert_bytes


class HostExpertStore(ExpertStore):
    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], slices: int = 1):
        """layers: per MoE layer (w13 [N, J, D], w2 [N, D, I]), N = units (experts * slices)."""
        if not layers:
            raise ValueError("HostExpertStore needs at least one MoE layer")
        self.layers, self.slices = layers, slices
        if layers[0][0].shape[0] % slices:
            raise ValueError(f"{layers[0][0].shape[0]} units is not a whole number of experts of {slices} slices")
        w13, w2 = layers[0]
        self.num_layers, self.num_experts = len(layers), w13.shape[0]
        self.w13_shape, self.w2_shape, self.dtype = tuple(w13.shape[1:]), tuple(w2.shape[1:]), w13.dtype
        for i, (a, b) in enumerate(layers):
            if a.shape != w13.shape or b.shape != w2.shape or a.dtype != w13.dtype:
                raise ValueError(f"MoE layer {i} has expert shapes {tuple(a.shape)}/{tuple(b.shape)} {a.dtype}; "
                                 f"offloading needs every layer like layer 0: {tuple(w13.shape)}/{tuple(w2.shape)}")

    @classmethod
    def from_blocks(cls, blocks, release: Callable[[int], None] | None = None, pin: bool | None = None,
                    dtype: torch.dtype | None = None, slices: int = 1) -> "HostExpertStore":
        """Take w13/w2 of each block's experts into host memory; `release(i)` drops layer i's original.
        slices > 1: stored as units (offload/slices.py), regrouped in the same one copy."""
        from .slices import units_w13, units_w2
        pin = torch.cuda.is_available() if pin is None else pin
        layers = []
        for i, block in enumerate(blocks):
            ex = block.experts
            src13, src2 = ex.w13.detach(), ex.w2.detach()
            dt = dtype or src13.dtype
            on_host = src13.device.type == "cpu" and dt == src13.dtype
            if slices > 1:  # regrouped unit by unit while copying: still one copy
                w13, w2 = units_w13(src13, slices, dt, pin), units_w2(src2, slices, dt, pin)
            elif on_host and (not pin or (src13.is_pinned() and src2.is_pinned())):
                w13, w2 = src13, src2  # already where it belongs: keep the very tensor, no second copy
            else:
                w13 = host_empty(src13.shape, dt, pin)  # exactly its bytes (offload/pinned.py)
                w2 = host_empty(src2.shape, dt, pin)
                w13.copy_(src13)
                w2.copy_(src2)
            del src13, src2, ex
            layers.append((w13, w2))
            if release is not None:
                release(i)
        return cls(layers, slices)

    def get(self, layer, expert):
        w13, w2 = self.layers[layer]
        return w13[expert], w2[expert]

    def to_slices(self, slices: int) -> "HostExpertStore":
        """This store cut `slices` times finer (G = self.slices * slices), layer by layer: each
        layer's tensors are dropped from this store once regrouped, so the two stores never hold
        more than one layer twice. This store is empty afterwards."""
        from .slices import units_w2, units_w13
        pin, layers = self.pinned, []
        for i, (w13, w2) in enumerate(self.layers):
            layers.append((units_w13(w13, slices, pin=pin), units_w2(w2, slices, pin=pin)))
            self.layers[i] = None
            del w13, w2
        self.layers = []
        return HostExpertStore(layers, self.slices * slices)

    @property
    def pinned(self) -> bool:
        return self.layers[0][0].is_pinned()

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.layers)


class PinnedArena:
    """Host buffers carved out of chunks of a power-of-two size: torch's pinned-memory allocator rounds
    every allocation up to the next power of two (a 604 MB layer of packed OLMoE experts would hold
    1 GiB), so the chunks are allocated at sizes it keeps as they are and the buffers are views into
    them, each starting on a 64-byte boundary. What is lost is the tail of each chunk (less than one
    buffer) and the unused end of the last one."""

    def __init__(self, chunk_bytes: int, pin: bool):
        if chunk_bytes < 1 or chunk_bytes & (chunk_bytes - 1):
            raise ValueError(f"chunk_bytes must be a power of two, got {chunk_bytes}")
        self.chunk_bytes, self.pin = chunk_bytes, pin
        self.chunks: list[torch.Tensor] = []
        self._at = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 view of ``nbytes`` (a request larger than a chunk gets a chunk of its own, rounded up
        to a power of two)."""
        if not self.chunks or self._at + nbytes > self.chunks[-1].numel():
            size = max(self.chunk_bytes, 1 << max(nbytes - 1, 0).bit_length())
            self.chunks.append(torch.empty(size, dtype=torch.uint8, pin_memory=self.pin))
            self._at = 0
        view = self.chunks[-1][self._at:self._at + nbytes]
        self._at += -(-nbytes // 64) * 64
        return view

    def nbytes(self) -> int:
        """Host bytes held (the chunks)."""
        return sum(c.numel() for c in self.chunks)


class PackedHostExpertStore(ExpertStore):
    """Experts in pinned host memory packed to 12 bits a weight, losslessly (kernels/unpack.py): a
    quarter fewer bytes over PCIe and in host memory. The cache copies ``packed(layer, expert)`` to a
    device staging buffer and decodes it into the slot (``kernels.unpack``; offload.cache);
    ``get`` decodes on the CPU (tests, tools), which the offloaded forward never calls.
    bfloat16 experts only (the exponent is what is packed); whole experts only."""

    def __init__(self, packed: list[list[tuple[torch.Tensor, int, int]]], w13_shape, w2_shape,
                 arena: PinnedArena | None = None):
        if not packed or not packed[0]:
            raise ValueError("PackedHostExpertStore needs at least one MoE layer of experts")
        self.layers, self.arena = packed, arena
        self.num_layers, self.num_experts = len(packed), len(packed[0])
        self.w13_shape, self.w2_shape, self.dtype = tuple(w13_shape), tuple(w2_shape), torch.bfloat16
        self.max_packed_bytes = max(buf.numel() for layer in packed for buf, _, _ in layer)

    @classmethod
    def from_blocks(cls, blocks, release: Callable[[int], None] | None = None,
                    pin: bool | None = None) -> "PackedHostExpertStore":
        """Pack each block's experts (on the device they are on) into host memory, layer by layer;
        `release(i)` drops layer i's originals once packed."""
        from kernels.unpack import pack_bf16
        pin = torch.cuda.is_available() if pin is None else pin
        layers, shapes, arena = [], None, None
        for i, block in enumerate(blocks):
            w13, w2 = block.experts.w13.detach(), block.experts.w2.detach()
            if w13.dtype != torch.bfloat16:
                raise ValueError(f"packed experts are bfloat16 (their exponents are packed); MoE layer {i}'s are "
                                 f"{w13.dtype}: load the model in bfloat16 or offload without pack_experts")
            if shapes is None:
                shapes = (tuple(w13.shape), tuple(w2.shape))
            elif (tuple(w13.shape), tuple(w2.shape)) != shapes:
                raise ValueError(f"MoE layer {i} has expert shapes {tuple(w13.shape)}/{tuple(w2.shape)}; offloading "
                                 f"needs every layer like layer 0: {shapes[0]}/{shapes[1]}")
            packed = [pack_bf16(w13[e], w2[e]) for e in range(w13.shape[0])]
            del w13, w2
            if arena is None:  # chunks of ~16 packed experts (at most ~1/16 of each is left over), 1 MiB to 2 GiB
                most = max(buf.numel() for buf, _, _ in packed)
                arena = PinnedArena(min(max(1 << 20, 1 << (16 * most - 1).bit_length()),
                                        max(1 << 31, 1 << (most - 1).bit_length())), pin)
            layers.append([(arena.take(buf.numel()).copy_(buf), base, n_esc) for buf, base, n_esc in packed])
            del packed
            if release is not None:
                release(i)
        return cls(layers, shapes[0][1:], shapes[1][1:], arena)

    def packed(self, layer: int, expert: int) -> tuple[torch.Tensor, int, int]:
        """(pinned uint8 buffer, base exponent, escapes): what unpack_bf16 decodes."""
        return self.layers[layer][expert]

    def get(self, layer, expert):
        from kernels.unpack import unpack_bf16_reference
        w13, w2 = torch.empty(self.w13_shape, dtype=self.dtype), torch.empty(self.w2_shape, dtype=self.dtype)
        unpack_bf16_reference(*self.packed(layer, expert), w13, w2)
        return w13, w2

    def copy_nbytes(self, layer: int, expert: int) -> int:
        return self.layers[layer][expert][0].numel()

    @property
    def pinned(self) -> bool:
        return self.layers[0][0][0].is_pinned()

    def nbytes(self) -> int:
        """Bytes of the packed experts (the host holds ``host_bytes()``)."""
        return sum(buf.numel() for layer in self.layers for buf, _, _ in layer)

    def host_bytes(self) -> int:
        """Host memory the store holds: its arena's chunks (the packed bytes when built without one)."""
        return self.arena.nbytes() if self.arena is not None else self.nbytes()


# Hugging Face names of expert weights: fused ([E, 2I, D] / [E, D, I]) or one tensor per expert
_FUSED = re.compile(r"layers\.(\d+)\..*experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"layers\.(\d+)\..*experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


class DiskExpertStore(ExpertStore):
    """Experts read on demand from a checkpoint's safetensors files (memory-mapped by safe_open).

    layer_ids: the decoder layer index of each MoE layer, in MoE order (block.layer_idx).
    """

    def __init__(self, checkpoint: str | Path, layer_ids: list[int], dtype: torch.dtype | None = None,
                 slices: int = 1):
        from safetensors import safe_open

        from .slices import check_slices

        path = Path(checkpoint)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise ValueError(f"no .safetensors files at {checkpoint}; give the model directory for store='disk'")
        self._files = {}
        self._where: dict[tuple, tuple[Path, str]] = {}  # (decoder_layer, role[, expert]) -> (file, key)
        for f in files:
            h = safe_open(str(f), framework="pt")
            self._files[f] = h
            for key in h.keys():
                m = _FUSED.search(key)
                if m:
                    self._where[(int(m.group(1)), "gate_up" if m.group(2) == "gate_up_proj" else "down")] = (f, key)
                    continue
                m = _PER_EXPERT.search(key)
                if m:
                    self._where[(int(m.group(1)), _ROLE[m.group(3)], int(m.group(2)))] = (f, key)
        self.layer_ids = list(layer_ids)
        self.num_layers = len(self.layer_ids)
        first = self.layer_ids[0]
        self.fused = (first, "gate_up") in self._where
        if self.fused:
            sl = self._slice(first, "gate_up")
            E, J, D = sl.get_shape()
            I = J // 2
        else:
            experts = {k[2] for k in self._where if len(k) == 3 and k[0] == first}
            if not experts:
                raise ValueError(f"{checkpoint}: no expert weights found for decoder layer {first} "
                                 "(looked for '...layers.N...experts.gate_up_proj' or '...experts.E.w1.weight')")
            E = max(experts) + 1
            I, D = self._slice(first, "gate", 0).get_shape()
        C = check_slices(I, slices)
        self.slices, self.num_experts = slices, E * slices
        self.w13_shape, self.w2_shape = (2 * C, D), (D, C)
        self.dtype = dtype or self._tensor_dtype()
        for lid in self.layer_ids:
            if not ((lid, "gate_up") in self._where or (lid, "gate", 0) in self._where):
                raise ValueError(f"{checkpoint}: decoder layer {lid} has no expert weights in the checkpoint")

    def _slice(self, *key):
        if key not in self._where:
            raise ValueError(f"expert tensor {key} missing from the checkpoint")
        f, name = self._where[key]
        return self._files[f].get_slice(name)

    def _tensor_dtype(self) -> torch.dtype:
        f, name = next(iter(self._where.values()))
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        code = header[name]["dtype"]
        return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[code]

    def get(self, layer, expert):
        if self.slices > 1:
            from .slices import unit_of
            e, g = divmod(expert, self.slices)
            return unit_of(*self._expert(layer, e), g, self.slices)
        return self._expert(layer, expert)

    def _expert(self, layer, expert):
        lid = self.layer_ids[layer]
        if self.fused:
            w13 = self._slice(lid, "gate_up")[expert]
            w2 = self._slice(lid, "down")[expert]
        else:
            gate = self._slice(lid, "gate", expert)[:]
            up = self._slice(lid, "up", expert)[:]
            w13 = torch.cat([gate, up], dim=0)
            w2 = self._slice(lid, "down", expert)[:]
        return w13.to(self.dtype), w2.to(self.dtype)
