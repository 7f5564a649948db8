"""benchmarks/prefill_attention.py runs end to end (tiny cases; the interpreter off a GPU): both tables, each output
checked against the reference inside the script (it exits on a wrong one)."""
import json

import torch

from tests.conftest import load_benchmark


def test_the_prefill_attention_benchmark_runs_and_checks_its_output(tmp_path, monkeypatch):
    import kernels.packed_attention as PA
    for name in ("WIDE_ROWS", "WIDE_FROM_SLOTS"):  # (the script scales them down; restored after the test)
        monkeypatch.setattr(PA, name, getattr(PA, name))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    script = load_benchmark("prefill_attention")
    assert script.main(["--device", device, "--quick", "--heads", "qwen3,dsv2lite", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "prefill_attention.json"))["rows"]
    assert [(r["heads"], r["table"]) for r in rows] == [("qwen3", "main"), ("qwen3", "wide"), ("dsv2lite", "main"),
                                                       ("dsv2lite", "wide")]
    assert all(r["errors"][0] < (1e-4 if device == "cpu" else 5e-3) and r["floor_ms"] > 0 for r in rows)
