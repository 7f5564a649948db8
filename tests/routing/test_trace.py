import json

import numpy as np
import pytest

from routing import RoutingTrace


def _trace(with_tokens=True):
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 8, size=(3, 10, 2))
    return RoutingTrace(ids, 8, rng.random((3, 10, 2)).astype(np.float32), np.repeat([4, 7], 5),
                        np.tile(np.arange(5), 2), {"model": "x"},
                        token_ids=rng.integers(0, 100, 10) if with_tokens else None)


@pytest.mark.parametrize("with_tokens", [True, False])
def test_round_trip(tmp_path, with_tokens):
    t = _trace(with_tokens)
    p = t.save(tmp_path / "t")
    assert p.suffix == ".npz"
    u = RoutingTrace.load(p)
    np.testing.assert_array_equal(u.expert_ids, t.expert_ids)
    np.testing.assert_array_equal(u.weights, t.weights)
    np.testing.assert_array_equal(u.request_ids, t.request_ids)
    np.testing.assert_array_equal(u.positions, t.positions)
    assert u.meta == {"model": "x"} and u.num_experts == 8
    if with_tokens:
        np.testing.assert_array_equal(u.token_ids, t.token_ids)
    else:
        assert u.token_ids is None


def test_slicing_keeps_token_ids_and_paths():
    t = _trace()
    s = t.select_tokens(np.arange(10) % 2 == 0)
    np.testing.assert_array_equal(s.token_ids, t.token_ids[::2])
    assert t.paths().shape == (10, 3, 2)
    np.testing.assert_array_equal(t.paths()[4, 1], t.expert_ids[1, 4])


def test_previous_token_index_follows_each_request():
    t = RoutingTrace(np.zeros((1, 6, 1), int), 2, request_ids=[0, 1, 0, 1, 1, 2])
    np.testing.assert_array_equal(t.previous_token_index(), [-1, -1, 0, 1, 3, -1])


def test_malformed_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a RoutingTrace"):
        RoutingTrace.load(junk)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="header"):
        RoutingTrace.load(tmp_path / "other.npz")
    hdr = np.frombuffer(json.dumps({"format": "else", "version": 1}).encode(), np.uint8)
    np.savez(tmp_path / "fmt.npz", header=hdr, expert_ids=np.zeros((1, 1, 1), np.int16))
    with pytest.raises(ValueError, match="unsupported trace format"):
        RoutingTrace.load(tmp_path / "fmt.npz")
    hdr = np.frombuffer(json.dumps({"format": "moeflow.RoutingTrace", "version": 1, "num_experts": 4}).encode(),
                        np.uint8)
    np.savez(tmp_path / "bad.npz", header=hdr, expert_ids=np.full((1, 2, 1), 9, np.int16))
    with pytest.raises(ValueError, match="wrong num_experts"):
        RoutingTrace.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        RoutingTrace.load(tmp_path / "missing.npz")


def test_bad_shapes():
    with pytest.raises(ValueError, match="layers, tokens, top_k"):
        RoutingTrace(np.zeros((4, 2), int), 4)
    with pytest.raises(ValueError, match="token_ids"):
        RoutingTrace(np.zeros((1, 4, 2), int), 4, token_ids=np.zeros(3))


def test_interleaved_decode_order():
    ids = np.arange(7)[None, :, None]
    t = RoutingTrace(ids, 7, request_ids=[0, 0, 0, 1, 1, 2, 2], positions=[0, 1, 2, 0, 1, 0, 1])
    u, per_step = t.interleaved()
    assert per_step == 3
    np.testing.assert_array_equal(u.expert_ids[0, :, 0], [0, 3, 5, 1, 4, 6])
    u, per_step = t.interleaved(3)
    assert per_step == 1 and u.num_tokens == 3
    with pytest.raises(ValueError, match="no request"):
        t.interleaved(4)


def test_mix_requests_interleaves_the_traces_requests_in_arrival_order():
    a = _trace()  # requests 4 and 7, 5 tokens each
    b = RoutingTrace(np.full((3, 6, 2), 5), 8, None, [9, 9, 1, 1, 1, 9], [0, 1, 0, 1, 2, 2], token_ids=np.arange(6))
    m = RoutingTrace.mix_requests([a, b], ["py", "c"])
    assert m.num_tokens == 16 and m.meta == {"mixed": ["py", "c"]} and m.weights is None  # b has none
    # a's requests 4, 7 -> 0, 2; b's 1, 9 -> 1, 3: the scheduler meets a, b, a, b
    np.testing.assert_array_equal(m.request_ids, [0] * 5 + [2] * 5 + [3, 3, 1, 1, 1, 3])
    np.testing.assert_array_equal(m.expert_ids[:, :10], a.expert_ids)
    np.testing.assert_array_equal(m.expert_ids[:, 10:], b.expert_ids)
    np.testing.assert_array_equal(m.token_ids[10:], np.arange(6))
    np.testing.assert_array_equal(m.previous_token_index()[10:], [-1, 10, -1, 12, 13, 11])  # each request's own order
    with pytest.raises(ValueError, match="one model"):
        RoutingTrace.mix_requests([a, RoutingTrace(np.zeros((2, 4, 2), int), 8)])
