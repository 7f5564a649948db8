"""benchmarks/routing_broadcast.py as a gloo dry run (2 CPU ranks): every rank's own routing equals
rank 0's on the same input, so the forward without the broadcast is timed beside the one with it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_times_both_forwards(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "routing_broadcast.py"), "--cpu", "--gpus", "2",
           "--layers", "2", "--tokens", "1,8", "--rounds", "3", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    res = json.load(open(tmp_path / "routing_broadcast_2cpu.json"))
    assert [row["tokens"] for row in res["rows"]] == [1, 8]
    for row in res["rows"]:
        assert row["routing_differed_layers"] == 0
        assert row["bcast_us"] > 0 and row["with_ms"] > 0 and row["without_ms"] > 0
        assert row["share"] == pytest.approx((row["with_ms"] - row["without_ms"]) / row["with_ms"])
    assert "share of fwd" in r.stdout
