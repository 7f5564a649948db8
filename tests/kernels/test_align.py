"""Token alignment: the Triton single-program kernel equals the torch reference, and the layout is valid."""
import json

import pytest
import torch

from kernels.align import align_parallel, align_reference, align_tokens, align_triton, max_padded_rows
from kernels.launch_config import MoEConfig, config_file_name, default_config, load_tuned, pick_config
from tests.conftest import ON_GPU

DEV = "cuda" if ON_GPU else "cpu"


@pytest.mark.parametrize("impl", [align_triton, align_parallel])
@pytest.mark.parametrize("T,K,E,BM", [(1, 2, 8, 16), (33, 3, 5, 16), (40, 1, 4, 16), (20, 2, 130, 32),
                                      (3, 4, 4, 64), (0, 2, 4, 16), (300, 2, 6, 16), (300, 2, 130, 16)])
def test_triton_alignment_equals_reference_and_is_valid(impl, T, K, E, BM):
    g = torch.Generator().manual_seed(T * 7 + E)
    ids = torch.randint(-1, E, (T, K), generator=g)
    if T:
        ids[0, 0] = E + 2                                  # out of range: dropped like -1
    ids = ids.to(DEV)
    ref = align_reference(ids, E, BM)
    got = impl(ids, E, BM)
    for f in ("sorted_pair_S", "block_expert_B", "num_padded_1", "expert_start_E1"):
        assert torch.equal(getattr(ref, f).int().cpu(), getattr(got, f).int().cpu()), f
    # the layout: every real pair exactly once, in its expert's run, in stable order
    pairs, blocks = ref.sorted_pair_S.long().cpu(), ref.block_expert_B.long().cpu()
    flat = ids.reshape(-1).cpu()
    real = (flat >= 0) & (flat < E)
    assert pairs.shape[0] == max_padded_rows(T * K, E, BM)
    held = pairs[pairs < T * K]
    assert sorted(held.tolist()) == torch.nonzero(real).flatten().tolist()
    for row, p in enumerate(pairs.tolist()):
        if p < T * K:
            assert flat[p] == blocks[row // BM]
    n = int(ref.num_padded_1)
    assert n % BM == 0 and (blocks[: n // BM] >= 0).all() and (blocks[n // BM:] == -1).all()


@pytest.mark.parametrize("programs", [1, 3, 7, 100])
@pytest.mark.parametrize("T,K,E,BM", [(300, 2, 130, 16), (257, 3, 6, 16), (50, 8, 64, 32), (600, 2, 130, 16)])
def test_parallel_alignment_with_long_chunks_equals_reference(programs, T, K, E, BM):
    """Few programs: each sorts a long chunk and fills several tiles of the block map; many programs
    (75 chunks at 1200 pairs): each sums the chunks' counts in several steps."""
    g = torch.Generator().manual_seed(T + E + programs)
    ids = torch.randint(-1, E, (T, K), generator=g)
    ids[:40] = ids[0]                                  # a run of one expert across step boundaries
    ids = ids.to(DEV)
    ref, got = align_reference(ids, E, BM), align_parallel(ids, E, BM, programs=programs)
    for f in ("sorted_pair_S", "block_expert_B", "num_padded_1", "expert_start_E1"):
        assert torch.equal(getattr(ref, f).int().cpu(), getattr(got, f).int().cpu()), (f, programs)


def test_align_rejects_non_power_of_two_block():
    with pytest.raises(ValueError, match="power of two"):
        align_tokens(torch.zeros(2, 1, dtype=torch.long), 4, 24)


def test_tuned_config_table_is_read_by_token_count(tmp_path, monkeypatch):
    import kernels.launch_config as lc
    table = {"1": MoEConfig(16).to_dict(), "64": MoEConfig(32).to_dict(), "_comment": "x"}
    name = config_file_name(7, 48, 32, "Fake GPU")
    (tmp_path / name).write_text(json.dumps(table))
    monkeypatch.setattr(lc, "CONFIG_DIR", tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    load_tuned.cache_clear()
    try:
        assert pick_config(1, 2, 7, 48, 32, "Fake GPU").block_m == 16
        assert pick_config(30, 2, 7, 48, 32, "Fake GPU").block_m == 32
        assert pick_config(5000, 2, 7, 48, 32, "Fake GPU").block_m == 32
        assert pick_config(1, 2, 7, 48, 32, "Other GPU") == default_config(1, 2, 7)
    finally:
        load_tuned.cache_clear()
    with pytest.raises(ValueError, match="unknown MoEConfig keys"):
        MoEConfig.from_dict({"block_m": 16, "bogus": 1})


def test_shipped_config_files_parse():
    from kernels.launch_config import CONFIG_DIR
    for path in CONFIG_DIR.glob("*.json"):
        table = {int(t): MoEConfig.from_dict(c) for t, c in json.loads(path.read_text()).items()
                 if not t.startswith("_")}
        assert table, path
