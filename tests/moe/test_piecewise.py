"""Piecewise decode (moe.cuda_graph.PiecewiseDecodeGraphs): the pieces around host-deciding experts
give the logits of model(); captured on a GPU, eager on the CPU."""
import pytest
import torch

from moe.cuda_graph import PiecewiseDecodeGraphs, piecewise_support
from offload import OffloadConfig, apply_offload

from ..offload.helpers import tiny_model


def _offloaded(family, device, slots=2, **cfg):
    m = tiny_model(family)
    if m is None or not hasattr(m, "layers"):
        pytest.skip("moe's MoEForCausalLM is needed")
    if cfg.get("predictor") == "fit_attention":  # a predictor reading point C, fitted on the model's own routing
        from ..offload.test_attention_prefetch import _c_predictor
        cfg = dict(cfg, predictor=_c_predictor(m))
    m = m.to(device)
    twin = tiny_model(family).to(device)
    if cfg.get("predictor") == "fit":  # a routing predictor of the model's shape
        from offload import TransitionPredictor
        from routing.synthetic import synthesize
        blocks = m.moe_blocks()
        cfg = dict(cfg, predictor=TransitionPredictor.fit(synthesize(
            num_layers=len(blocks), num_experts=blocks[0].experts.w13.shape[0], top_k=2, seed=0)))
    return twin.eval(), apply_offload(m, OffloadConfig(slots_per_layer=slots, device=str(device), calibrate=False,
                                                       backend="triton" if device.type == "cuda" else "torch",
                                                       **{"driver": "host", **cfg})).eval()


def _decode(model, steps, piecewise, device, B=2):
    cache = model.new_cache(B, 64)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 60, (B, 5), generator=g).to(device)
    with torch.inference_mode():
        ids = model(prompt, cache=cache, last_only=True).argmax(-1)
        valid = torch.ones(B, 1, dtype=torch.bool, device=device)
        valid[1] = False  # an idle row: its experts are -1, its length does not move
        runner = piecewise(model, cache) if piecewise else None
        out, length = [], 5
        for _ in range(steps):
            # the same attention width as the pieces' bucket (masked slots change nothing, but a
            # wider softmax may sum in another order)
            logits = runner.step(ids, valid, length) if runner else model(ids, cache=cache, valid_BT=valid,
                                                                          num_slots=cache.max_len)
            out.append(logits[:, -1].float().clone())
            ids = logits[:, -1].argmax(-1, keepdim=True)
            length += 1
    return out, cache.lengths.tolist()


@pytest.mark.parametrize("run_ahead", [True, False])
@pytest.mark.parametrize("family,slots", [("mixtral", 2), ("mixtral", 8), ("qwen2_moe", 2), ("deepseek_v3", 3)])
def test_pieces_equal_the_model_on_the_cpu(family, slots, run_ahead, monkeypatch):
    from offload.apply import OffloadedExperts

    dev = torch.device("cpu")
    _, m = _offloaded(family, dev, slots)
    want, len_want = _decode(m, 4, None, dev)
    m2 = _offloaded(family, dev, slots)[1]
    kept = []  # layer calls whose speculated output was kept (every expert resident)
    real = OffloadedExperts.forward

    def spy(self, x, ids, w, speculated=None, **kw):
        y = real(self, x, ids, w, speculated=speculated, **kw)
        if speculated is not None:  # a decode step's call (not the prompt's)
            kept.append((self.layer, y is speculated))
        return y

    pieces = []  # piece indices in the order they ran
    real_piece = PiecewiseDecodeGraphs._piece
    monkeypatch.setattr(OffloadedExperts, "forward", spy)
    monkeypatch.setattr(PiecewiseDecodeGraphs, "_piece", lambda self, k, *a: pieces.append(k) or real_piece(self, k, *a))
    runners = []

    def make(mm, c):
        runners.append(PiecewiseDecodeGraphs(mm, c, capture=False, run_ahead=run_ahead, run_ahead_min_kept=0.0))
        return runners[-1]

    got, len_got = _decode(m2, 4, make, dev)
    assert len_got == len_want
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    if slots == 8:  # every expert fits: once each is in, every layer call keeps its speculation
        assert sum(k for _, k in kept) >= len(kept) // 2
    else:
        assert not all(k for _, k in kept)
    r = runners[0]
    n = len(r._cuts) + 1
    assert bool(r._ahead) == (run_ahead and n > 2)
    # each piece once per step, plus a rerun for every run-ahead piece whose speculation was dropped
    ahead = {r.model.layers[r._cuts[k]].mlp.experts.layer for k in r._ahead}  # as cache layers
    assert len(pieces) - 4 * n == sum(1 for layer, k in kept if layer in ahead and not k)
    if run_ahead and slots == 2:  # mixtral and qwen2_moe, 2 of 8 experts cached
        assert len(pieces) > 4 * n  # the rerun path ran


def test_run_ahead_stops_at_layers_whose_speculations_are_mostly_dropped(monkeypatch):
    """A rerun after a dropped speculation wastes a piece (BENCHMARKS 3i: run-ahead slower than serial at
    25% of the experts): a layer runs ahead only while its moving share of kept speculations is at least
    run_ahead_min_kept. With 2 of 8 experts cached most are dropped, so most layer calls run serially,
    and the logits stay those of the model."""
    from offload.apply import OffloadedExperts

    dev = torch.device("cpu")
    want, _ = _decode(_offloaded("mixtral", dev, 2)[1], 8, None, dev)
    got = {}
    for min_kept in (0.0, 0.5, 1.0):
        m = _offloaded("mixtral", dev, 2)[1]
        dropped, pieces, runners = [0], [], []
        real, real_piece = OffloadedExperts.forward, PiecewiseDecodeGraphs._piece

        def spy(self, x, ids, w, speculated=None, **kw):
            y = real(self, x, ids, w, speculated=speculated, **kw)
            dropped[0] += speculated is not None and y is not speculated
            return y
        monkeypatch.setattr(OffloadedExperts, "forward", spy)
        monkeypatch.setattr(PiecewiseDecodeGraphs, "_piece", lambda self, k, *a: pieces.append(k) or real_piece(self, k, *a))

        def make(mm, c, mk=min_kept):
            runners.append(PiecewiseDecodeGraphs(mm, c, capture=False, run_ahead_min_kept=mk))
            return runners[-1]
        out, _ = _decode(m, 8, make, dev)
        for a, b in zip(want, out):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        r = runners[0]
        n = len(r._cuts) + 1
        got[min_kept] = (len(pieces) - 8 * n, dropped[0], dict(r._kept))
        monkeypatch.undo()
    reruns, drops, _ = got[0.0]
    assert reruns > 0 and reruns <= drops  # always ahead: a rerun for each dropped speculation ahead
    assert got[0.5][0] < reruns  # fewer reruns once a layer's share falls below one half
    assert got[1.0][0] < got[0.5][0] or got[0.5][0] == 0
    assert all(0.0 <= v <= 1.0 for v in got[0.5][2].values()) and min(got[0.5][2].values()) < 0.5
    with pytest.raises(ValueError, match="run_ahead_min_kept"):
        PiecewiseDecodeGraphs(m, m.new_cache(1, 8), capture=False, run_ahead_min_kept=1.5)


def _trace_lookahead(model, seed=0, stride=64, k=2):
    """Random guesses (k per token) of each next layer's experts wired into every offloaded layer's prefetch."""
    import numpy as np

    from placement.trace_routing import install_trace_lookahead
    blocks = model.moe_blocks()
    E = model.config.num_experts
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, E, size=(len(blocks), 4 * stride, k)).astype(np.int16)
    handles, routers = install_trace_lookahead(model, nxt, E, stride)
    for b, r in zip(blocks, routers):
        b.experts.set_next_router(r)
    return handles


def test_next_layer_prefetch_in_pieces_equals_the_model(monkeypatch):
    """Pieces whose layers prefetch a guess of the next layer (TraceLookahead through set_next_router)
    give the logits of model(), and copies in flight are left out of the speculation's table: a
    speculation that routed to one of them is dropped, never kept with that expert's output missing.
    On the CPU copies land at once, so in_flight is made to name every resident expert but one."""
    from offload.apply import OffloadedExperts
    from offload.cache import ExpertCache

    dev = torch.device("cpu")
    want, len_want = _decode(_offloaded("mixtral", dev, 3)[1], 6, None, dev)
    eager = _offloaded("mixtral", dev, 3)[1]
    _trace_lookahead(eager)
    _decode(eager, 6, None, dev)
    for pretend in (False, True):
        m = _offloaded("mixtral", dev, 3)[1]
        _trace_lookahead(m)
        if pretend:
            monkeypatch.setattr(ExpertCache, "in_flight", lambda self, layer: set(self.resident(layer)[1:]))
        seen = []  # (routed experts, left out of the table, kept)
        real = OffloadedExperts.forward

        def spy(self, x, ids, w, speculated=None, **kw):
            left = set(self._left_out)
            if speculated is not None and left:  # the table the piece read names none of the left-out experts
                table = self.cache.slot_table_buffer(self.layer)
                assert all(table[e].item() == -1 for e in left)
                assert all(table[e].item() == s for e, s in self.cache.slot_of[self.layer].items() if e not in left)
            y = real(self, x, ids, w, speculated=speculated, **kw)
            if speculated is not None:
                seen.append((set(ids.reshape(-1).tolist()) - {-1}, left, y is speculated))
            return y
        monkeypatch.setattr(OffloadedExperts, "forward", spy)
        got, len_got = _decode(m, 6, lambda mm, c: PiecewiseDecodeGraphs(mm, c, capture=False), dev)
        monkeypatch.undo()
        assert len_got == len_want
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert m.offload_cache.stats()["prefetches"] > 0
        if not pretend:  # the pieces' guesses (computed in the piece, read back with the ids) are the eager ones
            assert m.offload_cache.stats() == eager.offload_cache.stats()
        assert not any(kept for routed, left, kept in seen if routed & left)
        if pretend:
            assert any(routed & left for routed, left, _ in seen)
        else:
            assert all(not left for _, left, _ in seen)


def test_guess_next_takes_no_more_than_the_guesses_given():
    """A recorded guess of fewer experts than top-k: the prefetch takes those, not filler picked among
    the experts the guess does not name."""
    dev = torch.device("cpu")
    m = _offloaded("mixtral", dev, 3)[1]
    _trace_lookahead(m, k=1)
    with torch.inference_mode():
        m(torch.randint(3, 60, (2, 5)), cache=m.new_cache(2, 16))
        g = m.moe_blocks()[0].experts.guess_next(torch.zeros(10, m.config.hidden_size))
    assert g.shape == (10, 1)
    assert m.moe_blocks()[-1].experts.guess_next(torch.zeros(10, m.config.hidden_size)) is None  # no next layer
    # a token with fewer guesses than asked: -1 where it names none (dropped by the prefetch), never filler
    import numpy as np

    from placement.trace_routing import install_trace_lookahead
    blocks = m.moe_blocks()
    assert blocks[0].experts.guess_k == 1  # by default half the top-k of 2 (offload.prefetch.guess_count)
    m = _offloaded("mixtral", dev, 3, prefetch_k=2)[1]  # asks for 2 guesses a token
    blocks = m.moe_blocks()
    nxt = np.full((len(blocks), 64, 2), -1, dtype=np.int16)
    nxt[..., 0] = 3
    _, routers = install_trace_lookahead(m, nxt, m.config.num_experts, 64)
    for b, r in zip(blocks, routers):
        b.experts.set_next_router(r)
    with torch.inference_mode():
        m(torch.randint(3, 60, (1, 4)), cache=m.new_cache(1, 16))
        g = blocks[0].experts.guess_next(torch.zeros(4, m.config.hidden_size))
    assert g[:, 0].tolist() == [3] * 4 and g[:, 1].tolist() == [-1] * 4


def test_support_reasons():
    m = tiny_model("mixtral")
    if m is None or not hasattr(m, "layers"):
        pytest.skip("moe's MoEForCausalLM is needed")
    assert "not a CUDA device" in piecewise_support(m)
    with pytest.raises(ValueError, match="CUDA-graph pieces"):
        PiecewiseDecodeGraphs(m, m.new_cache(1, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family,slots,cfg", [("mixtral", 2, {}), ("mixtral", 8, {}), ("qwen3_moe", 2, {}),
                                              ("mixtral", 3, {"prefetch": "next_layer_gate"}),
                                              ("mixtral", 3, {"prefetch": "attention"}),
                                              ("mixtral", 3, {"prefetch": "predictor", "policy": "predictor",
                                                              "predictor": "fit_attention", "prefetch_budget": 2}),
                                              ("mixtral", 3, {"prefetch": "predictor", "policy": "predictor",
                                                              "predictor": "fit", "prefetch_budget": 2}),
                                              ("mixtral", 3, {"trace_lookahead": True}),
                                              ("qwen3_moe", 2, {"trace_lookahead": True})])
@pytest.mark.parametrize("run_ahead", [True, False])
def test_captured_pieces_equal_eager_offloaded_decode(family, slots, cfg, run_ahead):
    """trace_lookahead: every layer prefetches a guess of the next layer's experts, so pieces start
    while those copies still run (left out of the speculation's table)."""
    dev = torch.device("cuda")
    cfg = dict(cfg)
    lookahead = cfg.pop("trace_lookahead", False)
    _, m = _offloaded(family, dev, slots, **cfg)
    if lookahead:
        _trace_lookahead(m)
    want, len_want = _decode(m, 6, None, dev)
    m2 = _offloaded(family, dev, slots, **cfg)[1]
    if lookahead:
        _trace_lookahead(m2)
    got, len_got = _decode(m2, 6, lambda mm, c: PiecewiseDecodeGraphs(mm, c, run_ahead=run_ahead), dev)
    assert len_got == len_want
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert m2.offload_cache.stats()["hits"] + m2.offload_cache.stats()["misses"] == \
        m.offload_cache.stats()["hits"] + m.offload_cache.stats()["misses"]  # the capture counted no step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_engine_decodes_offloaded_models_in_pieces():
    import moe
    from moe import tiny
    from moe.generate import Engine

    path = tiny.ensure_tiny_model()
    tok = moe.Tokenizer.from_dir(path)
    prompts = ["def f(x):", "import os\nimport", "class A:\n    pass"]
    params = moe.SamplingParams(max_new_tokens=8)
    outs = []
    for graphs in (False, None):
        m = moe.load_model(path, dtype=torch.float32, device="cuda").eval()
        m = apply_offload(m, OffloadConfig(slots_per_layer=2, device="cuda", calibrate=False, backend="triton",
                                           driver="host"))  # (the host path's pieces; 'auto' takes the device here)
        eng = Engine(m, tok, max_batch_size=4, max_len=128, cuda_graph=graphs)
        assert isinstance(eng._graphs, PiecewiseDecodeGraphs) == (graphs is None)
        ids = [eng.add_request(p, params) for p in prompts]
        texts = {rid: [] for rid in ids}
        while eng.has_unfinished():
            for out in eng.step():
                texts[out.request_id].append(out.new_text)
        outs.append(["".join(texts[rid]) for rid in ids])
    assert outs[0] == outs[1]
