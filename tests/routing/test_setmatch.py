import numpy as np
import pytest

from routing import PathPredictor, PredictorConfig, RoutingTrace, evaluate, synthesize
from routing.setmatch import SetMatchTable


def _table(ids_LTK, E):
    L, T, K = ids_LTK.shape
    log_pop = np.log(np.full((L, E), K / E, dtype=np.float32))
    return SetMatchTable.count(ids_LTK, E, log_pop, span=L - 1, smoothing=1.0)


def test_exact_and_nearest_lookup():
    E = 8
    # layer 0: token 0 and 1 share set {0,1,2}; token 2 takes {5,6,7}
    ids = np.array([[[0, 1, 2], [2, 1, 0], [5, 6, 7]],
                    [[3, 4, 5], [3, 4, 5], [0, 1, 2]]], dtype=np.int16)
    t = _table(ids, E)
    assert t.num_keys == 2  # layer 0's two distinct sets (the last layer has no later layer)
    u = t.lookup(0, np.array([[1, 0, 2], [7, 5, 6], [0, 1, 7], [3, 4, 6]]))
    assert u[0] == t.lookup(0, np.array([[0, 1, 2]]))[0] != u[1]
    assert u[2] == u[0]  # {0,1,7} shares 2 of 3 with {0,1,2}: nearest seen set
    assert u[3] == t.num_keys  # shares < 2 with every seen set: the zero row
    assert not t.rows_UDE[t.num_keys].any()
    # the row of {0,1,2} says experts 3,4,5 follow at layer 1 (log-ratio > 0), others do not
    row = t.rows_UDE[u[0], 0]
    assert (row[[3, 4, 5]] > 0).all() and (row[[0, 1, 2, 6, 7]] < 0).all()


def _run_reference(table, ids_LTK, j, query_lK, pool):
    """Stored tokens with the query's set at layer j, ordered by their set ids at j - 1 and j - 2 (then
    stored order), `pool` of them from the first one not below the query's, moved back where fewer remain."""
    T = ids_LTK.shape[1]

    def key_of(t=None):
        def sid(i):
            if i < 0:
                return 0
            return int(table.sid_LT[i, t]) if t is not None else int(table.lookup(i, query_lK[i][None])[0])
        return sid(j - 1), sid(j - 2)
    run = sorted((t for t in range(T) if set(ids_LTK[j, t]) == set(query_lK[j])), key=lambda t: (key_of(t), t))
    at = next((i for i, t in enumerate(run) if key_of(t) >= key_of()), len(run))
    start = max(0, min(at, len(run) - pool))
    return run[start:start + pool]


def _neighbours_reference(table, ids_LTK, E, layer, query_lK, pool, nn, decay, depth, second_pool):
    """Plain loops: the first run, then the second run (set shared at layer - 1, not at layer)."""
    L = ids_LTK.shape[0]
    cands = _run_reference(table, ids_LTK, layer, query_lK, pool)
    if layer >= 1 and second_pool:
        cands += [t for t in _run_reference(table, ids_LTK, layer - 1, query_lK, second_pool)
                  if set(ids_LTK[layer, t]) != set(query_lK[layer])]
    sims = []
    for i, t in enumerate(cands):
        s = sum(decay ** (layer - j) * len(set(ids_LTK[j, t]) & set(query_lK[j]))
                for j in range(max(0, layer - depth), layer + 1))
        sims.append((-s, i, t))
    best = [t for _, _, t in sorted(sims)[:nn]]
    counts = np.zeros((L - 1 - layer, E))
    for t in best:
        for m in range(layer + 1, L):
            for e in ids_LTK[m, t]:
                counts[m - layer - 1, e] += 1
    return counts, len(best)


@pytest.mark.parametrize("layer,pool,depth,second", [(0, 50, 3, 0), (2, 50, 3, 0), (3, 5, 2, 0), (3, 50, 0, 0),
                                                     (2, 3, 4, 0), (2, 4, 2, 3), (3, 50, 1, 50)])
def test_neighbour_counts_equal_plain_loops(layer, pool, depth, second):
    tr = synthesize(num_layers=5, num_experts=70, top_k=3, num_requests=6, tokens_per_request=40,
                    planted_paths=4, path_noise=0.3, seed=4)  # 70 experts: two mask words
    ids = tr.expert_ids.astype(np.int64)
    t = _table(ids, tr.num_experts)
    queries = ids[:, ::7].transpose(1, 0, 2)  # stored tokens as queries: their pools are non-empty
    sid = np.stack([t.lookup(j, queries[:, j]) for j in range(layer + 1)], 1)
    counts, n = t.neighbour_counts(layer, sid, queries[:, :layer + 1], pool, 4, 0.7, depth, second)
    near, n1 = t.neighbour_counts(layer, sid, queries[:, :layer + 1], pool, 4, 0.7, depth, second, ahead=1)
    np.testing.assert_array_equal(near, counts[:, :1])  # the next layer only: the same neighbours
    np.testing.assert_array_equal(n1, n)
    for i, q in enumerate(queries):
        ref, n_ref = _neighbours_reference(t, ids, tr.num_experts, layer, q, pool, 4, 0.7, depth, second)
        assert n[i] == n_ref
        np.testing.assert_allclose(counts[i], ref)


def test_arrays_round_trip():
    tr = synthesize(num_layers=4, num_experts=16, top_k=2, num_requests=4, tokens_per_request=20, seed=0)
    t = _table(tr.expert_ids, 16)
    t2 = SetMatchTable.from_arrays(t.arrays())
    q = tr.expert_ids[:, :10].transpose(1, 0, 2)
    np.testing.assert_array_equal(t.lookup(1, q[:, 1]), t2.lookup(1, q[:, 1]))
    sid = np.stack([t.lookup(j, q[:, j]) for j in range(2)], 1)
    a = t.neighbour_counts(1, sid, q[:, :2], 8, 3, 0.7, 2)
    b = t2.neighbour_counts(1, sid, q[:, :2], 8, 3, 0.7, 2)
    np.testing.assert_array_equal(a[0], b[0])


def test_match_sources_help_on_set_structured_routing(tmp_path):
    # planted paths with noise: the exact sets fingerprint the path better than pairwise tables
    train, test = synthesize(num_layers=6, num_experts=16, top_k=2, num_requests=24, tokens_per_request=48,
                             planted_paths=12, path_noise=0.1, popularity_skew=0.5,
                             seed=7).split_requests(0.75, seed=0)
    with_m = PathPredictor.fit(train, PredictorConfig(match_layers=2))
    without = PathPredictor.fit(train, PredictorConfig(match_layers=0))
    r1, r0 = evaluate(with_m, test, distances=(1,)), evaluate(without, test, distances=(1,))
    assert r1["1"]["mean_recall"] > r0["1"]["mean_recall"] + 0.005  # measured: 0.874 vs 0.861
    # and it saves and loads with the tables it needs
    loaded = PathPredictor.load(with_m.save(tmp_path / "p.npz"))
    assert evaluate(loaded, test, distances=(1,))["1"]["mean_recall"] == pytest.approx(r1["1"]["mean_recall"])


def test_fast_path_equals_reference_when_the_span_binds():
    # max_span < layers - 1: the match sources' rows stop before the last layers
    tr = synthesize(num_layers=8, num_experts=12, top_k=2, num_requests=12, tokens_per_request=30,
                    planted_paths=6, path_noise=0.2, seed=11)
    p = PathPredictor.fit(tr, PredictorConfig(max_span=3, match_layers=2, fit_iters=3))
    paths = tr.paths().astype(np.int64)[:25]
    prev = np.roll(paths, 1, axis=0)
    for layer in range(-1, tr.num_layers):
        fast = p.predict_batch(prev, layer, paths[:, :layer + 1])
        p.reference = True
        try:
            ref = p.predict_batch(prev, layer, paths[:, :layer + 1])
        finally:
            p.reference = False
        np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)


def test_successor_source_predicts_the_next_path_before_the_forward():
    # six fixed paths visited in a cycle: a token's path is a function of the previous token's,
    # which no per-layer table of the token itself (nor "repeat the previous path") can express
    rng = np.random.default_rng(0)
    L, E, K, R, N = 4, 16, 2, 24, 30
    paths = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(6)])  # [6, L, K]
    which = (np.arange(N)[None, :] + rng.integers(0, 6, R)[:, None]) % 6  # [R, N]
    ids = paths[which.reshape(-1)].transpose(1, 0, 2)  # [L, R*N, K]
    tr = RoutingTrace(ids, E, request_ids=np.repeat(np.arange(R), N), positions=np.tile(np.arange(N), R))
    train, test = tr.split_requests(0.75, seed=0)
    with_s = evaluate(PathPredictor.fit(train, PredictorConfig(match_layers=2)), test, distances=(1,))["all"]["mean_recall"]
    without = evaluate(PathPredictor.fit(train, PredictorConfig(match_layers=0)), test, distances=(1,))
    assert with_s > 0.95 and with_s > without["all"]["mean_recall"] + 0.2, (with_s, without["all"]["mean_recall"])


@pytest.mark.parametrize("E", [8, 64, 65, 128, 200])
def test_set_masks_equal_the_plain_bit_sets(E):
    """_masks: bit e % 64 of word e // 64 for every expert id, none for -1, any leading shape."""
    from routing.setmatch import _masks
    rng = np.random.default_rng(E)
    for shape in ((5, 3), (4, 6, 8), (0, 2), (3, 1)):
        ids = rng.integers(-1, E, size=shape)
        got = _masks(ids, E)
        assert got.dtype == np.uint64 and got.shape == shape[:-1] + ((E + 63) // 64,)
        for idx in np.ndindex(*shape[:-1]):
            want = [0] * ((E + 63) // 64)
            for e in map(int, ids[idx]):
                if e >= 0:
                    want[e // 64] |= 1 << (e % 64)
            assert [int(v) for v in got[idx]] == want


def _queries(ids_LTK, E, n, seed):
    """[n, L, K] query paths: stored ones, stored ones with one expert swapped (unseen sets: the nearest
    seen set's row, or none), a dropped slot (-1) and a token with no experts at all."""
    rng = np.random.default_rng(seed)
    L, T, K = ids_LTK.shape
    q = ids_LTK[:, rng.integers(0, T, n)].transpose(1, 0, 2).astype(np.int64)
    for i in range(1, n, 3):  # one expert of one layer swapped for one the set does not hold
        j, k = rng.integers(0, L), rng.integers(0, K)
        q[i, j, k] = next(e for e in rng.permutation(E) if e not in q[i, j])
    for i in range(2, n, 5):  # far from everything: experts drawn at random
        q[i, rng.integers(0, L)] = rng.choice(E, K, replace=False)
    q[0, :, -1] = -1  # a dropped slot
    q[-1, 1] = -1  # no expert at layer 1
    return q


@pytest.mark.parametrize("E,K,n", [(8, 2, 3), (16, 3, 40), (70, 3, 5), (70, 4, 64), (200, 5, 7), (200, 5, 33)])
def test_lookup_many_equals_lookup(E, K, n):
    """The fast path's lookups (a dict for few tokens, one joint search for more) give lookup's rows,
    for seen, nearest, unseen and empty sets, over one to four mask words."""
    from routing.setmatch import _masks
    tr = synthesize(num_layers=5, num_experts=E, top_k=K, num_requests=6, tokens_per_request=30,
                    planted_paths=5, path_noise=0.3, seed=E + K)
    ids = tr.expert_ids.astype(np.int64)
    q = _queries(ids, E, n, seed=n)
    for t in (_table(ids, E), SetMatchTable.from_arrays({**_table(ids, E).arrays(), "match_meta": np.array([0])})):
        layers = [3, 0, 1, 0]  # any order, repeats allowed; layer 4 holds no keys (the last layer)
        got = t.lookup_many(layers + [4], _masks(q[:, layers + [4]], E))
        want = np.stack([t.lookup(j, q[:, j]) for j in layers + [4]], 1)
        np.testing.assert_array_equal(got, want)
        assert (want[:, -1] == t.num_keys).all() and (want[:, :-1] < t.num_keys).any()
        if t.min_overlap:
            assert (want[:, :-1] == t.num_keys).any()  # the random sets: some are near no seen set


def _ids_of(m0, m1):
    """A 128-expert set from its two mask words, padded with -1 to 128 slots."""
    bits = [e for e in range(64) if int(m0) >> e & 1] + [64 + e for e in range(64) if int(m1) >> e & 1]
    return np.array(bits + [-1] * (128 - len(bits)))


_PHI = np.uint64(0x9E3779B97F4A7C15)


def test_lookup_many_equals_lookup_when_set_hashes_collide():
    """Two seen sets of a layer whose masks hash alike: lookup's search sees only the more frequent
    one, the other goes to the nearest-set scan (here: near nothing, it is small). The fast lookups
    must do the same, not find it exactly (at layer 1, where the joint index's hashes differ)."""
    from routing.setmatch import _hash, _masks
    a0, a1, b0 = np.uint64(2 ** 64 - 1), np.uint64(int(np.random.default_rng(0).integers(0, 2 ** 62))), np.uint64(0)
    with np.errstate(over="ignore"):
        b1 = (a0 * _PHI) ^ a1 ^ (b0 * _PHI)  # _hash(b) = b0 * phi ^ b1 = _hash(a)
    a, b = _ids_of(a0, a1), _ids_of(b0, b1)
    assert _hash(_masks(a[None], 128))[0] == _hash(_masks(b[None], 128))[0]
    other = np.r_[np.arange(10), [-1] * 118]
    sets = np.stack([a, a, a, b, other])  # a seen more often than b
    ids = np.stack([sets[::-1], sets, sets[::-1]])  # [L=3, T=5, K=128]
    t = _table(ids, 128)
    q = np.stack([a, b, other, np.r_[np.arange(1, 11), [-1] * 118]])
    want = t.lookup(1, q)
    assert want[0] < t.num_keys and want[1] == t.num_keys  # b: a stored set that lookup does not find
    for n in (1, 4, 40):  # the dict and the joint search
        qq = np.resize(q, (n, 128))
        np.testing.assert_array_equal(t.lookup_many([1, 0], _masks(np.stack([qq, qq], 1), 128)),
                                      np.stack([t.lookup(1, qq), t.lookup(0, qq)], 1))


def test_lookup_many_equals_lookup_when_the_joint_hashes_collide():
    """Two small sets, one at layer 0 and one at layer 1, whose layer-seeded hashes are equal: the joint
    search finds one of them; the other must still be found exactly (by its layer's own search)."""
    from routing.setmatch import _hash_at, _masks
    m0, m1, n0 = np.uint64(0b1011000110010001), np.uint64(0), np.uint64(0)
    with np.errstate(over="ignore"):
        n1 = (m0 * _PHI) ^ (_PHI * _PHI)  # (phi ^ n0) * phi ^ n1 = m0 * phi ^ m1
    m, n = _ids_of(m0, m1), _ids_of(n0, n1)
    assert _hash_at(_masks(m[None], 128), np.array([0]))[0] == _hash_at(_masks(n[None], 128), np.array([1]))[0]
    other = np.r_[np.arange(10), [-1] * 118]
    ids = np.stack([np.stack([m, other, m]), np.stack([n, n, other]), np.stack([m, n, other])])  # [L=3, T=3, K]
    t = _table(ids, 128)
    qq = np.resize(np.stack([np.stack([m, n]), np.stack([n, m]), np.stack([other, other])]), (40, 2, 128))
    want = np.stack([t.lookup(0, qq[:, 0]), t.lookup(1, qq[:, 1])], 1)
    assert (want[0] < t.num_keys).all() and (t.lookup(0, n[None]) == t.num_keys).all()  # small: no nearest
    np.testing.assert_array_equal(t.lookup_many([0, 1], _masks(qq, 128)), want)


@pytest.mark.parametrize("layer,pool,nn,depth,second,ahead", [
    (0, 50, 4, 3, 0, None), (0, 50, 4, 3, 20, None), (2, 50, 4, 3, 0, None), (3, 5, 4, 2, 0, None),
    (3, 50, 4, 0, 0, 1), (2, 3, 4, 4, 0, None), (2, 4, 4, 2, 3, 2), (3, 50, 4, 1, 50, None),
    (1, 2, 8, 6, 1, None), (3, 128, 8, 6, 64, 2)])
@pytest.mark.parametrize("n", [1, 3, 64])
def test_neighbour_counts_fast_equals_neighbour_counts(layer, pool, nn, depth, second, ahead, n):
    """Same neighbours counted, for stored, perturbed and unseen query paths (set id ``num_keys``),
    pools smaller than the neighbours asked for, one and two runs, two mask words."""
    tr = synthesize(num_layers=6, num_experts=70, top_k=3, num_requests=6, tokens_per_request=40,
                    planted_paths=4, path_noise=0.3, seed=4)
    ids = tr.expert_ids.astype(np.int64)
    t = _table(ids, tr.num_experts)
    q = _queries(ids, tr.num_experts, n, seed=layer)
    sid = np.stack([t.lookup(j, q[:, j]) for j in range(layer + 1)], 1)
    if n > 1:
        sid[n // 2, layer] = t.num_keys  # a latest set near no seen one
    want = t.neighbour_counts(layer, sid, q[:, :layer + 1], pool, nn, 0.7, depth, second, ahead=ahead)
    got = t.neighbour_counts_fast(layer, sid, q[:, :layer + 1], pool, nn, 0.7, depth, second, ahead=ahead)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].dtype == np.float32 and (want[1] > 0).any()
