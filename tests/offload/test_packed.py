"""pack_experts: experts kept packed to 12 bits a weight (kernels/unpack.py) decode to the very weights,
so offloaded generation is the same as unpacked offloading and as the resident model, bit for bit,
with a quarter fewer bytes copied."""
import pytest
import torch

from offload import OffloadConfig, PackedHostExpertStore, apply_offload

from .helpers import greedy, tiny_model, twin

PROMPT = [3, 17, 5, 9, 30]
STEPS = 6


@pytest.fixture(scope="module")
def model():
    return twin(tiny_model("mixtral")).to(torch.bfloat16)


def _offloaded(model, **kw):
    return apply_offload(twin(model), OffloadConfig(device="cpu", calibrate=False, **kw))


@pytest.mark.parametrize("policy,slots", [("lru", 1), ("lru", 3), ("lfu", 3)])
def test_packed_offloading_equals_unpacked_and_resident(model, policy, slots):
    toks, logits = greedy(model, PROMPT, STEPS)
    plain = _offloaded(model, slots_per_layer=slots, policy=policy)
    packed = _offloaded(model, slots_per_layer=slots, policy=policy, pack_experts=True)
    assert isinstance(packed.offload_cache.store, PackedHostExpertStore)
    for m in (plain, packed):
        t, lg = greedy(m, PROMPT, STEPS)
        assert t == toks and torch.equal(lg, logits)
    a, b = plain.offload_cache.stats(), packed.offload_cache.stats()
    assert (a["hits"], a["misses"], a["copies"]) == (b["hits"], b["misses"], b["copies"]) and b["copies"] > 0
    store = packed.offload_cache.store
    # the bytes each copy moved: the packed buffers, a quarter fewer than the bf16 experts (the tiny model's
    # experts are small, so the 16-byte alignment of the buffer's parts shows)
    sizes = [store.copy_nbytes(layer, e) for layer in range(store.num_layers) for e in range(store.num_experts)]
    assert min(sizes) * b["copies"] <= b["bytes_copied"] <= max(sizes) * b["copies"]
    assert b["bytes_copied"] < 0.85 * a["bytes_copied"]
    assert store.nbytes() < 0.85 * store.num_layers * store.num_experts * store.expert_bytes
    # the user's one-line summary (moe generate) tells the two apart and carries the counters
    assert "packed to 12 bits a weight" in packed.offload_cache.describe()
    assert "copied bfloat16" in plain.offload_cache.describe()
    assert f"{b['copies']} copies ({b['bytes_copied'] / 1e6:.1f} MB)" in packed.offload_cache.describe()


def test_the_store_gives_back_the_weights(model):
    blocks = twin(model).moe_blocks()
    want = [(b.experts.w13.detach().clone(), b.experts.w2.detach().clone()) for b in blocks]
    store = PackedHostExpertStore.from_blocks(blocks, pin=False)
    for layer, (w13, w2) in enumerate(want):
        for e in range(w13.shape[0]):
            got13, got2 = store.get(layer, e)
            assert torch.equal(got13.view(torch.int16), w13[e].view(torch.int16))
            assert torch.equal(got2.view(torch.int16), w2[e].view(torch.int16))
            assert store.copy_nbytes(layer, e) == store.packed(layer, e)[0].numel() < 0.9 * store.expert_bytes


def test_clear_errors_and_nothing_lost():
    for kw, msg in ((dict(store="disk", checkpoint="x"), "store='disk'"), (dict(cpu_fallback=True), "cpu_fallback"),
                    (dict(expert_slices=2), "expert_slices")):
        with pytest.raises(ValueError, match=msg):
            OffloadConfig(slots_per_layer=2, pack_experts=True, **kw)
    m = tiny_model("mixtral")  # float32 experts
    toks, logits = greedy(m, PROMPT, 2)
    with pytest.raises(ValueError, match="bfloat16"):
        apply_offload(m, OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False, pack_experts=True))
    t2, l2 = greedy(m, PROMPT, 2)  # refused before any expert left the model
    assert t2 == toks and torch.equal(l2, logits)


def test_the_budget_counts_every_staging_buffer(model):
    """pack_experts sets its staging buffers aside from gpu_memory before the slots: one on the CPU,
    offload.cache.STAGES on a GPU (planned here for a CUDA device without one: the arithmetic only)."""
    from offload.apply import packed_staging
    from offload.cache import STAGES
    blocks = model.moe_blocks()
    ex = blocks[0].experts
    eb = (ex.w13[0].numel() + ex.w2[0].numel()) * ex.w13.element_size()
    one, n_cpu = packed_staging(True, eb, torch.device("cpu"))
    _, n_gpu = packed_staging(True, eb, torch.device("cuda"))
    assert n_cpu == 1 and n_gpu == STAGES >= 2 and one >= 0.75 * eb
    assert packed_staging(False, eb, torch.device("cuda")) == (0, 0)
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n)
    dense += sum(b.numel() * b.element_size() for b in model.buffers())
    # room for 3 slots a layer beside the dense part and one stage: 3 slots packed; unpacked, the same
    # 3 without the stage's room, and packed with a layer's slot less room, 2
    budget = dense + one + 3 * eb * len(blocks) + eb // 4
    for pack, room, slots in ((True, budget, 3), (False, budget - one, 3), (True, budget - eb * len(blocks), 2)):
        m = apply_offload(twin(model), OffloadConfig(gpu_memory=room, reserve_bytes=0, device="cpu",
                                                     calibrate=False, pack_experts=pack))
        assert m.offload_cache.slots == slots, (pack, room)


def test_auto_packs_large_bfloat16_experts_on_a_gpu_only():
    """pack_experts='auto' (the default) packs where packing measured a win (BENCHMARKS 3n): bfloat16
    experts of PACK_AUTO_FROM bytes or more, on a GPU, from host memory, whole, without cpu_fallback."""
    from offload.apply import resolve_pack
    from offload.config import PACK_AUTO_FROM
    gpu, cpu, bf, big = torch.device("cuda"), torch.device("cpu"), torch.bfloat16, PACK_AUTO_FROM

    def pack(cfg=None, dtype=bf, nbytes=big, device=gpu, use_disk=False):
        return resolve_pack(cfg or OffloadConfig(slots_per_layer=2), expert_dtype=dtype, expert_bytes=nbytes,
                            device=device, use_disk=use_disk)
    assert OffloadConfig(slots_per_layer=2).pack_experts == "auto" and pack()
    assert not pack(device=cpu) and not pack(dtype=torch.float16) and not pack(nbytes=big - 1)
    assert not pack(use_disk=True) and not pack(OffloadConfig(slots_per_layer=2, cpu_fallback=True))
    assert not pack(OffloadConfig(slots_per_layer=2, expert_slices=2))
    assert pack(OffloadConfig(slots_per_layer=2, pack_experts=True), nbytes=1, device=cpu)  # asked for: packed
    assert not pack(OffloadConfig(slots_per_layer=2, pack_experts=False))
    # driver='device' packs from PACK_AUTO_FROM_DEVICE (Qwen3's 9.4 MB experts: packed paid there, BENCHMARKS 3p)
    from offload.config import PACK_AUTO_FROM_DEVICE
    qwen3 = 3 * 2048 * 768 * 2
    assert PACK_AUTO_FROM_DEVICE <= qwen3 < big
    assert pack(OffloadConfig(slots_per_layer=2, driver="device"), nbytes=qwen3) and not pack(nbytes=qwen3)
    assert not pack(OffloadConfig(slots_per_layer=2, driver="device"), nbytes=PACK_AUTO_FROM_DEVICE - 1)
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        OffloadConfig(slots_per_layer=2, pack_experts="yes")


def test_cli_flag(model):
    import argparse

    from offload.cli_args import add_offload_args, apply_from_args
    p = argparse.ArgumentParser()
    add_offload_args(p)
    m = apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", "--offload-pack-experts"]))
    assert isinstance(m.offload_cache.store, PackedHostExpertStore)
    with pytest.raises(ValueError, match="--offload-pack-experts configure"):
        apply_from_args(twin(model), p.parse_args(["--offload-pack-experts"]))
    # auto (the default) and off: the tiny model's experts on the CPU stay unpacked either way
    for flags in ([], ["--offload-pack-experts", "auto"], ["--offload-pack-experts", "off"]):
        m = apply_from_args(twin(model), p.parse_args(["--gpu-memory", "1GiB", *flags]))
        assert not isinstance(m.offload_cache.store, PackedHostExpertStore), flags
    assert p.parse_args(["--offload-pack-experts", "off"]).offload_pack_experts is False
    with pytest.raises(SystemExit):
        p.parse_args(["--offload-pack-experts", "maybe"])


def test_the_arena_keeps_host_memory_near_the_packed_bytes():
    """Each layer's packed experts are views into power-of-two chunks (the pinned allocator rounds any
    other size up to one): aligned, disjoint, and the chunks hold little more than the packed bytes."""
    from offload.store import PinnedArena
    a = PinnedArena(1024, pin=False)
    views = [a.take(n) for n in (300, 300, 300, 500, 2000, 16)]
    assert [c.numel() for c in a.chunks] == [1024, 1024, 2048, 1024]  # 300+300(+pad) fit, 300 too; 500 next; ...
    for i, v in enumerate(views):
        v.fill_(i)
        assert v.data_ptr() % 64 == 0
    assert [int(v[0]) for v in views] == list(range(6))  # nothing overwritten by a later view
    with pytest.raises(ValueError, match="power of two"):
        PinnedArena(1000, pin=False)
    m = twin(tiny_model("mixtral", num_hidden_layers=4)).to(torch.bfloat16)
    store = PackedHostExpertStore.from_blocks(m.moe_blocks(), pin=False)
    assert all(c.numel() & (c.numel() - 1) == 0 for c in store.arena.chunks)
    assert store.nbytes() <= store.host_bytes() < store.nbytes() * 1.1 + store.arena.chunk_bytes


def test_the_offload_benchmark_bounds_at_the_fastest_copy_rate(capsys):
    """benchmarks/offload.py's rerate_copy: a probe 2% faster than the calibration re-rates the bound's cost and
    the model's rows' copy floors; a slower or absent probe (off a GPU) changes nothing."""
    from offload import CostModel
    from tests.conftest import load_benchmark
    mod = load_benchmark("offload")
    cost = CostModel(copy_bytes_per_s=25e9, cpu_base_s=1e-3, cpu_per_token_s=0.0)
    rows = [dict(model="Q", copy_floor_ms=40.0), dict(model="Q", copy_floor_ms=0.0), dict(model="M", copy_floor_ms=8.0)]
    assert mod.rerate_copy(rows, "Q", cost, None) is cost and mod.rerate_copy(rows, "Q", cost, 25.4e9) is cost
    new = mod.rerate_copy(rows, "Q", cost, 50e9)
    assert new.copy_bytes_per_s == 50e9 and new.cpu_base_s == cost.cpu_base_s
    assert [r["copy_floor_ms"] for r in rows] == [20.0, 0.0, 8.0]
    assert "50.0 GB/s now, 25.0 at calibration" in capsys.readouterr().out


def test_the_offload_benchmark_has_packed_rows(tmp_path, capsys):
    """benchmarks/offload.py --packed (on by default; bfloat16 runs): lru and lfu rows over packed experts,
    the same hits as the unpacked lru / lfu rows and ~3/4 of their bytes; and beside the oracle, Belady's
    hits with the same slots in one pool shared by all layers."""
    import json

    from tests.conftest import load_benchmark
    mod = load_benchmark("offload")
    out = tmp_path / "rows.json"
    mod.main(["--smoke", "--dtype", "bfloat16", "--budgets", "0.25", "--slices", "", "--json", str(out), "--rounds", "2"])
    rows = {r["config"]: r for r in json.loads(out.read_text())}
    # --rounds 2: each cached row ran twice, taking turns with the others, and kept the faster
    assert all(len(rows[n]["rounds_ms"]) == 2 and rows[n]["ms_per_token"] == min(rows[n]["rounds_ms"])
               for n in ("lru", "lfu", "lfu device", "cpu", "lru packed", "lfu packed", "lfu packed device"))
    # the device-decided rows: the host cache's decisions (the same hits and bytes), packed or not
    for name in ("lfu", "lfu packed"):
        assert rows[f"{name} device"]["hit_ratio"] == rows[name]["hit_ratio"]
        assert rows[f"{name} device"]["mb_copied_per_token"] == pytest.approx(rows[name]["mb_copied_per_token"])
    assert "rounds_ms" not in rows["oracle bound"]
    # the bound's compute is the faster resident row: the plain experts (no cache) or the cache's all hits
    fastest = min(rows["resident"]["ms_per_token"], rows["resident plain"]["ms_per_token"])
    assert rows["oracle bound"]["ms_per_token"] >= fastest * (1 - 1e-9)
    if rows["oracle bound"]["copy_floor_ms"] < fastest:  # compute-bound: the bound is that compute, no more
        assert rows["oracle bound"]["ms_per_token"] == pytest.approx(fastest)
    assert rows["resident plain"]["hit_ratio"] == 1.0 and rows["resident plain"]["mb_copied_per_token"] == 0.0
    for name in ("lru", "lfu"):
        plain, packed = rows[name], rows[f"{name} packed"]
        assert packed["hit_ratio"] == plain["hit_ratio"]
        assert 0.74 < packed["mb_copied_per_token"] / plain["mb_copied_per_token"] < 0.8
    # the oracle over the packed bytes: Belady's hits, ~3/4 of the plain bound's bytes, and no slower
    bound, packed_bound = rows["oracle bound"], rows["oracle packed"]
    assert packed_bound["hit_ratio"] == bound["hit_ratio"]
    assert 0.74 < packed_bound["mb_copied_per_token"] / bound["mb_copied_per_token"] < 0.8
    assert packed_bound["ms_per_token"] <= bound["ms_per_token"]
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "shared by all layers" in ln)
    shared = float(line.split("hit ")[1].split("%")[0])
    assert shared >= 100 * bound["hit_ratio"] - 0.05  # one pool can do all that fixed pools do
