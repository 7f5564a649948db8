"""Trace-driven routing keyed by (row, position) and seeded weights drawn on every rank: the
runtime's ranks route exactly the trace's experts in every plan and mode (rows moved equal the
figures metrics.py predicts for that routing) and give the single-process model's logits."""
import numpy as np
import pytest
import torch

from moe import MoEConfig
from placement.baselines import round_robin
from placement.metrics import evaluate
from placement.plan import PlacementPlan
from placement.runtime import EPConfig, ExpertParallelRuntime
from placement.trace_routing import (TraceRoutingSpec, expert_weights, expert_shapes, install_trace_routing,
                                     seeded_model, trace_keys)
from tests.placement.test_runtime import _greedy

L, E, K, N = 3, 8, 2, 61


def _cfg():
    return MoEConfig.tiny("mixtral", num_hidden_layers=L, num_experts=E, num_experts_per_tok=K)


def _spec(stride=9, weights=True):
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(N)]) for _ in range(L)])
    ids[1, 5, 1] = -1  # an idle slot routes nowhere
    w = rng.random((L, N, K)).astype(np.float32) if weights else None
    return TraceRoutingSpec(ids.astype(np.int16), w, E, stride)


def _routed(model):
    """Hooks after the trace's: record what each router finally returns."""
    got = {}
    hs = [b.router.register_forward_hook(lambda m, i, o, k=b.moe_index: got.setdefault(k, []).append(o))
          for b in model.moe_blocks()]
    return got, hs


def test_routers_return_the_trace_at_row_position_keys():
    spec = _spec()
    model = seeded_model(_cfg(), seed=3, std=0.2)
    install_trace_routing(model, spec)
    got, _ = _routed(model)
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(3, 7)
    with torch.no_grad():
        model(ids, cache=cache)
        model(ids[:, :1], cache=cache)  # a decode step at position 5
    rows, pos = np.divmod(np.arange(15), 5)
    keys = [trace_keys(rows, pos, 9, N), trace_keys(np.arange(3), np.full(3, 5), 9, N)]
    for layer in range(L):
        for call, k in zip(got[layer], keys):
            want = spec.expert_ids[layer, k].astype(np.int64)
            np.testing.assert_array_equal(call[0].numpy(), want)
            w = np.where(want >= 0, spec.weights[layer, k], 0.0)
            np.testing.assert_allclose(call[1].numpy(), w, rtol=1e-6)
    # the same tokens read from the spec's own sub-trace
    sub = spec.sub_trace(3, 5)
    np.testing.assert_array_equal(sub.expert_ids, spec.expert_ids[:, keys[0]])


def test_uniform_weights_and_shape_errors():
    spec = _spec(weights=False)
    model = seeded_model(_cfg(), seed=0)
    install_trace_routing(model, spec)
    got, _ = _routed(model)
    with torch.no_grad():
        model(torch.randint(3, 128, (2, 4)))
    w = got[0][0][1]
    assert torch.allclose(w, torch.full_like(w, 1.0 / K))
    with pytest.raises(ValueError, match="stride"):
        TraceRoutingSpec(spec.expert_ids, None, E, 0)
    with pytest.raises(ValueError, match="expert ids"):
        TraceRoutingSpec(spec.expert_ids, None, 4, 3)
    with pytest.raises(ValueError, match="MoE layers"):
        install_trace_routing(seeded_model(MoEConfig.tiny("mixtral", num_hidden_layers=4)), spec)


def test_seeded_weights_are_per_expert_and_per_name():
    a, b = seeded_model(_cfg(), seed=1), seeded_model(_cfg(), seed=1)
    for (n1, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p1, p2), n1
    c = seeded_model(_cfg(), seed=2)
    assert not torch.equal(a.embed.weight, c.embed.weight)
    w13, w2 = expert_weights((L, E), 1, [5, 2], expert_shapes(a), 1, 0.02, torch.float32, "cpu")
    blk = a.moe_blocks()[1].experts
    assert torch.equal(w13, blk.w13[[5, 2]]) and torch.equal(w2, blk.w2[[5, 2]])


@pytest.mark.ray
def test_runtime_ranks_route_by_the_trace(ray_session):
    spec = _spec()
    cfg = _cfg()
    ref = seeded_model(cfg, seed=4, std=0.2)
    install_trace_routing(ref, spec)
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids)
    ref_toks, ref_logits = _greedy(ref, ids, 3)
    sub = spec.sub_trace(3, 6)
    rng = np.random.default_rng(2)
    plans = [round_robin(L, E, 2), PlacementPlan([(rng.permutation(E) % 2).tolist() for _ in range(L)], 2,
                                                 method="random")]
    rt = ExpertParallelRuntime(None, plans[0], EPConfig())
    try:
        rt.set_trace_routing(spec)
        for plan in plans:
            rt.load_seeded(cfg, plan, seed=4, std=0.2)
            assert sum(rt.expert_params) == E * L * (2 * 16 * 32 + 32 * 16)  # nothing drawn twice
            f = evaluate(plan, sub)
            for mode in ("standard", "coherent"):
                rt.set_mode(mode)
                rt.reset_counters()
                torch.testing.assert_close(rt.forward(ids), want, rtol=1e-5, atol=1e-5)
                rows = sum(x["dispatch_rows"] + x["combine_rows"] for x in rt.counters())
                pred = (f.cc_messages_per_token if mode == "coherent" else f.ep_messages_per_token) * sub.num_tokens
                assert rows == pytest.approx(pred), (plan.method, mode)
                toks, logits = rt.greedy(ids, 3, home_only=True)  # ExFlow's decoding: each row's home routes it
                assert torch.equal(toks, ref_toks), (plan.method, mode)
                torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    finally:
        rt.shutdown()


def test_trace_lookahead_gives_each_tokens_guesses_best_first():
    """install_trace_lookahead: layer l's router-shaped guess of layer l+1, read at the same (row,
    position) keys as the routing, the first guess scoring highest and -1 naming nothing."""
    from placement.trace_routing import install_trace_lookahead
    spec = _spec()
    rng = np.random.default_rng(1)
    nxt = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(N)]) for _ in range(L)]).astype(np.int16)
    nxt[0, trace_keys(1, 2, 9, N), 1] = -1
    model = seeded_model(_cfg(), seed=3, std=0.2)
    install_trace_routing(model, spec)
    _, routers = install_trace_lookahead(model, nxt, E, stride=9)
    assert len(routers) == L - 1
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(3, 7)
    with torch.no_grad():
        for step, (x, keys) in enumerate([(ids, trace_keys(*np.divmod(np.arange(15), 5), 9, N)),
                                          (ids[:, :1], trace_keys(np.arange(3), np.full(3, 5), 9, N))]):
            model(x, cache=cache)
            for layer, r in enumerate(routers):
                _, _, logits = r(torch.zeros(len(keys), 4))
                assert logits.shape == (len(keys), E)
                for row, key in enumerate(keys):
                    want = [int(e) for e in nxt[layer, key] if e >= 0]
                    got = logits[row].topk(len(want)).indices.tolist()
                    assert got == want, (step, layer, row)
                    assert (logits[row] > -1e3).sum().item() == len(want)
        with pytest.raises(RuntimeError, match="positions name"):
            routers[0](torch.zeros(4, 4))
    with pytest.raises(ValueError, match="guessed expert ids"):
        install_trace_lookahead(model, np.full((L, N, K), E), E, stride=9)
    with pytest.raises(ValueError, match="next_ids must be"):
        install_trace_lookahead(model, nxt[:1], E, stride=9)
