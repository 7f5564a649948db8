"""offload.pinned.host_empty on the CPU, with the CUDA runtime stood in: the exact mapping is registered,
kept while any view of it lives and unregistered after; any failure falls back to torch's allocator."""
import gc

import pytest
import torch

import offload.pinned as P


class FakeRuntime:
    def __init__(self, register_error=0):
        self.err, self.registered, self.unregistered = register_error, [], []

    def cudaHostRegister(self, ptr, n, flags):
        self.registered.append((ptr, n))
        return self.err

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def cuda_standin(monkeypatch):
    def setup(register_error=0, pinned=True):
        rt = FakeRuntime(register_error)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self, *a, **k: pinned)
        fallback = []
        monkeypatch.setattr(P, "_torch_pinned", lambda shape, dtype: fallback.append(shape) or torch.empty(shape, dtype=dtype))
        return rt, fallback
    return setup


def test_exact_mapping_registered_and_released_with_its_last_view(cuda_standin):
    rt, fallback = cuda_standin()
    shape = (3, P.EXACT_FROM // 4 + 1000)  # past EXACT_FROM, not a power of two
    t = P.host_empty(shape, torch.bfloat16, pin=True)
    assert t.shape == shape and t.dtype == torch.bfloat16 and not fallback
    (ptr, n), = rt.registered
    assert n == t.numel() * 2 and ptr == t.data_ptr() and ptr % 4096 == 0
    row = t[1]
    t.fill_(1.5)
    del t
    gc.collect()
    assert rt.unregistered == [] and float(row[0]) == 1.5  # a view still holds the mapping
    del row
    gc.collect()
    assert rt.unregistered == [ptr]


@pytest.mark.parametrize("register_error,pinned", [(1, True), (0, False)])
def test_falls_back_to_torchs_allocator(cuda_standin, register_error, pinned):
    rt, fallback = cuda_standin(register_error, pinned)
    shape = (P.EXACT_FROM // 2 + 8,)
    t = P.host_empty(shape, torch.float32, pin=True)
    assert fallback == [shape] and t.shape == shape
    assert rt.unregistered == ([] if register_error else [rt.registered[0][0]])  # registered, then not seen pinned


def test_small_or_unpinned(cuda_standin):
    rt, fallback = cuda_standin()
    assert P.host_empty((4, 4), torch.float32, pin=False).shape == (4, 4) and not fallback
    P.host_empty((16,), torch.float32, pin=True)  # under EXACT_FROM: torch's allocator
    assert fallback == [(16,)] and not rt.registered
