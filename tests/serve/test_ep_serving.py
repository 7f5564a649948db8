"""A replica whose experts live on expert-parallel Ray actors (gloo ranks on the CPU) serves the
same greedy text as the single-process model, with continuous batching across its steps."""
import asyncio

import pytest
import torch

from serve.api import ServeLimits, parse_completion
from serve.app import ServeConfig
from serve.engine_deployment import ModelReplica, moe_api

Engine, Tokenizer, SamplingParams = moe_api()

PROMPTS = ["def first(x):", "class Second:", "import os\n", "return [i for i in"]


@pytest.fixture(scope="module")
def tiny():
    import moe
    from moe.tiny import ensure_tiny_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = str(ensure_tiny_model())
    try:
        yield path, moe.load_model(path), Tokenizer.from_dir(path)
    finally:
        torch.set_num_threads(threads)


def _alone(model, tok, prompt, n):
    from moe.generate import generate
    return generate(model, tok, [prompt], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]


def _serve_all(cfg, lengths):
    """Every prompt through one replica at once (they join and leave a batch of 2 rows)."""
    async def one(rep, prompt, n):
        req = parse_completion({"prompt": prompt, "max_tokens": n, "ignore_eos": True, "temperature": 0},
                               ["m"], ServeLimits()).to_dict()
        return "".join(e["text"] for e in [e async for e in rep.generate(req)] if e["type"] == "delta")

    async def main():
        rep = ModelReplica(cfg.replica_spec("cpu"))
        try:
            texts = await asyncio.gather(*(one(rep, p, n) for p, n in zip(PROMPTS, lengths)))
            return texts, rep.snapshot()
        finally:
            rep.shutdown()

    return asyncio.run(main())


@pytest.mark.parametrize("mode, decode, chunk", [
    ("coherent", "auto", None),  # decode steps: ExFlow's home-only decoding (placement/decode.py)
    ("standard", "home", None),
    ("coherent", "replicated", None),  # every rank runs the whole decode step
    ("adaptive", "auto", None),  # replicated: the adaptive layer has no homes
    ("coherent", "auto", 2),  # prompts fed 2 tokens a step (chunked prefill) on the ranks' caches
])
def test_expert_parallel_replica_equals_single_process(ray_session, tiny, tmp_path, mode, decode, chunk):
    path, model, tok = tiny
    plan = None
    if mode == "standard":  # a plan file that is not round robin: the first half of the experts on rank 1
        from placement.plan import PlacementPlan
        L, E = len(model.moe_blocks()), model.config.num_experts
        row = tuple(int(e < E // 2) for e in range(E))
        plan = str(PlacementPlan(assignment=(row,) * L, num_ranks=2, method="test").save(tmp_path / "p.json"))
    cfg = ServeConfig(model=path, device="cpu", max_batch_size=2, max_len=96, replica_cpus=0.1, ep_ranks=2,
                      ep_mode=mode, placement_plan=plan, ep_cpus_per_rank=0.1, ep_decode=decode,
                      prefill_chunk=chunk if chunk else "auto")
    lengths = [9, 4, 7, 5]
    texts, snap = _serve_all(cfg, lengths)
    for p, n, text in zip(PROMPTS, lengths, texts):
        assert text == _alone(model, tok, p, n)
    if mode == "adaptive":  # the strategy the adaptive layer ran reaches the snapshot (/metrics)
        assert snap["strategy"].startswith("expert-parallel-adaptive")
        assert snap["components"]["strategy"].startswith("expert-parallel-adaptive:")
        assert not snap["components"]["strategy"].endswith("none yet")
    else:
        assert snap["strategy"] == f"expert-parallel-{mode}"
        assert snap["components"]["cross_rank_tokens"] > 0


def test_expert_parallel_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ServeConfig(model="tiny", ep_ranks=2, placement_plan=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="ep_mode"):
        ServeConfig(model="tiny", ep_ranks=2, ep_mode="fast")
    with pytest.raises(ValueError, match="does not combine"):
        ServeConfig(model="tiny", ep_ranks=2, gpu_memory="1GiB")
    with pytest.raises(ValueError, match="ep_ranks"):
        ServeConfig(model="tiny", ep_ranks=-1)
    with pytest.raises(ValueError, match="ep_decode must be one of"):
        ServeConfig(model="tiny", ep_ranks=2, ep_decode="fast")
    with pytest.raises(ValueError, match="use ep_decode 'replicated' or 'auto'"):
        ServeConfig(model="tiny", ep_ranks=2, ep_mode="adaptive", ep_decode="home")
    plan = tmp_path / "p.json"
    plan.write_text("{}")
    with pytest.raises(ValueError, match="drop the placement plan"):
        ServeConfig(model="tiny", ep_ranks=2, ep_mode="adaptive", placement_plan=str(plan))
    assert ServeConfig.from_args({"ep_ranks": "2", "ep_cpus_per_rank": "0.2"}).expert_parallel()["ranks"] == 2


def test_a_rank_that_dies_mid_request_fails_it_cleanly_and_marks_the_replica_unhealthy(ray_session, tiny):
    """The expert-hosting rank actor dies during decoding: that request ends with an error event
    (not a hang, not wrong text), the replica reports unhealthy so Serve replaces it, and a new
    replica (new ranks) serves the single-process text again."""
    import ray
    from serve.engine_deployment import EngineFailedError

    path, model, tok = tiny
    cfg = ServeConfig(model=path, device="cpu", max_batch_size=2, max_len=96, replica_cpus=0.1, ep_ranks=2,
                      ep_cpus_per_rank=0.1)
    req = parse_completion({"prompt": PROMPTS[0], "max_tokens": 40, "ignore_eos": True, "temperature": 0},
                           ["m"], ServeLimits()).to_dict()

    async def broken():
        rep = ModelReplica(cfg.replica_spec("cpu"))
        try:
            events = []
            async for e in rep.generate(req):
                events.append(e)
                if e["type"] == "delta" and len(events) == 3:  # mid-request: kill rank 1
                    ray.kill(rep.loaded.model.runtime.workers[1], no_restart=True)
            with pytest.raises(EngineFailedError):
                rep.check_health()
            return events
        finally:
            rep.shutdown()

    events = asyncio.run(broken())
    assert events[0]["type"] == "start" and events[-1]["type"] == "error" and events[-1]["status"] == 500
    assert sum(e.get("num_tokens", 0) for e in events if e["type"] == "delta") < 40
    texts, _ = _serve_all(cfg, [6])  # the replacement replica: new ranks, correct text
    assert texts[0] == _alone(model, tok, PROMPTS[0], 6)


def test_greedy_tokens_false_leaves_the_engine_fetching_logits():
    """EPServeSettings.greedy_tokens=False (benchmarks/serving.py's -logits variants): the model offers no
    greedy_next, so the engine fetches rank 0's logits at every step, as before session 19."""
    from serve.ep_model import EPServeSettings, ExpertParallelModel
    assert EPServeSettings(ranks=2).greedy_tokens
    assert callable(ExpertParallelModel(None, None, torch.float32).greedy_next)
    assert ExpertParallelModel(None, None, torch.float32, greedy_tokens=False).greedy_next is None
