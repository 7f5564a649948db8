"""The prefill's activation bound and the chunk it gives (offload.apply.prefill_activation_bytes /
prefill_chunk_for) against what an H200 measured. The engine's chunking is tested in tests/moe/test_generate.py,
`--prefill-chunk auto` under offloading in tests/moe/test_cli.py and tests/serve/test_engine_loop.py."""
import pytest
import torch

from offload import prefill_activation_bytes, prefill_chunk_for, step_activation_bytes

from tests.conftest import load_benchmark

# the published shapes as benchmarks/prefill_memory.py builds them (two layers: the peak is one layer's)
BENCH = load_benchmark("prefill_memory")

# s31-b / s31-c (one H200, bf16, 2026-11-30; benchmarks/prefill_memory.py, BENCHMARKS 3t): the peak device memory of one forward (last_only) above the weights and the
# KV cache, in MiB, by (model, rows, cached tokens L, new tokens T); "off" rows under apply_offload (both drivers)
MEASURED = [
    ("mixtral", 1, 0, 128, 49.1), ("mixtral", 1, 0, 512, 84.7), ("mixtral", 1, 0, 2048, 244.6),
    ("mixtral", 1, 0, 8192, 990.4), ("mixtral", 4, 0, 512, 238.6), ("mixtral", 4, 0, 2048, 894.4),
    ("mixtral", 1, 8192, 512, 92.9), ("mixtral", 1, 8192, 2048, 276.6), ("mixtral", 1, 16384, 2048, 308.6),
    ("qwen3", 1, 0, 128, 20.1), ("qwen3", 1, 0, 512, 42.7), ("qwen3", 1, 0, 2048, 152.8), ("qwen3", 1, 0, 8192, 635.2),
    ("qwen3", 4, 0, 512, 146.8), ("qwen3", 4, 0, 2048, 539.2), ("qwen3", 1, 8192, 512, 50.7),
    ("qwen3", 1, 8192, 2048, 184.8), ("qwen3", 1, 16384, 2048, 216.8),
    ("dsv2lite", 1, 0, 128, 19.6), ("dsv2lite", 1, 0, 512, 40.6), ("dsv2lite", 1, 0, 2048, 160.5),
    ("dsv2lite", 1, 0, 8192, 741.1), ("dsv2lite", 4, 0, 512, 154.5), ("dsv2lite", 4, 0, 2048, 645.1),
    ("dsv2lite", 1, 8192, 512, 49.6), ("dsv2lite", 1, 8192, 2048, 192.5), ("dsv2lite", 1, 16384, 2048, 224.5),
    ("olmoe", 1, 0, 128, 16.1), ("olmoe", 1, 0, 512, 40.6), ("olmoe", 1, 0, 2048, 152.3), ("olmoe", 1, 0, 8192, 657.2),
    ("olmoe", 4, 0, 512, 146.3), ("olmoe", 4, 0, 2048, 561.2), ("olmoe", 1, 8192, 512, 48.6),
    ("olmoe", 1, 8192, 2048, 184.3), ("olmoe", 1, 16384, 2048, 216.3),
    # offloaded, device driver | host driver (Mixtral)
    ("mixtral", 1, 0, 512, 64.7), ("mixtral", 1, 0, 2048, 246.7), ("mixtral", 4, 0, 512, 240.7),
    ("mixtral", 1, 8192, 2048, 278.7), ("mixtral", 1, 0, 512, 71.2), ("mixtral", 1, 0, 2048, 259.1),
    ("mixtral", 4, 0, 512, 253.1), ("mixtral", 1, 8192, 2048, 291.1),
]


def _cfg(key):
    return BENCH.config(key, 2)


@pytest.mark.parametrize("key,B,L,T,mib", MEASURED)
def test_the_bound_lies_above_every_measured_prefill_and_not_far(key, B, L, T, mib):
    est = prefill_activation_bytes(_cfg(key), B, T, L + T, torch.bfloat16) / 2 ** 20
    assert mib <= est, (est, mib)
    # close where the chunk is chosen (thousands of tokens); small calls carry the worst-case padding
    assert est <= (1.7 if B * T >= 2048 else 5.0) * mib, (est, mib)


def test_the_bound_grows_with_rows_tokens_slots_and_dtype():
    cfg = _cfg("qwen3")
    base = prefill_activation_bytes(cfg, 1, 512, 1024)
    assert prefill_activation_bytes(cfg, 2, 512, 1024) > base
    assert prefill_activation_bytes(cfg, 1, 1024, 1024) > base
    assert prefill_activation_bytes(cfg, 1, 512, 4096) > base
    assert prefill_activation_bytes(cfg, 1, 512, 1024, torch.float32) > base
    assert prefill_activation_bytes(cfg, 0, 512, 1024) == 0
    with pytest.raises(ValueError, match="must be >= 0"):
        prefill_activation_bytes(cfg, 1, -1, 10)


def test_the_chunk_is_the_largest_power_of_two_inside_the_reserve():
    cfg = _cfg("mixtral")
    reserve = 256 << 20
    chunk = prefill_chunk_for(cfg, reserve, 1, 32768)
    assert chunk is not None and chunk & (chunk - 1) == 0
    assert prefill_activation_bytes(cfg, 1, chunk, 32768) <= reserve < prefill_activation_bytes(cfg, 1, 2 * chunk, 32768)
    # the chunk is a step's budget across its rows (the engine packs it beside the rows decoding): 8 rows cost the
    # other 7 rows' decode tokens and logits, not 8 x the chunk (before session 32 they got an eighth of it)
    # (at 32768 slots the 7 decoding rows' attention scratch, ~4 MB each, takes a power of two off the chunk here)
    from offload.apply import _attention_scratch as scratch
    eight = prefill_chunk_for(cfg, reserve, 8, 32768)
    assert step_activation_bytes(cfg, 8, eight, 32768) <= reserve < step_activation_bytes(cfg, 8, 2 * eight, 32768)
    assert eight in (chunk, chunk // 2) and prefill_activation_bytes(cfg, 8, eight, 32768) > reserve
    assert step_activation_bytes(cfg, 8, eight, 32768) == prefill_activation_bytes(cfg, 1, eight + 7, 32768) \
        - scratch(cfg, eight + 7, 32768) + scratch(cfg, eight, 32768) + 7 * scratch(cfg, 1, 32768) + 7 * 32000 * 4
    assert scratch(cfg, 1, 32768) > 0 and scratch(cfg, 1, 1024) == 0  # a decoding row cut in 32 pieces / one piece
    # a whole max_len that fits needs no chunk; a reserve short of even 16 tokens gets 16
    assert prefill_chunk_for(cfg, reserve, 1, 256) is None
    assert prefill_chunk_for(cfg, 1 << 20, 1, 32768) == 16


def test_the_benchmark_script_prints_the_bound_on_the_cpu(capsys):
    """benchmarks/prefill_memory.py --device cpu: the bound for every grid point (the GPU measures beside it)."""
    bench = BENCH
    assert bench.main(["--models", "tiny,mixtral", "--device", "cpu", "--offload-models", "", "--engine-models", "tiny",
                       "--engine-rows", "4", "--engine-tokens", "32"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if "bound" in ln]
    assert len(lines) == 2 * len(bench.GRID) and lines[0].startswith("tiny")
    # the engine's lone prefill timed by row prefix and with every row (on the CPU, no peak)
    table = out[out.index(next(ln for ln in out if ln.startswith("engine"))) + 1:]
    assert [ln.split()[:3] for ln in table] == [["tiny", "4", "32"]] * 4
    assert " prefix " in table[0] and " all rows " in table[1] and all(float(ln.split()[-1]) > 0 for ln in table)
    # the prompt joining 3 decoding rows: packed, then padded
    assert " joins packed " in table[2] and " joins padded " in table[3]
    with pytest.raises(SystemExit):
        bench.main(["--models", "nope", "--device", "cpu"])
    # mixed steps: packed, packed part by part, padded and the engine's choice, each timed (two small cases, one layer)
    assert bench.main(["--models", "", "--device", "cpu", "--offload-models", "", "--mixed-models", "tiny",
                       "--mixed-layers", "1", "--mixed-cases", "7 dec + 32;1 dec + 16"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(next(ln for ln in out if ln.startswith("mixed"))) + 1:]
    assert [ln.split()[:4] for ln in table] == [["tiny", "7", "dec", "+"], ["tiny", "1", "dec", "+"]]
    assert all(float(v) > 0 for ln in table for v in ln.split()[-4:])
    with pytest.raises(SystemExit):
        bench.main(["--models", "", "--device", "cpu", "--mixed-models", "tiny", "--mixed-cases", "nope"])


def test_auto_takes_the_reserve_offloaded_and_the_free_memory_resident(monkeypatch):
    """offload.auto_prefill_chunk (--prefill-chunk auto): an offloaded model's chunk fits its budget's reserve; a
    resident one on a CUDA device fits 90% of the free memory less the engine's KV cache; on the CPU, whole prompts."""
    from types import SimpleNamespace

    from offload import auto_prefill_chunk, kv_cache_bytes
    cfg = _cfg("mixtral")
    offloaded = SimpleNamespace(config=cfg, dtype=torch.bfloat16, offload_cache=object())
    assert auto_prefill_chunk(offloaded, 1, 32768, 256 << 20) == prefill_chunk_for(cfg, 256 << 20, 1, 32768)
    with pytest.raises(ValueError, match="reserve_bytes"):
        auto_prefill_chunk(offloaded, 1, 32768)
    gpu = SimpleNamespace(config=cfg, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    kv = kv_cache_bytes(cfg, 2, 32768, torch.bfloat16)
    fits_512 = prefill_activation_bytes(cfg, 2, 512, 32768)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(kv + fits_512 / 0.9) + 1, 1 << 40))
    assert auto_prefill_chunk(gpu, 2, 32768) == 512
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1 << 40, 1 << 40))
    assert auto_prefill_chunk(gpu, 2, 32768) is None  # a whole max_len fits
    assert auto_prefill_chunk(SimpleNamespace(config=cfg, dtype=torch.float32, device=torch.device("cpu")), 1, 32768) \
        is None
