"""Page-locked host tensors of exactly their size.

torch's pinned-memory allocator (CachingHostAllocator) rounds every allocation up to the next power of
two: a 805 MB layer of Qwen3-30B-A3B experts holds 1 GiB, a 738 MB DeepSeek-V2-Lite layer 1 GiB
(+33%, +45% host memory; OLMoE's layers happen to be powers of two). ``host_empty`` maps anonymous
memory of the exact size and page-locks it in place (``cudaHostRegister``, what sglang's host pools
do); it is unregistered when the last tensor over it goes. Where registering fails, or torch does not
see the memory as pinned, it falls back to torch's allocator (rounded, as before).
"""
from __future__ import annotations

import math
import mmap

import torch

EXACT_FROM = 1 << 24  # bytes: smaller tensors take torch's allocator (its rounding costs little there)


class _Mapping(mmap.mmap):
    """Anonymous memory that, once registered, unregisters itself when the last tensor over it goes
    (``__del__`` runs before the mapping is released; every view of the tensor holds the mapping)."""
    ptr: int | None = None

    def __del__(self):
        if self.ptr is not None:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.ptr)
            except Exception:  # noqa: BLE001 - at interpreter exit the CUDA runtime may be gone already
                pass
            self.ptr = None


def _torch_pinned(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)  # rounded up to a power of two


def host_empty(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor of ``shape``; page-locked (pinned) when ``pin``, holding exactly its
    bytes (rounded up to whole pages) from EXACT_FROM bytes on."""
    if not pin:
        return torch.empty(shape, dtype=dtype)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n < EXACT_FROM or not torch.cuda.is_available():
        return _torch_pinned(shape, dtype)
    try:
        mem = _Mapping(-1, n)  # anonymous and page-aligned; the tensors over it keep it alive
        raw = torch.frombuffer(mem, dtype=torch.uint8)
        if int(torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), n, 0)) == 0:
            mem.ptr = raw.data_ptr()
    except Exception:  # noqa: BLE001 - no mapping or no registration: torch's allocator, as before
        return _torch_pinned(shape, dtype)
    if mem.ptr is None or not raw.is_pinned():  # (a torch that does not count registered memory as pinned:
        return _torch_pinned(shape, dtype)      # its copies would not be asynchronous)
    return raw.view(dtype).view(shape)
