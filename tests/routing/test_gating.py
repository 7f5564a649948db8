"""Gating functions against plain per-token formulas written out with Python lists."""
from __future__ import annotations

import math

import pytest
import torch

from moe import MoEConfig
from routing.gating import Router, group_limited_greedy, greedy_topk, noaux_tc, softmax_topk


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _sigmoid(row):
    return [1 / (1 + math.exp(-v)) for v in row]


def _top(values, k, allowed=None):
    idx = [i for i in range(len(values)) if allowed is None or i in allowed]
    return sorted(idx, key=lambda i: -values[i])[:k]


def _as_sets(ids, w):
    """{expert: weight} per token, so the order top-k returns them in does not matter."""
    return [dict(zip(i, x)) for i, x in zip(ids.tolist(), w.tolist())]


def _close(a, b, tol=1e-6):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (ra, rb)
        for k in ra:
            assert abs(ra[k] - rb[k]) <= tol, (k, ra[k], rb[k])


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(37, 8) * 2


@pytest.mark.parametrize("renorm", [False, True])
def test_softmax_topk(logits, renorm):
    ids, w = softmax_topk(logits, 3, renorm)
    ref = []
    for row in logits.tolist():
        p = _softmax(row)
        top = _top(p, 3)
        s = sum(p[i] for i in top) if renorm else 1.0
        ref.append({i: p[i] / s for i in top})
    _close(_as_sets(ids, w), ref)
    if renorm:
        assert torch.allclose(w.sum(-1), torch.ones(len(w)))


def test_greedy_topk_scaled(logits):
    ids, w = greedy_topk(logits, 2, scaling=1.5)
    ref = []
    for row in logits.tolist():
        p = _softmax(row)
        ref.append({i: 1.5 * p[i] for i in _top(p, 2)})
    _close(_as_sets(ids, w), ref)


def test_group_limited_greedy(logits):
    n_group, topk_group, k = 4, 2, 3
    ids, w = group_limited_greedy(logits, k, n_group, topk_group, scaling=2.0)
    ref = []
    for row in logits.tolist():
        p = _softmax(row)
        groups = [max(p[g * 2:(g + 1) * 2]) for g in range(n_group)]
        kept = _top(groups, topk_group)
        allowed = {e for g in kept for e in (2 * g, 2 * g + 1)}
        ref.append({i: 2.0 * p[i] for i in _top(p, k, allowed)})
    _close(_as_sets(ids, w), ref)


@pytest.mark.parametrize("renorm", [False, True])
def test_noaux_tc(logits, renorm):
    torch.manual_seed(1)
    bias = torch.randn(8) * 0.5
    n_group, topk_group, k, scale = 4, 2, 2, 2.5
    ids, w = noaux_tc(logits, k, n_group, topk_group, bias, renorm, scale)
    ref = []
    b = bias.tolist()
    for row in logits.tolist():
        s = _sigmoid(row)
        choice = [s[i] + b[i] for i in range(8)]
        groups = [sum(sorted(choice[g * 2:(g + 1) * 2], reverse=True)[:2]) for g in range(n_group)]
        kept = _top(groups, topk_group)
        allowed = {e for g in kept for e in (2 * g, 2 * g + 1)}
        top = _top(choice, k, allowed)
        tot = sum(s[i] for i in top) + 1e-20 if renorm else 1.0
        ref.append({i: scale * s[i] / tot for i in top})
    _close(_as_sets(ids, w), ref, tol=1e-5)


def test_noaux_tc_bias_selects_but_does_not_weigh():
    logits = torch.tensor([[3.0, 2.0, -4.0, -5.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # lifts expert 2 into the top-2 ...
    ids, w = noaux_tc(logits, 2, n_group=1, topk_group=1, bias_E=bias, renormalize=False, scaling=1.0)
    got = _as_sets(ids, w)[0]
    assert set(got) == {0, 2}
    assert abs(got[2] - 1 / (1 + math.exp(4.0))) < 1e-7  # ... but its weight is its unbiased sigmoid score


def test_group_of_one_expert_rejected_by_config():
    with pytest.raises(ValueError, match="each group needs >= 2 experts"):
        MoEConfig.tiny("deepseek_v3", n_group=8, topk_group=4)


def test_router_per_family():
    torch.manual_seed(0)
    x = torch.randn(11, 32)
    for mt in ("mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"):
        r = Router.from_config(MoEConfig.tiny(mt))
        torch.nn.init.normal_(r.weight)
        ids, w, logits = r(x)
        assert ids.dtype == torch.int64 and w.dtype == torch.float32 and logits.dtype == torch.float32
        assert torch.allclose(logits, x @ r.weight.t(), atol=1e-5)
        if mt == "mixtral":  # Mixtral always renormalises
            assert torch.allclose(w.sum(-1), torch.ones(11))
            ref_ids, ref_w = softmax_topk(logits, 2, True)
        elif mt == "qwen2_moe":
            ref_ids, ref_w = softmax_topk(logits, 2, False)
        elif mt == "deepseek_v2":
            ref_ids, ref_w = group_limited_greedy(logits, 2, 4, 2, 1.0)
        else:
            ref_ids, ref_w = noaux_tc(logits, 2, 4, 2, r.e_score_correction_bias, True, 2.5)
        _close(_as_sets(ids, w), _as_sets(ref_ids, ref_w))


def test_router_hook_can_replace_routing():
    r = Router(16, 4, 2)
    torch.nn.init.normal_(r.weight)
    fixed = (torch.zeros(3, 2, dtype=torch.long), torch.full((3, 2), 0.5), torch.zeros(3, 4))
    h = r.register_forward_hook(lambda mod, inp, out: fixed)
    assert r(torch.randn(3, 16)) is fixed
    h.remove()


def test_router_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"top_k \(5\) must be <= num_experts \(4\)"):
        Router(16, 4, 5)
    with pytest.raises(ValueError, match="needs n_group and topk_group"):
        Router(16, 4, 2, topk_method="noaux_tc")
