"""benchmarks/kernels.py's round logic: every method timed once per round, interleaved, the best kept.

The timers are replaced (the real ones need a GPU); the methods themselves run (the Triton kernels in
the interpreter), so a method that cannot run is recorded as an error, not a time.
"""
import pytest
import torch

from tests.conftest import ON_GPU, load_benchmark

pytestmark = pytest.mark.skipif(ON_GPU, reason="the round logic is checked on CPU tensors in the interpreter")


def _load():
    return load_benchmark("kernels")


def test_rounds_interleave_methods_and_keep_the_best(monkeypatch):
    mod = _load()
    calls = []
    # each timing call returns a smaller number than the last: the best is the last round's
    clock = iter(range(1000, 0, -1))

    def fake_bench(fn, grad_to_none=None):
        fn()  # the method really runs once
        calls.append("eager" if grad_to_none is None else "fwdbwd")
        return float(next(clock))

    def fake_graph(fns):
        for f in fns:
            f()
        calls.append("graph")
        return float(next(clock))
    monkeypatch.setattr(mod, "bench", fake_bench)
    monkeypatch.setattr(mod, "bench_graph", fake_graph)
    E, D, I, K, T = 4, 16, 16, 2, 8
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * I, D, generator=g)
    w2 = torch.randn(E, D, I, generator=g)
    r = mod.run_case("tiny", E, D, I, K, T, w13, w2, w13.transpose(1, 2), w2.transpose(1, 2), (1e9, 1e12),
                     fwd_bwd=True, log=lambda s: None, rounds=3)
    timed = [m for m in ("moeflow", "loop", "gmm") if f"{m}_error" not in r]
    assert "moeflow" in timed and "loop" in timed
    # forward: per round each method eager then graph; then fwd+bwd rounds
    n_fwd = 2 * len(timed) * 3
    assert calls[:n_fwd] == ["eager", "graph"] * len(timed) * 3
    for m in timed:
        assert r[f"{m}_graph"] < r[f"{m}_eager"] < 1000
    # the best of three interleaved rounds: moeflow's graph time is from the last forward round
    assert r["moeflow_graph"] == 1000 - (2 * len(timed) * 2 + 1)
    fb_timed = [m for m in ("moeflow", "loop", "gmm") if f"{m}_fwdbwd_error" not in r]
    assert calls[n_fwd:] == ["fwdbwd"] * len(fb_timed) * 3


def test_routing_with_active_uses_exactly_that_many_experts():
    mod = _load()
    g = torch.Generator().manual_seed(1)
    for T, E, K, n in ((8, 8, 2, 6), (3, 16, 4, 5), (64, 128, 8, 128)):
        ids, w = mod.routing_with_active(T, E, K, n, "cpu", g)
        assert ids.shape == (T, K) and torch.unique(ids).numel() == n
        assert all(len(set(row)) == K for row in ids.tolist())                   # distinct per token
        assert torch.allclose(w.sum(1), torch.ones(T))
    with pytest.raises(ValueError, match="exactly 9 of 8"):
        mod.routing_with_active(8, 8, 2, 9, "cpu", g)


def test_anchor_draw_is_timed_only_where_the_active_count_differs(monkeypatch):
    mod = _load()
    monkeypatch.setattr(mod, "bench", lambda fn, grad_to_none=None: (fn(), 2.0)[1])
    monkeypatch.setattr(mod, "bench_graph", lambda fns: ([f() for f in fns], 1.0)[1])
    E, D, I, K, T = 8, 16, 16, 2, 8
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    bw = 1e9  # bytes per ms: an ANCHORS floor of 3 experts' bf16 weights
    one = 3 * I * D * 2 / bw
    for anchor, want in ((3 * one, 3), (None, None)):
        monkeypatch.setattr(mod, "VLLM_FLOOR", {"tiny": {T: anchor}} if anchor else {})
        r = mod.run_case("tiny", E, D, I, K, T, w13, w2, w13.transpose(1, 2), w2.transpose(1, 2), (bw, 1e12),
                         fwd_bwd=False, log=lambda s: None, anchor_draws=True)
        assert r.get("anchor_active") == want
        if want:
            assert r["moeflow_graph_anchor_draw"] == 1.0 and r["active_here"] > want
            assert r["floor_anchor_draw"] == pytest.approx(want * one + 2 * T * D * 2 / bw)


def test_compute_bound_cells_measure_the_matmul_rate_beside_their_timings(monkeypatch):
    """A compute-bound cell re-measures the matmul rate before each round's timings (the card's clock
    moves with its power draw) and is also held to that floor; a memory-bound cell is not."""
    mod = _load()
    order = []
    rates = iter([4e11, 5e11, 3e11])

    def fake_rate():
        order.append("rate")
        return next(rates)

    def fake_bench(fn, grad_to_none=None):
        order.append("eager")
        return 1.0
    monkeypatch.setattr(mod, "matmul_rate", fake_rate)
    monkeypatch.setattr(mod, "bench", fake_bench)
    monkeypatch.setattr(mod, "bench_graph", lambda fns: order.append("graph") or 1.0)
    E, D, I, K, T = 4, 16, 16, 2, 8
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    args = ("qwen3", E, D, I, K, T, w13, w2, w13.transpose(1, 2), w2.transpose(1, 2))  # (a label here)
    # bytes cost nothing, FLOPs at 1e12 per ms: compute-bound
    r = mod.run_case(*args, (1e30, 1e12), fwd_bwd=False, log=lambda s: None, rounds=3)
    assert order.count("rate") == 3 and order[0] == "rate" and order.index("rate", 1) > order.index("graph")
    assert r["matmul_TFLOPs_beside"] == 5e11 / 1e9
    assert r["floor_beside"] == pytest.approx(r["floor_math"] * 1e12 / 5e11)
    order.clear()
    r = mod.run_case(*args, (1.0, 1e30), fwd_bwd=False, log=lambda s: None, rounds=1)  # memory-bound
    assert "rate" not in order and "floor_beside" not in r
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    lines = []
    mod.print_table([r], lines.append)
    assert "m/f bs" in lines[1]
