"""Lossless exponent packing of bfloat16 weights: 12 bits a weight instead of 16, decoded on the GPU.

A bfloat16 weight is a sign bit, 8 exponent bits and 7 mantissa bits. The weights of a matrix use few
exponents: on the embedded default model's trained experts (and on normal random weights) 15
consecutive exponents hold 99.98% of the values, at ~2.6 bits of entropy. ``pack_bf16`` keeps

    nib  [ceil(N/2)] uint8  a 4-bit code per weight: its exponent - base for the 15 exponents from
                            base on, 15 for the others (escapes)
    low  [N] uint8          the sign bit (bit 7) and the 7 mantissa bits
    idx  [n] int32, val [n] int16   each escape's index and its whole 16 bits (n rounded up to a
                                    multiple of 32, padded with index -1: few distinct launch keys)

in one byte buffer, each part starting on a 16-byte boundary: 1.5 bytes a weight plus 6 an escape
(~0.7504 of the bfloat16 bytes on those weights). What offloading copies over PCIe shrinks by a
quarter, and the weights that arrive are bit for bit the ones packed.

``unpack_bf16`` writes the N weights into two bfloat16 outputs (the first N1 into ``out1``, the
rest into ``out2``: an expert's w13 and w2, which sit in separate slot pools) in one launch, plus
one for the escapes when there are any; ``unpack_bf16_reference`` is the same in torch ops.
Each launch is memory-bound (read 1.5 bytes, write 2 a weight).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grouped_gemm import _interpreted
from .launch import Launcher

CODES = 15  # exponents a window holds; code 15 marks an escape
ESCAPE = 15
ESC_ROUND = 32  # escapes are stored in whole rounds of this many (index -1 pads the last)


def _a16(n: int) -> int:
    return -(-n // 16) * 16


def layout(n: int, n_esc: int) -> tuple[int, int, int, int]:
    """Byte offsets of (low, idx, val) and the buffer's length, for n weights and n_esc escapes."""
    off_low = _a16(-(-n // 2))
    off_idx = _a16(off_low + n)
    off_val = _a16(off_idx + 4 * n_esc)
    return off_low, off_idx, off_val, _a16(off_val + 2 * n_esc)


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
    esc = torch.nonzero(code == ESCAPE).reshape(-1)
    if esc.numel() % ESC_ROUND:  # padded with index -1 (written nowhere): the patch launch keys on few counts
        esc = torch.cat([esc, esc.new_full((ESC_ROUND - esc.numel() % ESC_ROUND,), -1)])
    if n % 2:
        code = torch.cat([code, code.new_zeros(1)])
    nib = code[0::2] | (code[1::2] << 4)
    low = (((u >> 8) & 0x80) | (u & 0x7F)).to(torch.uint8)
    val = torch.where(esc >= 0, u[esc.clamp(min=0)], 0)  # the escapes' own 16 bits (int16)
    off_low, off_idx, off_val, total = layout(n, esc.numel())
    buf = torch.zeros(total, dtype=torch.uint8, pin_memory=pin)
    buf[:nib.numel()] = nib.cpu()
    buf[off_low:off_low + n] = low.cpu()
    buf[off_idx:off_idx + 4 * esc.numel()] = esc.to(torch.int32).cpu().view(torch.uint8)
    buf[off_val:off_val + 2 * esc.numel()] = val.cpu().view(torch.uint8)
    return buf, base, esc.numel()


def _parts(buf: torch.Tensor, n: int, n_esc: int):
    off_low, off_idx, off_val, _ = layout(n, n_esc)
    return (buf[:-(-n // 2)], buf[off_low:off_low + n], buf[off_idx:off_idx + 4 * n_esc].view(torch.int32),
            buf[off_val:off_val + 2 * n_esc].view(torch.int16))


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
    nib, low, idx, val = _parts(buf, n, n_esc)
    nib = nib.to(torch.int32)
    code = torch.stack([nib & 0xF, nib >> 4], dim=-1).reshape(-1)[:n]
    lo = low.to(torch.int32)
    u = ((lo & 0x80) << 8) | (((base + code) & 0xFF) << 7) | (lo & 0x7F)
    if n_esc:
        real = idx >= 0
        u[idx[real].long()] = val[real].to(torch.int32) & 0xFFFF
    u = torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16)
    n1 = out1.numel()
    out1.view(torch.int16).view(-1).copy_(u[:n1])
    out2.view(torch.int16).view(-1).copy_(u[n1:])


@triton.jit
def _unpack_kernel(nib_ptr, low_ptr, out1_ptr, out2_ptr, N1, N, base, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b = tl.load(nib_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    code = (b >> ((offs % 2) * 4)) & 0xF
    lo = tl.load(low_ptr + offs, mask=mask, other=0).to(tl.int32)
    u = ((lo & 0x80) << 8) | (((base + code) & 0xFF) << 7) | (lo & 0x7F)
    v = tl.where(u >= 0x8000, u - 0x10000, u).to(tl.int16)  # escapes are written over by _patch_kernel
    tl.store(out1_ptr + offs, v, mask=mask & (offs < N1))
    tl.store(out2_ptr + (offs - N1), v, mask=mask & (offs >= N1))


@triton.jit
def _patch_kernel(idx_ptr, val_ptr, out1_ptr, out2_ptr, N1, NE, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < NE
    idx = tl.load(idx_ptr + i, mask=mask, other=0)
    v = tl.load(val_ptr + i, mask=mask, other=0)
    tl.store(out1_ptr + idx, v, mask=mask & (idx >= 0) & (idx < N1))  # -1: padding
    tl.store(out2_ptr + (idx - N1), v, mask=mask & (idx >= N1))


_unpack = Launcher(_unpack_kernel)  # launched without per-call binding (kernels/launch.py)
_patch = Launcher(_patch_kernel)
BLOCK = 4096


def _launch(parts, o1: torch.Tensor, o2: torch.Tensor, n1: int, n: int, base: int, n_esc: int) -> None:
    nib, low, idx, val = parts
    _unpack[(triton.cdiv(n, BLOCK),)](nib, low, o1, o2, n1, n, base, BLOCK=BLOCK, num_warps=8)
    if n_esc:
        _patch[(triton.cdiv(n_esc, 256),)](idx, val, o1, o2, n1, n_esc, BLOCK=256, num_warps=4)


def unpack_bf16(buf: torch.Tensor, base: int, n_esc: int, out1: torch.Tensor, out2: torch.Tensor) -> None:
    """Decode a ``pack_bf16`` buffer (on the outputs' device) into out1 (the first out1.numel() weights)
    and out2 (the rest), on the current stream; nothing is read back to the host."""
    n = _check(buf, out1, out2, n_esc)
    _launch(_parts(buf, n, n_esc), out1.view(torch.int16), out2.view(torch.int16), out1.numel(), n, base, n_esc)


def kernel_runs_on(device: torch.device) -> bool:
    """Whether the decode kernel can run on tensors of ``device``: a GPU, or the CPU under the Triton
    interpreter (the CPU tests)."""
    return device.type == "cuda" or _interpreted()


class Unpacker:
    """``unpack_bf16`` into fixed outputs through one staging buffer, with the checks and views made once:
    the offload cache's copy path (one call per copied expert, on the host's critical path at
    fine-grained widths). ``outputs[key]`` = (out1, out2); ``stage``: uint8 on the outputs' device, at
    least as long as any buffer it will hold; every buffer holds n = out1.numel() + out2.numel() weights.
    Both the copy into the stage and the decode go to the current stream, in that order, so the next
    copy into the stage queues behind this decode."""

    def __init__(self, stage: torch.Tensor, outputs: dict):
        self.stage = stage
        self.outputs = {}
        for key, (o1, o2) in outputs.items():
            _check(stage, o1, o2, 0)
            self.outputs[key] = (o1.view(torch.int16), o2.view(torch.int16))
            self.n1, self.n = o1.numel(), o1.numel() + o2.numel()
        self._parts: dict[int, tuple] = {}  # escapes -> views of the staging buffer

    def __call__(self, key, buf: torch.Tensor, base: int, n_esc: int) -> None:
        """Copy the packed buffer ``buf`` (host memory; asynchronous from pinned memory) into the stage
        and decode it (``n_esc`` escapes) into outputs[key]."""
        parts = self._parts.get(n_esc)
        if parts is None:
            if layout(self.n, n_esc)[3] > self.stage.numel():
                raise ValueError(f"a buffer of {n_esc} escapes is {layout(self.n, n_esc)[3]} bytes; the staging "
                                 f"buffer holds {self.stage.numel()}")
            parts = self._parts[n_esc] = _parts(self.stage, self.n, n_esc)
        self.stage[:buf.numel()].copy_(buf, non_blocking=True)
        o1, o2 = self.outputs[key]
        _launch(parts, o1, o2, self.n1, self.n, base, n_esc)
