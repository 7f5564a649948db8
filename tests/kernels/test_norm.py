"""kernels.norm.rms_norm (Triton; interpreted on the CPU) against the torch reference the model uses."""
import pytest
import torch

from kernels.norm import rms_norm, rms_norm_reference


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 48), (2, 4, 7, 128), (1, 300)])
def test_rms_norm_matches_the_reference(dtype, tol, shape):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 3).to(dev, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dev, dtype)
    got = rms_norm(x, w, 1e-6)
    want = rms_norm_reference(x, w, 1e-6)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_rms_norm_strided_rows_and_promotion():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 96, generator=g).to(dev)[:, :64]  # rows 96 apart
    w = torch.rand(64, generator=g).to(dev)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rtol=1e-6, atol=1e-6)
    # a float32 weight on bfloat16 activations: the result is float32, as torch promotes it
    xb = x.to(torch.bfloat16)
    got, want = rms_norm(xb, w, 1e-5), rms_norm_reference(xb, w, 1e-5)
    assert got.dtype == want.dtype == torch.float32
    # one bfloat16 step of the normalised value (the Triton interpreter rounds its bf16 casts
    # differently from torch; on a GPU they agree)
    torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-2)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, w[:10], 1e-5)
    assert rms_norm(torch.empty(0, 64, device=dev), w, 1e-5).shape == (0, 64)
