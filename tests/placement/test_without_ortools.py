"""On a machine without OR-Tools (the GPU machines): plans, the tier types and the runtime import,
and solving says what is missing and what to do instead."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import sys
for m in ("ortools", "ortools.sat", "ortools.sat.python", "ortools.sat.python.cp_model", "ortools.graph",
          "ortools.graph.python", "ortools.graph.python.min_cost_flow"):
    sys.modules[m] = None  # "import ortools..." raises ModuleNotFoundError, as where it is not installed
import placement.decode, placement.runtime, placement.adaptive  # noqa: F401
from placement.cpu_tier import TieredPlan, TierConfig, solve_cpu_tier  # noqa: F401
from placement import AffinityStats, solve_exflow, synthetic_affinity_trace
import offload.tiered  # noqa: F401
trace, _ = synthetic_affinity_trace(num_layers=2, num_experts=4, num_groups=2, num_tokens=20, seed=0)
try:
    solve_exflow(AffinityStats.from_trace(trace), 2)
except ModuleNotFoundError as e:
    assert e.name == "ortools", e.name
    assert "pip install ortools" in str(e) and "PlacementPlan.load" in str(e), str(e)
    print("refused:", e)
else:
    raise SystemExit("solve_exflow ran without OR-Tools")
'''


def test_imports_without_ortools_and_solving_says_why():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "refused: solving a placement needs OR-Tools" in r.stdout
