"""kernels.decode_attention (Triton; interpreted on the CPU) against torch's SDPA: grouped heads, MLA's
unequal key / value sizes, masks with holes, several chunks, views of a larger cache; and its two
promises: the same bits on every call, and a row's output independent of the rest of the batch."""
import pytest
import torch

from kernels.decode_attention import (BLOCK_S, decode_attention, decode_attention_reference, supports)


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, G, S, d, e, dtype, lengths, seed=0, spare=3):
    """q [B, H, 1, d]; k / v as views of a cache with ``spare`` more slots; the decode mask of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    dev = _dev()
    r = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)  # noqa: E731
    q = r(B, H, 1, d)
    k_all, v_all = r(B, G, S + spare, d), r(B, G, S + spare, e)
    mask = torch.arange(S, device=dev)[None, None, None, :] < torch.tensor(lengths, device=dev)[:, None, None, None]
    return q, k_all[:, :, :S], v_all[:, :, :S], mask


def _additive(mask, dtype):
    """The model's additive form of a boolean mask (moe.model._additive): 0 where seen, -inf elsewhere."""
    from moe.model import _additive as additive
    return additive(mask, dtype)


def _ref(q, k, v, mask, scale):
    """SDPA in float32 (on the CPU: the math of the definition)."""
    m = mask.cpu() if mask.dtype == torch.bool else mask.float().cpu()
    return decode_attention_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), m, scale)


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,H,G,S,d,e,chunk", [
    (2, 4, 2, 300, 16, 16, 128),     # grouped heads, three chunks (the merge), the last one partial
    (1, 2, 2, 40, 24, 16, 256),      # MLA-like: H == G, key head 24, value head 16 (not powers of two), one chunk
    (3, 6, 2, 200, 32, 32, 256),     # three query heads a kv head, one chunk of two blocks
    (1, 4, 1, 9, 16, 16, 128),       # all heads share one kv head, fewer slots than a block
])
def test_matches_sdpa(dtype, tol, B, H, G, S, d, e, chunk, additive):
    lengths = [S, max(1, S // 3), 1][:B]
    q, k, v, mask = _inputs(B, H, G, S, d, e, dtype, lengths)
    if additive:
        mask = _additive(mask, dtype)
    got = decode_attention(q, k, v, mask, d ** -0.5, chunk=chunk)
    assert got.shape == (B, H, 1, e) and got.dtype == dtype
    torch.testing.assert_close(got.float().cpu(), _ref(q, k, v, mask, d ** -0.5), rtol=tol, atol=tol)


@pytest.mark.parametrize("additive", [False, True])
def test_holes_in_the_mask_and_a_row_that_sees_nothing(additive):
    B, H, G, S, d = 3, 4, 2, 400, 16
    q, k, v, _ = _inputs(B, H, G, S, d, d, torch.float32, [S] * B, seed=1)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.3
    mask[1, ..., 128:256] = False  # a whole block (and chunk) masked in the middle
    mask[1, ..., 5] = True
    mask[2] = False                # an idle row: zeros, not NaN
    mask = mask.to(_dev())
    if additive:  # with finite values too: an additive mask is added to the scores
        mask = _additive(mask, torch.float32) + torch.rand(mask.shape, generator=g).to(_dev())
    got = decode_attention(q, k, v, mask, 0.3, chunk=128).cpu()
    want = _ref(q, k, v, mask, 0.3)
    torch.testing.assert_close(got[:2], want[:2], rtol=2e-5, atol=2e-5)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@pytest.mark.parametrize("chunk", [128, 256])
def test_a_row_is_the_same_whatever_else_is_in_the_batch(chunk):
    """Batch invariance: row 0 alone over its own slots, and in a batch of 3 over 3x as many slots (as
    when another row's length rounds the slots read up), gives the same bits."""
    d = 16
    q, k, v, mask = _inputs(3, 4, 2, 3 * chunk, d, d, torch.float32, [chunk - 7, 3 * chunk, 5], seed=3)
    big = decode_attention(q, k, v, mask, d ** -0.5, chunk=chunk)
    alone = decode_attention(q[:1], k[:1, :, :chunk], v[:1, :, :chunk], mask[:1, ..., :chunk], d ** -0.5, chunk=chunk)
    assert torch.equal(big[:1], alone)
    assert torch.equal(decode_attention(q, k, v, mask, d ** -0.5, chunk=chunk), big)  # and on every call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_row_is_the_same_whatever_else_is_in_the_batch(dtype):
    """The batch invariance above at Qwen3's heads in half precision: row 0 (300 slots) alone over 512
    slots, and beside 7 longer rows over 4096 slots, gives the same bits, additive mask included."""
    q, k, v, mask = _inputs(8, 32, 4, 4096, 128, 128, dtype, [300] + [4096 - 511 * i for i in range(7)], seed=6)
    for m in (mask, _additive(mask, dtype)):
        big = decode_attention(q, k, v, m, 128 ** -0.5)
        alone = decode_attention(q[:1], k[:1, :, :512], v[:1, :, :512], m[:1, ..., :512], 128 ** -0.5)
        assert torch.equal(big[:1], alone)


def test_refuses_what_it_cannot_take():
    q, k, v, mask = _inputs(1, 4, 2, 8, 16, 16, torch.float32, [8])
    assert supports(q, k, v, mask)
    assert not supports(q.expand(1, 4, 2, 16), k, v, mask)          # two new tokens a row
    assert supports(q, k, v, _additive(mask, torch.float32))       # the model's additive mask
    assert not supports(q, k, v, mask.to(torch.int32))             # an integer mask
    assert not supports(q[:, :3], k, v, mask)                      # 3 heads over 2 kv heads
    with pytest.raises(ValueError, match="one token per row"):
        decode_attention(q, k, v, mask.to(torch.int32), 0.25)
    with pytest.raises(ValueError, match="multiple of"):
        decode_attention(q, k, v, mask, 0.25, chunk=BLOCK_S + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,G,S,d,e", [(1, 32, 4, 256, 128, 128), (8, 32, 8, 1024, 128, 128),
                                         (4, 16, 16, 512, 192, 128), (32, 32, 4, 4096, 128, 128)])
def test_gpu_half_precision_against_sdpa_and_repeatable(dtype, B, H, G, S, d, e, additive):
    """Real shapes (Qwen3, Mixtral, DeepSeek MLA, a long batch) in half precision on the GPU: close to
    SDPA, and bitwise the same over 20 calls (SDPA's cuDNN path is not, BENCHMARKS 6e)."""
    lengths = [max(1, S - 37 * i) for i in range(B)]
    q, k, v, mask = _inputs(B, H, G, S, d, e, dtype, lengths, seed=4)
    want = decode_attention_reference(q.float(), k.float(), v.float(), mask, d ** -0.5)
    if additive:
        mask = _additive(mask, dtype)
    got = decode_attention(q, k, v, mask, d ** -0.5)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    for _ in range(20):
        assert torch.equal(decode_attention(q, k, v, mask, d ** -0.5), got)


def test_the_models_attend_takes_it_for_decode_steps(monkeypatch):
    """moe.attention.attend sends a decode step (one token a row, the KV cache's own mask) to the kernel
    when it runs for inference on CUDA (here pretended, interpreted), and to SDPA when switched off."""
    import kernels
    from moe import attention
    from moe.kv_cache import KVCache

    calls = []
    real = __import__("kernels.decode_attention", fromlist=["decode_attention"]).decode_attention
    monkeypatch.setattr("kernels.decode_attention.decode_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(kernels, "inference_on_cuda", lambda *a: True)
    cache = KVCache(2, 20)
    cache.lengths[:] = torch.tensor([12, 3])
    mask = _additive(cache.attention_mask(1, 16), torch.float32).to(_dev())  # as the model hands it on CUDA
    q, k, v, _ = _inputs(2, 4, 2, 16, 16, 16, torch.float32, [16, 16], seed=5)
    got = attention.attend(q, k, v, mask, 0.25)
    assert calls == [1]
    torch.testing.assert_close(got.cpu(), _ref(q, k, v, mask, 0.25), rtol=2e-5, atol=2e-5)
    monkeypatch.setattr(attention, "DECODE_ATTENTION", "sdpa")
    attention.attend(q, k, v, mask, 0.25)
    attention.attend(q.expand(2, 4, 1, 16), k, v, mask, 0.25)
    assert calls == [1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v2"])
def test_gpu_bf16_greedy_decoding_repeats_bit_for_bit(family, monkeypatch):
    """A bf16 model on the GPU decoding greedily twice from the same prompt: the same logits bit for bit
    with the kernel (cuDNN's SDPA gave different bits between runs, BENCHMARKS 6e), and close to SDPA's."""
    import kernels.decode_attention as kda
    from moe import attention
    from moe.config import MoEConfig
    from moe.model import MoEForCausalLM

    calls = []
    real = kda.decode_attention
    monkeypatch.setattr(kda, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    m = MoEForCausalLM(MoEConfig.tiny(family), dtype=torch.bfloat16, device="cuda")
    m.init_weights(seed=0)
    m.eval()
    prompt = torch.randint(3, 100, (3, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def run():
        cache = m.new_cache(3, 40)
        out = []
        with torch.inference_mode():
            logits = m(prompt, cache=cache, last_only=True)
            for _ in range(24):
                out.append(logits[:, -1].float())
                logits = m(logits[:, -1].argmax(-1, keepdim=True), cache=cache)
        return torch.stack(out)

    a, b = run(), run()
    assert torch.equal(a, b)
    n = len(calls)
    assert n >= 2 * 23 * len(m.layers)  # every decode step's every layer ran the kernel
    monkeypatch.setattr(attention, "DECODE_ATTENTION", "sdpa")
    c = run()
    assert len(calls) == n
    torch.testing.assert_close(c[:4], a[:4], rtol=0.05, atol=0.05)  # greedy paths may part after a near tie


def test_benchmark_script_runs_on_cpu(tmp_path, capsys):
    """benchmarks/attention.py (interpreted kernel, SDPA's backends) on one small cell: the script's own check."""
    import json

    from tests.conftest import load_benchmark
    mod = load_benchmark("attention")
    assert mod.main(["--device", _dev(), "--shapes", "qwen3", "--batch", "2", "--slots", "70", "--reps", "1",
                     "--repeat", "2", "--out", str(tmp_path)]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "attention_results.jsonl").read_text().splitlines()]
    assert row["moeflow_err"] < (1e-5 if _dev() == "cpu" else 2e-2) and row["moeflow_differ"] == 0 and row["moeflow_ms"] > 0
    assert "decode attention" in capsys.readouterr().out
