"""benchmarks/parallel.py: its repeats rule, and one cell of the grid as a gloo dry run (2 CPU ranks):
the table it writes has every column the issue asks for, from timings it actually took."""
import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def test_repeats_by_step_length():
    p = load_benchmark("parallel")
    # short steps are cheap and noisy: every repeat asked for (the default is 9)
    assert p._iters_for(0.0015, 9) == 9
    assert p._iters_for(0.019, 9) == 9
    # 20 ms and more: at most LONG_STEP_ITERS, fewer as the step grows, never none
    assert p._iters_for(0.02, 9) == p.LONG_STEP_ITERS == 3
    assert p._iters_for(0.1, 9) == 2
    assert p._iters_for(0.2, 9) == 1
    assert p._iters_for(5.0, 9) == 1
    assert p._iters_for(0.0015, 1) == 1  # a lean cell stays at one


def test_one_cell_dry_run(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "parallel.py"), "--cpu", "--gpus", "2", "--configs", "small",
           "--tokens", "256", "--experts-per-rank", "4", "--capacity", "0", "--modes", "fwd",
           "--iters", "3", "--switch-steps", "8", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.load(open(tmp_path / "parallel_2gpu_cpu.json"))
    (row,) = res["rows"]
    static = {k: v for k, v in row["static"].items() if v is not None}
    assert set(static) >= {"ep:d1", "ep:d2", "ep:d4", "dp", "tp"}
    assert all(v > 0 for v in static.values())
    assert row["best"] == min(static, key=static.get) and row["best_s"] == min(static.values())
    assert row["worst_s"] == max(static.values())
    assert row["chooser"] in static and row["settled"]
    assert row["chooser_over_best"] == row["chooser_s"] / row["best_again_s"]
    assert row["switch_pair"][0] == row["best"] and row["switch_steps"] == 8 and row["switch_pairs"] == 3
    assert "chooser/best:" in r.stdout and "switch/step" in r.stdout
