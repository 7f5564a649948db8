"""Balancing losses, capacity and drop counts, bias balancing and jitter against hand formulas."""
import math

import pytest
import torch

from moe.losses import (BalanceConfig, apply_capacity, balance_stats, capacity, expert_load, jitter,
                        load_balancing_loss, router_probs, router_z_loss, update_correction_bias)


def test_load_balancing_loss_matches_hand_formula():
    logits = torch.tensor([[2.0, 0.0, 0.0, -1.0],
                           [0.0, 1.0, 0.0, 0.0],
                           [0.5, 0.5, 3.0, 0.0]])
    ids = torch.tensor([[0, 1], [1, 0], [2, 0]])
    # f = counts / (T*K) = [3, 2, 1, 0] / 6 ; P = column means of the softmax
    p = torch.softmax(logits, -1)
    P = p.mean(0)
    f = torch.tensor([3, 2, 1, 0]) / 6.0
    expected = 4 * float((f * P).sum())
    assert load_balancing_loss(logits, ids).item() == pytest.approx(expected, rel=1e-6)
    # by hand for expert 0 alone: E * f_0 * P_0
    by_hand = 4 * sum(c / 6 * float(P[e]) for e, c in enumerate([3, 2, 1, 0]))
    assert load_balancing_loss(logits, ids).item() == pytest.approx(by_hand, rel=1e-6)


def test_load_balancing_loss_is_one_when_balanced_and_e_when_collapsed():
    E, T = 4, 8
    uniform = torch.zeros(T, E)
    ids = torch.arange(T).remainder(E)[:, None]
    assert load_balancing_loss(uniform, ids).item() == pytest.approx(1.0)
    collapsed = torch.full((T, E), -30.0)
    collapsed[:, 0] = 30.0
    assert load_balancing_loss(collapsed, torch.zeros(T, 1, dtype=torch.long)).item() == pytest.approx(E, rel=1e-5)


def test_load_balancing_loss_equals_transformers_times_k():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 8, generator=g)
    ids = torch.topk(logits.softmax(-1), 2, dim=-1).indices
    ours = load_balancing_loss(logits, ids)
    theirs = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert float(theirs) == pytest.approx(2 * float(ours), rel=1e-5)


def test_load_balancing_loss_gradient_flows_through_probabilities_only():
    logits = torch.randn(6, 4, requires_grad=True)
    ids = torch.topk(logits.detach(), 2, -1).indices
    load_balancing_loss(logits, ids).backward()
    # d/dlogits of E * sum_e f_e * mean_t softmax_t[e]
    f = expert_load(ids, 4).float() / 12
    ref = logits.detach().clone().requires_grad_(True)
    (4 * (f * ref.softmax(-1).mean(0)).sum()).backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_sigmoid_probabilities_are_normalised():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    p = router_probs(logits, "sigmoid")
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    assert p[0, 0].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="score_func"):
        router_probs(logits, "relu")


def test_router_z_loss_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3.0)]
    assert router_z_loss(logits).item() == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)


def test_expert_load_ignores_dropped_slots():
    ids = torch.tensor([[0, 2], [2, -1], [-1, -1]])
    assert expert_load(ids, 3).tolist() == [1, 0, 2]


@pytest.mark.parametrize("factor,needed,expected", [
    (1.0, 10, 4),      # fixed: ceil(1.0 * 8*2/4) = 4, whatever the batch needs
    (1.25, 3, 5),      # fixed capacity may exceed what is needed
    (0.0, 7, 7),       # dropless: exactly what the batch needs
    (-2.0, 5, 5),      # adaptive: grows to the need ...
    (-1.5, 9, 6),      # ... capped at ceil(1.5 * mean)
])
def test_capacity_rule(factor, needed, expected):
    assert capacity(8, 2, 4, factor, needed) == expected


def test_apply_capacity_drops_second_choices_first():
    # expert 0 is everyone's first choice; capacity 2 keeps the first two tokens' first slots
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0]])
    kept, dropped, cap = apply_capacity(ids, 4, 1.0)  # mean = 4*2/4 = 2 -> capacity 2
    assert cap == 2
    assert kept.tolist() == [[0, 1], [0, 2], [-1, 3], [1, -1]]
    assert dropped == 2
    assert expert_load(kept, 4).max() <= cap


def test_apply_capacity_dropless_and_adaptive_cap():
    ids = torch.tensor([[0, 1]] * 6)
    same, dropped, cap = apply_capacity(ids, 4, 0.0)
    assert same is ids and dropped == 0 and cap == 6
    kept, dropped, cap = apply_capacity(ids, 4, -1.0)  # cap at ceil(1.0 * 3) = 3 per expert
    assert cap == 3 and dropped == 6
    assert expert_load(kept, 4).tolist() == [3, 3, 0, 0]
    assert kept[:3].tolist() == [[0, 1]] * 3 and (kept[3:] == -1).all()


def test_update_correction_bias_moves_against_the_load_error():
    bias = torch.zeros(4)
    update_correction_bias(bias, torch.tensor([7, 1, 4, 4]), 0.1)  # mean load 4
    assert bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        update_correction_bias(bias, torch.tensor([1, 2]), 0.1)


def test_jitter_range_and_identity():
    x = torch.ones(1000, 4)
    y = jitter(x, 0.1, torch.Generator().manual_seed(0))
    assert y.min() >= 0.9 and y.max() <= 1.1 and y.std() > 0.01
    assert jitter(x, 0.0) is x


def test_balance_stats():
    s = balance_stats(torch.tensor([2, 2, 2, 6]))
    assert s["max_over_mean"] == pytest.approx(2.0)
    assert s["cv"] == pytest.approx(math.sqrt(3.0) / 3.0)


@pytest.mark.parametrize("kw,match", [
    ({"lb_coef": -1.0}, "lb_coef"), ({"jitter_eps": 1.0}, "jitter_eps"), ({"score_func": "tanh"}, "score_func"),
])
def test_balance_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        BalanceConfig(**kw)
