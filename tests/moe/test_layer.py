"""MoELayer: a one-expert top-1 layer is a dense MLP; the sparse layer equals a dense computation
of every expert (outputs and gradients); capacity, bias balancing and jitter behave as specified."""
import pytest
import torch
import torch.nn.functional as F

from moe.layer import MoELayer, dense_mlp_from_single_expert
from moe.losses import BalanceConfig, expert_load


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def test_one_expert_top1_equals_dense_mlp_outputs_and_grads():
    torch.manual_seed(0)
    layer = MoELayer.simple(hidden_size=16, num_experts=1, top_k=1, intermediate_size=24)
    mlp = dense_mlp_from_single_expert(layer)
    x = torch.randn(2, 5, 16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, aux = layer(xa)
    y_ref = mlp(xb)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    I = 24
    torch.testing.assert_close(layer.experts.w13.grad[0, :I], mlp.gate_proj.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w13.grad[0, I:], mlp.up_proj.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.experts.w2.grad[0], mlp.down_proj.weight.grad, rtol=1e-5, atol=1e-6)
    assert aux.load_LE.tolist() == [[10]] and aux.dropped == 0


def _dense_reference(layer: MoELayer, x_ND: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with a dense [N, E] gate that is zero off the top-k."""
    w13, w2, W = layer.experts.w13, layer.experts.w2, layer.router.weight
    E, J, D = w13.shape
    I = J // 2
    probs = torch.softmax(x_ND @ W.t(), -1)
    top_w, top_i = torch.topk(probs, layer.cfg.num_experts_per_tok, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    gate_NE = torch.zeros_like(probs).scatter(1, top_i, top_w)
    h_NEJ = torch.einsum("nd,ejd->nej", x_ND, w13)
    act_NEI = F.silu(h_NEJ[..., :I]) * h_NEJ[..., I:]
    out_NED = torch.einsum("nei,edi->ned", act_NEI, w2)
    return (gate_NE[..., None] * out_NED).sum(1)


def test_sparse_layer_equals_dense_reference_outputs_and_grads():
    torch.manual_seed(1)
    layer = MoELayer.simple(hidden_size=12, num_experts=4, top_k=2, intermediate_size=8, init_std=0.3)
    x = torch.randn(9, 12)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, _ = layer(xa)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = _grads(layer)
    layer.zero_grad()
    y_ref = _dense_reference(layer, xb)
    (y_ref * g).sum().backward()
    ref_grads = _grads(layer)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(ref_grads) and len(grads) == 3  # router, w13, w2
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_aux_losses_reach_router_gradient():
    torch.manual_seed(2)
    layer = MoELayer.simple(hidden_size=8, num_experts=4, top_k=2, intermediate_size=8)
    _, aux = layer(torch.randn(16, 8))
    aux.loss(BalanceConfig(lb_coef=1.0, z_coef=1.0)).backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w13.grad is None  # aux losses do not touch the experts


def test_capacity_drops_are_counted_and_contribute_zero():
    torch.manual_seed(3)
    layer = MoELayer.simple(hidden_size=8, num_experts=4, top_k=2, intermediate_size=8,
                            balance=BalanceConfig(capacity_factor=0.5))
    with torch.no_grad():  # every token prefers expert 0, then expert 1
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 5.0
        layer.router.weight[1, 0] = 3.0
    x = torch.randn(8, 8)
    x[:, 0] = x[:, 0].abs() + 1.0
    y, aux = layer(x)
    # capacity = ceil(0.5 * 8*2/4) = 2 per expert: 6 of expert 0's and 6 of expert 1's slots drop
    assert aux.capacity == 2 and aux.dropped == 12
    assert aux.load_LE.tolist() == [[8, 8, 0, 0]]  # statistics see the router's choices
    # tokens 2.. lost both experts: their output is exactly zero
    assert torch.all(y[2:] == 0) and torch.all(y[:2].abs().sum(-1) > 0)
    dropless = MoELayer.simple(hidden_size=8, num_experts=4, top_k=2, intermediate_size=8)
    dropless.load_state_dict(layer.state_dict())
    y_full, aux_full = dropless(x)
    assert aux_full.dropped == 0
    torch.testing.assert_close(y[:2], y_full[:2])


def test_aux_free_bias_balances_a_skewed_router():
    torch.manual_seed(4)
    layer = MoELayer.simple(hidden_size=8, num_experts=8, top_k=2, intermediate_size=8, scoring_func="sigmoid",
                            balance=BalanceConfig(lb_coef=0.0, bias_rate=0.02))
    with torch.no_grad():  # feature 0 is constant and only expert 0 reads it: expert 0 is overloaded
        layer.router.weight.normal_()
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[0, 0] = 3.0
    x = torch.randn(256, 8)
    x[:, 0] = 1.0
    layer.eval()
    _, before = layer(x)
    assert torch.all(layer.router.e_score_correction_bias == 0)  # eval never moves the bias
    layer.train()
    for _ in range(60):
        with torch.no_grad():
            layer(x)
    layer.eval()
    _, after = layer(x)
    assert before.balance()["max_over_mean"] > 2.0
    assert after.balance()["max_over_mean"] < 1.3
    assert layer.router.e_score_correction_bias[0] == layer.router.e_score_correction_bias.min() < 0


def test_shared_experts_are_always_on():
    torch.manual_seed(5)
    layer = MoELayer.simple(hidden_size=8, num_experts=4, top_k=1, intermediate_size=8, num_shared_experts=1)
    x = torch.randn(5, 8)
    y, _ = layer(x)
    ids, w, _ = layer.router(x)
    routed = layer.experts(x, ids, w)
    torch.testing.assert_close(y, routed + layer.block.shared_experts(x))


def test_jitter_only_in_training():
    torch.manual_seed(6)
    layer = MoELayer.simple(hidden_size=8, num_experts=4, top_k=2, intermediate_size=8,
                            balance=BalanceConfig(jitter_eps=0.5))
    x = torch.randn(32, 8)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    layer.train()
    assert not torch.allclose(layer(x)[0], layer(x)[0])  # the router sees new noise each call


def test_bad_input_and_settings():
    layer = MoELayer.simple(hidden_size=8, num_experts=4, top_k=2, intermediate_size=8)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="scoring_func"):
        MoELayer.simple(hidden_size=8, num_experts=4, top_k=2, intermediate_size=8, scoring_func="relu")
    with pytest.raises(ValueError, match="backend"):
        layer.set_backend("cuda-magic")
    with pytest.raises(ValueError, match="1-expert"):
        dense_mlp_from_single_expert(layer)
    assert expert_load(torch.tensor([[1, 3]]), 4).tolist() == [0, 1, 0, 1]
