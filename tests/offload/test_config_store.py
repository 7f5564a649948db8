"""Budgets and their errors, settings validation, the host store and the disk tier."""
import pytest
import torch

from offload import DiskExpertStore, HostExpertStore, OffloadConfig, apply_offload, parse_bytes, plan_slots

from .helpers import greedy, tiny_model, twin

MiB, GiB = 2 ** 20, 2 ** 30


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * GiB
    assert parse_bytes("500MB") == 500 * 10 ** 6
    assert parse_bytes(1234) == 1234
    with pytest.raises(ValueError, match="24GiB"):
        parse_bytes("lots")


@pytest.mark.parametrize("kw,match", [
    (dict(), "gpu_memory"),
    (dict(gpu_memory=1.5), "fraction"),
    (dict(gpu_memory="24 bananas"), "byte size"),
    (dict(gpu_memory="2.0"), "has no unit"),  # not 2 bytes: a unit-less decimal above 1 is a mistake
    (dict(gpu_memory="0.0"), "fraction must be in"),  # a fraction from the command line is checked as one
    (dict(slots_per_layer=0), "slots_per_layer"),
    (dict(slots_per_layer=2, policy="fifo"), "fifo"),
    (dict(slots_per_layer=2, prefetch="magic"), "magic"),
    (dict(slots_per_layer=2, policy="predictor"), "predict_batch"),
    (dict(slots_per_layer=2, policy="belady"), "trace"),
    (dict(slots_per_layer=2, store="disk"), "checkpoint"),
    (dict(slots_per_layer=2, policy="lru", lfu_half_life=20), "needs policy='lfu'"),
    (dict(slots_per_layer=2, policy="lfu", lfu_half_life=0), "steps > 0"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        OffloadConfig(**kw)


def test_fraction_string_is_a_fraction():
    assert OffloadConfig(gpu_memory="0.25").gpu_memory == 0.25


def test_plan_slots_takes_dense_and_kv_first():
    kw = dict(device=torch.device("cpu"), dense_bytes=2 * GiB, expert_bytes=100 * MiB, num_layers=10,
              num_experts=64, top_k=4)
    cfg = OffloadConfig(gpu_memory="10GiB", kv_cache_bytes="1GiB", reserve_bytes=0)
    assert plan_slots(cfg, **kw) == (7 * GiB) // (10 * 100 * MiB)
    assert plan_slots(OffloadConfig(gpu_memory="1000GiB"), **kw) == 64  # never more slots than experts


def test_budget_too_small_names_the_numbers():
    kw = dict(device=torch.device("cpu"), dense_bytes=2 * GiB, expert_bytes=100 * MiB, num_layers=10,
              num_experts=64, top_k=4)
    with pytest.raises(ValueError, match=r"cannot hold one layer's 4 active experts.*dense weights 2\.00 GiB"):
        plan_slots(OffloadConfig(gpu_memory="2GiB", reserve_bytes=0), **kw)
    with pytest.raises(ValueError, match="less than one"):  # room for top-k, not for a slot in each layer
        plan_slots(OffloadConfig(gpu_memory=2 * GiB + 500 * MiB, reserve_bytes=0), **kw)


def test_apply_offload_with_a_byte_budget():
    model = tiny_model("mixtral")
    blocks = model.moe_blocks()
    ex = blocks[0].experts
    eb = (ex.w13[0].numel() + ex.w2[0].numel()) * ex.w13.element_size()
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    dense += sum(b.numel() * b.element_size() for b in model.buffers())
    budget = dense + 3 * eb * len(blocks) + eb // 2
    m = apply_offload(twin(model), OffloadConfig(gpu_memory=budget, reserve_bytes=0, device="cpu", calibrate=False))
    assert m.offload_cache.slots == 3
    with pytest.raises(ValueError, match="cannot hold"):
        apply_offload(twin(model), OffloadConfig(gpu_memory=dense + eb, reserve_bytes=0, device="cpu"))


@pytest.mark.parametrize("slices", [1, 2])
def test_budget_is_checked_on_the_models_shapes_before_the_load(tmp_path, slices):
    """offload.apply.check_budget on moe.checkpoint.model_skeleton (nothing loaded): the slots apply_offload gives
    the loaded model, and its error, word for word, where the budget cannot hold one layer's active experts."""
    from moe import load_model, save_pretrained
    from moe.checkpoint import model_skeleton
    from offload.apply import check_budget
    save_pretrained(tiny_model("mixtral"), tmp_path)
    sk, model = model_skeleton(tmp_path), load_model(tmp_path)
    blocks = model.moe_blocks()
    ex = blocks[0].experts
    eb = (ex.w13[0].numel() + ex.w2[0].numel()) * ex.w13.element_size()
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    dense += sum(b.numel() * b.element_size() for b in model.buffers())
    kw = dict(reserve_bytes=0, device="cpu", calibrate=False, expert_slices=slices)
    cfg = OffloadConfig(gpu_memory=dense + 3 * eb * len(blocks) + eb // 2, **kw)
    assert check_budget(sk, cfg) == 3 * slices == apply_offload(twin(model), cfg).offload_cache.slots
    small = OffloadConfig(gpu_memory=dense + eb, **kw)
    with pytest.raises(ValueError, match="cannot hold") as before:
        check_budget(sk, small)
    with pytest.raises(ValueError, match="cannot hold") as after:
        apply_offload(twin(model), small)
    assert str(before.value) == str(after.value)


def test_host_store_moves_layer_by_layer():
    model = twin(tiny_model("mixtral"))
    blocks = model.moe_blocks()
    want = [(b.experts.w13.detach().clone(), b.experts.w2.detach().clone()) for b in blocks]
    released = []

    def release(i):
        # the store already holds layer i when it is released; later layers are untouched
        assert all(blocks[j].experts is not None for j in range(i, len(blocks)))
        blocks[i].experts = None
        released.append(i)
    store = HostExpertStore.from_blocks(blocks, release=release, pin=False)
    assert released == list(range(len(blocks)))
    for i, (w13, w2) in enumerate(want):
        for e in range(w13.shape[0]):
            a, b = store.get(i, e)
            assert torch.equal(a, w13[e]) and torch.equal(b, w2[e])
    assert store.expert_bytes == (want[0][0][0].numel() + want[0][1][0].numel()) * 4


@pytest.mark.parametrize("layout,shard", [("fused", None), ("per_expert", 20_000)])
def test_disk_store_reads_checkpoint_experts(tmp_path, layout, shard):
    save_pretrained = pytest.importorskip("moe").save_pretrained
    model = tiny_model("mixtral")
    save_pretrained(model, tmp_path, layout=layout, max_shard_bytes=shard)
    blocks = model.moe_blocks()
    store = DiskExpertStore(tmp_path, [b.layer_idx for b in blocks])
    assert store.fused == (layout == "fused")
    for i, b in enumerate(blocks):
        for e in range(store.num_experts):
            a, c = store.get(i, e)
            assert torch.equal(a, b.experts.w13[e].detach()) and torch.equal(c, b.experts.w2[e].detach())
    m = apply_offload(twin(model), OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False, store="disk",
                                                 checkpoint=str(tmp_path), cpu_fallback=True,
                                                 copy_gbps=1e-3, cpu_gflops=1e-3))
    t0, l0 = greedy(model, [4, 8, 15], 3)
    t1, l1 = greedy(m, [4, 8, 15], 3)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=0)
    assert t1 == t0


def test_disk_store_rejects_a_directory_without_weights(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        DiskExpertStore(tmp_path, [0])


def test_cli_args_apply_offload():
    import argparse

    from offload.cli_args import add_offload_args, apply_from_args

    p = argparse.ArgumentParser()
    add_offload_args(p)
    model = tiny_model("mixtral")
    assert apply_from_args(model, p.parse_args([])) is model  # off without --gpu-memory
    args = p.parse_args(["--gpu-memory", "1GiB", "--offload-policy", "lfu", "--offload-prefetch", "next_layer_gate"])
    m = apply_from_args(twin(model), args)
    assert m.offload_cache.slots == m.offload_cache.num_experts  # 1 GiB holds the whole tiny model
    assert type(m.offload_cache.policy).__name__ == "LFUPolicy"
    t0, l0 = greedy(model, [5, 6], 2)
    t1, l1 = greedy(m, [5, 6], 2)
    on_cpu = m.offload_cache.device.type == "cpu"  # on a GPU machine the device run is compared to the CPU one
    torch.testing.assert_close(l1, l0, atol=1e-6 if on_cpu else 1e-4, rtol=0)
    with pytest.raises(ValueError, match="model directory"):
        apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-from-disk"]))
    m = apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-policy", "lfu",
                                                   "--offload-lfu-half-life", "23"]))
    assert m.offload_cache.policy.half_life == 23.0
    # the defaults: LFU with that half-life; inf counts over the whole run; LRU asked for by name
    m = apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB"]))
    assert type(m.offload_cache.policy).__name__ == "LFUPolicy" and m.offload_cache.policy.half_life == 23.0
    m = apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-lfu-half-life", "inf"]))
    assert m.offload_cache.policy.half_life is None
    m = apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-policy", "lru"]))
    assert type(m.offload_cache.policy).__name__ == "LRUPolicy"
    with pytest.raises(ValueError, match="--offload-lfu-half-life configure"):
        apply_from_args(twin(model), p.parse_args(["--offload-lfu-half-life", "23"]))
    m = apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--expert-slices", "2", "--cpu-fallback"]))
    assert m.offload_cache.store.slices == 2 and m.offload_cache.num_experts == 2 * m.moe_blocks()[0].experts.num_experts
    torch.testing.assert_close(greedy(m, [5, 6], 2)[1], l0, atol=1e-6 if on_cpu else 1e-4, rtol=0)


def test_cli_args_probe_prefetch(tmp_path):
    import argparse

    import numpy as np

    from offload.cli_args import add_offload_args, apply_from_args
    from routing import ProbeLookahead, hidden_matrix, record_sequences

    p = argparse.ArgumentParser()
    add_offload_args(p)
    model = tiny_model("mixtral")
    trace, feats = record_sequences(model, np.random.default_rng(0).integers(1, 40, (4, 10)).tolist(),
                                    hidden_layers="all")
    path = ProbeLookahead.fit(trace, hidden_matrix(feats, trace.num_layers)).save(tmp_path / "p.probe.npz")
    m = apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-prefetch", "probe",
                                                   "--offload-probes", str(path)]))
    assert m.moe_blocks()[0].experts._next_router[0] is not None
    on_cpu = m.offload_cache.device.type == "cpu"
    torch.testing.assert_close(greedy(m, [5, 6], 2)[1], greedy(model, [5, 6], 2)[1], atol=1e-6 if on_cpu else 1e-4,
                               rtol=0)
    for bad in (["--offload-prefetch", "probe"], ["--offload-probes", str(path)]):
        with pytest.raises(ValueError, match="go together"):
            apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", *bad]))


def test_cli_args_predictor_policy_and_prefetch(tmp_path):
    """--offload-policy/--offload-prefetch predictor with --offload-predictor P.npz (its P.probe.npz beside
    it becomes the lookahead) and --offload-prefetch-budget; a predictor of another model is refused
    before any expert leaves the model."""
    import argparse

    import numpy as np

    from offload.cli_args import add_offload_args, apply_from_args
    from routing import PathPredictor, PredictorConfig, ProbeLookahead, hidden_matrix, record_sequences
    from routing.cli import probe_path
    from routing.synthetic import synthesize

    p = argparse.ArgumentParser()
    add_offload_args(p)
    model = tiny_model("mixtral")
    trace, feats = record_sequences(model, np.random.default_rng(0).integers(1, 40, (6, 12)).tolist(),
                                    hidden_layers="all")
    pred_path = PathPredictor.fit(trace, PredictorConfig(fit_iters=2)).save(tmp_path / "p.npz")
    ProbeLookahead.fit(trace, hidden_matrix(feats, trace.num_layers)).save(probe_path(pred_path))
    args = ["--gpu-memory", "1GiB", "--offload-policy", "predictor", "--offload-prefetch", "predictor",
            "--offload-predictor", str(pred_path), "--offload-prefetch-budget", "2"]
    m = apply_from_args(twin(model), p.parse_args(args))
    ex = m.moe_blocks()[0].experts
    assert type(m.offload_cache.policy).__name__ == "PredictorPolicy"
    assert ex.copy_budget is not None and ex.copy_budget.per_layer == 2.0
    assert ex.lookahead.wants_hidden  # the probes beside the predictor file were loaded as its lookahead
    on_cpu = m.offload_cache.device.type == "cpu"
    torch.testing.assert_close(greedy(m, [5, 6], 2)[1], greedy(model, [5, 6], 2)[1], atol=1e-6 if on_cpu else 1e-4,
                               rtol=0)
    with pytest.raises(ValueError, match="goes with"):
        apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-policy", "predictor"]))
    with pytest.raises(ValueError, match="goes with"):
        apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-predictor", str(pred_path)]))
    with pytest.raises(ValueError, match="prefetch_budget limits the predictor"):
        apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-prefetch-budget", "1"]))
    with pytest.raises(ValueError, match="--offload-policy --offload-predictor configure expert offloading"):
        apply_from_args(twin(model), p.parse_args(["--offload-policy", "predictor", "--offload-predictor", str(pred_path)]))
    L = len(model.moe_blocks())
    other = PathPredictor.fit(synthesize(num_layers=L + 1, num_experts=8, top_k=2, seed=0), PredictorConfig(fit_iters=2))
    other_path = other.save(tmp_path / "other.npz")
    victim = twin(model)
    with pytest.raises(ValueError, match=f"{L + 1} MoE layers x 8 experts; this model has {L} x"):
        apply_from_args(victim, p.parse_args(["--gpu-memory", "1GiB", "--offload-prefetch", "predictor",
                                              "--offload-predictor", str(other_path)]))
    assert all(b.experts is not None and hasattr(b.experts, "w13") for b in victim.moe_blocks())  # nothing lost


def test_no_cache_clear():
    model = tiny_model("mixtral")
    m = apply_offload(twin(model), OffloadConfig(slots_per_layer=4, device="cpu", calibrate=False))
    with torch.no_grad():
        m(torch.tensor([[3, 4]]))
        m.offload_cache.clear()
        before = m.offload_cache.stats()["hits"]
        m(torch.tensor([[3, 4]]))
    assert m.offload_cache.stats()["hits"] == before  # nothing stayed resident


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_kv_cache_bytes_matches_the_cache(family):
    from offload.apply import kv_cache_bytes

    model = tiny_model(family)
    if not hasattr(model.config, "num_hidden_layers"):
        pytest.skip("needs moe's model")
    kv = model.new_cache(2, 16)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5], [6, 7, 8]]), cache=kv)
    real = sum(t.numel() * t.element_size() for t in list(kv._k.values()) + list(kv._v.values()))
    assert kv_cache_bytes(model.config, 2, 16, torch.float32) == real


def test_apply_offload_frees_each_original():
    import weakref

    model = twin(tiny_model("mixtral"))
    refs = [weakref.ref(b.experts) for b in model.moe_blocks()]
    apply_offload(model, OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False))
    assert all(r() is None for r in refs)  # the original expert modules are gone
