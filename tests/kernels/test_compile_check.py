"""The GPU code path of the MoE kernels compiles for sm_90 on a machine without a GPU.

The interpreter tests run the kernels' logic but compile nothing; this compiles every kernel a
forward and a forward + backward call launch, with the tuned H200 configs of each shape, and the
other inference kernels (norm, router, projections, attention prep, decode attention, a packed
step's attention in every variant), through Triton's real pipeline (``benchmarks/compile_check.py``,
a stand-in driver, nothing runs). It runs in a subprocess: the check replaces Triton's driver and
launcher for the whole process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ON_GPU

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(ON_GPU, reason="on a GPU machine the kernels compile (and run) in the other tests")
def test_kernels_compile_for_sm90_with_the_tuned_configs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--tokens", "1,8,64,512,4096"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"failures": 0}
    # every shape x token count forward, fwd+bwd at 64 and 4096; the decode-step kernels at 1, 8, 64 rows
    assert out.stdout.count("  ok ") == 4 * 5 + 4 * 2 + 4 * 3
