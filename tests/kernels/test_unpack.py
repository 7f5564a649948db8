"""kernels.unpack: bfloat16 weights packed to 12 bits and decoded bit for bit, by the Triton kernel
(interpreted on the CPU) and by the torch reference."""
import pytest
import torch

from kernels.unpack import layout, pack_bf16, unpack_bf16, unpack_bf16_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _bits(t):
    return t.view(torch.int16)


def _weights(shape, seed, planted=True):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    if planted and w.numel() >= 8:  # outside any window of 15 exponents: zeros, -0, a huge, a tiny, inf and a nan
        flat = w.view(-1)
        flat[0], flat[3] = 0.0, -0.0
        flat[-1], flat[5] = 3.0e38, -1e-38
        flat[len(flat) // 2] = float("inf")
        flat[len(flat) // 3] = float("nan")
    return w


@pytest.mark.parametrize("s1,s2", [((6, 8), (8, 3)), ((2, 5, 7), (3, 3)), ((1, 1), (1, 1)), ((64, 96), (96, 32))])
@pytest.mark.parametrize("planted", [True, False])
def test_pack_then_unpack_gives_back_every_bit(s1, s2, planted):
    a, b = _weights(s1, 0, planted), _weights(s2, 1, planted)
    buf, base, n_esc = pack_bf16(a, b)
    n = a.numel() + b.numel()
    assert buf.dtype == torch.uint8 and buf.numel() == layout(n, n_esc)[3]
    if planted and min(a.numel(), b.numel()) >= 8:
        assert n_esc >= 10  # the planted values cannot share a window with the rest
    if n >= 1000:
        assert buf.numel() < 0.77 * 2 * n  # ~12 bits a weight
    for fn in (unpack_bf16_reference, unpack_bf16):
        # the outputs are views between guard regions: nothing may be written outside them
        g1 = torch.full((a.numel() + 16,), 7.0, dtype=torch.bfloat16, device=DEV)
        g2 = torch.full((b.numel() + 16,), 7.0, dtype=torch.bfloat16, device=DEV)
        o1, o2 = g1[8:-8].view(s1), g2[8:-8].view(s2)
        fn(buf.to(DEV), base, n_esc, o1, o2)
        assert torch.equal(_bits(o1.cpu()), _bits(a)), fn.__name__
        assert torch.equal(_bits(o2.cpu()), _bits(b)), fn.__name__
        for g in (g1, g2):
            assert (g[:8] == 7.0).all() and (g[-8:] == 7.0).all(), fn.__name__


def test_escapes_across_blocks_and_past_a_round_of_the_table():
    """The kernel writes each block's escapes from the table in rounds of ESC_TILE: a block holding more
    than a round, blocks holding none, and escapes on both sides of the out1/out2 seam all land."""
    from kernels.unpack import BLOCK, ESC_TILE
    n1, n2 = BLOCK + 300, 2 * BLOCK - 100  # four blocks; the seam inside the second
    a, b = _weights((n1,), 3, planted=False), _weights((n2,), 4, planted=False)
    flat = torch.cat([a, b])
    hot = list(range(0, 3 * ESC_TILE * 7, 7)) + [n1 - 1, n1, n1 + 1] + [3 * BLOCK + 5, n1 + n2 - 1]
    flat[torch.tensor(hot)] = torch.tensor([1e30, -1e-30, 0.0] * (len(hot) // 3) + [1e30] * (len(hot) % 3),
                                           dtype=torch.bfloat16)
    a, b = flat[:n1].clone(), flat[n1:].clone()
    buf, base, n_esc = pack_bf16(a, b)
    assert n_esc >= len(hot) and n_esc > ESC_TILE
    for fn in (unpack_bf16_reference, unpack_bf16):
        o1 = torch.empty(n1, dtype=torch.bfloat16, device=DEV)
        o2 = torch.empty(n2, dtype=torch.bfloat16, device=DEV)
        fn(buf.to(DEV), base, n_esc, o1, o2)
        assert torch.equal(_bits(o1.cpu()), _bits(a)) and torch.equal(_bits(o2.cpu()), _bits(b)), fn.__name__


def test_the_reference_refuses_a_buffer_that_is_not_the_one_described():
    a = _weights((6, 8), 0)
    buf, base, n_esc = pack_bf16(a, a)
    with pytest.raises(ValueError, match="must stay together"):
        unpack_bf16_reference(buf, base + 1, n_esc, torch.empty_like(a), torch.empty_like(a))


def test_an_odd_count_and_a_single_window():
    a = torch.tensor([0.5, 0.75, -1.0], dtype=torch.bfloat16)  # three weights, exponents within one window
    buf, base, n_esc = pack_bf16(a, torch.tensor([2.0], dtype=torch.bfloat16))
    assert n_esc == 0
    o1, o2 = torch.empty(3, dtype=torch.bfloat16, device=DEV), torch.empty(1, dtype=torch.bfloat16, device=DEV)
    unpack_bf16(buf.to(DEV), base, n_esc, o1, o2)  # the kernel runs where its tensors are (the GPU, or interpreted)
    assert o1.tolist() == [0.5, 0.75, -1.0] and o2.tolist() == [2.0]


def test_clear_errors():
    with pytest.raises(ValueError, match="bfloat16"):
        pack_bf16(torch.zeros(4))
    buf, base, n_esc = pack_bf16(torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bfloat16 outputs"):
        unpack_bf16_reference(buf, base, n_esc, torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="bytes of uint8"):  # checked before any launch
        unpack_bf16(buf[:8], base, n_esc, torch.zeros(4, dtype=torch.bfloat16), torch.zeros(4, dtype=torch.bfloat16))


def test_the_unpacker_reuses_its_views_and_refuses_an_oversized_buffer():
    """Unpacker (the offload cache's copy path): decodes whatever buffer sits in its staging buffer into
    the outputs named by key, the staging views made once per escape count."""
    from kernels.unpack import Unpacker
    a, b = _weights((6, 8), 0), _weights((8, 3), 1)
    buf, base, n_esc = pack_bf16(a, b)
    stage = torch.zeros(buf.numel(), dtype=torch.uint8, device=DEV)
    outs = {k: (torch.empty(6, 8, dtype=torch.bfloat16, device=DEV), torch.empty(8, 3, dtype=torch.bfloat16, device=DEV))
            for k in ("x", "y")}
    up = Unpacker(stage, outs)
    up("y", buf, base, n_esc)
    up("x", buf, base, n_esc)
    for o1, o2 in outs.values():
        assert torch.equal(_bits(o1.cpu()), _bits(a)) and torch.equal(_bits(o2.cpu()), _bits(b))
    with pytest.raises(ValueError, match="staging"):
        up("x", buf, base, n_esc + 1000)
    with pytest.raises(ValueError, match="staging"):
        up.load(0, torch.zeros(buf.numel() + 1, dtype=torch.uint8))


def test_the_unpacker_ring_decodes_each_stage_into_its_key():
    """Two stages (the cache's copy/decode pipeline): buffers loaded into stages 0 and 1 before either
    is decoded each arrive whole in their own outputs."""
    from kernels.unpack import Unpacker
    w = [(_weights((6, 8), i), _weights((8, 3), 10 + i)) for i in range(2)]
    packed = [pack_bf16(a, b) for a, b in w]
    size = max(p[0].numel() for p in packed)
    stages = [torch.zeros(size, dtype=torch.uint8, device=DEV) for _ in range(2)]
    outs = {k: (torch.empty(6, 8, dtype=torch.bfloat16, device=DEV), torch.empty(8, 3, dtype=torch.bfloat16, device=DEV))
            for k in (0, 1)}
    up = Unpacker(stages, outs)
    for r, (buf, _, _) in enumerate(packed):
        up.load(r, buf)
    for r, (_, base, n_esc) in reversed(list(enumerate(packed))):
        up.decode(r, r, base, n_esc)
    for k, (a, b) in enumerate(w):
        o1, o2 = outs[k]
        assert torch.equal(_bits(o1.cpu()), _bits(a)) and torch.equal(_bits(o2.cpu()), _bits(b))
