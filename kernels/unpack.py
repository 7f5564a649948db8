"""Lossless exponent packing of bfloat16 weights: 12 bits a weight instead of 16, decoded on the GPU.

A bfloat16 weight is a sign bit, 8 exponent bits and 7 mantissa bits. The weights of a matrix use few
exponents: on the embedded default model's trained experts (and on normal random weights) 15
consecutive exponents hold 99.98% of the values, at ~2.6 bits of entropy. ``pack_bf16`` keeps

    nib  [ceil(N/2)] uint8   a 4-bit code per weight: its exponent - base for the 15 exponents from
                             base on, 15 for the others (escapes)
    low  [N] uint8           the sign bit (bit 7) and the 7 mantissa bits
    meta int32               base, the escape count, then for each block of BLOCK weights the number
                             of escapes before it (nb + 1 entries)
    esc  [n, 2] int32        each escape's index (ascending) and its whole 16 bits

in one byte buffer, each part starting on a 16-byte boundary: 1.5 bytes a weight plus 8 an escape and
4 a block (~0.7504 of the bfloat16 bytes on those weights). What offloading copies over PCIe shrinks
by a quarter, and the weights that arrive are bit for bit the ones packed.

``unpack_bf16`` writes the N weights into two bfloat16 outputs (the first N1 into ``out1``, the
rest into ``out2``: an expert's w13 and w2, which sit in separate slot pools) in one launch whose
arguments do not depend on the buffer (every part sits at an offset fixed by N; base and the escapes
are read from the buffer): each program decodes its block, skipping the escape codes, and writes its
block's escapes from the table. ``unpack_bf16_reference`` is the same in torch ops. The launch is
memory-bound (read 1.5 bytes, write 2 a weight); its host cost is one launch a copied expert.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grouped_gemm import _interpreted
from .launch import Launcher

CODES = 15  # exponents a window holds; code 15 marks an escape
ESCAPE = 15
BLOCK = 4096  # weights a decode program handles; the escape table counts per block of this many
ESC_TILE = 64  # escapes a program writes per round


def _a16(n: int) -> int:
    return -(-n // 16) * 16


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def layout(n: int, n_esc: int) -> tuple[int, int, int, int]:
    """Byte offsets of (low, meta, esc) and the buffer's length, for n weights and n_esc escapes (the
    offsets depend on n alone)."""
    off_low = _a16(-(-n // 2))
    off_meta = _a16(off_low + n)
    off_esc = _a16(off_meta + 4 * (2 + _blocks(n) + 1))
    return off_low, off_meta, off_esc, _a16(off_esc + 8 * n_esc)


def pack_bf16(*tensors: torch.Tensor, pin: bool = False) -> tuple[torch.Tensor, int, int]:
    """(buffer uint8 on the CPU, base exponent, escapes) of the bfloat16 tensors taken as one flat run
    of weights, in order. Computed on the tensors' device (a GPU packs a layer in milliseconds)."""
    if not tensors or any(t.dtype != torch.bfloat16 for t in tensors):
        raise ValueError(f"pack_bf16 packs bfloat16 weights, got {[t.dtype for t in tensors]}; cast the experts to "
                         "bfloat16 or offload them unpacked")
    # int16 throughout (half the memory traffic of int32): the masks drop what the arithmetic shifts sign-extend
    u = torch.cat([t.reshape(-1) for t in tensors]).view(torch.int16)
    n = u.numel()
    e = ((u >> 7) & 0xFF).to(torch.uint8)
    hist = torch.bincount(e, minlength=256)
    base = int(hist.unfold(0, CODES, 1).sum(1).argmax())  # the window of 15 exponents holding the most
    code = e - base  # uint8 wraps: exponents below the window land above it
    code = torch.where(code >= CODES, ESCAPE, code)
    esc = torch.nonzero(code == ESCAPE).reshape(-1)  # ascending
    starts = torch.searchsorted(esc, torch.arange(_blocks(n) + 1, device=esc.device) * BLOCK)
    if n % 2:
        code = torch.cat([code, code.new_zeros(1)])
    nib = code[0::2] | (code[1::2] << 4)
    low = (((u >> 8) & 0x80) | (u & 0x7F)).to(torch.uint8)
    pairs = torch.stack([esc.to(torch.int32), u[esc].to(torch.int32)], dim=1)  # (index, its 16 bits)
    meta = torch.cat([torch.tensor([base, esc.numel()], dtype=torch.int32), starts.to(torch.int32).cpu()])
    off_low, off_meta, off_esc, total = layout(n, esc.numel())
    buf = torch.zeros(total, dtype=torch.uint8, pin_memory=pin)
    buf[:nib.numel()] = nib.cpu()
    buf[off_low:off_low + n] = low.cpu()
    buf[off_meta:off_meta + 4 * meta.numel()] = meta.view(torch.uint8)
    buf[off_esc:off_esc + 8 * esc.numel()] = pairs.cpu().reshape(-1).view(torch.uint8)
    return buf, base, esc.numel()


def _parts(buf: torch.Tensor, n: int):
    """Views of (nib, low, meta, esc) of a buffer (or a staging buffer of any larger size: esc runs to its
    end, whatever the escape count of the buffer that lands there)."""
    off_low, off_meta, off_esc, _ = layout(n, 0)
    cap = (buf.numel() - off_esc) // 8
    return (buf[:-(-n // 2)], buf[off_low:off_low + n], buf[off_meta:off_esc].view(torch.int32),
            buf[off_esc:off_esc + 8 * cap].view(torch.int32))


def _check(buf: torch.Tensor, out1: torch.Tensor, out2: torch.Tensor, n_esc: int) -> int:
    for o in (out1, out2):
        if o.dtype != torch.bfloat16 or not o.is_contiguous():
            raise ValueError(f"unpack_bf16 writes contiguous bfloat16 outputs, got {o.dtype} "
                             f"(contiguous: {o.is_contiguous()})")
    n = out1.numel() + out2.numel()
    if buf.dtype != torch.uint8 or buf.numel() < layout(n, n_esc)[3]:
        raise ValueError(f"a packed buffer of {n} weights and {n_esc} escapes is {layout(n, n_esc)[3]} bytes of "
                         f"uint8, got {buf.numel()} of {buf.dtype}")
    return n


def unpack_bf16_reference(buf: torch.Tensor, base: int, n_esc: int, out1: torch.Tensor, out2: torch.Tensor) -> None:
    """``unpack_bf16`` in torch ops (any device)."""
    n = _check(buf, out1, out2, n_esc)
    nib, low, meta, esc = _parts(buf, n)
    if int(meta[0]) != base or int(meta[1]) != n_esc:
        raise ValueError(f"the packed buffer holds base {int(meta[0])} and {int(meta[1])} escapes, the caller said "
                         f"{base} and {n_esc}: a buffer and its pack_bf16 answer must stay together")
    nib = nib.to(torch.int32)
    code = torch.stack([nib & 0xF, nib >> 4], dim=-1).reshape(-1)[:n]
    lo = low.to(torch.int32)
    u = ((lo & 0x80) << 8) | (((base + code) & 0xFF) << 7) | (lo & 0x7F)
    pairs = esc[:2 * n_esc].view(-1, 2)
    u[pairs[:, 0].long()] = pairs[:, 1] & 0xFFFF
    u = torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16)
    n1 = out1.numel()
    out1.view(torch.int16).view(-1).copy_(u[:n1])
    out2.view(torch.int16).view(-1).copy_(u[n1:])


@triton.jit
def decode_block(nib_ptr, low_ptr, meta_ptr, esc_ptr, out1_ptr, out2_ptr, pid, N1, N,
                 BLOCK: tl.constexpr, ESC: tl.constexpr):
    """Block ``pid`` of a packed buffer's N weights into out1 (the first N1) and out2 (int16 views): the
    weights of the block, then its escapes from the table. Shared by _unpack_kernel and the device-driven
    cache's packed fill (offload/device_cache.py), which reads the buffer from host memory."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = tl.load(meta_ptr)
    b = tl.load(nib_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    code = (b >> ((offs % 2) * 4)) & 0xF
    lo = tl.load(low_ptr + offs, mask=mask, other=0).to(tl.int32)
    u = ((lo & 0x80) << 8) | (((base + code) & 0xFF) << 7) | (lo & 0x7F)
    v = tl.where(u >= 0x8000, u - 0x10000, u).to(tl.int16)
    keep = mask & (code != 15)  # an escape's slot is written from the table below (no two stores meet)
    tl.store(out1_ptr + offs, v, mask=keep & (offs < N1))
    tl.store(out2_ptr + (offs - N1), v, mask=keep & (offs >= N1))
    start = tl.load(meta_ptr + 2 + pid)
    end = tl.load(meta_ptr + 3 + pid)
    for j0 in range(start, end, ESC):
        j = j0 + tl.arange(0, ESC)
        m = j < end
        i = tl.load(esc_ptr + 2 * j, mask=m, other=0)
        w = tl.load(esc_ptr + 2 * j + 1, mask=m, other=0).to(tl.int16)  # an int16 sign-extended: truncation keeps it
        tl.store(out1_ptr + i, w, mask=m & (i < N1))
        tl.store(out2_ptr + (i - N1), w, mask=m & (i >= N1))


@triton.jit
def _unpack_kernel(nib_ptr, low_ptr, meta_ptr, esc_ptr, out1_ptr, out2_ptr, N1, N,
                   BLOCK: tl.constexpr, ESC: tl.constexpr):
    decode_block(nib_ptr, low_ptr, meta_ptr, esc_ptr, out1_ptr, out2_ptr, tl.program_id(0), N1, N, BLOCK, ESC)


_unpack = Launcher(_unpack_kernel)  # launched without per-call binding (kernels/launch.py)


def _launch(parts, o1: torch.Tensor, o2: torch.Tensor, n1: int, n: int) -> None:
    nib, low, meta, esc = parts
    _unpack[(_blocks(n),)](nib, low, meta, esc, o1, o2, n1, n, BLOCK=BLOCK, ESC=ESC_TILE, num_warps=8)


def unpack_bf16(buf: torch.Tensor, base: int, n_esc: int, out1: torch.Tensor, out2: torch.Tensor) -> None:
    """Decode a ``pack_bf16`` buffer (on the outputs' device) into out1 (the first out1.numel() weights)
    and out2 (the rest), on the current stream, in one launch; nothing is read back to the host."""
    n = _check(buf, out1, out2, n_esc)
    _launch(_parts(buf, n), out1.view(torch.int16), out2.view(torch.int16), out1.numel(), n)


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the decode kernel can run on tensors of ``device``: a GPU, or the CPU under the Triton
    interpreter (the CPU tests)."""
    return device.type == "cuda" or _interpreted()


class Unpacker:
    """``unpack_bf16`` into fixed outputs through a ring of staging buffers, with the checks and views
    made once: the offload cache's copy path (one call per copied expert, on the host's critical path at
    fine-grained widths). ``outputs[key]`` = (out1, out2); ``stages``: one uint8 buffer on the outputs'
    device, or a list of them (the ring), each at least as long as any buffer it will hold; every buffer
    holds n = out1.numel() + out2.numel() weights.

    ``load(r, buf)`` copies a packed buffer into stage r and ``decode(r, key, ...)`` decodes stage r into
    outputs[key], each on the current stream: the offload cache loads on its copy stream and decodes on
    another, so the copy engine fills stage r+1 while stage r decodes (a copy into a stage must wait for
    that stage's last decode: the caller's events). ``__call__`` does both on the current stream, stage 0."""

    def __init__(self, stages, outputs: dict):
        self.stages = list(stages) if isinstance(stages, (list, tuple)) else [stages]
        self.outputs = {}
        for key, (o1, o2) in outputs.items():
            for st in self.stages:
                _check(st, o1, o2, 0)
            self.outputs[key] = (o1.view(torch.int16), o2.view(torch.int16))
            self.n1, self.n = o1.numel(), o1.numel() + o2.numel()
        self._parts = [_parts(st, self.n) for st in self.stages]  # views of each stage, made once
        self._into: dict[tuple[int, int], torch.Tensor] = {}  # (stage, bytes) -> the stage's first bytes

    def load(self, r: int, buf: torch.Tensor) -> None:
        """Copy the packed buffer ``buf`` (host memory; asynchronous from pinned memory) into stage r."""
        into = self._into.get((r, buf.numel()))
        if into is None:
            stage = self.stages[r]
            if buf.numel() > stage.numel():
                raise ValueError(f"a packed buffer of {buf.numel()} bytes; the staging buffer holds {stage.numel()}")
            into = self._into[(r, buf.numel())] = stage[:buf.numel()]
        into.copy_(buf, non_blocking=True)

    def decode(self, r: int, key, base: int, n_esc: int) -> None:
        """Decode the buffer in stage r into outputs[key] (its base and ``n_esc`` escapes are read from
        the buffer on the device; n_esc is checked against the stage's room)."""
        if layout(self.n, n_esc)[3] > self.stages[r].numel():
            raise ValueError(f"a buffer of {n_esc} escapes is {layout(self.n, n_esc)[3]} bytes; the staging "
                             f"buffer holds {self.stages[r].numel()}")
        o1, o2 = self.outputs[key]
        _launch(self._parts[r], o1, o2, self.n1, self.n)

    def __call__(self, key, buf: torch.Tensor, base: int, n_esc: int) -> None:
        """load then decode through stage 0, on the current stream (in order)."""
        self.load(0, buf)
        self.decode(0, key, base, n_esc)
