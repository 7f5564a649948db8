"""prefetch='attention': the next MoE layer's own attention on layer l's pre-expert residual, then its router
(point C of benchmarks/lookahead_points.py), as the next-layer guess a layer prefetches."""
import importlib.util
from pathlib import Path

import pytest
import torch

from offload import OffloadConfig, apply_offload
from offload.apply import install
from offload.prefetch import AttentionRouter, attention_routers
from offload.store import HostExpertStore

from .helpers import StandInLM, greedy, offloaded, tiny_model

PROMPT = [3, 17, 5, 9, 30]
STEPS = 6

pytest.importorskip("moe.model")


@pytest.fixture(scope="module")
def pair():
    """(the tiny mixtral model, its resident greedy decode of PROMPT: tokens and logits)"""
    m = tiny_model("mixtral")
    return m, greedy(m, PROMPT, STEPS)


@pytest.fixture(scope="module")
def model(pair):
    return pair[0]


def _same(want, got):
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)
    assert got[0] == want[0]


@pytest.mark.parametrize("kw", [dict(policy="lru", slots_per_layer=3), dict(policy="lfu", slots_per_layer=2),
                                dict(policy="lru", slots_per_layer=3, cpu_fallback=True),
                                dict(policy="lru", slots_per_layer=2, driver="device"),
                                dict(policy="lfu", slots_per_layer=3, driver="device"),
                                dict(policy="lru", slots_per_layer=1), dict(policy="lfu", slots_per_layer=1, driver="device")])
def test_attention_prefetch_keeps_output(pair, kw):
    """The guess's attention writes the next layer's KV-cache slots for the current tokens; that layer's own
    attention overwrites them, so the text and logits stay the resident model's (host and device drivers; one slot
    a layer, fewer than the top-k guesses prefetched)."""
    model, resident = pair
    m = offloaded(model, prefetch="attention", prefetch_k=2, **kw)
    assert all(isinstance(b.experts._next_router[0], AttentionRouter) for b in m.moe_blocks()[:-1])
    assert m.moe_blocks()[-1].experts._next_router[0] is None
    _same(resident, greedy(m, PROMPT, STEPS))
    st = m.offload_cache.stats()
    assert st["prefetches"] > 0 and 0 < st["prefetch_precision"] <= 1 and 0 < st["prefetch_recall"] <= 1


@pytest.mark.parametrize("driver", ["host", "device"])
def test_attention_prefetches_every_guess_by_default(model, driver):
    """Point C's guesses are mostly right, so by default a layer prefetches all top-k of them (s29-g: all 8 were
    fastest); the gate trick's, mostly wrong in their tail, half; prefetch_k, when given, wins over both."""
    top_k = model.config.num_experts_per_tok
    for prefetch, k, want in (("attention", 0, top_k), ("next_layer_gate", 0, -(-top_k // 2)), ("attention", 1, 1)):
        m = offloaded(model, prefetch=prefetch, prefetch_k=k, policy="lru", slots_per_layer=3, driver=driver)
        assert {b.experts.guess_k for b in m.moe_blocks()} == {want}, (prefetch, k)


def _points():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "lookahead_points.py"
    spec = importlib.util.spec_from_file_location("lookahead_points", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@torch.no_grad()
def test_the_live_guess_is_the_measured_point_c(model):
    """What AttentionRouter guesses in a live decode is what benchmarks/lookahead_points.py measures as point C
    (the recalls of BENCHMARKS 7l and 7m): the same ids for every layer and token. And asking for it changes
    nothing the model computes."""
    seq = [3, 17, 5, 9, 30, 2, 11, 40, 7, 1, 22, 6]
    K = model.config.num_experts_per_tok
    _, kept = _points().attention_point(model, [seq], batch=1, keep_guesses=True)
    routers = attention_routers(model)
    got = {}
    hooks = []
    for l, r in enumerate(routers):
        if r is not None:
            def ask(mod, args, l=l, r=r):
                got.setdefault(l, []).append(r.forward(args[0].reshape(-1, args[0].shape[-1]))[0])
            hooks.append(model.layers[l].mlp.register_forward_pre_hook(ask))
    try:
        cache = model.new_cache(1, len(seq) + 1)
        with_guess = [model(torch.tensor([[t]]), cache)[0, -1] for t in seq]
    finally:
        for h in hooks:
            h.remove()
        for r in routers:
            if r is not None:
                r.remove()
    cache = model.new_cache(1, len(seq) + 1)
    plain = [model(torch.tensor([[t]]), cache)[0, -1] for t in seq]
    torch.testing.assert_close(torch.stack(with_guess), torch.stack(plain), atol=0, rtol=0)
    assert sorted(got) == list(range(len(model.layers) - 1))
    for l, ids in got.items():
        live = torch.cat(ids).numpy()  # [tokens, K]
        assert (live == kept[0][l, :, :K]).all(), f"layer {l}: live guesses differ from point C's"


def test_dense_layers_between_run_whole():
    """Qwen's mlp_only_layers: MoE layers 0 and 2 around a dense layer 1; layer 0's guess runs layer 1 whole
    (attention and dense MLP), then layer 2's attention and router; the output stays the resident model's."""
    m0 = tiny_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1])
    assert [hasattr(l.mlp, "router") for l in m0.layers] == [True, False, True]
    routers = attention_routers(m0)
    assert (routers[0].src, routers[0].dst) == (0, 2) and routers[1] is None
    for r in routers[:1]:
        r.remove()
    want = greedy(m0, PROMPT, 4)
    m = offloaded(m0, prefetch="attention", policy="lru", slots_per_layer=3, prefetch_k=2)
    _same(want, greedy(m, PROMPT, 4))
    assert m.offload_cache.stats()["prefetches"] > 0


def test_attention_prefetch_says_what_it_cannot_do(model):
    with pytest.raises(ValueError, match="needs moe's decoder layers"):
        apply_offload(StandInLM(), OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False, prefetch="attention"))
    m = tiny_model("mixtral")
    m.layers[1].window = 4  # a sliding window the layer before does not have
    with pytest.raises(ValueError, match="different windows.*next_layer_gate"):
        attention_routers(m)
    r = AttentionRouter(model.layers, 0, 1)
    try:
        with pytest.raises(RuntimeError, match="before that layer's attention ran"):
            r.forward(torch.zeros(1, model.config.hidden_size))
    finally:
        r.remove()
    blocks = list(tiny_model("mixtral").moe_blocks())
    store = HostExpertStore.from_blocks(blocks, pin=False)
    with pytest.raises(ValueError, match="pass install"):
        install(blocks, store, OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False, prefetch="attention",
                                             policy="lru", driver="host"), device=torch.device("cpu"), top_k=2, slots=2)


def test_cost_script_runs_and_keeps_logits(capsys):
    """benchmarks/attention_lookahead_cost.py on the CPU (eager steps: a check of the script, not a timing): the
    guesses computed inside the steps leave the logits bit for bit."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "attention_lookahead_cost.py"
    spec = importlib.util.spec_from_file_location("attention_lookahead_cost", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--models", "tiny", "--device", "cpu", "--batch", "1", "--steps", "3", "--prompt-len", "4"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "tiny" and row[-1] == "True"


def test_a_refused_model_keeps_its_experts_and_replaced_routers_unhook():
    """A model prefetch='attention' cannot run on is refused before any expert leaves it; a next router replaced
    (set_next_router, as the benchmarks do) takes its hooks off the layer."""
    m = tiny_model("mixtral", num_hidden_layers=3)
    m.layers[2].window = 4  # layer 0's router onto layer 1 is made, then layer 1's onto 2 is refused
    with pytest.raises(ValueError, match="different windows"):
        apply_offload(m, OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False, prefetch="attention"))
    assert all(b.experts is not None and hasattr(b.experts, "w13") for b in m.moe_blocks())
    assert not m.layers[0].attn._forward_pre_hooks  # the routers made before the refusal took their hooks off
    m = offloaded(tiny_model("mixtral"), slots_per_layer=2, prefetch="attention", policy="lru")
    attn = m.layers[0].attn
    assert len(attn._forward_pre_hooks) == 1
    m.moe_blocks()[0].experts.set_next_router(None)
    assert len(attn._forward_pre_hooks) == 0


@pytest.mark.parametrize("driver", ["host", "device"])
def test_batched_engine_generation_is_unchanged_with_attention_prefetch(driver):
    """Continuous batching (rows of different lengths joining and leaving, padding, idle rows) through experts
    that prefetch by the next layer's attention: the guesses write every row's next-layer KV slots, padding too, and
    the texts stay the resident model's."""
    import moe
    from moe import tiny

    path = tiny.ensure_tiny_model()
    model = moe.load_model(path, dtype=torch.float32).eval()
    tok = moe.Tokenizer.from_dir(path)
    prompts = ["def f(x):", "import os\nimport", "class A:\n    pass", "x"]
    params = [moe.SamplingParams(max_new_tokens=n) for n in (6, 3, 8, 5)]
    want = [moe.generate(model, tok, [p], q)[0] for p, q in zip(prompts, params)]
    m = offloaded(model, slots_per_layer=2, policy="lru", prefetch="attention", driver=driver)
    assert moe.generate(m, tok, prompts, params, max_batch_size=3) == want  # 4 requests, 3 rows: one waits
    assert m.offload_cache.stats()["prefetches"] > 0
    # the same with every step of rows feeding different counts packed (PackedStep in the attention mask's place:
    # the router's hook keeps it, and the guess's attention runs part by part on the rows' cache views)
    e = moe.Engine(m, tok, max_batch_size=3, max_len=64, cuda_graph=False)
    e.pack_tokens_per_part = 0
    rids = [e.add_request(p, q) for p, q in zip(prompts, params)]
    texts, packed = dict.fromkeys(rids, ""), []
    forward = m.forward

    def spy(*a, segments=None, **kw):
        packed.append(segments is not None)
        return forward(*a, segments=segments, **kw)
    m.forward = spy
    e._packed = True
    while e.has_unfinished():
        for o in e.step():
            texts[o.request_id] += o.new_text
    assert any(packed) and list(texts.values()) == want


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"])
def test_other_families_keep_output(family):
    """Shared experts (Qwen2-MoE), q/k norms (Qwen3, OLMoE), MLA attention and dense first layers (DeepSeek): the
    next layer's attention run early and overwritten leaves the text and logits the resident model's."""
    m0 = tiny_model(family)
    want = greedy(m0, PROMPT, 4)
    m = offloaded(m0, slots_per_layer=2, policy="lru", prefetch="attention")
    _same(want, greedy(m, PROMPT, 4))
    assert m.offload_cache.stats()["prefetches"] > 0


def _c_predictor(model):
    """A lean PathPredictor whose lookahead reads point C over probes (routing.AttentionLookahead), fitted on the
    model's own routing of random sequences (hidden states and C's logits recorded beside it)."""
    import numpy as np

    from routing import AttentionLookahead, PathPredictor, PopularityBaseline, PredictorConfig, ProbeLookahead
    from routing.record import hidden_matrix, record_trace
    from tests.conftest import load_benchmark

    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 60, (12,), generator=g).tolist() for _ in range(16)]
    trace, feats = record_trace(model, seqs)
    hidden = hidden_matrix(feats, trace.num_layers).astype(np.float32)
    _, logits = load_benchmark("predictor").attention_features(model, trace)
    probes = ProbeLookahead.fit(trace, hidden, span=1)
    look = AttentionLookahead(trace.num_layers, trace.num_experts, trace.top_k, base=probes,
                              fallback=PopularityBaseline.fit(trace))
    return PathPredictor.fit(trace, PredictorConfig(match_layers=0),
                             features={"hidden_NLD": np.concatenate([hidden, logits], -1)}, lookahead=look)


def test_a_predictor_reading_point_c_drives_the_cache_live():
    """policy/prefetch 'predictor' with a predictor whose lookahead reads point C: each offloaded layer hands it the
    hidden state with C's next-layer logits appended (its AttentionRouter runs the next layer's attention), and the
    text and logits stay the resident model's."""
    m0 = tiny_model("mixtral", num_hidden_layers=3)
    want = greedy(m0, PROMPT, STEPS)
    pred = _c_predictor(m0)
    widths = []
    real = pred.predict_batch

    def spy(prev, layer, known, features=None):
        widths.append(None if features is None else features["hidden_NLD"].shape[-1])
        return real(prev, layer, known, features)
    pred.predict_batch = spy
    m = offloaded(m0, slots_per_layer=3, policy="predictor", prefetch="predictor", predictor=pred,
                  prefetch_budget=2)
    assert [b.experts._attention_source[0] is not None for b in m.moe_blocks()] == [True, True, False]
    _same(want, greedy(m, PROMPT, STEPS))
    D, E = m0.config.hidden_size, m0.config.num_experts
    assert widths and set(widths) == {D + E}
    assert m.offload_cache.stats()["prefetches"] > 0


def test_graph_pieces_compute_point_c_for_the_predictor(monkeypatch):
    """In graph pieces (eager on the CPU) the piece that routes a layer also computes the predictor's C features
    and hands them to the experts (an eager run between pieces would read another bucket's captured arguments); the
    logits equal the model's own forward."""
    from moe.cuda_graph import PiecewiseDecodeGraphs
    from offload.apply import OffloadedExperts

    m0 = tiny_model("mixtral", num_hidden_layers=3)
    pred = _c_predictor(m0)

    def make():
        return offloaded(m0, slots_per_layer=3, policy="predictor", prefetch="predictor", predictor=pred,
                         prefetch_budget=2)

    def decode(model, pieces):
        cache = model.new_cache(1, 64)
        with torch.inference_mode():
            ids = model(torch.tensor([PROMPT]), cache=cache, last_only=True).argmax(-1)
            runner = PiecewiseDecodeGraphs(model, cache, capture=False) if pieces else None
            valid, out, length = torch.ones(1, 1, dtype=torch.bool), [], len(PROMPT)
            for _ in range(4):
                lg = runner.step(ids, valid, length) if runner else model(ids, cache=cache, num_slots=cache.max_len)
                out.append(lg[:, -1].clone())
                ids, length = lg[:, -1].argmax(-1, keepdim=True), length + 1
        return out

    want = decode(make(), False)
    handed = []
    real = OffloadedExperts.forward

    def spy(self, *a, **kw):
        handed.append(kw.get("features") is not None)
        return real(self, *a, **kw)
    monkeypatch.setattr(OffloadedExperts, "forward", spy)
    got = decode(make(), True)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert any(handed)  # the pieces handed the experts their features


def test_replacing_the_next_router_keeps_the_predictors_point_c():
    """prefetch='attention' with a predictor reading point C: one AttentionRouter a layer serves both. Replacing the
    next router (set_next_router, as the benchmarks do) must leave its hooks on for the predictor, whose features
    would otherwise come from a stale attention (and write the next layer's KV cache at stale slots)."""
    m0 = tiny_model("mixtral", num_hidden_layers=3)
    want = greedy(m0, PROMPT, STEPS)
    m = offloaded(m0, slots_per_layer=3, policy="predictor", prefetch="attention", predictor=_c_predictor(m0))
    e0 = m.moe_blocks()[0].experts
    assert e0._next_router[0] is e0._attention_source[0]
    e0.set_next_router(None)
    assert len(m.layers[0].attn._forward_pre_hooks) == 1
    _same(want, greedy(m, PROMPT, STEPS))
