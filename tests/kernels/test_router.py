"""kernels.router.softmax_topk (Triton; interpreted on the CPU) against the torch routing the model uses."""
import pytest
import torch

from kernels.router import softmax_topk, softmax_topk_reference


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,k,renorm", [(1, 8, 2, True), (3, 128, 8, True), (5, 128, 8, False), (2, 60, 4, True),
                                          (4, 64, 6, False), (2, 7, 7, True)])
def test_softmax_topk_matches_the_reference(dtype, T, E, k, renorm):
    g = torch.Generator().manual_seed(E + k)
    logits = (torch.randn(T, E, generator=g) * 2).to(_dev(), dtype)
    ids, w, out = softmax_topk(logits, k, renorm)
    rids, rw, rout = softmax_topk_reference(logits, k, renorm)
    assert ids.dtype == torch.int64 and w.dtype == out.dtype == torch.float32
    assert ids.shape == w.shape == (T, k) and out.shape == (T, E)
    assert torch.equal(out, rout)  # the cast logits, exactly
    # the same experts, largest first (no ties among random float32 logits; bf16 ties are below)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
    if dtype == torch.float32:
        assert torch.equal(ids, rids)
    else:  # equal bf16 logits may be taken in another order: the probabilities taken are the same
        probs = torch.softmax(rout, -1)
        assert torch.equal(probs.gather(1, ids), probs.gather(1, rids))


def test_ties_take_the_lower_expert_first_and_strided_logits():
    dev = _dev()
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, -1.0, 1.0]], device=dev)
    ids, w, _ = softmax_topk(logits, 3, False)
    assert ids.tolist() == [[1, 3, 2]]
    assert w[0, 0] == w[0, 1] and w[0, 2] < w[0, 1]
    wide = torch.randn(3, 20, device=dev)
    ids, w, out = softmax_topk(wide[:, :16], 4, True)  # rows 20 apart
    rids, rw, rout = softmax_topk_reference(wide[:, :16].contiguous(), 4, True)
    assert torch.equal(ids, rids) and torch.equal(out, rout)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
    assert softmax_topk(torch.empty(0, 16, device=dev), 2, True)[0].shape == (0, 2)
    broken = torch.randn(2, 16, device=dev)
    broken[1, 5] = float("nan")  # a broken row: NaN weights, ids still in range; the other row intact
    ids, w, _ = softmax_topk(broken, 3, True)
    assert w[1].isnan().all() and ids[1].tolist() == [0, 1, 2]
    rids, rw, _ = softmax_topk_reference(broken[:1], 3, True)
    assert torch.equal(ids[:1], rids)
    with pytest.raises(ValueError, match="top-k of 9"):
        softmax_topk(wide[:, :8], 9, True)


def test_the_router_uses_it_only_for_inference_on_cuda():
    from routing.gating import Router

    torch.manual_seed(0)
    r = Router(16, 8, 2, norm_topk_prob=True)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(3, 16)
    assert not r._fused(x)  # CPU: the torch ops
    ds = Router(16, 8, 2, topk_method="noaux_tc", n_group=2, topk_group=1, deepseek=True, correction_bias=True)
    if torch.cuda.is_available():
        r, ds = r.cuda(), ds.cuda()
        xc = x.cuda()
        with torch.no_grad():
            assert r._fused(xc) and not ds._fused(xc)
            ids, w, logits = r(xc)
        assert not r._fused(xc)  # a gradient is asked for (the weight requires it): the torch ops
        rids, rw, rlogits = r(xc)
        assert torch.equal(ids, rids) and torch.equal(logits, rlogits.detach())
        torch.testing.assert_close(w, rw.detach(), rtol=1e-6, atol=1e-7)
