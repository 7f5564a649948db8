"""benchmarks/tune_kernels.py --refine: each GEMM swept alone around its tile, the fastest few of each
paired in whole calls, a change kept only past the whole-call gain threshold. Timers are stand-ins
(the real ones need a GPU): each candidate's cost is read from the config its closure carries; the
alignment and the reference up GEMM really run (interpreted)."""
from dataclasses import replace

import pytest
import torch

from benchmarks import tune_kernels as tk
from kernels.launch_config import GemmConfig, MoEConfig
from tests.conftest import ON_GPU

pytestmark = pytest.mark.skipif(ON_GPU, reason="stand-in timers; the real sweep runs on the GPU")

BASE = MoEConfig(32, GemmConfig(block_n=32, block_k=32), GemmConfig(block_n=64, block_k=32))  # disjoint sweeps
BEST_UP = replace(BASE.up, tma=True, a_tma=True, num_stages=4, tail=0)      # fastest alone
SECOND_UP = replace(BASE.up, tma=True, num_stages=4, tail=1)                # second alone, best in whole calls
BEST_DOWN = replace(BASE.down, tail=2, num_stages=3)


def _inputs():
    g = torch.Generator().manual_seed(0)
    E, D, I, K, T = 4, 32, 32, 2, 40
    w13 = torch.randn(E, 2 * I, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    x = torch.randn(T, D, generator=g)
    ids, w = tk.random_routing(T, E, K, "cpu", g)
    return x, w13, w2, ids, w


def _timer(gain, broken=()):
    """GEMMs alone: BEST_UP 0.5, SECOND_UP 0.6, BEST_DOWN 0.5, the rest 1.0. Whole calls: BASE 2.0,
    (SECOND_UP, BEST_DOWN) 2 * (1 - gain), any other pair 2 * (1 - gain / 2)."""
    def timer(f):
        c = f.__defaults__[0]
        if c in broken:
            raise RuntimeError("out of shared memory")
        if isinstance(c, MoEConfig):
            if c == BASE:
                return 2.0
            return 2.0 * (1 - gain) if (c.up, c.down) == (SECOND_UP, BEST_DOWN) else 2.0 * (1 - gain / 2)
        return {BEST_UP: 0.5, SECOND_UP: 0.6, BEST_DOWN: 0.5}.get(c, 1.0)
    return timer


def test_neighbours_cover_every_knob_combination():
    n = tk._neighbours(BASE.up)
    # (tma, a_tma, stages) x tail 0/1/2 per tile, and (a_tma, stages) on a persistent grid (tail 0, tma)
    assert len(n) == 2 * 2 * 2 * 3 + 2 * 2 and len(set(n)) == len(n) and BASE.up in n
    assert all(c.tail == 0 and c.tma for c in n if c.persistent) and sum(c.persistent == 1 for c in n) == 4
    assert all((c.block_n, c.block_k, c.num_warps) == (32, 32, BASE.up.num_warps) for c in n)


def test_knobs_restrict_the_sweep():
    """--knobs: only the named settings move (a persistent tile keeps tail 0: the others are refused);
    --knobs names are checked."""
    from dataclasses import replace
    n = tk._neighbours(BASE.up, {"tail": tk.REFINE_KNOBS["tail"]})
    assert n == [replace(BASE.up, tail=t) for t in (0, 1, 2)]
    persistent = replace(BASE.up, tma=True, persistent=1)
    assert tk._neighbours(persistent, {k: tk.REFINE_KNOBS[k] for k in ("tail", "num_stages")}) == [
        replace(persistent, num_stages=s) for s in (3, 4)]
    with pytest.raises(SystemExit, match="unknown"):
        tk.main(["--refine", "--knobs", "tail,colour"])
    with pytest.raises(SystemExit, match="with --refine"):
        tk.main(["--knobs", "tail"])


def test_best_of_keeps_the_minimum_and_drops_failures():
    seq = {"a": iter([3.0, 1.0]), "b": iter([2.0, 2.5])}

    def timer(f):
        return f()
    fns = {"a": lambda: next(seq["a"]), "b": lambda: next(seq["b"]), "c": lambda: 1 / 0}
    assert tk._best_of(fns, 2, timer) == {"a": 1.0, "b": 2.0}


def test_refine_keeps_the_pair_fastest_as_a_whole_call():
    """The up GEMM fastest alone is not the one of the fastest whole call: the whole call decides."""
    ms, cfg = tk.refine_config(*_inputs(), BASE, log=lambda *_: None, timer=_timer(0.10))
    assert cfg == replace(BASE, up=SECOND_UP, down=BEST_DOWN) and ms == pytest.approx(1.8)


def test_refine_pairs_only_the_finalists():
    """With one finalist per GEMM the second-fastest up GEMM never reaches the whole-call round."""
    ms, cfg = tk.refine_config(*_inputs(), BASE, log=lambda *_: None, timer=_timer(0.10), finalists=1)
    assert cfg == replace(BASE, up=BEST_UP, down=BEST_DOWN) and ms == pytest.approx(1.9)


def test_refine_keeps_the_tuned_config_below_the_gain_threshold():
    ms, cfg = tk.refine_config(*_inputs(), BASE, log=lambda *_: None, timer=_timer(tk.VARIANT_MIN_GAIN / 2))
    assert cfg == BASE and ms == pytest.approx(2.0)


def test_refine_skips_candidates_that_cannot_launch():
    ms, cfg = tk.refine_config(*_inputs(), BASE, log=lambda *_: None, timer=_timer(0.10, broken=(SECOND_UP,)))
    assert cfg.up != SECOND_UP and cfg.down == BEST_DOWN


# --refine-backward: the backward's tiles around BASE's (its backward is its forward tiles)
CANON_UP, CANON_DOWN = replace(BASE.up, tma=False), replace(BASE.down, tma=False)
BEST_DH = replace(CANON_UP, num_stages=4, tail=1)
BEST_DX = replace(CANON_DOWN, a_tma=True, tail=2)


def _bwd_timers(gain, broken=()):
    """Alone: BEST_DH 0.5, BEST_DX 0.5, the rest 1.0. Steps: BASE 4.0, (BEST_DH, BEST_DX) 4 * (1 - gain),
    any other pair 4 * (1 - gain / 2)."""
    def timer(f):
        c = f.__defaults__[0]
        if c in broken:
            raise RuntimeError("out of shared memory")
        return {BEST_DH: 0.5, BEST_DX: 0.5}.get(c, 1.0)

    def step_timer(f):
        c = f.__defaults__[0]
        if c == BASE:
            return 4.0
        return 4.0 * (1 - gain) if c.backward == (BEST_DH, BEST_DX) else 4.0 * (1 - gain / 2)
    return timer, step_timer


def test_backward_neighbours():
    dh, dx = tk._bwd_neighbours(BASE.up, False), tk._bwd_neighbours(BASE.down, True)
    assert len(dh) == 2 * 3 and len(dx) == 2 * 3 * 2 and len(set(dx)) == len(dx)
    assert all(not c.persistent and not c.tma for c in dh + dx) and BEST_DH in dh and BEST_DX in dx
    # a persistent forward tile (tail 0, TMA) gives per-tile backward candidates
    assert all(not c.persistent for c in tk._bwd_neighbours(replace(BASE.up, tma=True, persistent=1), False))


def test_refine_backward_keeps_the_fastest_step_and_leaves_the_forward():
    timer, step_timer = _bwd_timers(0.10)
    ms, cfg = tk.refine_backward(*_inputs(), BASE, log=lambda *_: None, timer=timer, step_timer=step_timer)
    assert cfg == replace(BASE, bwd_up=BEST_DH, bwd_down=BEST_DX) and ms == pytest.approx(3.6)
    assert (cfg.up, cfg.down) == (BASE.up, BASE.down)


def test_refine_backward_keeps_the_tuned_config_below_the_gain_threshold():
    timer, step_timer = _bwd_timers(tk.VARIANT_MIN_GAIN / 2)
    ms, cfg = tk.refine_backward(*_inputs(), BASE, log=lambda *_: None, timer=timer, step_timer=step_timer)
    assert cfg == BASE and ms == pytest.approx(4.0)


def test_refine_backward_skips_candidates_that_cannot_launch():
    timer, step_timer = _bwd_timers(0.10, broken=(BEST_DX,))
    ms, cfg = tk.refine_backward(*_inputs(), BASE, log=lambda *_: None, timer=timer, step_timer=step_timer)
    assert cfg.bwd_down != BEST_DX and cfg.backward[0] == BEST_DH


def test_write_table_merges_entries_and_both_time_tables(tmp_path, monkeypatch):
    """A refine run writes only the token counts it changed: the file keeps the others, and forward
    times (_times_ms) and forward + backward step times (_fwd_bwd_times_ms) merge per token count."""
    import json

    import kernels.launch_config as lc
    monkeypatch.setattr(lc, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    first = {"64": BASE.to_dict(), "4096": BASE.to_dict(), "_times_ms": {"64": 0.2, "4096": 0.8}}
    tk.write_table(8, 32, 16, first, [])
    bwd = replace(BASE, bwd_up=replace(BASE.up, tail=2))
    paths = tk.write_table(8, 32, 16, {"4096": bwd.to_dict(), "_fwd_bwd_times_ms": {"4096": 2.9}}, [tmp_path / "out"])
    got = json.loads(paths[0].read_text())
    assert got["64"] == BASE.to_dict() and MoEConfig.from_dict(got["4096"]) == bwd
    assert got["_times_ms"] == {"64": 0.2, "4096": 0.8} and got["_fwd_bwd_times_ms"] == {"4096": 2.9}
    tk.write_table(8, 32, 16, {"_fwd_bwd_times_ms": {"64": 1.1}}, [])
    assert json.loads(paths[0].read_text())["_fwd_bwd_times_ms"] == {"4096": 2.9, "64": 1.1}
    assert json.loads((tmp_path / "out" / "tuned_configs.json").read_text())[paths[0].name]["4096"] == bwd.to_dict()
    assert lc.load_tuned(8, 32, 16, "Test GPU")[4096] == bwd


def test_rotation_gives_every_candidate_every_place_and_takes_medians():
    """Pass i starts at candidate i: over as many passes as candidates each runs first, second and last
    once; a candidate's time is the median of its single calls (a clock drifting within a pass would
    otherwise favour whichever candidate ran first)."""
    order, clock = [], iter(range(100))
    runs = {k: (lambda k=k: order.append(k)) for k in "abc"}

    def timed_call(run):
        run()
        t = float(next(clock))
        return lambda: t
    settled = []
    got = tk._rotation(runs, 3, timed_call, lambda: settled.append(True))
    assert order == list("abcbcacab") and settled == [True]
    # a's calls took 0, 5, 7 -> 5; b's 1, 3, 8 -> 3; c's 2, 4, 6 -> 4
    assert got == {"a": 5.0, "b": 3.0, "c": 4.0}
    places = {k: sorted(order[3 * i:3 * i + 3].index(k) for i in range(3)) for k in "abc"}
    assert all(p == [0, 1, 2] for p in places.values())


def test_best_of_uses_a_timers_rotation():
    """The GPU timers carry a rotation, which _best_of hands every candidate to at once."""
    seen = []

    def timer(f):
        raise AssertionError("a timer with a rotation is not called per candidate")
    timer.rotation = lambda fns, rounds: seen.append((sorted(fns), rounds)) or {k: 1.0 for k in fns}
    assert tk._best_of({"x": None, "y": None}, 2, timer) == {"x": 1.0, "y": 1.0} and seen == [(["x", "y"], 2)]
    assert tk._graph_timer.rotation is tk._graph_rotation and tk._eager_timer.rotation is tk._eager_rotation
