"""The Triton fused MoE (forward and backward) against the plain reference over a table of shapes.

On the CPU the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
in fp32, with tiny shapes; on a GPU the same table runs compiled, in bf16 against an fp32 reference.
"""
import pytest
import torch

from kernels import expert_mlp_reference, get_backend, moe_experts_reference
from kernels.fused_moe import fused_moe
from kernels.launch_config import GemmConfig, MoEConfig
from tests.conftest import ON_GPU

DEV = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
# bf16 operands land between 1e-3 and 1e-2 relative error; fp32 (ieee dots) far below
TOL = 1.5e-2 if ON_GPU else 1e-5


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_case(T, D, I, E, K, ids="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(E, 2 * I, D, generator=g) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    w = torch.rand(T, K, generator=g) + 0.1
    if ids == "random":
        topk = torch.randint(-1, E, (T, K), generator=g)
    elif ids == "distinct":       # each token's K experts distinct (what a router gives)
        topk = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    elif ids == "sparse":         # only experts 0 and E-1 used: the rest are empty
        topk = torch.where(torch.rand(T, K, generator=g) < 0.5, 0, E - 1)
    elif ids == "one":            # every token to expert 1
        topk = torch.ones(T, K, dtype=torch.long)
    else:
        raise AssertionError(ids)
    return x, w13, w2, topk, w


# (T, D, I, E, K, ids): 1 token, 33 tokens, odd hidden sizes, empty experts, all to one expert,
# top-k = E, -1 ids (in "random"), more rows than one block
SHAPES = [
    (1, 16, 24, 4, 2, "distinct"),
    (33, 17, 20, 5, 3, "random"),
    (7, 33, 19, 6, 2, "random"),
    (20, 16, 16, 8, 2, "sparse"),
    (40, 16, 16, 4, 1, "one"),
    (9, 16, 16, 3, 3, "distinct"),
    (5, 16, 16, 3, 2, "random"),
    (1, 24, 16, 5, 3, "random"),      # one token (pair-per-block layout, no alignment launch)
]


def _to(tensors, dtype, grad=False):
    out = []
    for t in tensors:
        t = t.to(DEV)
        if t.is_floating_point():
            t = t.to(dtype)
        out.append(t.requires_grad_(grad) if t.is_floating_point() else t)
    return out


@pytest.mark.parametrize("T,D,I,E,K,ids", SHAPES)
def test_forward_matches_reference(T, D, I, E, K, ids):
    case = make_case(T, D, I, E, K, ids)
    want = moe_experts_reference(*_to(case, torch.float32))
    x, w13, w2, topk, w = _to(case, DTYPE)
    out = torch.full((T, D), float("nan"), device=DEV, dtype=DTYPE)  # poison: every element must be written
    out.copy_(fused_moe(x, w13, w2, topk, w))
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < TOL


@pytest.mark.parametrize("T,D,I,E,K,ids", [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[4], SHAPES[5]])
def test_backward_matches_reference_autograd(T, D, I, E, K, ids):
    case = make_case(T, D, I, E, K, ids, seed=1)
    ref = _to(case, torch.float32, grad=True)
    got = _to(case, DTYPE, grad=True)
    y_ref = moe_experts_reference(*ref)
    y = fused_moe(*got)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    y_ref.backward(dy)
    y.backward(dy.to(DTYPE))
    for name, a, b in zip(("x", "w13", "w2", "topk_weights"), (got[0], got[1], got[2], got[4]),
                          (ref[0], ref[1], ref[2], ref[4])):
        assert a.grad is not None and a.grad.dtype == a.dtype, name
        assert rel_err(a.grad, b.grad) < 2 * TOL, (name, rel_err(a.grad, b.grad))


def test_one_expert_equals_dense_mlp_outputs_and_gradients():
    x, w13, w2, _, _ = make_case(21, 24, 40, 1, 1)
    ones, zeros = torch.ones(21, 1), torch.zeros(21, 1, dtype=torch.long)
    xr, w13r, w2r = _to((x, w13, w2), torch.float32, grad=True)
    xg, w13g, w2g, ids, wg = _to((x, w13, w2, zeros, ones), DTYPE, grad=True)
    y_ref = expert_mlp_reference(xr, w13r[0], w2r[0])
    y = fused_moe(xg, w13g, w2g, ids, wg)
    assert rel_err(y, y_ref) < TOL
    y_ref.square().sum().backward()
    y.float().square().sum().backward()
    for a, b in ((xg, xr), (w13g, w13r), (w2g, w2r)):
        assert rel_err(a.grad, b.grad) < 2 * TOL


def test_minus_one_slots_contribute_zero_and_get_zero_weight_grad():
    x, w13, w2, topk, w = make_case(6, 16, 16, 4, 2, "distinct")
    topk[:, 1] = -1
    topk[2, 0] = -1                                    # token 2 goes nowhere: output row is zero
    xg, w13g, w2g, ids, wg = _to((x, w13, w2, topk, w), DTYPE, grad=True)
    y = fused_moe(xg, w13g, w2g, ids, wg)
    assert torch.equal(y[2], torch.zeros_like(y[2]))
    y.float().sum().backward()
    assert torch.equal(wg.grad[:, 1], torch.zeros_like(wg.grad[:, 1]))
    assert wg.grad[0, 0] != 0


def test_one_token_drops_minus_one_and_out_of_range_ids():
    x, w13, w2, _, w = make_case(1, 16, 16, 4, 3)
    ids = torch.tensor([[-1, 6, 2]])                   # 6 >= E: not an expert here, dropped like -1
    want = moe_experts_reference(*_to((x, w13, w2, torch.tensor([[-1, -1, 2]]), w), torch.float32))
    assert rel_err(fused_moe(*_to((x, w13, w2, ids, w), DTYPE)), want) < TOL


def test_deterministic_forward_and_backward():
    """No atomics anywhere: the same call twice gives bit-identical outputs and gradients."""
    case = make_case(33, 17, 20, 5, 3, "random", seed=4)
    runs = []
    for _ in range(2):
        x, w13, w2, ids, w = _to(case, DTYPE, grad=True)
        y = fused_moe(x, w13, w2, ids, w)
        y.float().square().sum().backward()
        runs.append((y.detach(), x.grad, w13.grad, w2.grad, w.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_zero_tokens_and_backend_seam():
    x, w13, w2, topk, w = _to(make_case(0, 16, 16, 4, 2), DTYPE)
    assert fused_moe(x, w13, w2, topk, w).shape == (0, 16)
    assert get_backend("triton") is fused_moe


def test_explicit_config_and_bad_inputs(monkeypatch):
    x, w13, w2, topk, w = _to(make_case(5, 16, 16, 3, 2), DTYPE)
    cfg = MoEConfig(32, GemmConfig(16, 16, 1, 2, 1), GemmConfig(16, 32, 2, 2, 1))
    want = moe_experts_reference(*_to(make_case(5, 16, 16, 3, 2), torch.float32))
    assert rel_err(fused_moe(x, w13, w2, topk, w, config=cfg), want) < TOL
    with pytest.raises(ValueError, match="dtype"):
        fused_moe(x.double(), w13.double(), w2.double(), topk, w)
    with pytest.raises(ValueError, match="share one dtype"):
        fused_moe(x, w13.half(), w2, topk, w)
    with pytest.raises(ValueError, match="block_m"):
        MoEConfig(block_m=24)
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            fused_moe(x, w13, w2, topk, w)


# A rows by TMA (the gathered copy of x and its descriptors made during capture) and tail tiles, whose
# short blocks change from replay to replay with the routing
TMA_TAIL = MoEConfig(64, GemmConfig(64, 64, 8, 4, 3, tma=True, tail=2, a_tma=True),
                     GemmConfig(64, 64, 8, 4, 3, tma=True, tail=2, a_tma=True))


@pytest.mark.gpu
@pytest.mark.parametrize("T,cfg", [(1, None), (3, None), (64, None), (300, None), (64, TMA_TAIL), (300, TMA_TAIL)])
def test_gpu_cuda_graph_capture_and_decode_configs(T, cfg):
    """The forward path has no host sync: it captures into a CUDA graph and replays on new inputs."""
    E, D, I, K = 16, 256, 192, 4
    x, w13, w2, topk, w = _to(make_case(T, D, I, E, K, "distinct"), torch.bfloat16)
    fused_moe(x, w13, w2, topk, w, config=cfg)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe(x, w13, w2, topk, w, config=cfg)
    for seed in range(3):
        x2, _, _, topk2, w_2 = make_case(T, D, I, E, K, "random", seed=seed + 10)
        x.copy_(x2.to(x)), topk.copy_(topk2.to(topk)), w.copy_(w_2.to(w))
        graph.replay()
        want = moe_experts_reference(x.float(), w13.float(), w2.float(), topk, w.float())
        assert rel_err(y, want) < TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions(dtype):
    """fp16/bf16 inputs (fp32 accumulation): within bf16 rounding of the fp32 reference."""
    case = make_case(33, 17, 20, 5, 3, "random", seed=3)
    want = moe_experts_reference(*_to(case, torch.float32))
    out = fused_moe(*_to(case, dtype))
    assert out.dtype == dtype and rel_err(out, want) < 1.5e-2


def _tiles(tma: bool) -> MoEConfig:
    g = GemmConfig(32, 64, 1, 4, 3, tma=tma) if ON_GPU else GemmConfig(32, 32, 1, 1, 1, tma=tma)
    return MoEConfig(16, g, g)


@pytest.mark.parametrize("T,ids", [(1, "distinct"), (33, "random"), (40, "one")])
def test_tma_weight_tiles_match_reference(T, ids):
    """Weight tiles by TMA descriptor (up and down GEMMs) give the reference's outputs and gradients;
    a layout TMA cannot take (strides not 16-byte aligned) falls back to pointer loads."""
    from kernels import grouped_gemm
    case = make_case(T, 32, 24, 4, 2, ids, seed=5)
    ref = _to(case, torch.float32, grad=True)
    got = _to(case, DTYPE, grad=True)
    assert grouped_gemm._weight_desc(got[1].detach(), _tiles(True).up) is not None  # the TMA path is taken
    y_ref = moe_experts_reference(*ref)
    y = fused_moe(*got, config=_tiles(True))
    assert rel_err(y, y_ref) < TOL
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(6)).to(DEV)
    y_ref.backward(dy)
    y.backward(dy.to(DTYPE))
    for a, b in zip((got[0], got[1], got[2], got[4]), (ref[0], ref[1], ref[2], ref[4])):
        assert rel_err(a.grad, b.grad) < 2 * TOL
    odd = _to(make_case(5, 17, 20, 3, 2), DTYPE)
    assert grouped_gemm._weight_desc(odd[1], _tiles(True).up) is None
    want = moe_experts_reference(*_to(make_case(5, 17, 20, 3, 2), torch.float32))
    assert rel_err(fused_moe(*odd, config=_tiles(True)), want) < TOL


@pytest.mark.parametrize("tma", [False, True])
def test_weight_gradient_kernel_on_transposed_operands(tma):
    """moe_wgrad_kmajor sums each expert's own rows only (padding columns are zero), by TMA or not."""
    from kernels.align import align_tokens
    from kernels.wgrad import moe_wgrad_kmajor, sorted_rows_t
    g = torch.Generator().manual_seed(7)
    T, K, E, X, Y = 37, 2, 5, 32, 48
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[3, 1] = -1
    al = align_tokens(ids.to(DEV), E, 16, allow_pair_blocks=False)
    src = torch.randn(T, Y, generator=g).to(DEV, DTYPE)
    scale = torch.rand(T * K, generator=g).to(DEV)
    at = torch.randn(X, al.num_rows, generator=g).to(DEV, DTYPE)
    bt = sorted_rows_t(src, al, scale)
    got = moe_wgrad_kmajor(at, bt, E, al, tma=tma, tile=(64, 64, 16, 4, 3) if ON_GPU else (16, 16, 16, 1, 1))
    # reference: every (token, slot) pair adds at[:, its row] x (scale * src[token]) to its expert
    pair = al.sorted_pair_S.long().cpu()
    want = torch.zeros(E, X, Y, dtype=torch.float64)
    for row, p in enumerate(pair.tolist()):
        if p < T * K and ids[p // K, p % K] >= 0:
            e = int(ids[p // K, p % K])
            want[e] += torch.outer(at[:, row].double().cpu(), src[p // K].double().cpu() * float(scale[p]))
    assert rel_err(got.cpu(), want) < TOL


def test_backward_by_transposed_operands_matches_reference(monkeypatch):
    """The TMA weight-gradient path (transposed operands) that large calls take; small ones, as in the
    other tests, gather rows in place."""
    import kernels.fused_moe as fm
    monkeypatch.setattr(fm, "KMAJOR_MIN_ROWS", 0)
    calls = []
    real = fm.moe_wgrad_kmajor
    monkeypatch.setattr(fm, "moe_wgrad_kmajor", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = make_case(33, 17, 20, 5, 3, "random", seed=8)
    ref = _to(case, torch.float32, grad=True)
    got = _to(case, DTYPE, grad=True)
    moe_experts_reference(*ref).square().sum().backward()
    fused_moe(*got).float().square().sum().backward()
    assert len(calls) == 2
    for a, b in zip((got[0], got[1], got[2], got[4]), (ref[0], ref[1], ref[2], ref[4])):
        assert rel_err(a.grad, b.grad) < 2 * TOL


def _fused1(block_i=16, block_d=16, block_d2=16) -> MoEConfig:
    from kernels.launch_config import FusedDecodeConfig
    g = GemmConfig(32, 32, 1, 1, 1)
    return MoEConfig(16, g, g, fused=FusedDecodeConfig(block_i, block_d, block_d2, num_warps=4 if ON_GPU else 1))


# one token through the fused one-token kernels: odd sizes (masks on D and I), -1 and out-of-range
# ids, top-k = E, an expert repeated
@pytest.mark.parametrize("D,I,E,K,ids", [(24, 16, 5, 3, [0, -1, 4]), (33, 19, 6, 2, [5, 2]),
                                         (16, 24, 4, 4, [3, 0, 2, 1]), (17, 8, 3, 3, [1, 7, 1])])
def test_one_token_fused_kernels_match_reference(D, I, E, K, ids):
    x, w13, w2, _, w = make_case(1, D, I, E, K, "distinct", seed=D)
    topk = torch.tensor([ids])
    case = _to((x, w13, w2, topk, w), DTYPE)
    dropped = torch.where(topk >= E, -1, topk)  # the reference rejects ids past E; the kernel drops them
    want = moe_experts_reference(*_to((x, w13, w2, dropped, w), torch.float32))
    cfg = _fused1()
    first = fused_moe(*case, config=cfg)
    assert first.shape == (1, D) and first.dtype == DTYPE and rel_err(first, want) < TOL
    for _ in range(2):  # partial rows summed in a fixed order: bitwise the same every call
        assert torch.equal(fused_moe(*case, config=cfg), first)
    # with grad enabled the three-kernel path runs (the fused one-token kernels have no backward)
    xg = case[0].clone().requires_grad_()
    out_g = fused_moe(xg, *case[1:], config=cfg)
    out_g.float().sum().backward()
    assert rel_err(out_g.detach(), want) < TOL and xg.grad is not None


def test_one_token_tiles_too_big_for_the_gpu_fall_back_to_three_kernels(monkeypatch):
    """A GPU with less shared memory than the tuned tiles need refuses them at compile time: the call
    still returns the right output (three kernels), warns once, and does not try those tiles again."""
    import kernels.fused_moe as fm
    from triton.runtime.errors import OutOfResources
    calls = []

    def refuse(*a, **k):
        calls.append(1)
        raise OutOfResources(232448, 101376, "shared memory")
    monkeypatch.setattr(fm, "moe_decode1", refuse)
    monkeypatch.setattr(fm, "_FUSED_TOO_BIG", set())
    x, w13, w2, topk, w = _to(make_case(1, 24, 16, 5, 3, "distinct", seed=5), DTYPE)
    want = moe_experts_reference(*(t.float() if t.is_floating_point() else t for t in (x, w13, w2, topk, w)))
    cfg = _fused1()
    with pytest.warns(RuntimeWarning, match="do not fit"):
        out = fused_moe(x, w13, w2, topk, w, config=cfg)
    assert rel_err(out, want) < TOL
    assert rel_err(fused_moe(x, w13, w2, topk, w, config=cfg), want) < TOL and len(calls) == 1


def test_fused_decode_config_round_trip_and_validation():
    from kernels.launch_config import FusedDecodeConfig
    cfg = _fused1(16, 64, 32)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert "fused" not in MoEConfig().to_dict() and MoEConfig.from_dict(MoEConfig().to_dict()).fused is None
    with pytest.raises(ValueError, match="block_i"):
        FusedDecodeConfig(block_i=24)
    # one token takes the fused kernels by default on a GPU; the interpreter keeps the plain path
    from kernels.launch_config import default_config
    assert default_config(1, 8, 128).fused is not None and default_config(2, 8, 128).fused is None
    assert default_config(1, 8, 128, interpreted=True).fused is None


def test_one_token_tiles_step_half_as_far_along_d_in_float32():
    """The tuned / default one-token tiles are for 2-byte weights; 4-byte ones take twice the shared memory in the
    up projection's pipeline (the default asked 288 KB of the H200's 227 in float32), so they step half as far."""
    from kernels.fused_moe import _fused_tiles
    from kernels.launch_config import FusedDecodeConfig
    cfg = FusedDecodeConfig(64, 256, 256, 8, 3)
    assert _fused_tiles(cfg, 2) is cfg and _fused_tiles(cfg, 1) is cfg
    assert _fused_tiles(cfg, 4) == FusedDecodeConfig(64, 128, 256, 8, 3)
    assert _fused_tiles(FusedDecodeConfig(16, 16, 16), 4).block_d == 16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_default_one_token_tiles_fit_in_every_dtype(dtype, recwarn):
    """The default one-token config compiles on the GPU in float32 too (it fell back to three kernels with a
    warning before, s31-a) and matches the reference."""
    import kernels.fused_moe as fm
    from kernels.launch_config import default_config
    x, w13, w2, topk, w = _to(make_case(1, 256, 192, 8, 2, "distinct", seed=3), dtype)
    want = moe_experts_reference(*(t.float() if t.is_floating_point() else t for t in (x, w13, w2, topk, w)))
    cfg = default_config(1, 2, 8)
    out = fused_moe(x, w13, w2, topk, w, config=cfg)
    assert rel_err(out, want) < (1e-5 if dtype == torch.float32 else TOL)
    assert not [r for r in recwarn if "do not fit" in str(r.message)]
    assert not any(dev == x.device for dev, _ in fm._FUSED_TOO_BIG)


@pytest.mark.gpu
def test_gpu_one_token_fused_kernels_in_a_cuda_graph():
    """Captured once (two launches chained by programmatic dependent launch on Hopper), replayed on
    new tokens and routings (including -1 slots): the same bits as the eager call."""
    E, D, I, K = 16, 256, 192, 4
    x, w13, w2, topk, w = _to(make_case(1, D, I, E, K, "distinct"), torch.bfloat16)
    cfg = _fused1(16, 128, 64)
    fused_moe(x, w13, w2, topk, w, config=cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fused_moe(x, w13, w2, topk, w, config=cfg)
    for seed in range(4):
        x2, _, _, topk2, w_2 = make_case(1, D, I, E, K, "random", seed=seed + 20)
        x.copy_(x2.to(x)), topk.copy_(topk2.to(topk)), w.copy_(w_2.to(w))
        graph.replay()
        want = moe_experts_reference(x.float(), w13.float(), w2.float(), topk, w.float())
        assert rel_err(y, want) < TOL
        assert torch.equal(fused_moe(x, w13, w2, topk, w, config=cfg), y)


def _tail_case(seed=11):
    """96 pairs over 5 experts in 64-row blocks: expert 0 has 66 rows (a whole block, then a 2-row
    tail), expert 1 20 (a half tile), experts 2 and 4 have 5 and 1 (quarter tiles), 4 ids are
    dropped (-1) and expert 3 is empty."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.tensor([0] * 66 + [1] * 20 + [2] * 5 + [4] * 1 + [-1] * 4)
    ids = flat[torch.randperm(flat.numel(), generator=g)].view(48, 2)
    x, w13, w2, _, w = make_case(48, 32, 24, 5, 2, seed=seed)
    return x, w13, w2, ids, w


def _tail_config(tail: int, a_tma: bool = False) -> MoEConfig:
    g = (GemmConfig(32, 32, 1, 4, 3, tail=tail, a_tma=a_tma) if ON_GPU
         else GemmConfig(32, 32, 1, 1, 1, tail=tail, a_tma=a_tma))
    return MoEConfig(64, g, g)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled floating tensors: a row a kernel should write but skips shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", empty)


@pytest.mark.parametrize("tail,a_tma", [(1, False), (2, False), (0, True), (2, True)])
def test_tail_tiles_match_reference(tail, a_tma, poisoned_empty):
    """An expert's last row block run as a half or quarter tile, and A rows by TMA (x gathered into
    sorted order first): outputs and all four gradients equal the reference, with every scratch
    buffer poisoned (the skipped padding rows of the saved activations and of dgu are zeroed, so
    the weight gradients' transposes read no NaN)."""
    import kernels.fused_moe as fm
    case = _tail_case()
    ref = _to(case, torch.float32, grad=True)
    y_ref = moe_experts_reference(*ref)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(12)).to(DEV)
    y_ref.backward(dy)
    for kmajor_rows in (10 ** 9, 0):  # weight gradients by gathered rows, then by transposed operands
        fm.KMAJOR_MIN_ROWS, saved = kmajor_rows, fm.KMAJOR_MIN_ROWS
        try:
            got = _to(case, DTYPE, grad=True)
            y = fused_moe(*got, config=_tail_config(tail, a_tma))
            y.backward(dy.to(DTYPE))
        finally:
            fm.KMAJOR_MIN_ROWS = saved
        assert rel_err(y, y_ref) < TOL
        for name, a, b in zip(("x", "w13", "w2", "w"), (got[0], got[1], got[2], got[4]), (ref[0], ref[1], ref[2], ref[4])):
            assert torch.isfinite(a.grad).all() and rel_err(a.grad, b.grad) < 2 * TOL, (name, kmajor_rows)


def test_sorted_row_gather_and_its_tma_descriptors():
    """gather_sorted_rows puts each sorted row's token row in place (zero on padding); the A
    descriptors exist exactly when the config asks and the layout allows."""
    from kernels.align import align_tokens
    from kernels.grouped_gemm import _row_descs, gather_sorted_rows
    x, _, _, ids, _ = _to(_tail_case(), DTYPE)
    al = align_tokens(ids, 5, 64, allow_pair_blocks=False)
    xs = gather_sorted_rows(x, al).float().cpu()
    pair = al.sorted_pair_S.long().cpu()
    used = int(al.num_padded_1.item())
    want = torch.where((pair < al.num_pairs)[:, None], x.float().cpu()[(pair // 2).clamp(max=47)], 0.0)
    assert torch.equal(xs[:used], want[:used])
    assert _row_descs(xs, al, _tail_config(2).up, 2) is None
    descs = _row_descs(x.new_zeros(al.num_rows, 32), al, _tail_config(2, a_tma=True).up, 2)
    assert descs is not None and [d.block_shape for d in descs] == [[64, 32], [32, 32], [16, 32]]
    assert _row_descs(x.new_zeros(al.num_rows, 33)[:, :31], al, _tail_config(0, a_tma=True).up, 0) is None


def test_tail_setting_validated_and_kept_by_the_config_files():
    with pytest.raises(ValueError, match="tail must be 0, 1 or 2"):
        GemmConfig(tail=3)
    c = _tail_config(2)
    assert MoEConfig.from_dict(c.to_dict()) == c and c.to_dict()["up"]["tail"] == 2


def test_tail_tiles_skip_the_padding_rows(poisoned_empty):
    """The tail path is taken: with tail=2 the up GEMM leaves the padding rows past a short block's
    quarter (or half) unwritten in inference (where no kernel reads them), and tail=0 writes them all."""
    from kernels.align import align_tokens
    from kernels.grouped_gemm import moe_up
    x, w13, _, ids, _ = _to(_tail_case(), DTYPE)
    al = align_tokens(ids, 5, 64, allow_pair_blocks=False)
    starts = al.expert_start_E1.cpu().tolist()
    for tail in (0, 1, 2):
        h, _ = moe_up(x, w13, al, _tail_config(tail).up, save_preact=False)
        h = h.float().cpu()
        # expert 2: 5 real rows in one block -> a 16-row tile with tail 2, 32 with tail 1
        written = {0: 64, 1: 32, 2: 16}[tail]
        block = h[starts[2]:starts[2] + 64]
        assert torch.isfinite(block[:written]).all()
        assert torch.isnan(block[written:]).all()
        # expert 0's second block (2 real rows) likewise; its first block is whole
        assert torch.isfinite(h[starts[0]:starts[0] + 64 + written]).all()
        assert torch.isnan(h[starts[0] + 64 + written:starts[1]]).all()


@pytest.mark.parametrize("a_tma", [False, True])
def test_persistent_grid_matches_reference(a_tma, poisoned_empty, monkeypatch):
    """GemmConfig.persistent: a grid of a few programs, each walking several (row block, N tile)
    tiles of the used blocks in one flattened loop. Outputs and all four gradients equal the
    reference (the backward's dx GEMM reads w13 transposed without TMA and keeps per-tile
    programs), on routing with a dropped id, an empty expert and an expert spanning two blocks;
    scratch buffers are poisoned, so a tile no program reaches shows as NaN."""
    import kernels.fused_moe as fm
    import kernels.grouped_gemm as gg
    monkeypatch.setattr(gg, "_sm_count", lambda index: 2)  # on a GPU too: 2 programs per SM x 2 "SMs"
    case = _tail_case()
    ref = _to(case, torch.float32, grad=True)
    y_ref = moe_experts_reference(*ref)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(12)).to(DEV)
    y_ref.backward(dy)
    g = (GemmConfig(16, 32, 2, 4, 3, tma=True, a_tma=a_tma, persistent=2) if ON_GPU
         else GemmConfig(16, 32, 2, 1, 1, tma=True, a_tma=a_tma, persistent=2))
    cfg = MoEConfig(64, g, g)
    for kmajor_rows in (10 ** 9, 0):
        monkeypatch.setattr(fm, "KMAJOR_MIN_ROWS", kmajor_rows)
        got = _to(case, DTYPE, grad=True)
        y = fused_moe(*got, config=cfg)
        y.backward(dy.to(DTYPE))
        assert rel_err(y, y_ref) < TOL
        for name, a, b in zip(("x", "w13", "w2", "w"), (got[0], got[1], got[2], got[4]), (ref[0], ref[1], ref[2], ref[4])):
            assert torch.isfinite(a.grad).all() and rel_err(a.grad, b.grad) < 2 * TOL, (name, kmajor_rows)


def test_persistent_grid_walks_every_used_tile_once(monkeypatch, poisoned_empty):
    """The persistent up GEMM's programs cover exactly the used row blocks' tiles: with fewer programs
    than tiles every used sorted row of h is written (h starts poisoned), and the rows past the used
    blocks are left alone. A call without weight descriptors keeps the per-tile grid."""
    from kernels.align import align_tokens
    import kernels.grouped_gemm as gg
    monkeypatch.setattr(gg, "_sm_count", lambda index: 1)
    x, w13, _, ids, _ = _to(_tail_case(), DTYPE)
    al = align_tokens(ids, 5, 64, allow_pair_blocks=False)
    g = GemmConfig(16, 32, 1, 4 if ON_GPU else 1, 3 if ON_GPU else 1, tma=True, persistent=1)
    desc = gg._weight_desc(w13, g)
    grid = gg._persistent_grid(al, 24, g, x, desc)
    assert grid[0] == (gg.INTERPRETED_PERSISTENT_PROGRAMS if not ON_GPU else 1)
    assert gg._persistent_grid(al, 24, GemmConfig(16, 32, tma=True, persistent=0), x, desc) is None
    assert gg._persistent_grid(al, 24, g, x, None) is None  # no weight descriptor: per-tile programs
    h, _ = gg.moe_up(x, w13, al, g, save_preact=False)
    used = int(al.num_padded_1.item())
    h = h.float().cpu()
    want = expert_rows_up(x.float().cpu(), w13.float().cpu(), al)
    assert torch.allclose(h[:used], want[:used], rtol=TOL, atol=TOL)
    assert torch.isnan(h[used:]).all()


def expert_rows_up(x, w13, al):
    """silu(x Wg^T) * (x Wu^T) for each sorted row's (token, expert), zero on padding rows."""
    I = w13.shape[1] // 2
    pair = al.sorted_pair_S.long().cpu()
    blocks = al.block_expert_B.long().cpu()
    e = blocks[torch.arange(pair.numel()) // al.block_m].clamp(min=0)
    real = pair < al.num_pairs
    tok = torch.where(real, pair // al.top_k, 0)
    gu = torch.einsum("sd,sjd->sj", x[tok], w13[e])
    h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
    return torch.where(real[:, None], h, 0.0)


def test_persistent_setting_validated_and_kept_by_the_config_files():
    with pytest.raises(ValueError, match="persistent must be 0"):
        GemmConfig(persistent=3)
    with pytest.raises(ValueError, match="set tail=0 and tma=True"):
        GemmConfig(persistent=1, tail=1, tma=True)
    with pytest.raises(ValueError, match="set tail=0 and tma=True"):
        GemmConfig(persistent=1)
    c = MoEConfig(64, GemmConfig(tma=True, persistent=1), GemmConfig(tma=True, persistent=2))
    assert MoEConfig.from_dict(c.to_dict()) == c


def test_backward_tiles_of_their_own(monkeypatch):
    """MoEConfig.bwd_up / bwd_down: the backward's dh and dx GEMMs run with their own tiles (here a
    tail tile after a persistent forward), the gradients still equal the reference, and the config
    files keep them; without them the backward runs the forward's tiles."""
    import kernels.fused_moe as fm
    import kernels.grouped_gemm as gg
    monkeypatch.setattr(gg, "_sm_count", lambda index: 1)
    seen = []

    def record(name, cfg_arg):  # note the GemmConfig each launcher gets, then launch as usual
        real = getattr(fm, name)

        def launcher(*args, **kwargs):
            seen.append((name, args[cfg_arg]))
            return real(*args, **kwargs)
        monkeypatch.setattr(fm, name, launcher)
    record("moe_swiglu_bwd", 5)
    record("moe_gemm", 6)
    w, s = (4, 3) if ON_GPU else (1, 1)
    fwd = GemmConfig(16, 32, 1, w, s, tma=True, persistent=1)
    bwd_up, bwd_down = GemmConfig(32, 32, 1, w, s, tail=2), GemmConfig(16, 32, 2, w, s, tail=1)
    cfg = MoEConfig(64, fwd, fwd, bwd_up=bwd_up, bwd_down=bwd_down)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg and cfg.backward == (bwd_up, bwd_down)
    assert MoEConfig(64, fwd, fwd).backward == (fwd, fwd) and "bwd_up" not in MoEConfig(64, fwd, fwd).to_dict()
    case = _tail_case()
    ref = _to(case, torch.float32, grad=True)
    y_ref = moe_experts_reference(*ref)
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(12)).to(DEV)
    y_ref.backward(dy)
    got = _to(case, DTYPE, grad=True)
    y = fused_moe(*got, config=cfg)
    y.backward(dy.to(DTYPE))
    assert ("moe_swiglu_bwd", bwd_up) in seen and ("moe_gemm", bwd_down) in seen
    for name, a, b in zip(("x", "w13", "w2", "w"), (got[0], got[1], got[2], got[4]), (ref[0], ref[1], ref[2], ref[4])):
        assert rel_err(a.grad, b.grad) < 2 * TOL, name


def test_persistent_grid_with_no_routed_pair(monkeypatch):
    """Every id dropped (-1): no used row block, so the persistent programs walk no tile, and the
    output is zeros (as the per-tile grid's)."""
    import kernels.grouped_gemm as gg
    monkeypatch.setattr(gg, "_sm_count", lambda index: 1)
    x, w13, w2, _, w = _to(make_case(9, 16, 16, 3, 2, seed=3), DTYPE)
    ids = torch.full((9, 2), -1, dtype=torch.long, device=DEV)
    g = GemmConfig(16, 16, 1, 4 if ON_GPU else 1, 3 if ON_GPU else 1, tma=True, persistent=1)
    y = fused_moe(x, w13, w2, ids, w, config=MoEConfig(16, g, g))
    assert torch.equal(y, torch.zeros_like(y))
