"""Expert slices (offload/slices.py): units add up to the expert, and offloading over units is exact."""
import numpy as np
import pytest
import torch

from kernels import expert_mlp_reference, moe_experts_reference
from offload import DiskExpertStore, HostExpertStore, OffloadConfig, TransitionPredictor, apply_offload
from offload.slices import expand_ids, expand_weights, unit_of, unit_trace, units_w2, units_w13
from routing.synthetic import synthesize

from .helpers import greedy, offloaded, tiny_model, twin

PROMPT = [3, 17, 5, 9, 30]
STEPS = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model("mixtral")  # 2 MoE layers, 8 experts top-2, ffn 16


@pytest.fixture(scope="module")
def resident(model):
    return greedy(model, PROMPT, STEPS)


@pytest.mark.parametrize("G", [1, 2, 4])
def test_units_add_up_to_the_expert(G):
    torch.manual_seed(0)
    E, D, I, T, K = 3, 8, 12, 5, 2
    w13, w2 = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    u13, u2 = units_w13(w13, G), units_w2(w2, G)
    assert u13.shape == (E * G, 2 * I // G, D) and u2.shape == (E * G, D, I // G)
    x = torch.randn(T, D)
    for e in range(E):
        want = expert_mlp_reference(x, w13[e], w2[e])
        got = sum(expert_mlp_reference(x, u13[e * G + g], u2[e * G + g]) for g in range(G))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g in range(G):  # the one-expert form (disk store) gives the same unit
            a, b = unit_of(w13[e], w2[e], g, G)
            assert torch.equal(a, u13[e * G + g]) and torch.equal(b, u2[e * G + g])
    # the whole layer through the reference over units, ids and weights expanded (-1 stays out)
    ids = torch.tensor([[0, 2], [1, -1], [2, 2], [0, 1], [-1, -1]])
    w = torch.rand(T, K)
    want = moe_experts_reference(x, w13, w2, ids, w)
    uids = torch.from_numpy(expand_ids(ids.numpy(), G))
    got = moe_experts_reference(x, u13, u2, uids, expand_weights(w, G))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_expand_ids_keeps_minus_one_and_order():
    ids = np.array([[3, -1], [0, 5]])
    assert expand_ids(ids, 2).tolist() == [[6, 7, -1, -1], [0, 1, 10, 11]]
    assert expand_ids(ids, 1) is ids
    w = torch.tensor([[0.7, 0.3]])
    assert expand_weights(w, 3)[0].tolist() == pytest.approx([0.7, 0.7, 0.7, 0.3, 0.3, 0.3])


@pytest.mark.parametrize("cpu_fallback", [False, True, "makespan"])
@pytest.mark.parametrize("G,policy,slots", [(2, "lru", 1), (2, "lru", 3), (2, "lfu", 5), (4, "lru", 7),
                                            (2, "predictor", 3)])
def test_offloaded_over_slices_equals_resident(model, resident, G, policy, slots, cpu_fallback):
    E = model.moe_blocks()[0].experts.w13.shape[0]
    trace = synthesize(num_layers=2, num_experts=E, top_k=2, num_requests=1, tokens_per_request=64,
                       popularity_skew=1.0, temporal_locality=0.5, affinity=0.5, seed=1)
    pred = TransitionPredictor.fit(trace) if policy == "predictor" else None
    m = offloaded(model, slots_per_layer=slots, policy=policy, predictor=pred, cpu_fallback=bool(cpu_fallback),
                  expert_slices=G, prefetch="predictor" if pred is not None else "none",
                  miss_split="makespan" if cpu_fallback == "makespan" else "reuse")
    toks, logits = greedy(m, PROMPT, STEPS)
    torch.testing.assert_close(logits, resident[1], atol=1e-6, rtol=0)
    assert toks == resident[0]
    cache = m.offload_cache
    assert cache.num_experts == E * G and cache.store.w2_shape[1] == 16 // G
    st = cache.stats()
    assert (st["cpu_computed"] > 0) == bool(cpu_fallback)
    if slots == 1:
        assert st["evictions"] > 0  # one slot for 2*G units per token: units cycle through it


def test_one_missed_expert_is_shared_between_copy_and_cpu(model):
    """The point of slices: at one token a single missed expert is two unit misses, and the
    cost model (copy and CPU equally fast here) sends one to the copy engine, one to the CPU."""
    # a unit: 3072 bytes, 1536 FLOPs per token; copy at 2e-3 GB/s and CPU at 1e-3 GFLOP/s both take 1.5 ms
    m = offloaded(model, slots_per_layer=16, cpu_fallback=True, expert_slices=2, copy_gbps=2e-3)
    assert m.offload_cache.store.expert_bytes == 3072
    blk = m.moe_blocks()[0]
    x = torch.randn(1, blk.experts.cache.store.w13_shape[1])
    ids, w = torch.tensor([[5, -1]]), torch.tensor([[1.0, 0.0]])
    blk.experts(x, ids, w)
    st = m.offload_cache.stats()
    assert st["cpu_computed"] == 1 and st["misses"] == 2
    assert m.offload_cache.is_resident(0, 10) != m.offload_cache.is_resident(0, 11)


@pytest.mark.parametrize("next_gate", [False, True])
def test_belady_and_gate_prefetch_over_slices(model, resident, next_gate):
    blocks = model.moe_blocks()
    E = blocks[0].experts.w13.shape[0]
    from offload import route_by_trace
    trace = synthesize(num_layers=len(blocks), num_experts=E, top_k=2, num_requests=1, tokens_per_request=64,
                       popularity_skew=1.0, temporal_locality=0.5, affinity=0.5, seed=2)
    m0 = twin(model)
    kw = dict(slots_per_layer=2, expert_slices=2)
    kw |= dict(policy="lru", prefetch="next_layer_gate") if next_gate else dict(policy="belady", trace=trace)
    m = offloaded(model, **kw)
    with route_by_trace(m0, trace), route_by_trace(m, trace):
        want = greedy(m0, PROMPT, STEPS)
        got = greedy(m, PROMPT, STEPS)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)
    assert unit_trace(trace, 2).expert_ids.shape[-1] == 4


def test_stores_in_slices_agree(tmp_path, model):
    save_pretrained = pytest.importorskip("moe").save_pretrained
    save_pretrained(model, tmp_path, layout="fused")
    blocks = model.moe_blocks()
    disk = DiskExpertStore(tmp_path, [b.layer_idx for b in blocks], slices=2)
    host = HostExpertStore.from_blocks(twin(model).moe_blocks(), pin=False, slices=2)
    assert disk.num_experts == host.num_experts == 16 and disk.expert_bytes == host.expert_bytes
    for i in range(len(blocks)):
        for u in range(16):
            a, b = disk.get(i, u)
            c, d = host.get(i, u)
            assert torch.equal(a, c) and torch.equal(b, d) and c.is_contiguous() and d.is_contiguous()


def test_slices_that_do_not_divide_the_ffn_are_a_clear_error(model):
    with pytest.raises(ValueError, match="expert_slices=3 must divide"):
        offloaded(model, slots_per_layer=2, expert_slices=3)
    with pytest.raises(ValueError, match="expert_slices must be an integer >= 1"):
        OffloadConfig(slots_per_layer=2, expert_slices=0)


def test_cutting_a_store_finer_equals_cutting_the_experts(model):
    blocks = twin(model).moe_blocks()
    w = [(b.experts.w13.detach().clone(), b.experts.w2.detach().clone()) for b in blocks]
    store = HostExpertStore.from_blocks(twin(model).moe_blocks(), pin=False, slices=2)
    finer = store.to_slices(2)
    assert finer.slices == 4 and finer.num_experts == 32 and store.layers == []
    for i, (w13, w2) in enumerate(w):
        u13, u2 = units_w13(w13, 4), units_w2(w2, 4)
        for u in range(32):
            a, b = finer.get(i, u)
            assert torch.equal(a, u13[u]) and torch.equal(b, u2[u])
