"""kernels.proj.multi_linear (Triton; interpreted on the CPU) against F.linear per weight."""
import os

import pytest
import torch

from kernels.proj import multi_linear, multi_linear_reference
from tests.conftest import ON_GPU, load_benchmark


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("M,K,Ns", [(1, 64, (96, 32, 32)), (3, 40, (50,)), (16, 128, (64, 16)), (5, 300, (70, 33, 33))])
def test_multi_linear_matches_f_linear(dtype, tol, M, K, Ns):
    g = torch.Generator().manual_seed(M * 1000 + K)
    dev = _dev()
    x = torch.randn(M, K, generator=g).to(dev, dtype)
    ws = [(torch.randn(n, K, generator=g) / K ** 0.5).to(dev, dtype) for n in Ns]
    got = multi_linear(x, ws)
    want = multi_linear_reference(x, ws)
    assert len(got) == len(ws)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_strided_input_fallbacks_and_errors():
    dev = _dev()
    x = torch.randn(4, 80, device=dev)[:, :64]  # rows 80 apart
    ws = [torch.randn(24, 64, device=dev), torch.randn(8, 64, device=dev)]
    for a, b in zip(multi_linear(x, ws), multi_linear_reference(x, ws)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    big = torch.randn(17, 64, device=dev)  # more rows than one tile: F.linear
    for a, b in zip(multi_linear(big, ws), multi_linear_reference(big, ws)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="each weight"):
        multi_linear(x, [torch.randn(8, 63, device=dev)])
    with pytest.raises(ValueError, match="1 to 3"):
        multi_linear(x, ws * 2)


def test_gemv_benchmark_script_smoke_run(capsys, monkeypatch):
    """benchmarks/gemv.py --smoke: every shape's one-launch result against F.linear (the script's own
    check); in the interpreter on the CPU (fp32), compiled in bf16 on a GPU machine (where the
    interpreter is off for the whole session). The environment is restored after: the script once left
    TRITON_INTERPRET=1 behind on a GPU machine, and a later test that skips CPU cases without the
    interpreter ran them against compiled kernels (s34-a)."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    mod = load_benchmark("gemv")
    assert mod.main(["--device", "cuda" if ON_GPU else "cpu", "--smoke", "--rows", "2"]) == 0
    errs = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if "relative error" in line]
    assert len(errs) == len(mod.SHAPES) and max(errs) < (2e-2 if ON_GPU else 1e-5)
