"""On a CUDA device: slot pools on the GPU, copies on the side stream ordered by events."""
import pytest
import torch

from offload import OffloadConfig, TransitionPredictor, apply_offload
from routing.synthetic import synthesize

from .helpers import greedy, tiny_model, twin

pytestmark = pytest.mark.gpu
PROMPT = [3, 17, 5, 9, 30]


@pytest.mark.parametrize("kw", [
    dict(slots_per_layer=1),
    dict(slots_per_layer=3, cpu_fallback=True, copy_gbps=1e-3, cpu_gflops=1e-3),
    dict(slots_per_layer=3, prefetch="next_layer_gate"),
    dict(slots_per_layer=3, prefetch="attention"),
    dict(slots_per_layer=3, prefetch="probe"),
    dict(slots_per_layer=3, policy="predictor", prefetch="predictor"),
    dict(slots_per_layer=3, policy="predictor", prefetch="predictor", prefetch_budget=2),
    dict(slots_per_layer=3, expert_slices=2),
    dict(slots_per_layer=5, expert_slices=2, cpu_fallback=True, copy_gbps=2e-3, cpu_gflops=1e-3),
])
def test_gpu_offloaded_equals_gpu_resident(kw):
    model = tiny_model("mixtral")
    resident = twin(model).cuda()
    want = greedy(resident, PROMPT, 6)
    if kw.get("policy") == "predictor":
        L = len(model.moe_blocks())
        kw["predictor"] = TransitionPredictor.fit(synthesize(num_layers=L, num_experts=8, top_k=2, seed=0))
    if kw.get("prefetch") == "probe":  # probes fitted on the model's own hidden states (on the CPU)
        import numpy as np

        from routing import ProbeLookahead, hidden_matrix, record_sequences
        trace, feats = record_sequences(model, np.random.default_rng(0).integers(1, 40, (4, 10)).tolist(),
                                        hidden_layers="all")
        kw = dict(kw, probes=ProbeLookahead.fit(trace, hidden_matrix(feats, trace.num_layers)))
    m = apply_offload(twin(model), OffloadConfig(device="cuda", calibrate=False, **kw))
    assert m.offload_cache.copy_stream is not None and m.offload_cache.pool_w13[0].is_cuda
    assert m.offload_cache.store.pinned
    got = greedy(m, PROMPT, 6)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[0] == want[0]
    torch.cuda.synchronize()
    assert not m.offload_cache.pending_copies()


def test_gpu_packed_experts_equal_unpacked():
    """pack_experts on the GPU: copies land in the staging buffer and the Triton kernel decodes them into
    the slots on the copy stream; the tokens and logits are those of unpacked offloading, bit for bit."""
    model = twin(tiny_model("mixtral")).to(torch.bfloat16)
    runs = []
    for pack in (False, True):
        m = apply_offload(twin(model), OffloadConfig(device="cuda", calibrate=False, slots_per_layer=1,
                                                     pack_experts=pack))
        runs.append((greedy(m, PROMPT, 6), m.offload_cache.stats()))
    (a, sa), (b, sb) = runs
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert sa["copies"] == sb["copies"] > 0 and sb["bytes_copied"] < 0.85 * sa["bytes_copied"]


def test_gpu_auto_packs_large_bfloat16_experts_and_decodes_the_same():
    """pack_experts='auto' (the default) on a GPU with experts of 10 MiB or more: the store is packed,
    two staging buffers are counted, and generation equals pack_experts=False bit for bit."""
    from offload import PackedHostExpertStore
    from offload.config import PACK_AUTO_FROM
    model = twin(tiny_model("mixtral", hidden_size=512, moe_intermediate_size=4096)).to(torch.bfloat16)
    ex = model.moe_blocks()[0].experts
    assert (ex.w13[0].numel() + ex.w2[0].numel()) * 2 >= PACK_AUTO_FROM
    runs = []
    for pack in ("auto", False):
        m = apply_offload(twin(model), OffloadConfig(device="cuda", calibrate=False, slots_per_layer=2,
                                                     pack_experts=pack))
        assert isinstance(m.offload_cache.store, PackedHostExpertStore) == (pack == "auto")
        runs.append(greedy(m, PROMPT, 4))
        del m
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_gpu_host_empty_is_pinned_at_its_size(monkeypatch):
    """offload.pinned.host_empty: a tensor past EXACT_FROM bytes, not a power of two, page-locked in place
    (cudaHostRegister on an exact mapping), so torch's allocator does not round it up; copies to and
    from the GPU are asynchronous and exact."""
    from offload import pinned
    from offload.pinned import EXACT_FROM, host_empty

    def refuse(*a):
        raise AssertionError("host_empty fell back to torch's rounded pinned allocator")
    monkeypatch.setattr(pinned, "_torch_pinned", refuse)  # the exact mapping must have been registered
    shape = (3, EXACT_FROM // 4 + 1000)
    t = host_empty(shape, torch.bfloat16, pin=True)
    assert t.shape == shape and t.is_pinned() and t.data_ptr() % 4096 == 0
    assert t.untyped_storage().nbytes() == t.numel() * 2  # exactly its bytes
    base = t._base
    t.copy_(torch.randn(shape).to(torch.bfloat16))
    d = t.to("cuda", non_blocking=True)
    back = host_empty(shape, torch.bfloat16, pin=True)
    back.copy_(d, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, t)
    del t, base, back
    import gc
    gc.collect()  # unregistered and unmapped with its last view


def test_gpu_budget_from_fraction_and_calibration():
    model = tiny_model("mixtral")
    m = apply_offload(twin(model), OffloadConfig(gpu_memory=0.5, device="cuda", cpu_fallback=True))
    cm = m.offload_cache.cost_model
    assert cm.copy_bytes_per_s > 1e8 and cm.cpu_per_token_s > 0  # measured on this machine
    greedy(m, PROMPT, 2)


def test_gpu_cache_current_stream_is_torchs_and_waits_land_on_it():
    """ExpertCache.current_stream() (kept Stream objects keyed by the raw handle) names the stream torch would,
    on the default stream and inside a side stream's context, and a wait under a side stream is that stream's."""
    model = tiny_model("mixtral")
    want = greedy(twin(model).cuda(), PROMPT, 4)
    m = apply_offload(twin(model), OffloadConfig(device="cuda", calibrate=False, slots_per_layer=2))
    cache = m.offload_cache
    side = torch.cuda.Stream()
    for _ in range(2):  # the second round reads the kept objects
        assert cache.current_stream().cuda_stream == torch.cuda.current_stream().cuda_stream
        with torch.cuda.stream(side):
            assert cache.current_stream().cuda_stream == side.cuda_stream
            slots = cache.ensure(0, [0, 1], wait=False)
            cache.wait(0, slots)
            assert cache._waited[0][slots[0]] == side.cuda_stream
            cache.release(0, slots)
    assert len(cache._streams) == 2
    torch.cuda.synchronize()
    got = greedy(m, PROMPT, 4)  # and offloaded decoding through it still equals resident
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy,slots,pack,prefetch", [
    ("lru", 1, False, "none"), ("lru", 3, False, "none"), ("lfu", 3, False, "none"), ("lru", 1, True, "none"),
    ("lfu", 3, True, "none"), ("lfu", 3, False, "next_layer_gate"), ("lru", 2, True, "next_layer_gate"),
    ("lru", 2, False, "attention")])
def test_gpu_device_driver_equals_resident_and_replays_in_one_graph(policy, slots, pack, prefetch):
    """driver='device' on the GPU: the fill kernel reads missed experts from pinned host memory itself; greedy
    decoding equals the resident model's, and with the triton experts a whole decode step captures as one
    CUDA graph (no host sync) whose replays give eager's tokens while the cache keeps deciding inside them."""
    from moe.cuda_graph import DecodeGraphs, graph_support
    model = tiny_model("mixtral")
    if pack:  # packed stores hold bfloat16 experts: the reference is the same cache over the bfloat16 store, bit for bit
        model = twin(model).to(torch.bfloat16)
        want = greedy(apply_offload(twin(model), OffloadConfig(device="cuda", calibrate=False, slots_per_layer=slots,
                                                               policy=policy, driver="device", pack_experts=False,
                                                               prefetch=prefetch)), PROMPT, 6)
    else:
        want = greedy(twin(model).cuda(), PROMPT, 6)
    m = apply_offload(twin(model), OffloadConfig(device="cuda", calibrate=False, slots_per_layer=slots, policy=policy,
                                                 driver="device", pack_experts=pack, prefetch=prefetch))
    assert m.offload_cache.store.pinned and m.offload_cache.pool_w13[0].is_cuda
    assert (m.offload_cache.packed is not None) == pack
    got = greedy(m, PROMPT, 6)
    if pack:
        assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    assert got[0] == want[0]
    m.set_backend("triton")
    assert graph_support(m) is None
    runs = {}
    with torch.inference_mode():
        for graph in (False, True):
            cache = m.new_cache(1, 64)
            ids = m(torch.tensor([PROMPT], device="cuda"), cache=cache, last_only=True).argmax(-1)
            valid = torch.ones(1, 1, dtype=torch.bool, device="cuda")
            graphs = DecodeGraphs(m, cache) if graph else None
            m.offload_cache.reset_stats()
            toks, logits, length = [], [], len(PROMPT)
            for _ in range(10):
                out = graphs.step(ids, valid, length) if graph else m(ids, cache=cache)
                logits.append(out[:, -1].float().clone())  # (a graph writes into one static buffer)
                ids = out[:, -1].argmax(-1, keepdim=True)
                toks.append(int(ids))
                length += 1
            runs[graph] = toks, torch.cat(logits), m.offload_cache.stats()
    assert runs[True][0] == runs[False][0]
    tol = 3e-2 if pack else 1e-4  # (bfloat16 logits: graph steps attend over a padded width)
    torch.testing.assert_close(runs[True][1], runs[False][1], atol=tol, rtol=tol)
    if slots < 8:
        assert runs[True][2]["misses"] > 0 and runs[True][2]["copies"] >= runs[True][2]["misses"]  # decided in the graph
    if prefetch != "none":  # the side stream's prefetches, captured in the graph too
        assert runs[True][2]["prefetches"] > 0 and runs[True][2]["useful_prefetches"] > 0


@pytest.mark.parametrize("driver,slots,chunk", [("device", 1, None), ("auto", 2, None), ("device", 3, None),
                                               ("device", 2, 3)])
def test_gpu_engine_serves_batches_under_the_device_driver(driver, slots, chunk):
    """The serving engine's path with the GPU-decided cache: requests join and leave a batch of up to 4 (prefills
    of several tokens run in rounds over the slots, decode steps of 1-4 rows replay one CUDA graph each); the
    texts are the resident model's engine's. driver='auto' takes the device driver here (a GPU, triton experts).
    chunk: the offloaded engine feeds prompts 3 tokens a step (chunked prefill beside graph-replayed decode rows)."""
    import moe
    from moe import tiny
    from moe.cuda_graph import DecodeGraphs
    from moe.generate import Engine
    from offload.device_cache import DeviceExpertCache

    # the embedded default model (6 layers x 8 experts, top-2) where there is one, else the tiny one (2 x 4)
    path = tiny.ASSETS_DEFAULT if tiny.default_model_is_embedded() else tiny.ensure_tiny_model()
    tok = moe.Tokenizer.from_dir(path)
    prompts = ["def f(x):", "import os\nimport", "class A:\n    pass", "for i in range(10):\n", "x = [1, 2"]
    params = moe.SamplingParams(max_new_tokens=10)

    def serve(m, prefill_chunk=None):
        eng = Engine(m, tok, max_batch_size=4, max_len=128, prefill_chunk=prefill_chunk)
        assert isinstance(eng._graphs, DecodeGraphs)
        ids = [eng.add_request(p, params) for p in prompts[:2]]
        texts = {}
        steps = 0
        while eng.has_unfinished():
            for out in eng.step():
                texts[out.request_id] = texts.get(out.request_id, "") + out.new_text
            steps += 1
            if steps == 3:  # three more join a running batch (one waits for a free row)
                ids += [eng.add_request(p, params) for p in prompts[2:]]
        return [texts[i] for i in ids]

    resident = moe.load_model(path, dtype=torch.float32, device="cuda").eval()
    resident.set_backend("triton")
    want = serve(resident)
    m = moe.load_model(path, dtype=torch.float32, device="cuda").eval()
    m = apply_offload(m, OffloadConfig(slots_per_layer=slots, device="cuda", calibrate=False, backend="triton",
                                       driver=driver))
    assert isinstance(m.offload_cache, DeviceExpertCache)
    assert serve(m, chunk) == want
    st = m.offload_cache.stats()
    assert st["misses"] > 0 and st["hits"] > 0


@pytest.mark.parametrize("driver", ["device", "host"])
def test_gpu_engine_warm_up_under_offloading_changes_no_text(driver):
    """Engine.warm_up on an offloaded model (the device driver's whole-step graphs, the host path's graph pieces):
    it captures every decode bucket, leaves the cache's statistics at zero, and the texts served after it are the
    resident model's."""
    import moe
    from moe import tiny
    from moe.generate import Engine

    path = tiny.ASSETS_DEFAULT if tiny.default_model_is_embedded() else tiny.ensure_tiny_model()
    tok = moe.Tokenizer.from_dir(path)
    prompts = ["def f(x):", "import os\nimport", "class A:\n    pass"]
    params = moe.SamplingParams(max_new_tokens=12)

    def serve(m, warm):
        eng = Engine(m, tok, max_batch_size=2, max_len=96)
        eng._graphs.bucket = 32  # three buckets: 32, 64, 96
        if warm:
            eng.warm_up(max_prompt=40)
            assert eng._graphs.captured == [32, 64, 96]
            if hasattr(m, "offload_cache"):
                st = m.offload_cache.stats()
                assert st["hits"] + st["misses"] == 0
        texts = {}
        ids = [eng.add_request(p, params) for p in prompts]
        while eng.has_unfinished():
            for out in eng.step():
                texts[out.request_id] = texts.get(out.request_id, "") + out.new_text
        return [texts[i] for i in ids]

    resident = moe.load_model(path, dtype=torch.float32, device="cuda").eval()
    resident.set_backend("triton")
    want = serve(resident, warm=False)
    m = moe.load_model(path, dtype=torch.float32, device="cuda").eval()
    m = apply_offload(m, OffloadConfig(slots_per_layer=2, device="cuda", calibrate=False, backend="triton",
                                       driver=driver))
    assert serve(m, warm=True) == want
