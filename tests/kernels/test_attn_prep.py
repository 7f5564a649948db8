"""kernels.attn_prep.prepare_qkv (Triton; interpreted on the CPU) against the torch ops the model runs."""
import pytest
import torch

from kernels.attn_prep import prepare_qkv, prepare_qkv_reference


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, T, H, G, d, S, dtype, norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev = _dev()
    r = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)  # noqa: E731
    q, k, v = r(B, T, H * d) * 2, r(B, T, G * d) * 2, r(B, T, G * d)
    ang = torch.rand(B, T, d // 2, generator=g) * 6.3
    cos, sin = ang.cos().to(dev, dtype), ang.sin().to(dev, dtype)
    qw = (1 + 0.2 * torch.randn(d, generator=g)).to(dev, dtype) if norm else None
    kw = (1 + 0.2 * torch.randn(d, generator=g)).to(dev, dtype) if norm else None
    kc, vc = r(B, G, S, d), r(B, G, S, d)
    slots = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)]).to(dev)
    return q, k, v, cos, sin, qw, kw, kc, vc, slots


# bf16: a rounding step of values up to ~8 (the Triton interpreter rounds its bf16 casts differently
# from torch, as in test_norm; the sum of two rounded products can cancel)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("B,T,H,G,d,norm", [(2, 1, 4, 2, 16, True), (1, 3, 2, 2, 8, False), (3, 2, 6, 2, 12, True),
                                            (1, 1, 4, 1, 32, False)])
def test_prepare_qkv_matches_the_reference(dtype, tol, B, T, H, G, d, norm):
    q, k, v, cos, sin, qw, kw, kc, vc, slots = _inputs(B, T, H, G, d, 9, dtype, norm)
    kc2, vc2 = kc.clone(), vc.clone()
    got = prepare_qkv(q, k, v, cos, sin, qw, kw, 1e-6, kc, vc, slots, H, G)
    want = prepare_qkv_reference(q, k, v, cos, sin, qw, kw, 1e-6, kc2, vc2, slots, H, G)
    assert got.shape == want.shape == (B, H, T, d) and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(kc, kc2, rtol=tol, atol=tol)
    assert torch.equal(vc, vc2)  # values are copied as they are
    touched = torch.zeros(B, 9, dtype=torch.bool, device=slots.device).scatter_(1, slots, True)
    untouched = ~touched[:, None, :, None].expand_as(kc)
    assert torch.equal(kc[untouched], kc2[untouched])  # no slot but the new tokens' is written


def test_strided_projections_and_bad_shapes():
    B, T, H, G, d = 2, 2, 4, 2, 8
    q, k, v, cos, sin, qw, kw, kc, vc, slots = _inputs(B, T, H, G, d, 6, torch.float32, True, seed=1)
    qkv = torch.cat([q, k, v], dim=-1)  # one fused projection's output, split by views
    qs, ks, vs = qkv.split([H * d, G * d, G * d], dim=-1)
    kc2, vc2 = kc.clone(), vc.clone()
    got = prepare_qkv(qs, ks, vs, cos, sin, qw, kw, 1e-6, kc, vc, slots, H, G)
    want = prepare_qkv_reference(q, k, v, cos, sin, qw, kw, 1e-6, kc2, vc2, slots, H, G)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kc, kc2, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="heads"):
        prepare_qkv(q, k[..., :-1], v, cos, sin, qw, kw, 1e-6, kc, vc, slots, H, G)
    with pytest.raises(ValueError, match="both"):
        prepare_qkv(q, k, v, cos, sin, qw, None, 1e-6, kc, vc, slots, H, G)
    with pytest.raises(ValueError, match="cos/sin"):
        prepare_qkv(q, k, v, cos[..., :2], sin, qw, kw, 1e-6, kc, vc, slots, H, G)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_the_model_decodes_the_same_with_and_without_it(family, monkeypatch):
    from moe.attention import Attention
    from moe.config import MoEConfig
    from moe.model import MoEForCausalLM

    torch.manual_seed(0)
    m = MoEForCausalLM(MoEConfig.tiny(family), dtype=torch.float32, device="cuda")
    m.init_weights(seed=0)
    m.eval()
    prompt = torch.randint(3, 100, (2, 7), device="cuda")

    def run():
        cache = m.new_cache(2, 32)
        with torch.inference_mode():
            out = [m(prompt, cache=cache)[:, -1].float()]
            ids = out[0].argmax(-1, keepdim=True)
            for _ in range(4):
                out.append(m(ids, cache=cache)[:, -1].float())
                ids = out[-1].argmax(-1, keepdim=True)
        return torch.stack(out)

    fused = run()
    monkeypatch.setattr(Attention, "_fused_prep", lambda self, q, cache: False)
    monkeypatch.setattr(Attention, "_fused_qkv", lambda self, x: False)  # kernels/proj.py too
    plain = run()
    # float32: only the norm's sum is taken in another order
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


def test_only_a_kvcache_itself_takes_the_kernel():
    """The expert-parallel decode hands attention a recorder wrapping the cache (placement/decode.py):
    that must go through update(), which the recorder watches, not straight into the cache."""
    from types import SimpleNamespace

    from moe.attention import Attention
    from moe.config import MoEConfig
    from moe.kv_cache import KVCache
    from placement.decode import _KVRecorder

    attn = Attention(MoEConfig.tiny("qwen3_moe"), 0)
    cache = KVCache(1, 8, dtype=torch.float32)
    q = SimpleNamespace(is_cuda=True, dtype=torch.float32, requires_grad=False)  # as a CUDA tensor would answer
    with torch.no_grad():
        assert attn._fused_prep(q, cache)
        assert not attn._fused_prep(q, _KVRecorder(cache))
        assert not attn._fused_prep(q, None)
        assert not attn._fused_prep(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, requires_grad=False), cache)
