import numpy as np
import pytest
import torch

from routing import (NearestTraceBaseline, PathPredictor, PopularityBaseline, PredictorConfig,
                     PreviousPathBaseline, evaluate, synthesize)
from routing.baselines import GateLookahead, multi_hot
from routing.trace import RoutingTrace

SHAPE = dict(num_layers=6, num_experts=16, top_k=2, num_requests=24, tokens_per_request=48)


@pytest.fixture(scope="module")
def planted():
    # uniform popularity: the 8 planted paths rarely share experts, so the known layers identify
    # the path (with skewed popularity paths collide at later layers and a few points are lost)
    return synthesize(**SHAPE, planted_paths=8, popularity_skew=0.0, seed=1).split_requests(0.75, seed=0)


@pytest.fixture(scope="module")
def planted_predictor(planted):
    return PathPredictor.fit(planted[0])


def test_learns_a_planted_path_structure(planted, planted_predictor):
    r = evaluate(planted_predictor, planted[1], distances=(1, 2, 4))
    for key in ("1", "2", "4"):
        assert r[key]["mean_recall"] > 0.98, (key, r[key]["mean_recall"])
    # popularity alone cannot know which path a token is on
    pop = evaluate(PopularityBaseline.fit(planted[0]), planted[1], distances=(1,))
    assert pop["1"]["mean_recall"] < 0.5


def test_no_better_than_popularity_without_structure():
    train, test = synthesize(**SHAPE, popularity_skew=1.0, seed=2).split_requests(0.75, seed=0)
    p = evaluate(PathPredictor.fit(train), test, distances=(1, 4))
    pop = evaluate(PopularityBaseline.fit(train), test, distances=(1, 4))
    for key in ("1", "4", "all"):
        # nothing but popularity to learn: the predictor may match it, never beat it by more than noise
        assert p[key]["mean_recall"] <= pop[key]["mean_recall"] + 0.02
        assert p[key]["mean_recall"] >= pop[key]["mean_recall"] - 0.05


def test_at_least_as_good_as_every_baseline_on_affinity_and_locality():
    # each baseline captures one kind of structure; the predictor combines them
    train, test = synthesize(**SHAPE, affinity=0.9, temporal_locality=0.2, seed=3).split_requests(0.75, seed=0)
    p = evaluate(PathPredictor.fit(train), test, distances=(1, 2, 4))
    for base in (PopularityBaseline.fit(train), PreviousPathBaseline.fit(train), NearestTraceBaseline.fit(train)):
        b = evaluate(base, test, distances=(1, 2, 4))
        for key in ("1", "2", "4", "all"):
            assert p[key]["mean_recall"] >= b[key]["mean_recall"] - 0.01, (base.name, key)
        assert p["1"]["mean_recall_2k"] > b["1"]["mean_recall_2k"] + 0.05, base.name


def test_contract_shape_known_rows_and_online_correction(planted, planted_predictor):
    test = planted[1]
    paths = test.paths().astype(np.int64)[:32]
    L, E = test.num_layers, test.num_experts
    for layer in (-1, 0, 3, L - 1):
        probs = planted_predictor.predict_batch(None, layer, paths[:, :layer + 1])
        assert probs.shape == (32, L, E) and probs.dtype == np.float32
        assert ((probs >= 0) & (probs <= 1)).all()
        np.testing.assert_array_equal(probs[:, :layer + 1], multi_hot(paths[:, :layer + 1], E))
    with pytest.raises(ValueError, match="known_NlK"):
        planted_predictor.predict_batch(None, 2, paths[:, :2])
    with pytest.raises(ValueError, match="layer must be"):
        planted_predictor.predict_batch(None, L, paths)
    with pytest.raises(ValueError, match="prev_paths_NLK"):
        planted_predictor.predict_batch(paths[:, :2], 0, paths[:, :1])


def test_save_load_round_trip(tmp_path, planted, planted_predictor):
    p = planted_predictor.save(tmp_path / "pred")
    q = PathPredictor.load(p)
    paths = planted[1].paths()[:16]
    prev = np.roll(paths, 1, axis=0)
    for layer in (-1, 2):
        np.testing.assert_array_equal(planted_predictor.predict_batch(prev, layer, paths[:, :layer + 1]),
                                      q.predict_batch(prev, layer, paths[:, :layer + 1]))
    planted[1].save(tmp_path / "trace.npz")
    with pytest.raises(ValueError, match="PathPredictor"):
        PathPredictor.load(tmp_path / "trace.npz")
    with pytest.raises(FileNotFoundError):
        PathPredictor.load(tmp_path / "nope.npz")


def test_config_validation():
    with pytest.raises(ValueError, match="holdout"):
        PredictorConfig(holdout=1.5)
    with pytest.raises(ValueError, match="context_layers"):
        PredictorConfig(context_layers=0)


@pytest.mark.parametrize("with_prev", [True, False])
def test_fast_path_equals_the_reference(planted, planted_predictor, with_prev):
    test = planted[1]
    paths = test.paths().astype(np.int64)[:40]
    paths[3, 1, 0] = -1  # a dropped slot
    prev = np.roll(paths, 1, axis=0) if with_prev else None
    if with_prev:
        prev[0] = -1  # a token with no previous token
    feats = {"token_ids": test.token_ids[:40]}
    p = planted_predictor
    assert sorted(p.weight_sets) == ["base", "token"]
    for layer in range(-1, test.num_layers):
        fast, ref = _predict_both(p, prev, layer, paths, feats)
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)


def test_a_missing_optional_input_does_not_derail_the_other_sources(planted):
    # token ids that give the path away: the "token" weights lean on them; a caller that does not
    # pass token ids (offload's lookahead does not) must get the "base" weights, fitted without them
    train, test = planted
    paths = train.paths().reshape(train.num_tokens, -1).astype(np.int64)
    _, path_id = np.unique(paths, axis=0, return_inverse=True)
    leaky = RoutingTrace(train.expert_ids, train.num_experts, request_ids=train.request_ids,
                         positions=train.positions, token_ids=path_id.reshape(-1))
    p = PathPredictor.fit(leaky)
    tpaths = test.paths().astype(np.int64)
    hits = 0
    for layer in (0, 2):
        probs = p.predict_batch(None, layer, tpaths[:, :layer + 1])  # no features at all
        top = np.argsort(-probs[:, layer + 1], -1)[:, :test.top_k]
        hits += np.mean([len(set(a) & set(b)) / test.top_k for a, b in zip(top, tpaths[:, layer + 1])])
    assert hits / 2 > 0.98


# the fast path against the plain reference: (layers, experts, top-k, config) -- one and two mask words,
# the span binding or not, with and without the set sources, short context windows
FAST_CASES = {
    "16e": (6, 16, 2, dict(match_layers=2)),
    "70e-span3": (9, 70, 3, dict(max_span=3, context_layers=2, match_layers=2)),
    "130e-depth0": (8, 130, 4, dict(match_layers=1, match_depth=0, match_second_pool=0, match_pool=4)),
    "no-sets": (7, 24, 3, dict(match_layers=0, token_buckets=0)),
}


def _linear_routers(L, D, E, seed):
    """Gate lookahead stand-ins: router m is a fixed linear map of the hidden state."""
    w = torch.randn(L, D, E, generator=torch.Generator().manual_seed(seed))
    return [lambda x, m=m: x @ w[m] for m in range(L)]


@pytest.fixture(scope="module", params=sorted(FAST_CASES))
def fast_case(request, tmp_path_factory):
    L, E, K, cfg = FAST_CASES[request.param]
    trace = synthesize(num_layers=L, num_experts=E, top_k=K, num_requests=12, tokens_per_request=24,
                       planted_paths=8, path_noise=0.2, popularity_skew=0.5, temporal_locality=0.3, seed=L + E)
    train, test = trace.split_requests(0.75, seed=0)
    D = 8
    hidden = np.random.default_rng(E).standard_normal((train.num_tokens, L, D)).astype(np.float32)
    lookahead = GateLookahead(_linear_routers(L, D, E, seed=E), E, K)
    p = PathPredictor.fit(train, PredictorConfig(fit_iters=3, **cfg), features={"hidden_NLD": hidden},
                          lookahead=lookahead)
    # target rows the lookahead answers alone (the fit's choice on these random routers is noise): both
    # paths must replace the same rows, and the choice must survive the file
    p.direct_LD[1::2, 0] = True
    p.direct_LD[0, :3] = True
    loaded = PathPredictor.load(p.save(tmp_path_factory.mktemp("fast") / "p.npz"), lookahead=lookahead)
    return p, loaded, train, test, D


def _inputs(train, test, n, D, seed):
    """n tokens from both halves (the test half's sets are partly unseen), with a dropped slot, a token
    without a previous token, one whose previous token had no experts at layer 0 and one with no known
    expert at all (no set to look up: no neighbours)."""
    rng = np.random.default_rng(seed)
    paths = np.concatenate([train.paths(), test.paths()]).astype(np.int64)
    tok = np.concatenate([train.token_ids, test.token_ids])
    pick = rng.choice(len(paths), n, replace=n > len(paths))
    known, prev = paths[pick], paths[rng.choice(len(paths), n)]
    known[0, 1, -1] = -1
    prev[-1] = -1
    if n > 2:
        prev[1, 0] = -1
        known[2] = -1
    feats = {"token_ids": tok[pick], "hidden_NLD": rng.standard_normal((n, train.num_layers, D)).astype(np.float32)}
    return known, prev, feats


def _predict_both(p, prev, layer, known, feats):
    fast = p.predict_batch(prev, layer, known[:, :layer + 1], feats)
    p.reference = True
    try:
        ref = p.predict_batch(prev, layer, known[:, :layer + 1], feats)
    finally:
        p.reference = False
    return fast, ref


def _assert_same_prediction(fast, ref, k):
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)
    assert fast.dtype == np.float32 and fast.flags.c_contiguous
    # the same expert sets: the reference's top-k mass over the fast path's top-k (ties may swap members)
    top_fast = np.argsort(-fast, -1, kind="stable")[..., :k]
    np.testing.assert_allclose(np.take_along_axis(ref, top_fast, -1).sum(-1),
                               -np.sort(-ref, -1)[..., :k].sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 64])
@pytest.mark.parametrize("inputs", ["all", "token", "gate", "none", "no-prev"])
def test_fast_path_equals_the_reference_over_shapes_layers_and_batches(fast_case, n, inputs):
    p, loaded, train, test, D = fast_case
    known, prev, feats = _inputs(train, test, n, D, seed=n)
    feats = {"all": feats, "token": {"token_ids": feats["token_ids"]}, "gate": {"hidden_NLD": feats["hidden_NLD"]},
             "none": None, "no-prev": feats}[inputs]
    if inputs == "no-prev":
        prev = None
    L = p.num_layers
    for layer in sorted({-1, 0, 1, L // 2, L - 2, L - 1}):
        for model in (p, loaded):
            fast, ref = _predict_both(model, prev, layer, known, feats)
            _assert_same_prediction(fast, ref, p.top_k)
        np.testing.assert_array_equal(loaded.predict_batch(prev, layer, known[:, :layer + 1], feats),
                                      p.predict_batch(prev, layer, known[:, :layer + 1], feats))


def test_rows_the_lookahead_answers_alone_are_its_softmax_and_need_its_input(fast_case):
    p, loaded, train, test, D = fast_case
    known, prev, feats = _inputs(train, test, 16, D, seed=5)
    look = p.lookahead.predict_batch(prev, 0, known[:, :1], feats)
    got = p.predict_batch(prev, 0, known[:, :1], feats)
    np.testing.assert_array_equal(loaded.direct_LD, p.direct_LD)
    for d in (1, 2, 3):
        np.testing.assert_allclose(got[:, d], look[:, d], rtol=1e-5, atol=1e-6)
    # without the hidden state the gate source is absent, and so is its own answer
    plain = p.predict_batch(prev, 0, known[:, :1], {"token_ids": feats["token_ids"]})
    assert not np.allclose(plain[:, 1], look[:, 1], atol=1e-3)
    with pytest.raises(ValueError, match="direct_LD must be"):
        PathPredictor(p.tables, p.weight_sets, p.top_k, p.config, p.lookahead, direct_LD=np.zeros((2, 2), bool))


def test_fast_path_takes_an_empty_batch(fast_case):
    p, _, train, _, _ = fast_case
    paths = train.paths().astype(np.int64)[:0]
    for layer in (-1, 0, p.num_layers - 1):
        assert p.predict_batch(paths, layer, paths[:, :layer + 1]).shape == (0, p.num_layers, p.num_experts)


@pytest.mark.parametrize("replaced", ["tables", "weight_sets"])
def test_fast_path_follows_replaced_tables_and_weights(planted, replaced):
    # the per-layer plans are computed from the tables and weights (``fit`` replaces both): replacing
    # either must not leave stale plans
    train, test = planted
    p = PathPredictor.fit(train, PredictorConfig(fit_iters=2))
    other = PathPredictor.fit(test, PredictorConfig(fit_iters=2))
    paths = test.paths().astype(np.int64)[:8]
    before = p.predict_batch(None, 1, paths[:, :2])
    setattr(p, replaced, getattr(other, replaced))
    want = PathPredictor(p.tables, p.weight_sets, p.top_k, p.config).predict_batch(None, 1, paths[:, :2])
    np.testing.assert_array_equal(p.predict_batch(None, 1, paths[:, :2]), want)
    assert not np.array_equal(before, want)
