"""Cache simulator: brute-force counts, Belady optimality, agreement with the live cache, time model."""
import itertools
from collections import OrderedDict

import numpy as np
import pytest
import torch

from offload import (CostModel, OffloadConfig, TransitionPredictor, apply_offload, oracle_bound, route_by_trace,
                     shared_pool_belady, simulate)
from routing import RoutingTrace
from routing.synthetic import synthesize

from .helpers import tiny_model, twin


def _trace(L=3, E=8, K=2, T=60, seed=0, **kw):
    kw.setdefault("popularity_skew", 1.0)
    kw.setdefault("temporal_locality", 0.4)
    kw.setdefault("affinity", 0.5)
    return synthesize(num_layers=L, num_experts=E, top_k=K, num_requests=1, tokens_per_request=T, seed=seed, **kw)


def _brute_lru(trace, C):
    hits = misses = evictions = 0
    for layer in range(trace.num_layers):
        cache = OrderedDict()
        for t in range(trace.num_tokens):
            need = sorted({int(e) for e in trace.expert_ids[layer, t] if e >= 0})
            order = [e for e in need if e in cache] + [e for e in need if e not in cache]
            for e in order:
                if e in cache:
                    hits += 1
                    cache.move_to_end(e)
                    continue
                misses += 1
                if len(cache) >= C:
                    victim = next(v for v in cache if v not in need)
                    del cache[victim]
                    evictions += 1
                cache[e] = True
    return hits, misses, evictions


@pytest.mark.parametrize("C", [2, 3, 5])
def test_lru_matches_brute_force(C):
    tr = _trace(seed=C)
    st = simulate(tr, "lru", C)
    assert (st["hits"], st["misses"], st["evictions"]) == _brute_lru(tr, C)
    assert st["copies"] == st["misses"] and st["bytes_copied"] == st["copies"]


def _opt_misses(seq, C):
    """Fewest misses over every eviction choice (exhaustive search) for one layer, one expert per step."""
    best = [len(seq)]

    def go(i, cache, m):
        if m >= best[0]:
            return
        if i == len(seq):
            best[0] = m
            return
        e = seq[i]
        if e in cache:
            go(i + 1, cache, m)
        elif len(cache) < C:
            go(i + 1, cache | {e}, m + 1)
        else:
            for v in cache:
                go(i + 1, (cache - {v}) | {e}, m + 1)
    go(0, frozenset(), 0)
    return best[0]


def test_belady_is_optimal_on_a_tiny_trace():
    rng = np.random.default_rng(3)
    seq = rng.integers(0, 5, size=14)
    tr = RoutingTrace(seq.reshape(1, -1, 1), num_experts=5)
    assert simulate(tr, "belady", 2)["misses"] == _opt_misses(list(seq), 2)


@pytest.mark.parametrize("C", [2, 4, 6])
def test_belady_beats_lru_and_lfu(C):
    tr = _trace(T=120, seed=10 + C)
    bel = simulate(tr, "belady", C)["hit_ratio"]
    assert bel >= simulate(tr, "lru", C)["hit_ratio"]
    assert bel >= simulate(tr, "lfu", C)["hit_ratio"]
    assert oracle_bound(tr, C, cost=CostModel(1e9, 0.0, 1e-3), expert_bytes=10**6)["hit_ratio"] == pytest.approx(bel)


def test_shared_pool_belady_is_optimal_and_never_below_per_layer_pools():
    """One pool for all layers: Belady over the interleaved accesses (optimal: brute force on a top-1 trace),
    never fewer hits than per-layer Belady with the same slots, equal to it with one layer."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 3, size=(2, 7, 1))  # 2 layers, 7 tokens, top-1: 14 accesses
    tr = RoutingTrace(ids, num_experts=3)
    keys = [(layer, int(ids[layer, t, 0])) for t in range(7) for layer in range(2)]
    assert shared_pool_belady(tr, 3)["misses"] == _opt_misses(keys, 3)
    one = RoutingTrace(rng.integers(0, 5, size=(1, 30, 1)), num_experts=5)
    assert shared_pool_belady(one, 2)["misses"] == simulate(one, "belady", 2)["misses"]
    for C in (2, 4):
        syn = _trace(T=60, seed=20 + C)
        shared = shared_pool_belady(syn, C * syn.num_layers, warmup_steps=5)
        per = oracle_bound(syn, C, cost=CostModel(1e9, 0.0, 1e-3), expert_bytes=1, warmup_steps=5)
        assert shared["hit_ratio"] >= per["hit_ratio"] - 1e-12
        assert sum(shared["slots_per_layer"]) <= C * syn.num_layers + 1e-9


def test_shared_pool_lets_a_layer_with_more_experts_in_use_keep_them():
    """Layer 0 always routes to expert 0, layer 1 cycles through 3 experts: with 2 slots a layer, layer 1
    misses every time after the first round's luck runs out; one shared pool of 4 gives it 3 slots."""
    ids = np.zeros((2, 30, 1), dtype=np.int64)
    ids[1, :, 0] = np.arange(30) % 3
    tr = RoutingTrace(ids, num_experts=3)
    shared = shared_pool_belady(tr, 4, warmup_steps=3)
    assert shared["hit_ratio"] == 1.0 and shared["slots_per_layer"] == pytest.approx([1.0, 3.0])
    per = oracle_bound(tr, 2, cost=CostModel(1e9, 0.0, 1e-3), expert_bytes=1, warmup_steps=3)
    assert per["hit_ratio"] < 0.8
    with pytest.raises(ValueError, match="cannot hold one layer's 2 experts"):
        shared_pool_belady(RoutingTrace(np.array([[[0, 1]]]), num_experts=2), 1)


def test_simulator_equals_live_cache():
    """Token-by-token decode under trace routing: the live cache's counters equal the simulator's."""
    model = tiny_model("mixtral")
    L = len(model.moe_blocks())
    tr = _trace(L=L, T=16, seed=5)
    pred = TransitionPredictor.fit(_trace(L=L, T=200, seed=6))
    for policy, prefetch, every in (("lru", "none", 1), ("lfu", "none", 1), ("predictor", "predictor", 1),
                                    ("predictor", "predictor", 2), ("lru", "predictor", 1)):
        m = apply_offload(twin(model), OffloadConfig(slots_per_layer=3, device="cpu", calibrate=False, policy=policy,
                                                     prefetch=prefetch, predictor=pred, predict_every=every,
                                                     prefetch_threshold=0.1))
        cache = m.offload_cache
        with route_by_trace(m, tr), torch.no_grad():
            kv = m.new_cache(1, 32) if hasattr(m, "new_cache") else None
            for t in range(tr.num_tokens):
                m(torch.tensor([[t % 50 + 3]]), cache=kv)
        live = cache.stats()
        sim = simulate(tr, policy, 3, prefetch=prefetch, predictor=pred, expert_bytes=cache.store.expert_bytes,
                       predict_every=every, prefetch_threshold=0.1)
        for k in ("hits", "misses", "evictions", "bytes_copied", "prefetches", "useful_prefetches"):
            assert live[k] == sim[k], (policy, k, live[k], sim[k])


def test_simulated_next_layer_guesses_equal_the_live_caches():
    """prefetch='guesses': the simulator's counters equal the live cache's when each layer prefetches
    the same recorded guesses of the next layer (placement.trace_routing.TraceLookahead), for all of
    each token's guesses and for its first one; guesses of the true next layer are all used."""
    from placement.trace_routing import install_trace_lookahead
    model = tiny_model("mixtral")
    if not hasattr(model, "rotary"):
        pytest.skip("moe's MoEForCausalLM is needed (positions key the guesses)")
    L = len(model.moe_blocks())
    tr = _trace(L=L, T=16, seed=5)
    E = tr.num_experts
    rng = np.random.default_rng(0)
    noisy = np.stack([[rng.choice(E, 3, replace=False) for _ in range(tr.num_tokens)] for _ in range(L)])
    true_next = np.concatenate([tr.expert_ids[1:], np.full_like(tr.expert_ids[:1], -1)]).astype(np.int64)
    for guesses, k in ((noisy, 0), (noisy, 1), (true_next, 0)):
        m = apply_offload(twin(model), OffloadConfig(slots_per_layer=3, policy="lru", device="cpu", calibrate=False))
        _, routers = install_trace_lookahead(m, guesses[:, :, :k or None], E, stride=tr.num_tokens)
        for b, r in zip(m.moe_blocks(), routers):
            b.experts.set_next_router(r)
        with route_by_trace(m, tr), torch.no_grad():
            kv = m.new_cache(1, 32)
            for t in range(tr.num_tokens):
                m(torch.tensor([[t % 50 + 3]]), cache=kv)
        live = m.offload_cache.stats()
        sim = simulate(tr, "lru", 3, prefetch="guesses", guesses=guesses, prefetch_k=k,
                       expert_bytes=m.offload_cache.store.expert_bytes)
        for key in ("hits", "misses", "evictions", "bytes_copied", "prefetches", "useful_prefetches"):
            assert live[key] == sim[key], (k, key, live[key], sim[key])
        assert sim["prefetches"] > 0
    assert sim["prefetch_precision"] == 1.0
    none = simulate(tr, "lru", 3)
    assert simulate(tr, "lru", 3, prefetch="guesses", guesses=np.full_like(noisy, -1))["misses"] == none["misses"]
    with pytest.raises(ValueError, match="guesses"):
        simulate(tr, "lru", 3, prefetch="guesses", guesses=noisy[:, :5])


def test_lfu_with_a_half_life_forgets_what_earlier_requests_used():
    """Whole-run LFU keeps the experts of a long first phase after the routing moved on; with a
    half-life their counts fade and the new phase's experts stay."""
    from offload.policies import LFUPolicy
    L, E, K = 1, 6, 1
    first = np.array([0, 1] * 30)  # a long phase on experts 0 and 1
    second = np.array([2, 3, 4] * 20)  # then three others, cycling
    ids = np.concatenate([first, second]).reshape(1, -1, 1)
    tr = RoutingTrace(ids.astype(np.int16), E)
    whole = simulate(tr, LFUPolicy(), 3)
    aged = simulate(tr, LFUPolicy(half_life=4), 3)
    assert aged["hits"] > whole["hits"]
    # by name: the default half-life (23 steps), or the whole run with math.inf
    assert simulate(tr, "lfu", 3)["hits"] == simulate(tr, LFUPolicy(half_life=23), 3)["hits"]
    from offload.policies import make_policy
    assert simulate(tr, make_policy("lfu", lfu_half_life=float("inf")), 3)["hits"] == whole["hits"]
    assert make_policy("lfu").half_life == 23.0 and make_policy("lfu", lfu_half_life=5).half_life == 5.0
    with pytest.raises(ValueError, match="half_life"):
        LFUPolicy(half_life=-1)


def test_stats_are_consistent():
    model = tiny_model("mixtral")
    L = len(model.moe_blocks())
    tr = _trace(L=L, T=12, seed=7)
    m = apply_offload(twin(model), OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False, cpu_fallback=True,
                                                 prefetch="next_layer_gate", copy_gbps=1e-3, cpu_gflops=1e-3))
    with route_by_trace(m, tr), torch.no_grad():
        m(torch.arange(3, 15)[None])
    st = m.offload_cache.stats()
    unique = sum(len(np.unique(tr.expert_ids[layer, :12])) for layer in range(L))  # one step: each expert once
    assert st["hits"] + st["misses"] == unique
    assert st["copies"] == st["misses"] - st["cpu_computed"] + st["prefetches"]
    assert st["bytes_copied"] == st["copies"] * m.offload_cache.store.expert_bytes
    occupied = sum(len(m.offload_cache.resident(layer)) for layer in range(L))
    assert st["evictions"] == st["copies"] - occupied


def test_time_model_and_oracle_bound():
    tr = _trace(T=80, seed=2)
    cost = CostModel(copy_bytes_per_s=1e9, cpu_base_s=0.5e-3, cpu_per_token_s=0.1e-3)
    kw = dict(cost=cost, expert_bytes=10**6, layer_compute_s=0.2e-3)
    lru = simulate(tr, "lru", 3, **kw)
    fid = simulate(tr, "lru", 3, cpu_fallback=True, **kw)
    orc = simulate(tr, "belady", 3, prefetch="oracle", cpu_fallback=True, **kw)
    bound = oracle_bound(tr, 3, **kw)
    # no-cache lower limit of LRU time: its copies alone
    assert lru["time_s"] >= lru["copies"] * cost.copy_s(10**6) - 1e-12
    assert fid["time_s"] < lru["time_s"]  # the CPU takes misses off the copy engine
    assert bound["time_s"] <= min(lru["time_s"], fid["time_s"], orc["time_s"]) + 1e-12
    assert bound["time_s"] >= tr.num_layers * (tr.num_tokens) * 0.2e-3 - 1e-12
    assert orc["useful_prefetches"] > 0


def test_simulate_rejects_bad_arguments():
    tr = _trace(T=5)
    with pytest.raises(ValueError, match="capacity_per_layer"):
        simulate(tr, "lru", 0)
    with pytest.raises(ValueError, match="predictor"):
        simulate(tr, "predictor", 2)
    with pytest.raises(ValueError, match="prefetch"):
        simulate(tr, "lru", 2, prefetch="magic")
    with pytest.raises(ValueError, match="cost"):
        simulate(tr, "lru", 2, cpu_fallback=True)


def test_cost_split_is_optimal():
    cost = CostModel(copy_bytes_per_s=1e6, cpu_base_s=0.3e-3, cpu_per_token_s=0.4e-3, copy_latency_s=0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        misses = [(e, int(n)) for e, n in enumerate(rng.integers(1, 6, size=rng.integers(1, 7)))]
        backlog = float(rng.random() * 1e-3)
        to_copy, to_cpu, t = cost.split(misses, expert_bytes=1000, copy_backlog_s=backlog)
        assert sorted(to_copy + to_cpu) == [e for e, _ in misses]
        n = dict(misses)
        assert t == pytest.approx(max(sum(cost.cpu_s(n[e]) for e in to_cpu),
                                      backlog + cost.copy_s(1000) * len(to_copy)))
        best = min(max(sum(cost.cpu_s(n[e]) for e in sub), backlog + cost.copy_s(1000) * (len(misses) - len(sub)))
                   for r in range(len(misses) + 1) for sub in itertools.combinations(n, r))
        assert t == pytest.approx(best)


def test_warmup_steps_are_not_counted():
    tr = _trace(T=40, seed=4)
    full = simulate(tr, "lru", 3)
    warm = simulate(tr, "lru", 3, warmup_steps=10)
    tail = sum(len(np.unique(tr.expert_ids[layer, t])) for layer in range(tr.num_layers) for t in range(10, 40))
    assert warm["hits"] + warm["misses"] == tail and warm["steps"] == 30
    assert warm["misses"] < full["misses"]
    cost = CostModel(1e9, 0.0, 1e-3)
    b = oracle_bound(tr, 3, cost=cost, expert_bytes=10**6, warmup_steps=10)
    assert b["misses"] <= simulate(tr, "belady", 3, warmup_steps=10)["misses"] + 0


def test_split_weighs_the_lost_reuse_of_cpu_experts():
    cost = CostModel(copy_bytes_per_s=1e6, cpu_base_s=0.9e-3, cpu_per_token_s=0.0, copy_latency_s=0.0)
    one = [(5, 1)]
    assert cost.split(one, 1000)[1] == [5]                 # CPU slightly cheaper than a 1 ms copy
    assert cost.split(one, 1000, reuse=0.5)[0] == [5]      # but the copy stays for later hits
    two = [(5, 1), (6, 1)]
    to_copy, to_cpu, t = cost.split(two, 1000, reuse=0.5)  # two misses: one each way still wins
    assert len(to_copy) == len(to_cpu) == 1 and t == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="reuse"):
        cost.split(one, 1000, reuse=2.0)


def test_cpu_time_measured_in_use_moves_the_split():
    cost = CostModel(copy_bytes_per_s=1e6, cpu_base_s=0.5e-3, cpu_per_token_s=0.1e-3, copy_latency_s=0.0)
    two = [(5, 1), (6, 1)]
    assert len(cost.split(two, 1000)[1]) == 1  # calibrated: 0.6 ms on the CPU against 1 ms copies
    cost.observe_cpu([1, 3], 0.8e-3)  # as calibrated (0.6 + 0.8 ms would be 1.4; 0.8 is faster)
    assert cost.cpu_scale == pytest.approx(1 + 0.25 * (0.8 / 1.4 - 1))
    for _ in range(20):
        cost.observe_cpu([1], 3.0e-3)  # in use the CPU takes 5x its calibrated time
    assert cost.cpu_scale == pytest.approx(5.0, rel=0.01)
    assert cost.cpu_s(1) == pytest.approx(3.0e-3, rel=0.01)
    assert cost.split(two, 1000)[1] == []  # copying both is now the faster way
    assert "as measured in use" in cost.describe()
    before = cost.cpu_scale
    cost.observe_cpu([], 1.0)  # nothing computed: nothing learned
    cost.observe_cpu([1], 0.0)
    assert cost.cpu_scale == before


def test_offloaded_experts_feed_their_cpu_time_back():
    model = tiny_model("mixtral")
    m = apply_offload(twin(model), OffloadConfig(slots_per_layer=1, device="cpu", calibrate=False, cpu_fallback=True,
                                                 copy_gbps=1e-3, cpu_gflops=1e-3))
    cost = m.moe_blocks()[0].experts.cost_model
    assert cost.cpu_scale == 1.0
    with torch.no_grad():
        m(torch.arange(3, 9)[None])
    assert m.offload_cache.stats()["cpu_computed"] > 0
    assert cost.cpu_scale != 1.0  # nominal rates of 1 MFLOP/s: the real CPU is far faster


def test_lookahead_every_and_threshold():
    from offload import Lookahead
    tr = _trace(L=4, E=8, K=2, T=50, seed=9)
    la = Lookahead(TransitionPredictor.fit(tr), 4, 8, every=2, threshold=0.2)
    ids = tr.expert_ids[:, 10].astype(np.int64)  # [L, K] of one token
    assert la.observe(0, ids[0][None]) and list(la.targets(0)) == [1, 2]
    assert not la.observe(1, ids[1][None])
    assert la.observe(2, ids[2][None]) and list(la.targets(2)) == [3]
    assert la.observe(3, ids[3][None])  # the last layer always records the path for the next token
    picks = la.to_prefetch(3, 8, 8, lambda layer, e: False)
    assert all(la.score_LE[3, e] > 0.2 for e in picks)
    assert la.to_prefetch(3, 8, 8, lambda layer, e: True) == []
    with pytest.raises(ValueError, match="every"):
        Lookahead(la.predictor, 4, 8, every=0)


def test_time_model_by_hand():
    """One layer, one slot, experts 0,1,0: every access misses; copy 1 s, compute 0.1 s, CPU 0.5 s."""
    tr = RoutingTrace(np.array([[[0], [1], [0]]]), num_experts=2)
    cost = CostModel(copy_bytes_per_s=1.0, cpu_base_s=0.5, cpu_per_token_s=0.0, copy_latency_s=0.0)
    kw = dict(cost=cost, expert_bytes=1, layer_compute_s=0.1)
    # copies serialise behind the compute: 1.1, 2.2, 3.3
    assert simulate(tr, "lru", 1, **kw)["time_s"] == pytest.approx(3.3)
    # the CPU takes each miss (0.5 < 1.0; nothing was ever reused): 0.5 per step
    st = simulate(tr, "lru", 1, cpu_fallback=True, **kw)
    assert st["time_s"] == pytest.approx(1.5) and st["cpu_computed"] == 3
    # oracle: Belady also misses 3 times; with perfect prefetch one copy (1.0) hides behind the
    # other two steps' CPU work: max(0.5 + 0.5 + 0.1, 1.0) = 1.1 (all on the CPU: 1.5; two copies: 2.0)
    assert oracle_bound(tr, 1, **kw)["time_s"] == pytest.approx(1.1)


def test_prefetch_budget_limits_copies_and_can_beat_demand_belady():
    # one slot per layer, a new expert almost every step: demand caching (even Belady) mostly misses,
    # while the oracle prefetching one copy per layer during the layer before never misses after the first
    rng = np.random.default_rng(0)
    T = 40
    ids = rng.integers(0, 4, size=(2, T, 1))
    tr = RoutingTrace(ids, 4)
    belady = simulate(tr, "belady", 1)
    one = simulate(tr, "lru", 1, prefetch="oracle", prefetch_budget=1)
    assert one["hits"] == 2 * T - 1 and one["misses"] == 1
    assert one["hit_ratio"] > belady["hit_ratio"] + 0.5
    # a copy every other layer: half of the prefetches at most; none with no budget
    half = simulate(tr, "lru", 1, prefetch="oracle", prefetch_budget=0.5)
    assert half["prefetches"] <= T and belady["hit_ratio"] < half["hit_ratio"] < one["hit_ratio"]
    none = simulate(tr, "lru", 1, prefetch="oracle", prefetch_budget=0)
    assert none["prefetches"] == 0 and none["hits"] == simulate(tr, "lru", 1)["hits"]


def test_prefetch_budget_bounds_predictor_prefetches():
    tr = _trace(L=4, E=8, K=2, T=80, seed=3)
    pred = TransitionPredictor.fit(_trace(L=4, E=8, K=2, T=200, seed=4))
    for budget in (0.5, 1, 2):
        st = simulate(tr, "predictor", 3, prefetch="predictor", predictor=pred, prefetch_budget=budget,
                      prefetch_threshold=0.05)
        assert 0 < st["prefetches"] <= budget * tr.num_layers * tr.num_tokens
        assert st["copies"] == st["misses"] + st["prefetches"]
    with pytest.raises(ValueError, match="prefetch_budget"):
        simulate(tr, "lru", 3, prefetch="oracle", prefetch_budget=-1)


def test_calibration_times_the_cpu_on_cold_copies(monkeypatch):
    """The CPU rate is timed over copies of the expert that exceed the cache budget, not one warm expert."""
    import kernels

    seen = []
    real = kernels.expert_mlp_reference

    def spy(x, w13, w2):
        seen.append(w13.data_ptr())
        return real(x, w13, w2)

    monkeypatch.setattr(kernels, "expert_mlp_reference", spy)
    w13, w2 = torch.randn(16, 8), torch.randn(8, 8)
    nbytes = (w13.numel() + w2.numel()) * 4
    cm = CostModel.calibrate(torch.device("cpu"), w13, w2, cold_bytes=5 * nbytes)
    assert len(set(seen)) == 5 and cm.cpu_base_s >= 0 and cm.cpu_per_token_s > 0
    seen.clear()
    CostModel.calibrate(torch.device("cpu"), w13, w2, cold_bytes=1)
    assert len(set(seen)) == 1
