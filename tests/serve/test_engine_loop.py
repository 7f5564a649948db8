"""The replica's continuous-batching loop and request handling, in-process on the tiny model (no Ray)."""
import asyncio

import pytest
import torch

from serve.api import ServeLimits, parse_chat, parse_completion
from serve.engine_deployment import (EngineFailedError, EngineLoop, LoadedEngine, ModelReplica, QueueFullError,
                                     moe_api)

Engine, Tokenizer, SamplingParams = moe_api()


@pytest.fixture(scope="module")
def tiny():
    import moe
    from moe.tiny import ensure_tiny_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 intra-op threads crawl on a loaded 2-core machine
    path = str(ensure_tiny_model())
    try:
        yield moe.load_model(path), Tokenizer.from_dir(path)
    finally:
        torch.set_num_threads(threads)


def _alone(tiny, prompt, n):
    from moe.generate import generate
    return generate(*tiny, [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


async def _drain(loop, slot):
    return [o async for o in loop.stream(slot)]


def test_a_request_joins_a_running_batch_and_both_match_running_alone(tiny):
    model, tok = tiny
    p = lambda n: SamplingParams(max_new_tokens=n, ignore_eos=True)  # noqa: E731

    async def main():
        loop = EngineLoop(Engine(model, tok, max_batch_size=4, max_len=128), max_batch_size=4, max_waiting=4)
        a = loop.submit("def first(x):", p(20))
        outs_a = []
        agen = loop.stream(a)
        for _ in range(5):
            outs_a.append(await agen.__anext__())
        b = loop.submit("class Second:", p(6))
        outs_b = await _drain(loop, b)
        assert not a.finished  # b joined and left while a kept running
        outs_a += [o async for o in agen]
        loop.shutdown()
        return outs_a, outs_b

    outs_a, outs_b = asyncio.run(main())
    assert "".join(o.new_text for o in outs_a) == _alone(tiny, "def first(x):", 20)
    assert "".join(o.new_text for o in outs_b) == _alone(tiny, "class Second:", 6)
    assert [o.finished for o in outs_b] == [False] * 5 + [True]


def test_more_requests_than_rows_all_complete(tiny):
    model, tok = tiny
    prompts = [f"x{i} = {i}" for i in range(5)]

    async def main():
        loop = EngineLoop(Engine(model, tok, max_batch_size=2, max_len=64), max_batch_size=2, max_waiting=3)
        slots = [loop.submit(pr, SamplingParams(max_new_tokens=4, ignore_eos=True)) for pr in prompts]
        with pytest.raises(QueueFullError, match="queue"):
            loop.submit("one too many", SamplingParams(max_new_tokens=1))
        res = await asyncio.gather(*(_drain(loop, s) for s in slots))
        assert loop.counts() == (0, 0)
        loop.submit("room again", SamplingParams(max_new_tokens=1))  # capacity is released on finish
        loop.shutdown()
        return res

    res = asyncio.run(main())
    assert ["".join(o.new_text for o in r) for r in res] == [_alone(tiny, pr, 4) for pr in prompts]


def test_leaving_the_stream_aborts_the_request_in_the_engine(tiny):
    model, tok = tiny

    async def main():
        engine = Engine(model, tok, max_batch_size=2, max_len=256)
        loop = EngineLoop(engine, max_batch_size=2, max_waiting=0)
        slot = loop.submit("while True:", SamplingParams(max_new_tokens=200, ignore_eos=True))
        agen = loop.stream(slot)
        await agen.__anext__()
        await agen.aclose()  # what a client disconnect does to the replica's generator
        for _ in range(200):
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        steps = loop.steps
        loop.shutdown()
        return engine.has_unfinished(), steps, loop.counts()

    unfinished, steps, counts = asyncio.run(main())
    assert not unfinished and steps < 200 and counts == (0, 0)


class _BreaksOnStep:
    """An engine whose third step raises, as a GPU fault would."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.engine.step()


def breaking_factory(spec):
    import moe
    from moe.tiny import ensure_tiny_model
    path = str(ensure_tiny_model())
    tok = Tokenizer.from_dir(path)
    return LoadedEngine(_BreaksOnStep(Engine(moe.load_model(path), tok, max_batch_size=2, max_len=64)), tok,
                        max_len=64)


def test_engine_failure_fails_requests_cleanly_and_marks_the_replica_unhealthy(tiny):
    lim = ServeLimits(max_waiting=2)

    async def main():
        rep = ModelReplica({"engine_factory": "tests.serve.test_engine_loop:breaking_factory",
                            "max_batch_size": 2, "limits": lim.to_dict()})
        rep.check_health()
        req = parse_completion({"prompt": "abc", "max_tokens": 20, "ignore_eos": True}, ["m"], lim).to_dict()
        events = [e async for e in rep.generate(req)]
        with pytest.raises(EngineFailedError, match="illegal memory access"):
            rep.check_health()
        after = [e async for e in rep.generate(req)]
        rep.loop.shutdown()
        return events, after

    events, after = asyncio.run(main())
    assert events[0]["type"] == "start" and events[-1]["type"] == "error" and events[-1]["status"] == 500
    assert "illegal memory access" in events[-1]["error"]["message"]
    assert after[0]["type"] == "error" and after[0]["status"] == 503


def test_replica_checks_prompts_and_queue_bound(tiny):
    lim = ServeLimits(max_prompt_tokens=40, max_tokens=50, max_waiting=0)

    async def main():
        rep = ModelReplica({"model": "tiny", "device": "cpu", "max_batch_size": 1, "max_len": 64,
                            "limits": lim.to_dict(), "torch_threads": 1})
        long = parse_completion({"prompt": [100] * 41}, ["m"], lim).to_dict()
        too_long = [e async for e in rep.generate(long)]
        ctx = parse_completion({"prompt": [100] * 15, "max_tokens": 50}, ["m"], lim).to_dict()
        over_ctx = [e async for e in rep.generate(ctx)]
        chat = parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0},
                          ["m"], lim).to_dict()
        first = rep.generate(chat)
        start = await first.__anext__()
        busy = [e async for e in rep.generate(chat)]  # the one row is taken, no queue: 429
        rest = [e async for e in first]
        rep.loop.shutdown()
        return too_long, over_ctx, start, busy, rest, rep.snapshot()

    too_long, over_ctx, start, busy, rest, snap = asyncio.run(main())
    assert too_long[0]["status"] == 400 and "has 41 tokens; the limit is 40 tokens" in too_long[0]["error"]["message"]
    assert over_ctx[0]["status"] == 400 and over_ctx[0]["error"]["code"] == "context_length_exceeded"
    assert "asks for 65 (15 in the prompt, 50 in the completion)" in over_ctx[0]["error"]["message"]
    assert start == {"type": "start", "prompt_tokens": len(tiny[1].encode(
        tiny[1].apply_chat_template([{"role": "user", "content": "hi"}])))}
    assert busy == [{"type": "error", "status": 429, "error": busy[0]["error"]}]
    assert busy[0]["error"]["code"] == "queue_full"
    assert rest[-1]["finished"] and sum(e["num_tokens"] for e in rest) <= 3
    assert snap["running"] == 0 and snap["waiting"] == 0 and snap["steps"] >= 1
    assert len(snap["expert_load"]) == 2 and all(sum(layer) > 0 for layer in snap["expert_load"])


def _run_replica(cfg, prompt: str, max_tokens: int):
    """One greedy completion through a ModelReplica built from ``cfg``: (events, snapshot)."""
    async def main():
        rep = ModelReplica(cfg.replica_spec("cpu"))
        req = parse_completion({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0},
                               ["m"], ServeLimits()).to_dict()
        events = [e async for e in rep.generate(req)]
        snap = rep.snapshot()
        rep.shutdown()  # its CPU hosts are Ray actors when the session's Ray runs: free their CPUs
        return events, snap

    return asyncio.run(main())


def test_offloaded_replica_reports_cache_stats_and_matches_resident_output(tiny):
    from serve.app import ServeConfig
    cfg = ServeConfig(model="tiny", device="cpu", max_batch_size=2, max_len=64, replica_cpus=1,
                      offload_options={"slots_per_layer": 2, "calibrate": False})
    prompt = "def first(x):"

    events, snap = _run_replica(cfg, prompt, 8)
    assert "".join(e["text"] for e in events[1:]) == _alone(tiny, prompt, 8)
    comp = snap["components"]
    assert snap["strategy"] == "offload" and comp["misses"] > 0 and comp["hits"] + comp["misses"] > 0
    assert "prefetch_precision" not in comp  # prefetch is off


def test_offloaded_replica_refuses_a_budget_too_small_before_the_weights_load(monkeypatch):
    """A replica whose gpu_memory cannot hold one layer's active experts says so from the model's shapes, before
    it reads the checkpoint (on a 90 GB model that is minutes of every replica's start)."""
    import moe
    from serve.app import ServeConfig
    monkeypatch.setattr(moe, "load_model", lambda *a, **k: pytest.fail("the weights were read"))
    cfg = ServeConfig(model="tiny", device="cpu", max_batch_size=2, max_len=64, replica_cpus=1, gpu_memory="1MiB")
    with pytest.raises(ValueError, match=r"gpu_memory='1MiB' cannot hold one layer's 2 active experts"):
        ModelReplica(cfg.replica_spec("cpu"))


def test_offloaded_replica_counts_its_kv_cache_in_the_budget(tiny):
    """The replica's engine makes a KV cache of max_batch_size rows x max_len up front; the offload budget takes it
    first (it was left out: a --gpu-memory held the slots, and the cache came on top). A budget with room for one
    slot a layer plus half that cache is refused, naming the cache's bytes; with the whole cache, it serves."""
    import moe
    from moe.tiny import ensure_tiny_model
    from offload.apply import _fmt_bytes, _model_bytes, kv_cache_bytes
    from serve.app import ServeConfig
    model, _ = tiny
    sk = moe.checkpoint.model_skeleton(str(ensure_tiny_model()))
    kv = kv_cache_bytes(sk.config, 2, 64, sk.dtype)
    L = len(sk.moe_blocks())
    eb, dense = _model_bytes(sk, sk.moe_blocks())  # (its counting is tested in tests/offload/test_config_store.py)
    assert 0 < kv // 2 < L * eb  # (the case this test needs: half the cache fits beside one slot a layer, not all)

    def cfg(budget):
        return ServeConfig(model="tiny", device="cpu", max_batch_size=2, max_len=64, replica_cpus=1,
                           gpu_memory=str(budget), offload_options={"reserve_bytes": 0, "calibrate": False})
    with pytest.raises(ValueError, match=f"KV cache {_fmt_bytes(kv)}"):
        ModelReplica(cfg(dense + L * eb + kv // 2).replica_spec("cpu"))
    events, snap = _run_replica(cfg(dense + L * eb + kv), "def first(x):", 4)
    assert snap["strategy"] == "offload" and "".join(e["text"] for e in events[1:]) == _alone(tiny, "def first(x):", 4)


def test_offloaded_replica_chunks_prefills_inside_its_reserve(tiny):
    """moe serve --gpu-memory with --prefill-chunk auto (the default): the replica's engine feeds prompts in the
    chunk whose step, beside the other --max-batch-size rows decoding, fits the reserve (offload.prefill_chunk_for,
    step_activation_bytes), and serves the
    resident model's text; a number is taken as given, 'off' feeds whole prompts, and a bad value is refused."""
    import moe
    from moe.tiny import ensure_tiny_model
    from offload import step_activation_bytes
    from serve.app import ServeConfig
    sk = moe.checkpoint.model_skeleton(str(ensure_tiny_model()))
    reserve = step_activation_bytes(sk.config, 2, 16, 64, sk.dtype)  # a step of 16 prompt tokens fits, 32 do not

    def cfg(**kw):
        return ServeConfig(model="tiny", device="cpu", max_batch_size=2, max_len=64, replica_cpus=1,
                           gpu_memory="300MiB", offload_options={"reserve_bytes": reserve, "calibrate": False}, **kw)
    prompt = "import os\nimport sys\n\nclass Config(object):\n    pass\n"
    assert len(tiny[1].encode(prompt)) > 16
    for c, chunk in ((cfg(), 16), (cfg(prefill_chunk="off"), None), (cfg(prefill_chunk="5"), 5)):
        assert c.replica_spec("cpu")["prefill_chunk"] == (chunk if chunk != 16 else "auto")
        rep = ModelReplica(c.replica_spec("cpu"))
        assert rep.loaded.engine.prefill_chunk == chunk
        rep.shutdown()
    events, _ = _run_replica(cfg(), prompt, 4)
    assert "".join(e["text"] for e in events[1:]) == _alone(tiny, prompt, 4)
    for bad in (0, "many", True):
        with pytest.raises(ValueError, match="prefill_chunk"):
            cfg(prefill_chunk=bad)
    # resident: whole prompts unless asked
    assert ModelReplica(ServeConfig(model="tiny", device="cpu", max_batch_size=2, max_len=64).replica_spec(
        "cpu")).loaded.engine.prefill_chunk is None


def test_offloaded_replica_loads_the_predictor_and_probes_it_is_given(tiny, tmp_path):
    """moe serve --offload-policy predictor --offload-prefetch predictor --offload-predictor P.npz (with
    P.probe.npz beside it) --offload-prefetch-budget 1: the replica loads the files itself (the spec
    carries their paths) and its output is the resident model's."""
    import numpy as np

    from routing import PathPredictor, PredictorConfig, ProbeLookahead, hidden_matrix, record_sequences
    from routing.cli import probe_path
    from serve.app import ServeConfig
    model, tok = tiny
    trace, feats = record_sequences(model, np.random.default_rng(0).integers(1, 300, (6, 16)).tolist(),
                                    hidden_layers="all")
    pred = PathPredictor.fit(trace, PredictorConfig(fit_iters=2)).save(tmp_path / "p.npz")
    ProbeLookahead.fit(trace, hidden_matrix(feats, trace.num_layers)).save(probe_path(pred))
    cfg = ServeConfig(model="tiny", device="cpu", max_batch_size=2, max_len=64, replica_cpus=1,
                      offload_policy="predictor", offload_prefetch="predictor", offload_predictor=str(pred),
                      offload_prefetch_budget=1, offload_options={"slots_per_layer": 2, "calibrate": False})
    spec = cfg.replica_spec("cpu")
    assert spec["offload"]["prefetch_budget"] == 1.0 and spec["offload_files"]["predictor_file"] == str(pred)
    assert "predictor" not in spec["offload"]  # a path travels to the replica, not the loaded object
    prompt = "def first(x):"
    events, snap = _run_replica(cfg, prompt, 8)
    assert "".join(e["text"] for e in events[1:]) == _alone(tiny, prompt, 8)
    comp = snap["components"]
    assert snap["strategy"] == "offload" and comp["hits"] + comp["misses"] > 0
    assert "prefetch_precision" in comp  # the predictor prefetched
    with pytest.raises(ValueError, match="set without offloading"):
        ServeConfig(model="tiny", offload_predictor=str(pred))
    with pytest.raises(ValueError, match="offload_predictor file 'nope.npz' not found"):
        ServeConfig(model="tiny", offload_predictor="nope.npz", offload_options={"slots_per_layer": 2})
    with pytest.raises(ValueError, match="goes with"):
        ServeConfig(model="tiny", offload_predictor=str(pred), offload_options={"slots_per_layer": 2})


def test_stream_chunks_hands_over_everything_that_arrived_in_one_piece(tiny):
    model, tok = tiny

    async def main():
        loop = EngineLoop(Engine(model, tok, max_batch_size=1, max_len=64), max_batch_size=1, max_waiting=0)
        slot = loop.submit("abc", SamplingParams(max_new_tokens=6, ignore_eos=True))
        while not slot.finished:  # a consumer that does not read while the request runs
            await asyncio.sleep(0.01)
        chunks = [c async for c in loop.stream_chunks(slot)]
        loop.shutdown()
        return chunks

    chunks = asyncio.run(main())
    assert len(chunks) == 1 and len(chunks[0]) == 6 and chunks[0][-1].finished
    assert "".join(o.new_text for o in chunks[0]) == _alone(tiny, "abc", 6)


def test_stream_interval_sends_the_first_token_alone_then_groups(tiny):
    lim = ServeLimits()

    async def main():
        rep = ModelReplica({"model": "tiny", "device": "cpu", "max_batch_size": 1, "max_len": 64,
                            "limits": lim.to_dict(), "torch_threads": 1, "stream_interval": 4})
        req = parse_completion({"prompt": "abc", "max_tokens": 10, "ignore_eos": True, "temperature": 0}, ["m"],
                               lim).to_dict()
        events = [e async for e in rep.generate(req)]
        rep.loop.shutdown()
        return events

    deltas = [e for e in asyncio.run(main()) if e["type"] == "delta"]
    sizes = [e["num_tokens"] for e in deltas]
    assert sizes[0] == 1 and sum(sizes) == 10 and all(n >= 4 for n in sizes[1:-1]) and deltas[-1]["finished"]
    assert "".join(e["text"] for e in deltas) == _alone(tiny, "abc", 10)
    with pytest.raises(ValueError, match="stream_interval"):
        ModelReplica({"model": "tiny", "device": "cpu", "stream_interval": 0})


def test_replica_with_cpu_hosts_matches_resident_output_and_reports_tiers(tiny):
    """`moe serve --gpu-memory ... --cpu-hosts 2`: misses shared between copies and 2 CPU hosts
    (threads, or Ray actors when the test session's Ray runs), same text, per-tier counters in the
    snapshot and /metrics."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.exposition import generate_latest

    from serve.app import ServeConfig
    from serve.metrics import EngineSnapshotCollector

    cfg = ServeConfig(model="tiny", device="cpu", max_batch_size=2, max_len=64, replica_cpus=1,
                      offload_options={"slots_per_layer": 1, "calibrate": False}, cpu_hosts=2)
    prompt = "def first(x):"

    events, snap = _run_replica(cfg, prompt, 8)
    assert "".join(e["text"] for e in events[1:]) == _alone(tiny, prompt, 8)
    comp = snap["components"]
    assert snap["strategy"] == "offload+cpu-hosts"
    # cache hits run in the inner (GPU cache) tier, the rest of the misses on the hosts
    assert comp["misses"] > 0 and comp["cpu_pairs"] > 0 and comp["gpu_rank_pairs"] > 0
    reg = CollectorRegistry()
    col = EngineSnapshotCollector()
    col.update([snap], now=0.0)
    reg.register(col)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    tiers = {s.labels["tier"]: s.value for s in fams["moeflow_tier_expert_tokens"].samples
             if s.name.endswith("_total")}
    assert tiers["cpu_host"] == comp["cpu_pairs"] and tiers["gpu"] == comp["gpu_rank_pairs"]


def test_cpu_hosts_need_an_expert_cache():
    from serve.app import ServeConfig
    with pytest.raises(ValueError, match="needs an expert cache"):
        ServeConfig(model="tiny", device="cpu", cpu_hosts=2)
    with pytest.raises(ValueError, match="cpu_hosts"):
        ServeConfig(model="tiny", device="cpu", cpu_hosts=-1)


def test_replica_loads_the_expert_backend_its_spec_names(monkeypatch):
    """backend 'auto' resolves on the replica's device (torch on this CPU; triton on a GPU: kernels.resolve_backend),
    a named one is kept; an offloaded replica loads its weights into host memory first (the experts stay there)."""
    from kernels import resolve_backend
    from serve.engine_deployment import load_engine
    assert resolve_backend("auto", "cpu") == "torch" and resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(ValueError, match="unknown expert backend"):
        resolve_backend("cuda-magic", "cpu")
    with monkeypatch.context() as mp:  # (CI interprets Triton on the CPU, where it would run: not here)
        mp.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="needs a CUDA device"):
            load_engine({"model": "tiny", "device": "cpu", "backend": "triton"})
    for spec in ({"model": "tiny", "device": "cpu", "max_len": 64},
                 {"model": "tiny", "device": "cpu", "max_len": 64, "backend": "torch",
                  "offload": {"slots_per_layer": 2, "calibrate": False, "device": "cpu"}}):
        loaded = load_engine(spec)
        try:
            assert {b.experts.backend for b in loaded.model.moe_blocks()} == {"torch"}
        finally:
            loaded.close()


def test_a_replica_whose_max_len_exceeds_the_trained_context_says_so(tiny, caplog):
    """--max-len past the model's max_position_embeddings still serves (rotary positions compute) but the load logs
    a warning with the numbers and the fix; within it, nothing."""
    import logging

    from serve.app import ServeConfig
    trained = tiny[0].config.max_position_embeddings
    with caplog.at_level(logging.WARNING):
        ModelReplica(ServeConfig(model="tiny", device="cpu", max_batch_size=1, max_len=trained + 1).replica_spec("cpu"))
    assert f"max_len {trained + 1} exceeds the model's context of {trained} tokens" in caplog.text
    assert f"lower --max-len to {trained}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ModelReplica(ServeConfig(model="tiny", device="cpu", max_batch_size=1, max_len=64).replica_spec("cpu"))
    assert "exceeds the model's context" not in caplog.text
