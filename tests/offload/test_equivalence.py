"""Offloaded generation equals resident generation, for every policy, pool size and miss path."""
import numpy as np
import pytest
import torch

from offload import OffloadConfig, TransitionPredictor, apply_offload, route_by_trace
from routing.synthetic import synthesize

from .helpers import greedy, offloaded, tiny_model, twin

PROMPT = [3, 17, 5, 9, 30]
STEPS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model("mixtral")


@pytest.fixture(scope="module")
def trace(model):
    blocks = model.moe_blocks()
    E = blocks[0].experts.w13.shape[0]
    return synthesize(num_layers=len(blocks), num_experts=E, top_k=2, num_requests=1, tokens_per_request=64,
                      popularity_skew=1.0, temporal_locality=0.5, affinity=0.5, seed=1)


@pytest.fixture(scope="module")
def resident(model):
    return greedy(model, PROMPT, STEPS)


def _check(resident, got):
    toks, logits = resident
    toks2, logits2 = got
    torch.testing.assert_close(logits2, logits, atol=1e-6, rtol=0)
    assert toks2 == toks


@pytest.mark.parametrize("cpu_fallback", [False, True])
@pytest.mark.parametrize("policy,slots", [("lru", 1), ("lru", 3), ("lru", 8), ("lfu", 1), ("lfu", 3),
                                          ("predictor", 1), ("predictor", 3)])
def test_offloaded_equals_resident(model, resident, trace, policy, slots, cpu_fallback):
    pred = TransitionPredictor.fit(trace) if policy == "predictor" else None
    m = offloaded(model, slots_per_layer=slots, policy=policy, predictor=pred, cpu_fallback=cpu_fallback)
    _check(resident, greedy(m, PROMPT, STEPS))
    st = m.offload_cache.stats()
    if cpu_fallback:
        assert st["cpu_computed"] > 0
    else:
        assert st["cpu_computed"] == 0
    if slots == 1:
        assert st["evictions"] > 0  # a pool smaller than top-k: experts cycle through the one slot


@pytest.mark.parametrize("cpu_fallback", [False, True])
@pytest.mark.parametrize("slots", [3])
@pytest.mark.parametrize("prefetch", ["next_layer_gate", "predictor"])
def test_prefetch_keeps_output(model, resident, trace, prefetch, slots, cpu_fallback):
    pred = TransitionPredictor.fit(trace) if prefetch == "predictor" else None
    m = offloaded(model, slots_per_layer=slots, policy="lru", prefetch=prefetch, predictor=pred,
                   cpu_fallback=cpu_fallback)
    _check(resident, greedy(m, PROMPT, STEPS))
    st = m.offload_cache.stats()
    assert st["prefetches"] > 0
    assert 0.0 <= st["prefetch_precision"] <= 1.0 and 0.0 <= st["prefetch_recall"] <= 1.0


@pytest.mark.parametrize("cpu_fallback", [False, True])
@pytest.mark.parametrize("slots", [1, 3])
def test_belady_under_trace_routing(model, trace, slots, cpu_fallback):
    with route_by_trace(model, trace):
        want = greedy(model, PROMPT, STEPS)
    m = offloaded(model, slots_per_layer=slots, policy="belady", trace=trace, cpu_fallback=cpu_fallback)
    with route_by_trace(m, trace) as cursor:
        got = greedy(m, PROMPT, STEPS)
    _check(want, got)
    assert cursor.position[0] == len(PROMPT) + STEPS


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_other_families(family):
    m0 = tiny_model(family)
    want = greedy(m0, PROMPT, 3)
    m = offloaded(m0, slots_per_layer=2, policy="lru", cpu_fallback=True)
    _check(want, greedy(m, PROMPT, 3))


def test_set_backend_reaches_offloaded_experts(model):
    m = offloaded(model, slots_per_layer=2)
    if hasattr(m, "set_backend"):
        m.set_backend("torch")
    assert all(b.experts.backend == "torch" for b in m.moe_blocks())
    with pytest.raises(ValueError, match="already offloaded"):
        apply_offload(m, OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False))


def test_batched_engine_generation_is_unchanged():
    """Continuous batching (rows of different lengths, padding) through the offloaded experts."""
    moe = pytest.importorskip("moe")
    from moe import tiny

    path = tiny.ensure_tiny_model()
    model = moe.load_model(path, dtype=torch.float32).eval()
    tok = moe.Tokenizer.from_dir(path)
    prompts = ["def f(x):", "import os\nimport", "class A:\n    pass"]
    params = moe.SamplingParams(max_new_tokens=6)
    want = moe.generate(model, tok, prompts, params)
    m = offloaded(model, slots_per_layer=1, policy="lfu", cpu_fallback=True)
    assert moe.generate(m, tok, prompts, params) == want
    assert m.offload_cache.stats()["cpu_computed"] > 0


def test_route_by_trace_replaces_the_routers_choice(model, trace):
    seen = []
    blocks = model.moe_blocks()
    h = blocks[1].experts.register_forward_hook(lambda mod, inp, out: seen.append(inp[1].clone()))
    try:
        with route_by_trace(model, trace, start_token=2), torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
        model(torch.tensor([[5, 6, 7]]))  # outside the block: the router's own choice again
    finally:
        h.remove()
    assert torch.equal(seen[0], torch.from_numpy(trace.expert_ids[1, 2:5].astype("int64")))
    assert all(len(b.router._forward_hooks) == 0 for b in blocks)
    with pytest.raises(ValueError, match="exhausted"):
        with route_by_trace(model, trace, start_token=trace.num_tokens - 1), torch.no_grad():
            model(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="MoE layers"):
        with route_by_trace(model, trace.select_layers(slice(0, 1))):
            pass


def test_warm_cache_maps_ids_through_the_device_table(model, resident):
    """Every expert resident: ids become slots by the layer's device-side table (no host-built copy)."""
    E = model.moe_blocks()[0].experts.w13.shape[0]
    m = offloaded(model, slots_per_layer=E, policy="lru")
    cache = m.offload_cache
    calls = []
    real = cache.slot_table
    cache.slot_table = lambda layer: calls.append(layer) or real(layer)
    _check(resident, greedy(m, PROMPT, STEPS))
    assert calls  # once warm, calls took the table path
    for layer in range(cache.num_layers):
        table = real(layer).tolist()
        assert table[-1] == -1
        for e in range(E):
            assert table[e] == cache.slot_of[layer].get(e, -1)


def test_slot_table_follows_evictions_and_clear():
    from offload.cache import ExpertCache
    from offload.policies import make_policy
    from offload.store import HostExpertStore

    E, D, I = 6, 8, 4
    store = HostExpertStore([(torch.randn(E, 2 * I, D), torch.randn(E, D, I))])
    cache = ExpertCache(store, 2, make_policy("lru"), "cpu")
    cache.ensure(0, [1, 4])
    assert [cache.slot_table(0)[e].item() for e in (1, 4, 0)] == [cache.slot_of[0][1], cache.slot_of[0][4], -1]
    cache.release(0, [0, 1])
    cache.ensure(0, [2])  # evicts one of 1, 4
    t = cache.slot_table(0).tolist()
    assert t[2] == cache.slot_of[0][2] and sorted(v for v in t if v >= 0) == [0, 1]
    cache.clear()
    assert cache.slot_table(0).tolist() == [-1] * (E + 1)


def test_a_speculation_is_dropped_once_the_layer_changed_since_it_was_prepared():
    """forward(speculated=y) keeps y only if no copy into the layer came after prepare_speculation():
    the table the speculation read may map an id to a slot that now holds another expert."""
    from offload.apply import OffloadedExperts
    from offload.cache import ExpertCache
    from offload.policies import make_policy
    from offload.store import HostExpertStore

    E, D, I, K = 6, 8, 4, 2
    torch.manual_seed(0)
    store = HostExpertStore([(torch.randn(E, 2 * I, D), torch.randn(E, D, I))])
    cache = ExpertCache(store, 3, make_policy("lru"), "cpu")
    ex = OffloadedExperts(0, cache, K)
    x, ids, w = torch.randn(3, D), torch.tensor([[0, 1], [1, 2], [2, 0]]), torch.full((3, K), 0.5)
    want = ex(x, ids, w)  # copies 0, 1, 2 in: all three slots
    ex.prepare_speculation()
    garbage = torch.full_like(want, 7.0)
    assert ex(x, ids, w, speculated=garbage) is garbage  # unchanged since: kept as is
    ex.prepare_speculation()
    cache.prefetch(0, [3])  # evicts one of 0, 1, 2 ...
    cache.ensure(0, [0, 1, 2])  # ... which comes back, maybe into another slot
    cache.release(0, list(range(3)))
    got = ex(x, ids, w, speculated=garbage)
    assert got is not garbage
    torch.testing.assert_close(got, want)
    assert ex.can_run_ahead()
    assert not OffloadedExperts(0, cache, K, cost_model=object(), cpu_fallback=True).can_run_ahead()


def test_a_kept_speculation_stands_for_the_hits_when_experts_must_be_copied():
    """With misses to copy, a speculation that is still current holds the hits' part (the misses read
    as -1 in its table): forward launches only the copied experts' kernel and adds it, and the result
    equals a call without speculation, which runs the hits' kernel itself."""
    from offload.apply import OffloadedExperts
    from offload.cache import ExpertCache
    from offload.policies import make_policy
    from offload.store import HostExpertStore

    E, D, I, K = 6, 8, 4, 2
    torch.manual_seed(0)
    store = HostExpertStore([(torch.randn(E, 2 * I, D), torch.randn(E, D, I))])
    x, ids, w = torch.randn(3, D), torch.tensor([[0, 1], [1, 4], [4, 0]]), torch.rand(3, K)

    def fresh():
        cache = ExpertCache(store, 3, make_policy("lru"), "cpu")
        ex = OffloadedExperts(0, cache, K)
        cache.ensure(0, [0, 1, 2])  # 0 and 1 resident, 4 not: one miss
        cache.release(0, [0, 1, 2])
        return cache, ex

    cache, ex = fresh()
    want = ex(x, ids, w)  # no speculation: hits' kernel, then the copied expert's
    cache, ex = fresh()
    ex.prepare_speculation()
    spec = ex.speculate(x, ids, w)
    launched = []
    real = ex._kernel
    ex._kernel = lambda x_TD, ids_TK, w_TK: launched.append(ids_TK.clone()) or real(x_TD, ids_TK, w_TK)
    got = ex(x, ids, w, speculated=spec)
    assert got is not spec and len(launched) == 1  # the copied expert's round only
    s4 = cache.slot_of[0][4]
    assert torch.equal(launched[0], torch.where(ids == 4, s4, -1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 3 + 1  # fresh() copied 3
    # a speculation that is not the hits' part shows in the result: it is added, not recomputed
    cache, ex = fresh()
    ex.prepare_speculation()
    off = ex(x, ids, w, speculated=ex.speculate(x, ids, w) + 1.0)
    torch.testing.assert_close(off, want + 1.0)


def test_route_by_trace_without_logits_and_with_dropped_slots(model):
    import numpy as np
    from routing import RoutingTrace

    blocks = model.moe_blocks()
    E = blocks[0].experts.w13.shape[0]
    ids = np.random.default_rng(0).integers(0, E, size=(len(blocks), 8, 2))
    ids[:, :, 1] = np.where(np.arange(8) % 2 == 0, -1, (ids[:, :, 0] + 1) % E)  # half the tokens drop slot 1
    tr = RoutingTrace(expert_ids=ids, num_experts=E)
    outs = []
    for with_logits in (True, False):
        with route_by_trace(model, tr, with_logits=with_logits), torch.no_grad():
            # registered after the trace's hook, so it sees what the trace's hook returned
            h = blocks[0].router.register_forward_hook(lambda mod, inp, out: outs.append(out))
            try:
                model(torch.tensor([[5, 6, 7, 8]]))
            finally:
                h.remove()
    (ids1, w1, lg1), (ids2, w2, lg2) = outs[0], outs[1]
    assert torch.equal(ids1, ids2) and torch.equal(w1, w2) and lg2 is None
    assert torch.all(w1[ids1 < 0] == 0)
    assert torch.all(lg1.gather(1, ids1.clamp(min=0))[ids1 >= 0] > -1e3)


@pytest.mark.parametrize("budget", [0, 1, 2])
def test_predictor_prefetch_within_a_copy_budget(model, resident, budget):
    """prefetch_budget: the predictor's prefetch queues behind the layer's demand copies (not only when
    the copy engine is idle), at most `budget` expert copies per layer on average; output unchanged."""
    blocks = model.moe_blocks()
    L, E = len(blocks), blocks[0].experts.w13.shape[0]

    class Rotating:  # always predicts two experts per later layer that are often not resident
        num_layers, num_experts, top_k = L, E, 2
        calls = 0

        def predict_batch(self, prev, layer, known, features=None):
            Rotating.calls += 1
            probs = np.zeros((known.shape[0], L, E), dtype=np.float32)
            probs[:, :, [Rotating.calls % E, (Rotating.calls + 3) % E]] = 0.9
            return probs
    m = offloaded(model, slots_per_layer=3, policy="lru", prefetch="predictor", predictor=Rotating(),
                  prefetch_budget=budget)
    _check(resident, greedy(m, PROMPT, STEPS))
    st = m.offload_cache.stats()
    # the prompt's forward, then one per generated token; every layer but the last prefetches for the next
    layer_calls = (L - 1) * (STEPS + 1)
    assert st["prefetches"] <= budget * layer_calls
    if budget == 0:
        assert st["prefetches"] == 0
    else:
        assert st["prefetches"] >= layer_calls // 2  # demand misses no longer hold it back
    # idle-only (no budget): on the CPU a layer that copied anything this step does not prefetch
    idle = offloaded(model, slots_per_layer=3, policy="lru", prefetch="predictor", predictor=Rotating())
    greedy(idle, PROMPT, STEPS)
    if budget == 2:
        assert st["prefetches"] > idle.offload_cache.stats()["prefetches"]


def test_prefetch_threshold_defaults_to_zero_within_a_budget(model):
    from offload.prefetch import default_threshold
    assert default_threshold(None, None, True) == 0.3 and default_threshold(None, 2, True) == 0.0
    assert default_threshold(None, 2, False) == 0.3  # LRU eviction: a low-probability copy could evict a used one
    assert default_threshold(0.2, 2, True) == 0.2  # as given
    pred = TransitionPredictor(len(model.moe_blocks()), 8, 2)
    kw = dict(slots_per_layer=3, policy="predictor", prefetch="predictor", predictor=pred)
    with_budget = offloaded(model, prefetch_budget=1, **kw)
    idle_only = offloaded(model, **kw)
    lru_budget = offloaded(model, **dict(kw, policy="lru"), prefetch_budget=1)
    assert with_budget.moe_blocks()[0].experts.lookahead.threshold == 0.0
    assert idle_only.moe_blocks()[0].experts.lookahead.threshold == 0.3
    assert lru_budget.moe_blocks()[0].experts.lookahead.threshold == 0.3
    with pytest.raises(ValueError, match="prefetch_threshold"):
        OffloadConfig(slots_per_layer=2, prefetch="predictor", predictor=pred, prefetch_threshold=1.5)


def test_prefetch_budget_config_errors():
    with pytest.raises(ValueError, match="prefetch_budget must be >= 0"):
        OffloadConfig(slots_per_layer=2, prefetch="predictor", predictor=TransitionPredictor(2, 4, 2), prefetch_budget=-1)
    with pytest.raises(ValueError, match="does nothing with prefetch='next_layer_gate'"):
        OffloadConfig(slots_per_layer=2, prefetch="next_layer_gate", prefetch_budget=1)


def test_copy_budget_banks_and_spends():
    from offload import CopyBudget
    b = CopyBudget(0.5)
    assert b.available() == 0
    b.tick()
    assert b.available() == 0
    b.tick()
    assert b.available() == 1
    b.tick()  # banked at most max(1, 0.5 x every=1) = 1
    assert b.credit == 1.0
    b.spend(1)
    assert b.available() == 0
    b4 = CopyBudget(2, every=3)  # asked every 3 layers: up to 6 banked for those layers at once
    for _ in range(5):
        b4.tick()
    assert b4.available() == 6
    with pytest.raises(ValueError, match="copies per layer"):
        CopyBudget(-0.5)


def test_a_predictor_that_reads_hidden_states_gets_each_layers_input(model, resident):
    """Live offload: a predictor with a lookahead source (a PathPredictor with probes, say) is handed
    the hidden state entering each MoE layer (the router's input), and the output is unchanged."""
    blocks = model.moe_blocks()
    L, E = len(blocks), blocks[0].experts.w13.shape[0]
    D = blocks[0].experts.w13.shape[2]
    seen = []

    class ReadsHidden:
        lookahead = "probes"  # what Lookahead.wants_hidden looks for
        num_layers, num_experts, top_k = L, E, 2

        def predict_batch(self, prev, layer, known, features=None):
            h = features["hidden_NLD"][:, layer]
            seen.append((layer, h.shape))
            probs = np.full((known.shape[0], L, E), 2.0 / E, dtype=np.float32)
            probs[:, layer + 1:, 0] = 1.0  # always expert 0 next: a prefetch that is sometimes right
            return probs
    m = offloaded(model, slots_per_layer=3, policy="lru", prefetch="predictor", predictor=ReadsHidden())
    _check(resident, greedy(m, PROMPT, STEPS))
    assert seen and {s[0] for s in seen} == set(range(L))
    assert all(shape[1] == D for _, shape in seen)
    assert m.offload_cache.stats()["prefetches"] > 0


def test_probe_prefetch_keeps_output_and_checks_its_probes(model, resident):
    """prefetch='probe': layer l's fitted probe (on the device, like a router) guesses layer l+1's
    experts from layer l's input; the output is the resident one whatever it guesses."""
    from routing import ProbeLookahead, hidden_matrix, record_sequences
    blocks = model.moe_blocks()
    seqs = np.random.default_rng(0).integers(1, 40, (6, 12)).tolist()
    trace, feats = record_sequences(model, seqs, hidden_layers="all")
    probes = ProbeLookahead.fit(trace, hidden_matrix(feats, len(blocks)), span=2)
    m = offloaded(model, slots_per_layer=3, policy="lru", prefetch="probe", probes=probes)
    _check(resident, greedy(m, PROMPT, STEPS))
    assert m.offload_cache.stats()["prefetches"] > 0
    with pytest.raises(ValueError, match="needs probes"):
        OffloadConfig(slots_per_layer=2, prefetch="probe")
    # probes of another model: one hidden unit short
    wrong = ProbeLookahead(probes.mean_lD[:, 1:], probes.std_lD[:, 1:], probes.W_lDSE[:, 1:], probes.b_lSE,
                           probes.log_pop_LE, probes.top_k)
    with pytest.raises(ValueError, match="fit them on its own"):
        offloaded(model, slots_per_layer=3, policy="lru", prefetch="probe", probes=wrong)
