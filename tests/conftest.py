"""Test-suite set-up.

TRITON_INTERPRET=1 must be set before any Triton kernel module is imported, so it is set here,
at the top, when no CUDA device is present: the Triton kernels then run in the interpreter on
the CPU. On a GPU machine the same tests run the compiled kernels.
"""
import os
import sys

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

# one thread: the suite is thousands of tiny ops, where a second thread costs more than it gives
torch.set_num_threads(1)


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package, and on sys.path its kernels.py
    would shadow the library's `kernels`): for the tests that run a benchmark script's own checks."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _interpreter_flag_unchanged():
    """No test leaves TRITON_INTERPRET changed for the tests after it: the kernels read it once, at import, but
    tests that choose between the interpreter and compiled kernels read it when they run (a benchmark script run
    in-process once set it on a GPU machine, and a later test ran CPU cases against compiled kernels)."""
    yield
    now = os.environ.get("TRITON_INTERPRET")
    if now != _INTERPRET_AT_START:
        if _INTERPRET_AT_START is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _INTERPRET_AT_START
        pytest.fail(f"the test left TRITON_INTERPRET={now!r} (was {_INTERPRET_AT_START!r} at the session's start); "
                    f"change it with monkeypatch.setenv so it is restored")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (2 CPUs; actors use fractional CPUs).

    Tests that use it run inside a loopback-only network namespace (.ci/test makes one), since
    Ray otherwise binds the machine's external address.
    """
    try:
        import ray
    except ImportError:
        if ON_GPU:  # the lent GPU machines have no Ray; CI (no GPU) installs it, and a missing one fails there
            pytest.skip("Ray is not installed on this GPU machine")
        raise

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", ignore_reinit_error=True)
    try:
        yield ray
    finally:
        ray.shutdown()
