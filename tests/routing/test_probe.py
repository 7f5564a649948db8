"""routing.probe.ProbeLookahead: probes from the hidden state to the next layers' experts."""
import numpy as np
import pytest

from routing import RoutingTrace, record_sequences, save_features
from routing.baselines import GateLookahead, PopularityBaseline
from routing.cli import main, probe_path
from routing.predictor import PathPredictor
from routing.probe import ProbeLookahead
from routing.stats import evaluate

from ._standin import StandinMoE

L, E, K, D = 4, 8, 2, 16


def _planted(T=3200, seed=0, structured=True):
    """Hidden state entering layer l = a layer-specific rotation of one latent z; layer m routes by
    top-k of G_m z. A probe can learn G_m R_l^-1 from h_l; a router applied to h_l (the gate trick)
    sees a rotated vector and cannot. structured=False: routing drawn independently of z."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((T, D)).astype(np.float32)
    R = [np.linalg.qr(rng.standard_normal((D, D)))[0].astype(np.float32) for _ in range(L)]
    G = rng.standard_normal((L, D, E)).astype(np.float32)
    hidden = np.stack([z @ R[l] for l in range(L)], axis=1)  # [T, L, D]
    if structured:
        ids = np.stack([np.argsort(-(z @ G[m]), axis=1)[:, :K] for m in range(L)])
    else:
        ids = np.stack([np.stack([rng.choice(E, K, replace=False, p=np.arange(1, E + 1) / (E * (E + 1) / 2))
                                  for _ in range(T)]) for _ in range(L)])
    req = np.repeat(np.arange(T // 40), 40)
    trace = RoutingTrace(ids.astype(np.int16), E, request_ids=req, positions=np.tile(np.arange(40), T // 40))
    routers = [lambda x, m=m: __import__("torch").as_tensor(np.asarray(x) @ G[m]) for m in range(L)]
    return trace, hidden, routers


def _split(trace, hidden):
    train, test = trace.split_requests(0.5, seed=0)
    m = np.isin(trace.request_ids, np.unique(train.request_ids))
    return train, test, hidden[m], hidden[~m]


def test_probes_learn_a_planted_map_the_gate_trick_cannot_read():
    trace, hidden, routers = _planted()
    train, test, h_tr, h_te = _split(trace, hidden)
    probe = ProbeLookahead.fit(train, h_tr, span=3)
    r = evaluate(probe, test, {"hidden_NLD": h_te})
    assert r["1"]["mean_recall"] > 0.9 and r["2"]["mean_recall"] > 0.9
    gate = GateLookahead(routers, E, K, fallback=PopularityBaseline.fit(train))
    assert evaluate(gate, test, {"hidden_NLD": h_te})["1"]["mean_recall"] < r["1"]["mean_recall"] - 0.3
    # as the path predictor's lookahead source
    pred = PathPredictor.fit(train, features={"hidden_NLD": h_tr}, lookahead=probe)
    assert evaluate(pred, test, {"hidden_NLD": h_te})["1"]["mean_recall"] > 0.9


def test_probes_do_no_better_than_popularity_on_structureless_routing():
    trace, hidden, _ = _planted(structured=False)
    train, test, h_tr, h_te = _split(trace, hidden)
    probe = ProbeLookahead.fit(train, h_tr)
    r = evaluate(probe, test, {"hidden_NLD": h_te})["1"]["mean_recall"]
    pop = evaluate(PopularityBaseline.fit(train), test)["1"]["mean_recall"]
    assert r <= pop + 0.03


def test_span_beyond_the_probes_is_popularity_and_layer_minus_one_falls_back():
    trace, hidden, _ = _planted(T=400)
    probe = ProbeLookahead.fit(trace, hidden, span=1)
    logits = probe.lookahead_logits(hidden[:5, 0], 0)
    assert np.all(logits[:, 0] == 0)
    np.testing.assert_allclose(logits[:, 2:], np.broadcast_to(probe.log_pop_LE[2:], (5, 2, E)))
    assert not np.allclose(logits[:, 1], probe.log_pop_LE[1])
    pop = PopularityBaseline.fit(trace).predict_batch(None, -1, np.zeros((3, 0, K), np.int64))
    got = probe.predict_batch(None, -1, np.zeros((3, 0, K), np.int64), {"hidden_NLD": hidden[:3]})
    np.testing.assert_allclose(got, pop)


def test_save_load_round_trip_and_clear_errors(tmp_path):
    trace, hidden, _ = _planted(T=400)
    probe = ProbeLookahead.fit(trace, hidden, span=2)
    back = ProbeLookahead.load(probe.save(tmp_path / "p"))
    for layer in range(L - 1):
        np.testing.assert_array_equal(back.lookahead_logits(hidden[:7, layer], layer),
                                      probe.lookahead_logits(hidden[:7, layer], layer))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a probe file"):
        ProbeLookahead.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="same recording"):
        ProbeLookahead.fit(trace, hidden[:-1])
    with pytest.raises(ValueError, match="features of another model"):
        probe.lookahead_logits(np.zeros((2, D + 1)), 0)


def test_cli_trains_probes_from_features_and_eval_reads_them_back(tmp_path, capsys):
    model = StandinMoE(mix=0.3)
    seqs = np.random.default_rng(0).integers(0, 50, (8, 12)).tolist()
    trace, feats = record_sequences(model, seqs, hidden_layers="all")
    trace.save(tmp_path / "t.npz")
    save_features(tmp_path / "f.npz", feats)
    out = tmp_path / "p.npz"
    assert main(["predictor", "train", str(tmp_path / "t.npz"), "--out", str(out), "--features",
                 str(tmp_path / "f.npz"), "--probe-span", "2"]) == 0
    assert probe_path(out).is_file() and "probes written" in capsys.readouterr().out
    assert main(["predictor", "eval", str(out), str(tmp_path / "t.npz"), "--features", str(tmp_path / "f.npz")]) == 0
    assert "probe-lookahead" in capsys.readouterr().out
    # retrained without features: the old probes must not pair with the new predictor
    assert main(["predictor", "train", str(tmp_path / "t.npz"), "--out", str(out)]) == 0
    assert not probe_path(out).exists()
    # the gate needs the model
    assert main(["predictor", "train", str(tmp_path / "t.npz"), "--out", str(out), "--features",
                 str(tmp_path / "f.npz"), "--lookahead", "gate"]) == 2
    assert "--model" in capsys.readouterr().err


def _router_readable(T, seed=0):
    """Hidden state entering every layer = z itself, and layer m routes by top-k of G_m z: the model's
    own routers read every later layer exactly; a probe must learn G_m from T tokens."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((T, D)).astype(np.float32)
    G = rng.standard_normal((L, D, E)).astype(np.float32)
    ids = np.stack([np.argsort(-(z @ G[m]), axis=1)[:, :K] for m in range(L)])
    req = np.repeat(np.arange(T // 20), 20)
    trace = RoutingTrace(ids.astype(np.int16), E, request_ids=req, positions=np.tile(np.arange(20), T // 20))
    routers = [lambda x, m=m: __import__("torch").as_tensor(np.asarray(x) @ G[m]) for m in range(L)]
    return trace, np.repeat(z[:, None], L, axis=1), routers


def test_a_router_prior_keeps_what_the_router_reads_when_tokens_are_few():
    """The deep-model case (BENCHMARKS 7h): the router reads the next layer better than a probe fitted
    from a few tokens; started from the router, the probe keeps (at least) what the router reads."""
    trace, hidden, routers = _router_readable(T=160)
    train, test, h_tr, h_te = _split(trace, hidden)
    gate = GateLookahead(routers, E, K, fallback=PopularityBaseline.fit(train))
    zero = evaluate(ProbeLookahead.fit(train, h_tr, span=2), test, {"hidden_NLD": h_te})["1"]["mean_recall"]
    started = ProbeLookahead.fit(train, h_tr, span=2, prior=gate)
    r = evaluate(started, test, {"hidden_NLD": h_te})["1"]["mean_recall"]
    assert evaluate(gate, test, {"hidden_NLD": h_te})["1"]["mean_recall"] == 1.0
    assert r >= 0.97 and r > zero + 0.05, (r, zero)
    assert len(started.prior_pull) == L - 1


def test_a_router_prior_starts_at_the_router_and_moves_away_where_it_reads_badly():
    # the start is the router itself on the hidden state (exact for a linear router)
    trace, hidden, routers = _router_readable(T=400)
    gate = GateLookahead(routers, E, K)
    start = ProbeLookahead.fit(trace, hidden, span=2, prior=gate, iters=0)
    for layer in range(L - 1):
        np.testing.assert_allclose(start.lookahead_logits(hidden[:9, layer], layer)[:, layer + 1:layer + 3],
                                   gate.lookahead_logits(hidden[:9, layer], layer)[:, layer + 1:layer + 3],
                                   rtol=1e-4, atol=1e-4)
    # the planted rotation: the routers read nothing useful, and the fit learns the map as from zero
    trace, hidden, routers = _planted()
    train, test, h_tr, h_te = _split(trace, hidden)
    gate = GateLookahead(routers, E, K, fallback=PopularityBaseline.fit(train))
    r = evaluate(ProbeLookahead.fit(train, h_tr, span=3, prior=gate), test, {"hidden_NLD": h_te})
    assert r["1"]["mean_recall"] > 0.9 and r["2"]["mean_recall"] > 0.9
    # a prior of another model is refused, naming the fix
    with pytest.raises(ValueError, match="routers of the model the trace was recorded from"):
        ProbeLookahead.fit(trace, hidden, prior=GateLookahead(routers[:2], E, K))
    with pytest.raises(ValueError, match="prior_ridges is empty"):
        ProbeLookahead.fit(trace, hidden, prior=gate, prior_ridges=())


@pytest.mark.parametrize("scale", [0.02, 20.0])
def test_the_path_predictor_gains_from_router_started_probes_whatever_the_routers_scale(scale):
    """Half the known layers see z (the routers read the next layer exactly), half a rotation of it
    (the routers read nothing). The predictor weighs its lookahead source alike at every known layer,
    so a router start must be rescaled to the probes' log-odds: on the 48-layer model (s19-c) the
    unscaled one read 0.925 alone but made the predictor worse than zero-started probes (0.838 against
    0.883). Here too, flat (0.02) or peaky (20) router logits: the predictor must gain, not lose.

    And it must read at least what its lookahead reads alone: rescaled or not, the weights are shared
    by every known layer, so the product under-uses a source that is exact at half of them (0.938
    against 0.953 here; on a 48-layer model 0.887 against 0.955, BENCHMARKS 7i). The fit keeps the
    lookahead's own answer where it reads the held-out tokens better (``direct_LD``). The routers used
    as they are (no probes) fell furthest: 0.057 against 0.584 at scale 20."""
    import torch
    Lm, Em, Km, Dm, T = 8, 16, 4, 24, 1200
    rng = np.random.default_rng(0)
    z = rng.standard_normal((T, Dm)).astype(np.float32)
    G = rng.standard_normal((Lm, Dm, Em)).astype(np.float32)
    R = [np.linalg.qr(rng.standard_normal((Dm, Dm)))[0].astype(np.float32) for _ in range(Lm)]
    hidden = np.stack([z if l % 2 == 0 else z @ R[l] for l in range(Lm)], 1)
    ids = np.stack([np.argsort(-(z @ G[m]), axis=1)[:, :Km] for m in range(Lm)])
    trace = RoutingTrace(ids.astype(np.int16), Em, request_ids=np.repeat(np.arange(T // 20), 20),
                         positions=np.tile(np.arange(20), T // 20))
    routers = [lambda x, m=m: torch.as_tensor(np.asarray(x) @ (scale * G[m])) for m in range(Lm)]
    train, test, h_tr, h_te = _split(trace, hidden)
    gate = GateLookahead(routers, Em, Km, fallback=PopularityBaseline.fit(train))
    got = {}
    for name, look in (("zero", ProbeLookahead.fit(train, h_tr)), ("router", ProbeLookahead.fit(train, h_tr, prior=gate)),
                       ("gate", gate)):
        pred = PathPredictor.fit(train, features={"hidden_NLD": h_tr}, lookahead=look)
        got[name] = (evaluate(look, test, {"hidden_NLD": h_te})["1"]["mean_recall"],
                     evaluate(pred, test, {"hidden_NLD": h_te})["1"]["mean_recall"])
        assert pred.direct_LD.shape == (Lm - 1, Lm - 1)
    assert got["router"][0] > got["zero"][0] + 0.05, got  # the lookahead alone
    assert got["router"][1] > got["zero"][1] + 0.05, got  # and through the predictor
    for name, (alone, predicted) in got.items():
        assert predicted >= alone - 0.01, (name, got)


def test_cli_starts_the_probes_from_the_models_routers_given_the_model(tmp_path, capsys):
    from moe.tiny import ASSETS_DEFAULT
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return [i * x for i in range(10) if i % 3]\n" * 40)
    assert main(["predictor", "record", str(ASSETS_DEFAULT), "--text", str(text), "--out", str(tmp_path),
                 "--name", "t", "--tokens", "512", "--seq-len", "64", "--device", "cpu"]) == 0
    t, f, out = tmp_path / "t.npz", tmp_path / "t.features.npz", tmp_path / "p.npz"
    capsys.readouterr()
    assert main(["predictor", "train", str(t), "--out", str(out), "--features", str(f), "--model",
                 str(ASSETS_DEFAULT), "--probe-span", "2"]) == 0
    assert "probes fitted from the model's routers" in capsys.readouterr().out and probe_path(out).is_file()
    assert main(["predictor", "eval", str(out), str(t), "--features", str(f)]) == 0
    assert "probe-lookahead" in capsys.readouterr().out
    assert main(["predictor", "train", str(t), "--out", str(out), "--features", str(f),
                 "--lookahead", "probe+router"]) == 2
    assert "--model" in capsys.readouterr().err
    import torch
    if not torch.cuda.is_available():
        assert main(["predictor", "train", str(t), "--out", str(out), "--features", str(f),
                     "--fit-device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_interleaved_order_is_the_interleaved_trace():
    trace, hidden, _ = _planted(T=400)
    order, R = trace.interleaved_order(10)
    inter, R2 = trace.interleaved(10)
    assert R == R2 and np.array_equal(trace.select_tokens(order).expert_ids, inter.expert_ids)


def test_the_cache_simulator_hands_hidden_states_to_a_predictor_that_reads_them():
    from offload import simulate
    trace, hidden, _ = _planted()
    train, test, h_tr, h_te = _split(trace, hidden)
    probe = ProbeLookahead.fit(train, h_tr)
    one = test.request_ids == test.request_ids[0]  # one sequence decoding: 2 of 8 experts a layer
    order, per_step = test.select_tokens(one).interleaved_order()
    inter, hid = test.select_tokens(one).select_tokens(order), h_te[one][order]
    kw = dict(tokens_per_step=per_step, prefetch="predictor", predictor=probe, prefetch_budget=2)
    with_h = simulate(inter, "lru", 2, hidden_NLD=hid, **kw)["hit_ratio"]
    # without them the probes cannot run: the lookahead falls back to popularity
    without = simulate(inter, "lru", 2, **{**kw, "predictor": PathPredictor.fit(train)})["hit_ratio"]
    demand = simulate(inter, "lru", 2, tokens_per_step=per_step)["hit_ratio"]
    assert with_h > without + 0.1 and with_h > demand + 0.1
    with pytest.raises(ValueError, match="hidden_NLD must be"):
        simulate(inter, "lru", 2, hidden_NLD=hid[:-1], **kw)
