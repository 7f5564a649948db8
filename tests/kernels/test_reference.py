import pytest
import torch

from kernels import expert_mlp_reference, get_backend, moe_experts_reference


def _weights(E, D, I, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(E, 2 * I, D, generator=g, dtype=dtype) / D ** 0.5,
            torch.randn(E, D, I, generator=g, dtype=dtype) / I ** 0.5)


def test_one_expert_top1_equals_dense_mlp():
    w13, w2 = _weights(1, 16, 24)
    x = torch.randn(7, 16, dtype=torch.float64)
    ids = torch.zeros(7, 1, dtype=torch.long)
    y = moe_experts_reference(x, w13, w2, ids, torch.ones(7, 1, dtype=torch.float64))
    torch.testing.assert_close(y, expert_mlp_reference(x, w13[0], w2[0]))


def test_minus_one_contributes_zero_and_weights_scale():
    w13, w2 = _weights(4, 8, 12)
    x = torch.randn(5, 8, dtype=torch.float64)
    ids = torch.tensor([[0, -1], [1, 2], [-1, -1], [3, 3], [2, 0]])
    w = torch.rand(5, 2, dtype=torch.float64)
    y = moe_experts_reference(x, w13, w2, ids, w)
    for t in range(5):
        want = torch.zeros(8, dtype=torch.float64)
        for k in range(2):
            e = int(ids[t, k])
            if e >= 0:
                want += w[t, k] * expert_mlp_reference(x[t:t + 1], w13[e], w2[e])[0]
        torch.testing.assert_close(y[t], want)


def test_bad_shapes_and_backend_names_raise():
    w13, w2 = _weights(2, 8, 12)
    with pytest.raises(ValueError, match="hidden size"):
        moe_experts_reference(torch.randn(3, 9, dtype=torch.float64), w13, w2,
                              torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown expert backend"):
        get_backend("cuda-magic")
