"""GPU cache + CPU hosts with every miss split over its ffn columns (offload.tiered,
granularity='slice'): the pure pieces (the slice of one expert, the water-filling split), the
host's sliced compute, and a tiny model whose logits equal the resident model's for split
fractions 0, 1/4, 1/2 and 1, at batch 1 and batch > 1, with two hosts, a host dying mid-run,
thread and child-process hosts."""
import numpy as np
import pytest
import torch

from kernels import expert_mlp_reference, moe_experts_reference
from moe import MoEConfig, MoEForCausalLM
from offload import CostModel, HostExpertStore, OffloadConfig
from offload.apply import install
from offload.cpu_compute import Miss, expert_mlp_slice, expert_mlp_slice_t, split_misses
from offload.tiered import TieredExperts, TierRuntimeConfig, apply_cpu_tier
from placement.cpu_tier import TieredPlan
from serve.cpu_host import CPUExpertHost, HostConfig, from_wire, to_wire
from serve.cpu_host_pool import HostPoolConfig, start_hosts

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))


def _model():
    torch.manual_seed(0)
    m = MoEForCausalLM(MoEConfig.tiny("mixtral", num_hidden_layers=3), dtype=torch.float32)
    m.init_weights(std=0.2, seed=1)
    return m.eval()


# --- pure pieces -----------------------------------------------------------------------------------
def test_slices_of_an_expert_sum_to_the_expert():
    g = torch.Generator().manual_seed(0)
    D, I = 12, 10
    w13, w2 = 0.3 * torch.randn(2 * I, D, generator=g), 0.3 * torch.randn(D, I, generator=g)
    x = torch.randn(3, D, generator=g)
    ref = expert_mlp_reference(x, w13, w2)
    for cuts in ([0, 10], [0, 4, 10], [0, 1, 7, 9, 10], [0, 0, 10]):
        parts = sum(expert_mlp_slice(x, w13, w2, a, b) for a, b in zip(cuts, cuts[1:]))
        torch.testing.assert_close(parts, ref, atol=1e-5, rtol=0)
    w2t = w2.t().contiguous()
    dev = expert_mlp_slice_t(x, w13[:4], w13[I:I + 4], w2t[:4]) + expert_mlp_slice(x, w13, w2, 4, I)
    torch.testing.assert_close(dev, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"ffn slice \[3, 11\) must lie in \[0, 10\]"):
        expert_mlp_slice(x, w13, w2, 3, 11)


def test_split_fraction_equalises_copy_and_host_time():
    # one Mixtral miss at batch 1: 6.1 ms to copy, 6.8 ms on the host -> ~53% copied, ~3.2 ms
    sp = split_misses([Miss(3, 0, 6.8e-3)], copy_s=6.1e-3, ffn=14336, align=128)
    c = sp.copy_cols[3]
    assert c % 128 == 0 and abs(c / 14336 - 6.8 / 12.9) < 128 / 14336
    assert abs(sp.copy_s - sp.host_s[0]) <= 6.8e-3 * 128 / 14336  # equal within one column step
    assert sp.makespan_s < 0.55 * 6.1e-3
    # free on the host: nothing copied; copies free compared to the host: all copied (whole)
    assert split_misses([Miss(1, 0, 0.0)], 1.0, 64, 8).copy_cols == {1: 0}
    assert split_misses([Miss(1, 0, 1.0)], 1e-9, 64, 8).copy_cols == {1: 64}
    # two misses on two hosts and a backlog: all three resources end together
    sp = split_misses([Miss(0, 0, 4.0), Miss(1, 1, 2.0)], copy_s=3.0, ffn=3000, align=1, copy_backlog_s=0.5)
    assert sp.copy_s == pytest.approx(sp.host_s[0], abs=0.01) and sp.host_s[1] <= sp.host_s[0] + 0.01
    # several misses of one host: the one with most tokens is copied first, whole where it fits
    sp = split_misses([Miss(0, 0, 1.0), Miss(1, 0, 1.0), Miss(2, 0, 3.0)], copy_s=1.0, ffn=100, align=1)
    assert sp.copy_cols[2] == 100 and sp.copy_cols[0] + sp.copy_cols[1] == 50
    assert sp.makespan_s == pytest.approx(1.5)  # host 5 -> 1.5, copy 1.5
    # never worse than copying or hosting everything, or than the whole-expert split
    misses = [Miss(e, e % 2, 0.5 + 0.3 * e) for e in range(5)]
    sp = split_misses(misses, copy_s=1.2, ffn=256, align=16)
    best_whole = min(max(1.2 * sum(pick), *(sum(m.host_s for m, p in zip(misses, pick) if not p and m.host == h)
                                            for h in (0, 1)))
                     for pick in np.ndindex(*[2] * 5))  # every way to copy or host each miss whole
    assert sp.makespan_s <= best_whole + 16 / 256 * 1.7  # at most one column step above the fluid optimum
    assert sp.makespan_s < 0.9 * best_whole
    with pytest.raises(ValueError, match="copy_s"):
        split_misses(misses, copy_s=0.0, ffn=256)
    with pytest.raises(ValueError, match="host_s of expert 2 must be >= 0"):
        split_misses([Miss(2, 0, -1.0)], copy_s=1.0, ffn=8)
    assert split_misses([], 1.0, 8).copy_cols == {}


# --- the host's sliced compute ---------------------------------------------------------------------
def test_host_computes_a_slice_and_in_shared_buffers():
    g = torch.Generator().manual_seed(0)
    E, D, I = 4, 12, 8
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    host = CPUExpertHost(0, HostConfig(threads=1), pin_process=False)
    host.add_experts(0, [1, 2], to_wire(w13[[1, 2]]), to_wire(w2[[1, 2]]))
    x = torch.randn(4, D, generator=g)
    ids = np.array([[1, 2], [2, -1], [1, -1], [-1, 2]])
    w = torch.rand(4, 2, generator=g).numpy()
    cols = np.array([[1, 3, 8], [2, 0, 5]])  # expert 1 over [3, 8), expert 2 over [0, 5)
    y, _ = host.compute(0, to_wire(x), ids, w, cols)
    want = torch.zeros(4, D)
    for t in range(4):
        for k in range(2):
            e = int(ids[t, k])
            if e >= 0:
                a, b = {1: (3, 8), 2: (0, 5)}[e]
                want[t] += float(w[t, k]) * expert_mlp_slice(x[t:t + 1], w13[e], w2[e], a, b)[0]
    torch.testing.assert_close(from_wire(y, torch.float32), want, atol=1e-5, rtol=1e-5)
    # columns [0, 3) of expert 1 and [5, 8) of expert 2 complete the reference
    rest, _ = host.compute(0, to_wire(x), ids, w, np.array([[1, 0, 3], [2, 5, 8]]))
    full = moe_experts_reference(x, w13, w2, torch.as_tensor(ids), torch.as_tensor(w))
    torch.testing.assert_close(from_wire(y, torch.float32) + from_wire(rest, torch.float32), full, atol=1e-5, rtol=1e-5)
    xb, yb = torch.zeros(6, D), torch.zeros(6, D)
    xb[:4] = x
    host.attach(xb, yb)
    assert host.compute_shared(0, 4, ids, w, cols) >= 0
    torch.testing.assert_close(yb[:4], from_wire(y, torch.float32))
    with pytest.raises(ValueError, match="needs attach"):
        host.compute_shared(0, 7, ids, w, cols)


# --- the tier in a model ---------------------------------------------------------------------------
def _tiered(frac, hosts, rehome="auto", align=4, adapt=False, host_s=1e-3, replicas=1):
    """The model with a 2-slot LRU cache and every expert also on a host; a single-token miss is
    split `frac` copied / 1 - frac on its host by the cost model (0: all on hosts, 1: whole copies)."""
    model = _model()
    blocks = model.moe_blocks()
    store = HostExpertStore.from_blocks(blocks, pin=False)
    h = host_s
    c = 1e9 if frac == 0 else h * (1 - frac) / frac
    cost = CostModel(copy_bytes_per_s=store.expert_bytes / c if c else 1e30, cpu_base_s=h if frac < 1 else 1e9,
                     cpu_per_token_s=1e-12, copy_latency_s=0.0)
    cfg = OffloadConfig(slots_per_layer=2, policy="lru", device="cpu", calibrate=False)
    cache = install(blocks, store, cfg, device=torch.device("cpu"), top_k=2, slots=2, cost=cost)
    plan = TieredPlan.on_hosts(3, 8, len(hosts))
    rt = apply_cpu_tier(model, plan, hosts, TierRuntimeConfig(dispatch="split", granularity="slice", align=align,
                                                               rehome=rehome, adapt=adapt, replicas=replicas))
    return model, rt, cache


def _decode(model, ids, steps=4):
    """Prefill ids[:, :5], then `steps` one-token decode steps: stacked last logits."""
    cache = model.new_cache(ids.shape[0], 16)
    with torch.no_grad():
        out = [model(ids[:, :5], cache=cache)[:, -1]]
        for s in range(steps):
            out.append(model(ids[:, 5 + s:6 + s], cache=cache)[:, -1])
    return torch.stack(out)


@pytest.fixture(scope="module")
def reference():
    m = _model()
    with torch.no_grad():
        return {"full": m(IDS), "b1": _decode(m, IDS[:1]), "b2": _decode(m, IDS)}


@pytest.mark.parametrize("frac", [0.0, 0.25, 0.5, 1.0])
def test_split_equals_resident_model(frac, reference):
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    model, rt, cache = _tiered(frac, hosts)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference["full"], atol=1e-5, rtol=0)
    torch.testing.assert_close(_decode(model, IDS[:1]), reference["b1"], atol=1e-5, rtol=0)  # batch 1
    torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
    s = rt.stats()
    if frac == 0.0:
        # copies cost ~forever: only the cold cache's empty slots are filled (2 slots x 3 layers), once
        assert s["split_experts"] == 0 and s["slice_bytes_copied"] == 0 and cache.stats()["copies"] == 6
    elif frac == 1.0:
        assert s["cpu_pairs"] == 0 and s["split_experts"] == 0 and cache.stats()["copies"] > 0
    else:
        assert s["split_experts"] > 0 and s["cpu_pairs"] > 0 and s["slice_bytes_copied"] > 0
    if frac < 1.0:  # the misses' host parts went to both hosts
        assert set(s["cpu_pairs_per_host"]) == {0, 1}
    assert s["model_floor_s"] > 0 and s["model_floor_s"] <= s["model_copy_s"] + s["model_host_s"] + 1e-12
    for h in hosts:
        h.kill()


def test_a_miss_split_across_two_replica_hosts(reference):
    """replicas=2: both hosts hold every expert and divide each miss's host part [c, I) between
    them; a dead replica is dropped without re-homing and the other computes the whole part."""
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    seen = []  # (host, layer, expert, a, b) of every host call
    for h in hosts:
        def spy(layer, n, ids, w, cols, _f=h.local.compute_shared, _h=h.host_id):
            seen.extend((_h, layer, *map(int, r)) for r in np.asarray(cols).reshape(-1, 3))
            return _f(layer, n, ids, w, cols)
        h.local.compute_shared = spy
    model, rt, _ = _tiered(0.5, hosts, replicas=2)
    assert rt.holds.all() and sorted(hosts[0].call("held")) == sorted(hosts[1].call("held"))
    torch.testing.assert_close(_decode(model, IDS[:1]), reference["b1"], atol=1e-5, rtol=0)  # batch 1
    torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
    by_host = {h: {(l, e): (a, b) for hh, l, e, a, b in seen if hh == h} for h in (0, 1)}
    shared = set(by_host[0]) & set(by_host[1])
    assert shared  # some misses had their host part divided between the two hosts
    for key in shared:
        (a0, b0), (a1, b1) = by_host[0][key], by_host[1][key]
        assert b0 == a1 and b1 == 16 and a0 < b0 < b1  # adjacent: host 0 [c, m), host 1 [m, I)
    assert rt.stats()["split_experts"] > 0
    hosts[0].kill()
    seen.clear()
    torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
    s = rt.stats()
    assert s["dead_hosts"] == [0] and s["rehomed_experts"] == 0 and (rt.host_of[rt.host_of >= 0] == 1).all()
    assert seen and all(h == 1 and b == 16 for h, _, _, _, b in seen)
    with pytest.raises(ValueError, match="replicas=3 needs at least as many CPU hosts"):
        _tiered(0.5, start_hosts(HostPoolConfig(num_hosts=2, backend="thread")), replicas=3)
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        TierRuntimeConfig(dispatch="split", replicas=2)
    hosts[1].kill()


def test_the_split_adapts_to_measured_host_time(reference):
    """Hosts 5 ms slower per call than the cost model believes: their reported seconds pull the
    host scale up (to its cap of 4), so more of each miss is copied; logits stay exact."""
    import time

    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    for h in hosts:
        slow = h.local.compute_shared

        def late(*args, _f=slow):
            time.sleep(5e-3)
            return _f(*args) + 5e-3
        h.local.compute_shared = late
    model, rt, _ = _tiered(0.5, hosts, adapt=True)
    before = split_misses([Miss(0, 0, rt.scale["host"] * 1e-3)], 1e-3, 16, 4).copy_cols[0]
    torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
    s = rt.stats()
    assert s["host_scale"] > 2.0 and s["copy_scale"] == 1.0  # no CUDA events on the CPU
    after = split_misses([Miss(0, 0, rt.scale["host"] * 1e-3)], 1e-3, 16, 4).copy_cols[0]
    assert after > before
    rt.learn("host", 1.0, 1e-5)  # under 0.1 ms predicted: mostly overhead, ignored
    rt.learn("host", 50.0, 1.0)  # capped at 4x
    assert s["host_scale"] <= rt.scale["host"] <= 4.0
    for h in hosts:
        h.kill()


def test_padding_ids_and_direct_call_equal_the_reference():
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    model, rt, _ = _tiered(0.25, hosts)
    ex = model.moe_blocks()[1].experts
    assert isinstance(ex, TieredExperts)
    w13, w2 = ex.inner.store.layers[1]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, w13.shape[2], generator=g)
    ids = torch.tensor([[3, -1], [-1, -1], [5, 3], [0, 7], [-1, 6], [7, 5]])
    w = torch.rand(6, 2, generator=g)
    want = moe_experts_reference(x, w13, w2, ids, w)
    with torch.no_grad():
        for _ in range(2):  # a cold cache first fills its empty slots with whole copies; then misses split
            torch.testing.assert_close(ex(x, ids, w), want, atol=1e-5, rtol=0)
    assert rt.stats()["split_experts"] > 0
    with pytest.raises(ValueError, match="expert id 9 out of range for 8 experts"):
        ex(x, ids.clamp(max=9) + (ids == 7).long() * 2, w)
    for h in hosts:
        h.kill()


def test_host_dying_mid_run_is_rehomed_and_the_output_stays_exact(reference):
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="thread"))
    model, rt, _ = _tiered(0.5, hosts)
    torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
    hosts[1].kill()
    torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
    s = rt.stats()
    assert s["dead_hosts"] == [1] and s["retries"] == 1 and s["rehomed_experts"] == 12
    # the last host gone: the host parts are computed from copies streamed to this device
    hosts[0].kill()
    torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
    assert rt.stats()["dead_hosts"] == [0, 1] and (rt.host_of == -1).all()


def test_process_hosts_share_buffers_and_survive_a_crash(reference):
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="process"))
    try:
        model, rt, _ = _tiered(0.5, hosts)
        torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
        assert all(h._bufs is not None and h._bufs[0].is_shared() for h in hosts)
        hosts[0].local.proc.kill()  # a crash mid-run
        hosts[0].local.proc.join()
        torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
        assert rt.stats()["dead_hosts"] == [0]
    finally:
        for h in hosts:
            h.kill()


def test_slice_settings_are_checked():
    with pytest.raises(ValueError, match="granularity must be"):
        TierRuntimeConfig(dispatch="split", granularity="half")
    with pytest.raises(ValueError, match="needs dispatch='split'"):
        TierRuntimeConfig(granularity="slice")
    with pytest.raises(ValueError, match="align"):
        TierRuntimeConfig(dispatch="split", granularity="slice", align=0)


@pytest.mark.ray
def test_ray_hosts_take_wire_rows_and_slices(ray_session, reference):
    hosts = start_hosts(HostPoolConfig(num_hosts=2, backend="ray", num_cpus=0.1))
    try:
        assert not any(h.shares_memory for h in hosts)
        model, rt, _ = _tiered(0.5, hosts)
        torch.testing.assert_close(_decode(model, IDS), reference["b2"], atol=1e-5, rtol=0)
        assert rt.stats()["split_experts"] > 0 and set(rt.stats()["cpu_pairs_per_host"]) == {0, 1}
        with pytest.raises(ValueError, match="wire arrays"):
            hosts[0].buffers(1, 4, torch.float32)
    finally:
        for h in hosts:
            h.kill()


def test_split_refuses_a_packed_cache():
    """dispatch='split' copies column slices of bfloat16 experts from host memory: a packed store
    (pack_experts) has none to slice, so the tier refuses it with the fix, before any host is used."""
    from offload import PackedHostExpertStore
    model = _model().to(torch.bfloat16)
    blocks = model.moe_blocks()
    store = PackedHostExpertStore.from_blocks(blocks, pin=False)
    install(blocks, store, OffloadConfig(slots_per_layer=2, policy="lru", device="cpu", calibrate=False),
            device=torch.device("cpu"), top_k=2, slots=2)
    hosts = start_hosts(HostPoolConfig(num_hosts=1, backend="thread"))
    try:
        with pytest.raises(ValueError, match="pack_experts=False"):
            apply_cpu_tier(model, TieredPlan.on_hosts(3, 8, 1), hosts, TierRuntimeConfig(dispatch="split"))
    finally:
        for h in hosts:
            h.kill()
