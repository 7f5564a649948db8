"""kernels.packed_attention (a packed step's attention in one launch) and kernels.attn_prep.prepare_qkv_rows (its
q/k/v preparation, each token to its own cache row), against their torch references; on the CPU in the Triton
interpreter (float32), on a GPU also in bfloat16."""
import pytest
import torch

from kernels.attn_prep import prepare_qkv_reference, prepare_qkv_rows
from kernels.packed_attention import (block_table, every_variant, group_rows, packed_attention,
                                      packed_attention_reference, single_tokens_per_block)

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]  # (off a GPU the Triton interpreter runs them)


def _case(H, G, d, runs, rows=4, max_len=40, dtype=torch.float32, device="cpu", seed=0, e=None, window=0,
          split=None, single_from=None):
    """q [H, N, d] and a cache of random keys/values (value heads of e, default d); runs: (row, first position,
    tokens) one after another; the table for a window, a split of the slots and the context from which one-token
    runs take tiles of their own (defaults: the module's)."""
    g = torch.Generator().manual_seed(seed)
    N = sum(t for _, _, t in runs)
    q = torch.randn(H, N, d, generator=g).to(device, dtype)
    k = torch.randn(rows, G, max_len + 1, d, generator=g).to(device, dtype)
    v = torch.randn(rows, G, max_len + 1, e or d, generator=g).to(device, dtype)
    starts, n = [], 0
    for _, _, t in runs:
        starts.append(n)
        n += t
    R, TB = group_rows(H, G)
    kw = {} if split is None else dict(split=split)
    if single_from is not None:
        kw["single_from"] = single_from
    table = block_table([r for r, _, _ in runs], starts, [t for _, _, t in runs], [p for _, p, _ in runs], TB, device,
                        max_len, window, **kw)
    return q, k, v, table, max_len


# (H, G, d, e, runs): decoding rows (one token), prompts spanning several blocks, a row at its cache's end with
# padding past max_len, grouped heads of 1, 2, 3 (tile rows masked to 4) and 8 query heads per key/value head, and
# MLA's shape (every head its own key/value head; keys wider than values: 24 = 16 + 8 rotary, values 16)
CASES = [
    (4, 2, 16, 16, [(0, 5, 1), (1, 0, 37), (3, 12, 1)]),
    (8, 1, 32, 32, [(2, 3, 9), (0, 30, 1), (1, 0, 1)]),
    (6, 2, 24, 24, [(0, 0, 21), (1, 38, 4), (2, 7, 1)]),
    (4, 4, 16, 16, [(3, 0, 70), (0, 2, 2)]),
    (4, 4, 24, 16, [(1, 4, 1), (2, 0, 19)]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,G,d,e,runs", CASES)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("split,single_from,wide", [(None, None, False), (16, None, False), (16, 4, False),
                                                     (None, None, True), (16, 4, True)])
def test_packed_attention_equals_sdpa_per_run(device, H, G, d, e, runs, window, split, single_from, wide,
                                              monkeypatch):
    """Against SDPA run by run; with the slots cut every 16 too (a block's pieces merged, as for long contexts), with
    one-token runs of 4 slots or more in a table of their own (16-row tiles, as for contexts of SINGLE_FROM), and with
    runs of 16 tokens or more in the wide table (128-row tiles, as for prompts of thousands of tokens)."""
    import kernels.packed_attention as PA
    if wide:
        monkeypatch.setattr(PA, "WIDE_ROWS", 16 * group_rows(H, G)[0])  # (block_table's kv_heads: 1)
        monkeypatch.setattr(PA, "WIDE_FROM_SLOTS", 0)
    max_len = 80 if any(p + t > 40 for _, p, t in runs if t > 30) else 40
    q, k, v, table, max_len = _case(H, G, d, runs, max_len=max_len, device=device, e=e, window=window, split=split,
                                    single_from=single_from)
    if split:
        assert window or any(t.num_merges > 0 for t in table.tables)
    if single_from and not window and any(t == 1 and p + 1 >= single_from for _, p, t in runs):
        assert table.single is not None and table.single.tokens_per_block == single_tokens_per_block(
            table.tokens_per_block)
    assert (table.wide is not None) == (wide and any(t >= 16 for _, _, t in runs))
    got = packed_attention(q, k, v, table, 0.3)
    want = packed_attention_reference(q, k, v, table, 0.3)
    # tokens past max_len (padding) see the slots below it; with a window they may see none: compare the others
    live = torch.ones(q.shape[1], dtype=torch.bool)
    n = 0
    for _, p, t in runs:
        for i in range(t):
            live[n + i] = p + i < max_len
        n += t
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got[live], want[live], **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("wide", [False, True])
def test_a_tokens_attention_does_not_depend_on_what_is_packed_beside_it(device, window, wide, monkeypatch):
    """The same bits for a row's tokens whether the step holds them alone or beside other rows: what keeps a packed
    step's greedy tokens from depending on the traffic beside them. (A row's tokens are cut into blocks from its
    own first token, so its blocks are the same either way.) ``wide``: the row's run long enough for the wide table."""
    import kernels.packed_attention as PA
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, _, L = _case(8, 2, 32, [(1, 6, 11)], dtype=dtype, device=device, max_len=300)
    R, TB = group_rows(8, 2)
    assert TB > 11
    if wide:
        monkeypatch.setattr(PA, "WIDE_ROWS", 10 * R)  # (block_table's kv_heads: 1) the 11-token run, not the others
        monkeypatch.setattr(PA, "WIDE_FROM_SLOTS", 0)
    t1 = block_table([1], [0], [11], [6], TB, device, L, window, split=64)
    assert (t1.wide is not None) == wide
    alone = packed_attention(q, k, v, t1, 0.2)
    g = torch.Generator().manual_seed(9)
    other = torch.randn(8, 5, 32, generator=g).to(device, dtype)
    both = torch.cat([other[:, :3], q, other[:, 3:]], dim=1)
    t2 = block_table([0, 1, 2], [0, 3, 14], [3, 11, 2], [4, 6, 200], TB, device, L, window, split=64)
    beside = packed_attention(both, k, v, t2, 0.2)
    assert torch.equal(beside[3:14], alone)
    # a long context's row cut in pieces beside it: its own bits again
    t3 = block_table([1, 2], [3, 14], [11, 1], [6, 250], TB, device, L, window, split=64)
    assert t3.num_merges == (0 if window else 1)
    assert torch.equal(packed_attention(both, k, v, t3, 0.2)[3:14], alone)


@pytest.mark.parametrize("device", DEVICES)
def test_a_long_contexts_decoding_row_gets_its_own_bits_in_the_one_token_table(device):
    """A decoding row whose context takes the one-token table (16-row tiles): the same bits alone and beside a prompt
    (which table a run takes follows from the run alone), and right against SDPA."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, _, L = _case(8, 2, 32, [(2, 250, 1)], dtype=dtype, device=device, max_len=300)
    R, TB = group_rows(8, 2)
    alone_t = block_table([2], [0], [1], [250], TB, device, L, split=64, single_from=100)
    assert alone_t.num_items == 0 and alone_t.single.num_items == 4 and alone_t.single.num_merges == 1
    alone = packed_attention(q, k, v, alone_t, 0.2)
    g = torch.Generator().manual_seed(9)
    prompt = torch.randn(8, 9, 32, generator=g).to(device, dtype)
    both = torch.cat([prompt, q], dim=1)
    t2 = block_table([1, 2], [0, 9], [9, 1], [0, 250], TB, device, L, split=64, single_from=100)
    assert t2.num_items == 1 and t2.single.num_items == 4
    beside = packed_attention(both, k, v, t2, 0.2)
    assert torch.equal(beside[9:], alone)
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(beside, packed_attention_reference(both, k, v, t2, 0.2), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_a_run_of_many_programs_is_not_cut_and_only_cut_pieces_take_scratch(device):
    """A run whose blocks x key/value heads make UNCUT_PROGRAMS programs keeps each block whole (it fills the GPU; its
    pieces would need merges and a scratch that grows with the run and its context), a short run beside it is cut;
    the cut pieces come first, so the scratch is theirs alone; the result equals SDPA's."""
    import kernels.packed_attention as PA
    H, G, d = 4, 2, 16
    runs = [(0, 30, 1), (1, 0, 70), (2, 40, 3)]
    q, k, v, _, L = _case(H, G, d, runs, device=device, max_len=80)
    R, TB = group_rows(H, G)  # (2, 32): the 70-token run is 3 blocks
    args = ([0, 1, 2], [0, 1, 71], [1, 70, 3], [30, 0, 40], TB, device, L)
    cut_all = block_table(*args, split=16)
    assert cut_all.cut_pieces == 2 + (2 + 4 + 5) + 3 and cut_all.num_items == cut_all.cut_pieces
    t = block_table(*args, split=16, kv_heads=-(-PA.UNCUT_PROGRAMS // 3))  # 3 blocks x heads: uncut; 1 block: cut
    blk, lo, hi, one = (x.tolist() for x in t.items)
    assert t.cut_pieces == 2 + 3 and t.num_items == 5 + 3  # the 70-token run's 3 blocks whole, after the cut pieces
    # the whole blocks longest first: the 70-token run's last block (most slots) starts first
    assert blk[:5] == [0, 0, 4, 4, 4] and one[:5] == [0] * 5 and blk[5:] == [3, 2, 1] and one[5:] == [1] * 3
    assert [x.tolist() for x in t.merges] == [[0, 4], [0, 2], [2, 3]]
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)
    want = packed_attention_reference(q, k, v, t, 0.3)
    torch.testing.assert_close(packed_attention(q, k, v, t, 0.3), want, **tol)
    torch.testing.assert_close(packed_attention(q, k, v, cut_all, 0.3), want, **tol)
    with every_variant():  # the warm-up's steps cut every run, however many programs (runs of 3 tokens and more wide)
        t = block_table(*args, kv_heads=256)  # (outside it: every run uncut, the long ones wide)
        assert (t.num_items, t.single.num_merges, t.wide.num_merges) == (0, 1, 3)


@pytest.mark.parametrize("heads", [(32, 4, 128), (32, 8, 128), (16, 16, 128), (4, 2, 16)])
def test_the_scratch_bound_holds_for_every_step(heads):
    """scratch_bytes_bound (what a step's activation bound counts for a run's partial results, offload.apply) lies at
    or above what packed_attention allocates for random steps: runs of 1 to 600 tokens at any position up to 40000
    slots, the one-token table and uncut runs included; and the scratch is zero where nothing is cut."""
    import numpy as np
    from kernels.packed_attention import scratch_bytes, scratch_bytes_bound
    H, G, e = heads
    R, TB = group_rows(H, G)
    rng = np.random.default_rng(0)
    L = 40000
    for _ in range(60):
        n = int(rng.integers(1, 9))
        counts = [int(c) for c in rng.choice([1, 1, 1, 3, 40, 200, 600], n)]
        positions = [int(rng.integers(0, L - c)) for c in counts]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        t = block_table(list(range(n)), starts, counts, positions, TB, "cpu", L, kv_heads=G)
        bound = sum(scratch_bytes_bound(H, G, e, c, L) for c in counts)
        assert scratch_bytes(t, H, G, e) <= bound
    assert scratch_bytes(block_table([0, 1], [0, 5], [5, 1], [0, 900], TB, "cpu", L, kv_heads=G), H, G, e) == 0
    assert scratch_bytes_bound(H, G, e, 600, 1000) == 0 and scratch_bytes_bound(H, G, e, 1, 40000) > 0


def test_block_table_gives_one_token_runs_of_long_contexts_a_table_of_their_own():
    # TB 8 (8 query heads a key/value head: 64-row tiles); one-token runs from 100 slots: tiles of 16 rows, 2 tokens
    assert [single_tokens_per_block(tb) for tb in (64, 16, 8, 2, 1)] == [16, 4, 2, 1, 1]
    t = block_table([0, 1, 2, 3], [0, 1, 2, 12], [1, 1, 10, 1], [98, 150, 140, 400], 8, "cpu", 300, single_from=100)
    assert t.tokens_per_block == 8 and t.single.tokens_per_block == 2 and t.single.single is None
    assert t.blocks[0].tolist() == [0, 2, 2]  # 99 slots, and the prompt (never the one-token table)
    assert t.single.blocks[0].tolist() == [1, 3] and t.single.blocks[1].tolist() == [1, 12]
    # (whole blocks longest first; the row at 400 sees the slots below max_len)
    assert t.single.blocks[3].tolist() == [150, 400] and t.single.items[2].tolist() == [300, 151]
    for x in (*t.single.blocks, *t.single.items, *t.single.merges):
        assert x.data_ptr() % 16 == 0
    # a window narrower than the threshold: what the row sees is short, so the main table
    assert block_table([1], [0], [1], [150], 8, "cpu", 300, 20, single_from=100).single is None
    # tiles already of one token's rows (64 query heads a key/value head): nothing to gain, no second table
    assert block_table([1], [0], [1], [150], 1, "cpu", 300, single_from=100).single is None
    assert block_table([1], [0], [1], [150], 8, "cpu", 300).single is None  # the default threshold: 16384 slots
    # the default threshold by the query heads a key/value head shares (R = 64 / tokens a block): the fewer, the sooner
    from kernels.packed_attention import single_from_slots
    assert [single_from_slots(r) for r in (1, 2, 4, 8, 16)] == [5632, 12288, 10240, 16384, 16384]
    for tb, r in ((64, 1), (16, 4), (8, 8)):
        at = single_from_slots(r)
        assert block_table([1], [0], [1], [at - 2], tb, "cpu", at + 8).single is None  # a row sees pos + 1 slots
        assert block_table([1], [0], [1], [at - 1], tb, "cpu", at + 8).single.blocks[0].tolist() == [1]
    with every_variant():  # a warm-up's step: every slot a piece, every one-token run in the one-token table
        t = block_table([0, 1], [0, 1], [1, 2], [3, 0], 8, "cpu", 300)
        assert t.single.num_items == 4 and t.single.num_merges == 1 and t.num_merges == 1
    assert block_table([0, 1], [0, 1], [1, 2], [3, 0], 8, "cpu", 300).single is None


def test_block_table_gives_long_runs_over_long_contexts_the_wide_table():
    """A run goes wide when its tokens x R x key/value heads reach WIDE_ROWS and its last token sees WIDE_FROM_SLOTS
    slots: Qwen3-30B-A3B's heads (R 8, 4 key/value heads) from 1024 tokens, ending at 4096 slots or later; blocks of
    twice the main table's tokens, never cut; a one-token run never."""
    import kernels.packed_attention as PA
    R, TB = group_rows(32, 4)
    L = 40000
    assert PA.wide_tokens_per_block(TB) == 2 * TB
    t = block_table([0, 1, 2, 3], [0, 1024, 2047, 3070], [1024, 1023, 1023, 1], [3072, 3072, 0, 30000], TB, "cpu", L,
                    kv_heads=4)
    assert t.wide is not None and t.wide.blocks[0].unique().tolist() == [0]  # 1024 tokens ending at 4096: wide
    assert t.wide.tokens_per_block == 2 * TB and t.wide.num_items == 1024 // (2 * TB) and t.wide.num_merges == 0
    assert sorted(set(t.blocks[0].tolist())) == [1, 2]  # 1023 tokens: the main table, wherever they are
    assert t.single.blocks[0].tolist() == [3]
    assert block_table([0], [0], [2000], [0], TB, "cpu", L, kv_heads=4).wide is None  # its last token sees 2000 slots
    assert block_table([0], [0], [2000], [2096], TB, "cpu", L, kv_heads=4).wide is not None
    assert block_table([0], [0], [4096], [0], TB, "cpu", L, kv_heads=2).wide is not None  # 4096 x 8 x 2
    assert block_table([0], [0], [4095], [0], TB, "cpu", L, kv_heads=2).wide is None


def test_block_table_cuts_runs_into_blocks_and_slots_into_pieces():
    t = block_table([2, 0], [0, 10], [10, 1], [7, 3], 4, "cpu", 40)
    rows, toks, cnts, pos = t.blocks
    assert rows.tolist() == [2, 2, 2, 0] and toks.tolist() == [0, 4, 8, 10]
    assert cnts.tolist() == [4, 4, 2, 1] and pos.tolist() == [7, 11, 15, 3]
    assert t.num_items == 4 and t.num_merges == 0 and t.items[3].tolist() == [1] * 4
    # a decoding row at 150 and a prompt's block at 60-63, slots cut every 64: [0, 64) [64, 128) [128, 151); [0, 64)
    t = block_table([0, 1], [0, 1], [1, 4], [150, 60], 4, "cpu", 300, split=64)
    blk, lo, hi, one = (x.tolist() for x in t.items)
    assert (blk, lo, hi, one) == ([0, 0, 0, 1], [0, 64, 128, 0], [64, 128, 151, 64], [0, 0, 0, 1])
    assert [x.tolist() for x in t.merges] == [[0], [0], [3]]
    # a window of 20 over the row at 150: its slots from 128 (131 rounded down to 64s), one piece
    t = block_table([0], [0], [1], [150], 4, "cpu", 300, 20, split=64)
    assert [x.tolist() for x in t.items] == [[0], [128], [151], [1]]
    for x in (*t.blocks, *t.items, *t.merges):  # each 16-byte aligned (Triton compiles a variant per alignment)
        assert x.data_ptr() % 16 == 0
    assert group_rows(32, 4) == (8, 8) and group_rows(6, 2) == (4, 16) and group_rows(16, 16) == (1, 64)
    with pytest.raises(ValueError, match="evenly"):
        group_rows(6, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", [False, True])
def test_prepare_qkv_rows_writes_each_token_to_its_own_row(device, norm):
    """prepare_qkv_rows over packed tokens of three rows = prepare_qkv_reference run row by row."""
    g = torch.Generator().manual_seed(1)
    H, G, d, rows, S = 4, 2, 16, 3, 12
    per_row = [(0, 2, 3), (2, 5, 1), (1, 0, 4)]  # (row, first slot, tokens)
    N = sum(t for _, _, t in per_row)
    q, k, v = (torch.randn(N, n * d, generator=g).to(device) for n in (H, G, G))
    cos, sin = (torch.randn(N, d // 2, generator=g).to(device) for _ in range(2))
    qw, kw = (torch.randn(d, generator=g).to(device), torch.randn(d, generator=g).to(device)) if norm else (None, None)
    row_N = torch.tensor([r for r, _, t in per_row for _ in range(t)], device=device)
    slot_N = torch.tensor([s + i for _, s, t in per_row for i in range(t)], device=device)
    kc, vc = torch.zeros(rows, G, S, d, device=device), torch.zeros(rows, G, S, d, device=device)
    got = prepare_qkv_rows(q, k, v, cos, sin, qw, kw, 1e-6, kc, vc, row_N, slot_N, H, G)
    kr, vr = torch.zeros_like(kc), torch.zeros_like(vc)
    n = 0
    for r, s, t in per_row:
        sl = slice(n, n + t)
        want = prepare_qkv_reference(q[None, sl], k[None, sl], v[None, sl], cos[None, sl], sin[None, sl], qw, kw,
                                     1e-6, kr[r:r + 1], vr[r:r + 1], slot_N[None, sl], H, G)
        torch.testing.assert_close(got[:, sl], want[0], rtol=1e-5, atol=1e-5)
        n += t
    torch.testing.assert_close(kc, kr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vc, vr, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows/slots"):
        prepare_qkv_rows(q, k, v, cos, sin, qw, kw, 1e-6, kc, vc, row_N[:-1], slot_N, H, G)


def test_every_tables_launch_fits_the_shared_memory():
    """_launch's key step and stages, fitted to the shared memory for every head size and dtype a model may bring:
    the published shapes keep the measured configs (Qwen3's wide table 128-slot steps at 3 stages, DeepSeek-V2-Lite's
    64-slot), and wide heads or float32 caches get narrower steps or fewer stages instead of a launch that fails."""
    import kernels.packed_attention as PA
    PA._launch.cache_clear()
    for rows, d, e, dtype in [(r, d, e, dt) for r in (PA.SINGLE_ROWS, PA.BLOCK_M, PA.WIDE_M)
                              for d, e in ((64, 64), (128, 128), (192, 128), (256, 256))
                              for dt in (torch.bfloat16, torch.float32)]:
        R = 8 if rows >= 8 else 1
        c = PA._launch(R, rows // R, d, e, False, dtype, False, True)
        elem = torch.empty((), dtype=dtype).element_size()
        assert PA.shared_bytes(rows, c["BLOCK_N"], c["num_stages"], c["BLOCK_D"], c["BLOCK_E"], elem) <= PA.SHARED_BYTES
        assert c["BLOCK_N"] >= 16 and c["num_stages"] >= 2
    wide = PA._launch(8, PA.WIDE_M // 8, 128, 128, False, torch.bfloat16, False, True)
    assert (wide["BLOCK_N"], wide["num_stages"], wide["num_warps"], wide["KV_TMA"]) == (128, 3, 8, True)
    mla = PA._launch(1, PA.WIDE_M, 192, 128, False, torch.bfloat16, False, True)
    assert (mla["BLOCK_N"], mla["num_stages"]) == (64, 3)
    main = PA._launch(8, PA.BLOCK_M // 8, 128, 128, False, torch.bfloat16, False, True)
    assert (main["BLOCK_N"], main["num_stages"], main["KV_TMA"]) == (64, 3, False)
    assert PA._launch(8, PA.WIDE_M // 8, 128, 128, False, torch.bfloat16, False, False)["KV_TMA"] is False
