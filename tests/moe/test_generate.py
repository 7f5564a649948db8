"""The generation engine on a tiny random Mixtral-family model.

The reference for greedy decoding is the plain loop without a KV cache: run the whole sequence
through the model, take the argmax of the last position, append, repeat.
"""
import copy
import os

import numpy as np
import pytest
import torch

from moe.config import MoEConfig
from moe.generate import Engine, _held_back, generate, stream, stream_outputs
from moe.model import MoEForCausalLM
from moe.sampling import SamplingParams
from moe.tiny import ensure_tiny_model
from moe.tokenizer import Tokenizer
from tests.conftest import load_benchmark

PROMPTS = ["def foo(x):", "import os\nimport sys\n\nclass Config(object):\n    pass\n", "a",
           "for i in range(10):\n    print(i)", "x = {'k': [1, 2, 3]}"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(ensure_tiny_model(cache_dir=tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def model(tok):
    cfg = MoEConfig.tiny("mixtral", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_ids[0])
    m = MoEForCausalLM(cfg)
    m.init_weights(seed=0)
    with torch.no_grad():  # a wide output layer: clear argmax margins, varied tokens
        m.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    return m.eval()


def greedy_reference(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            t = int(logits.argmax())
            ids.append(t)
            out.append(t)
    return out


def run(engine, requests):
    """Drive an engine to completion: {request_id: (token ids, text, finish_reason)}."""
    ids = {rid: [] for rid in requests}
    text = {rid: "" for rid in requests}
    reason = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id not in reason, "output after the request finished"
            ids[o.request_id] += o.new_token_ids
            text[o.request_id] += o.new_text
            if o.finished:
                reason[o.request_id] = o.finish_reason
    return {rid: (ids[rid], text[rid], reason[rid]) for rid in requests}


def alone(model, tok, prompt, params, max_len=256):
    e = Engine(model, tok, max_batch_size=1, max_len=max_len)
    return run(e, [e.add_request(prompt, params)])


def test_greedy_matches_the_no_cache_reference(model, tok):
    ids = tok.encode(PROMPTS[0])
    (got, text, reason), = alone(model, tok, ids, SamplingParams(max_new_tokens=8, ignore_eos=True)).values()
    assert got == greedy_reference(model, ids, 8)
    assert reason == "length" and text == tok.decode(got)


def test_batched_greedy_equals_each_request_alone(model, tok):
    # 5 requests of different lengths through 3 rows: rows are reused as requests leave
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (9, 4, 12, 6, 7)]
    e = Engine(model, tok, max_batch_size=3, max_len=128)
    rids = [e.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    batched = run(e, rids)
    for rid, p, sp in zip(rids, PROMPTS, params):
        ref = list(alone(model, tok, p, sp).values())[0]
        assert batched[rid] == ref
        assert len(ref[0]) == sp.max_new_tokens


def test_requests_join_a_running_batch(model, tok):
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    e = Engine(model, tok, max_batch_size=4, max_len=64)
    first = e.add_request(PROMPTS[1], sp)
    seen = {first: []}
    for _ in range(3):
        for o in e.step():
            seen[o.request_id] += o.new_token_ids
    late = e.add_request(PROMPTS[2], sp)  # joins while the first is decoding
    seen[late] = []
    assert e.num_waiting == 1 and e.num_running == 1
    while e.has_unfinished():
        for o in e.step():
            seen[o.request_id] += o.new_token_ids
    assert seen[first] == list(alone(model, tok, PROMPTS[1], sp).values())[0][0]
    assert seen[late] == list(alone(model, tok, PROMPTS[2], sp).values())[0][0]


def test_long_prompt_joins_a_row_set_near_max_len(model, tok):
    # the cache needs room only for each row's valid tokens, so a long prompt joins a free row at
    # once even while the other row is about to reach max_len; the padding it forces on that row
    # goes to the spare slot and must not overwrite the row's last valid token (slot max_len - 1)
    sp_long = SamplingParams(max_new_tokens=20, ignore_eos=True)
    long_prompt = tok.encode(PROMPTS[1])
    max_len = len(long_prompt) + 20
    e = Engine(model, tok, max_batch_size=2, max_len=max_len)
    assert len(long_prompt) > 21
    a = e.add_request(long_prompt, sp_long)
    got = {a: [], "b": [], "c": []}
    finished_at = {}
    for step in range(100):
        if step == 1:
            e.add_request(long_prompt, SamplingParams(max_new_tokens=3, ignore_eos=True), request_id="b")
        if step == 19:  # a's last step: it writes slot max_len - 1 while c's prompt pads its row
            e.add_request(PROMPTS[2], SamplingParams(max_new_tokens=2, ignore_eos=True), request_id="c")
        for o in e.step():
            got[o.request_id] += o.new_token_ids
            if o.finished:
                finished_at[o.request_id] = step
        if not e.has_unfinished():
            break
    assert finished_at == {a: 19, "b": 3, "c": 20}
    ref = list(alone(model, tok, long_prompt, sp_long, max_len).values())[0][0]
    assert got[a] == ref
    assert got["b"] == ref[:3]
    assert got["c"] == list(alone(model, tok, PROMPTS[2], SamplingParams(max_new_tokens=2, ignore_eos=True)).values())[0][0]


class _Shapes(torch.nn.Module):
    """The model, with the token count T of every forward recorded."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.T, self.shapes = [], []

    def new_cache(self, *a):
        return self.inner.new_cache(*a)

    def forward(self, input_BT, cache=None, valid_BT=None, last_only=False):
        self.T.append(input_BT.shape[1])
        self.shapes.append(tuple(input_BT.shape))
        return self.inner(input_BT, cache=cache, valid_BT=valid_BT, last_only=last_only)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_gives_each_request_its_unchunked_tokens(model, tok, chunk):
    """Prompts fed ``chunk`` tokens a step (5 requests through 3 rows, greedy and seeded sampling)
    give the tokens the whole-prompt engine gives, and no forward runs more than ``chunk`` tokens."""
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (9, 4, 12, 6)] + [
        SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)]
    spy = _Shapes(model)
    e = Engine(spy, tok, max_batch_size=3, max_len=128, cuda_graph=False, prefill_chunk=chunk)
    rids = [e.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    chunked = run(e, rids)
    assert max(spy.T) == chunk
    whole = Engine(model, tok, max_batch_size=3, max_len=128, cuda_graph=False)
    ref = run(whole, [whole.add_request(p, sp) for p, sp in zip(PROMPTS, params)])
    assert list(chunked.values()) == list(ref.values())


def test_a_prefill_runs_the_rows_up_to_the_last_running_one(model, tok):
    """An eager prefill step feeds rows 0 .. the last running one (KVCache.rows_prefix), not every row of the
    cache: a lone request on a 4-row engine prefills [1, T]; decode steps keep all rows; the tokens are the same."""
    spy = _Shapes(model)
    sp = SamplingParams(max_new_tokens=3, ignore_eos=True)
    e = Engine(spy, tok, max_batch_size=4, max_len=64, cuda_graph=False)
    first = e.add_request(PROMPTS[1], sp)
    got = run(e, [first])
    n = len(tok.encode(PROMPTS[1]))
    assert spy.shapes == [(1, n), (4, 1), (4, 1)]
    assert got[first] == list(alone(model, tok, PROMPTS[1], sp).values())[0]
    # rows 0 and 1 running, row 1 joins: [2, T]
    spy.shapes.clear()
    e = Engine(spy, tok, max_batch_size=4, max_len=64, cuda_graph=False)
    a = e.add_request(PROMPTS[0], SamplingParams(max_new_tokens=4, ignore_eos=True))
    e.step()
    b = e.add_request(PROMPTS[3], sp)
    rest = run(e, [a, b])
    assert spy.shapes[1] == (2, len(tok.encode(PROMPTS[3])))
    assert rest[b] == list(alone(model, tok, PROMPTS[3], sp).values())[0]


class _Packed(_Shapes):
    """The model, with every forward's input shape and packed parts (segments=) recorded."""

    def __init__(self, inner):
        super().__init__(inner)
        self.segments, self.valid = [], []

    def forward(self, input_BT, cache=None, valid_BT=None, last_only=False, segments=None):
        self.shapes.append(tuple(input_BT.shape))
        self.segments.append(None if segments is None else [tuple(p) for p in segments])
        self.T.append(input_BT.shape[1] if segments is None else max(t for n, t in segments))
        self.valid.append(input_BT.numel() if valid_BT is None else int(valid_BT.sum()))
        return self.inner(input_BT, cache=cache, valid_BT=valid_BT, last_only=last_only, segments=segments)

    def packs_in_one_pass(self, cache):
        return self.inner.packs_in_one_pass(cache)


@pytest.mark.parametrize("family,extra", [("mixtral", {}), ("deepseek_v2", {}), ("olmoe", {"clip_qkv": 8.0}),
                                          ("qwen2_moe", {"sliding_window": 3}),
                                          ("qwen3_moe", {"sliding_window": 4,
                                                         "layer_types": ["sliding_attention", "full_attention"]})])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("attend", ["parts", "one launch"])
def test_a_packed_step_gives_each_row_its_own_logits(family, extra, device, attend, monkeypatch):
    """forward(segments=...): rows feeding 1, 6, 1 tokens and an idle row, packed into [1, 9] (no padding between
    them), give each row the logits and the cache it gets running alone; MLA, clipped q/k/v, shared experts and
    sliding windows included. Attention part by part (on a GPU with the triton backend, float32: the fused q/k/v
    preparation writing into row views of the cache, and the decode attention kernel on the one-token parts), or
    over the whole step in one launch (kernels.packed_attention; on the CPU in the Triton interpreter; MLA's keys
    and values written by index into their rows)."""
    import moe.attention as A
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if device == "cpu" and attend == "one launch" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the one-launch kernels take CPU tensors only in the Triton interpreter (CI)")
    monkeypatch.setattr(A, "PACKED_ATTENTION", "never" if attend == "parts" else "always")
    cfg = MoEConfig.tiny(family, **extra)
    m = MoEForCausalLM(cfg, backend="triton" if device == "cuda" else "torch", device=device)
    m.init_weights(seed=3)
    m.eval()
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)
    g = torch.Generator().manual_seed(4)
    before = [torch.randint(3, cfg.vocab_size, (n,), generator=g).to(device) for n in (5, 0, 3, 2)]
    feeds = [torch.randint(3, cfg.vocab_size, (n,), generator=g).to(device) for n in (1, 6, 1, 1)]

    def cache_with_history():
        c = m.new_cache(4, 16)
        for b, p in enumerate(before):
            if len(p):
                m(p[None], cache=c.rows_range(b, 1))
        return c

    with torch.no_grad():
        alone_cache = cache_with_history()
        ref = [m(feeds[b][None], cache=alone_cache.rows_range(b, 1))[0] for b in range(3)]
        c = cache_with_history()
        ids = torch.cat(feeds)[None]
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[0, -1] = False  # row 3 idle: one padding token
        last = m(ids, cache=c, valid_BT=valid, last_only=True, segments=[(1, 1), (1, 6), (2, 1)])
        c.lengths -= torch.tensor([1, 6, 1, 0], device=device)  # the same step again, every token's logits
        full = m(ids, cache=c, valid_BT=valid, segments=[(1, 1), (1, 6), (2, 1)])
    assert last.shape == (4, 1, cfg.vocab_size) and full.shape == (1, 9, cfg.vocab_size)
    for b, (a, z) in enumerate(((0, 1), (1, 7), (7, 8))):
        torch.testing.assert_close(full[0, a:z], ref[b], **tol)
        torch.testing.assert_close(last[b, 0], ref[b][-1], **tol)
    assert c.lengths.tolist() == [6, 6, 4, 2] == alone_cache.lengths.tolist()
    for layer in alone_cache._k:
        for b, n in enumerate((6, 6, 4, 2)):
            torch.testing.assert_close(c._k[layer][b, :, :n], alone_cache._k[layer][b, :, :n], **tol)
            torch.testing.assert_close(c._v[layer][b, :, :n], alone_cache._v[layer][b, :, :n], **tol)


def test_a_packed_step_refuses_segments_that_do_not_fit(model):
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="KVCache"):
        model(ids, segments=[(1, 5)])
    for bad in ([(1, 4)], [(2, 2), (1, 1)], [(0, 5)], [(3, 1), (1, 2)]):
        with pytest.raises(ValueError, match="segments"):
            model(ids, cache=model.new_cache(2, 16), segments=bad)


def test_a_prompt_joining_decoding_rows_is_packed(model, tok):
    """A step where rows decode while another row feeds its prompt runs packed: the model gets the fed tokens
    one after another ([1, 1 + prompt], not [2, prompt] of padding), and every request gets the tokens it gets
    alone, greedy and sampled, with chunked prompts too; so does the same engine made to pad (unpacked)."""
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    spy = _Packed(model)
    e = Engine(spy, tok, max_batch_size=4, max_len=64, cuda_graph=False)
    e.pack_tokens_per_part = 0  # (these prompts save little padding: pack them all the same, _pays_to_pack)
    a = e.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True))
    e.step()
    b = e.add_request(PROMPTS[3], sp)
    got = run(e, [a, b])
    n = len(tok.encode(PROMPTS[3]))
    assert spy.shapes[1] == (1, 1 + n) and spy.segments[1] == [(1, 1), (1, n)]
    assert got[b] == list(alone(model, tok, PROMPTS[3], sp).values())[0]
    # (a's first token came from the step before run)
    assert got[a][0] == list(alone(model, tok, PROMPTS[0], SamplingParams(max_new_tokens=6, ignore_eos=True)
                                   ).values())[0][0][1:]

    def mixed(engine):  # 5 requests through 3 rows, arriving while others decode; one sampled
        rids = [engine.add_request(PROMPTS[0], sp)]
        first = [t for o in engine.step() for t in o.new_token_ids]
        rids += [engine.add_request(p, sampled if i == 2 else sp) for i, p in enumerate(PROMPTS[1:])]
        out = list(run(engine, rids).values())
        return [(first + out[0][0],) + out[0][1:]] + out[1:]

    for chunk in (None, 4):
        packed = _Packed(model)
        want = mixed(Engine(model, tok, max_batch_size=3, max_len=128, cuda_graph=False, prefill_chunk=chunk))
        e = Engine(packed, tok, max_batch_size=3, max_len=128, cuda_graph=False, prefill_chunk=chunk)
        e.pack_tokens_per_part = 0
        assert mixed(e) == want
        assert any(s is not None and len(s) > 1 for s in packed.segments)
        padded = Engine(model, tok, max_batch_size=3, max_len=128, cuda_graph=False, prefill_chunk=chunk)
        padded._packed = False
        assert mixed(padded) == want
        for p, want_one in zip(PROMPTS, want):
            params = sampled if p == PROMPTS[3] else sp
            ids, text, reason = list(alone(model, tok, p, params).values())[0]
            assert want_one[0] == ids and want_one[2] == reason


def test_a_step_packs_where_it_saves_enough_padding_or_the_chunk_needs_it(model, tok):
    """Engine._pays_to_pack: packing costs host time per part, so a mixed step packs only where it saves at least
    pack_tokens_per_part padded tokens per part beyond the first, and always where padding would pass the tokens a
    prefill chunk bounds (chunk + rows - 1); either way the tokens are the same."""
    e = Engine(model, tok, max_batch_size=8, max_len=4096, cuda_graph=False)
    assert e.pack_tokens_per_part == 256  # on the CPU (2048 on a GPU, PACK_TOKENS_PER_PART)
    assert e._pays_to_pack([(7, 1), (1, 256)], 8, 256) and not e._pays_to_pack([(7, 1), (1, 32)], 8, 32)
    e.pack_tokens_per_part = 2048
    assert not e._pays_to_pack([(7, 1), (1, 256)], 8, 256)  # saves 1785 < 2048
    assert e._pays_to_pack([(7, 1), (1, 2048)], 8, 2048)  # saves 14329
    assert not e._pays_to_pack([(4, 1), (1, 500), (1, 400), (1, 300), (1, 200)], 8, 500)  # 2596 < 4 x 2048
    e = Engine(model, tok, max_batch_size=8, max_len=4096, cuda_graph=False, prefill_chunk=64)
    e.pack_tokens_per_part = 2048
    assert e._pays_to_pack([(7, 1), (1, 64)], 8, 64)  # 8 x 64 padded would pass the 64 + 7 the chunk bounds
    assert e._pays_to_pack([(1, 1), (1, 64)], 2, 64)  # 2 x 64 padded: past the 64 + 1 bounded, saving only 63
    assert not e._pays_to_pack([(1, 1), (1, 20)], 2, 20)  # 2 x 20 padded: inside, and it saves 19
    e.pack_tokens_per_part = 0
    assert e._pays_to_pack([(1, 1), (1, 20)], 2, 20)
    spy = _Packed(model)
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    e = Engine(spy, tok, max_batch_size=3, max_len=128, cuda_graph=False)
    a = e.add_request(PROMPTS[0], sp)
    first = [t for o in e.step() for t in o.new_token_ids]
    b = e.add_request(PROMPTS[1], sp)
    got = run(e, [a, b])
    assert all(s is None for s in spy.segments)  # a short prompt beside one decoding row: padded
    assert first + got[a][0] == list(alone(model, tok, PROMPTS[0], sp).values())[0][0]
    assert got[b] == list(alone(model, tok, PROMPTS[1], sp).values())[0]


def test_an_engine_whose_model_attends_a_packed_step_in_one_launch_packs_every_mixed_step(model, tok, monkeypatch):
    """Where the model attends over a packed step in one launch (MoEForCausalLM.packs_in_one_pass; here the Triton
    interpreter, PACKED_ATTENTION 'always'), a part costs no launch of its own: the engine packs every mixed step
    (PACK_TOKENS_ONE_PASS, 0) and every other step of several tokens a row (one part), and packed so, every request
    gets the tokens it gets alone, greedy and sampled, chunked or not."""
    import moe.attention as A
    from moe.generate import PACK_TOKENS_ONE_PASS
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the one-launch kernels take CPU tensors only in the Triton interpreter (CI; the GPU's own "
                    "packed-step tests cover the kernels there)")
    monkeypatch.setattr(A, "PACKED_ATTENTION", "always")
    assert model.packs_in_one_pass(model.new_cache(2, 8)) is False  # (autograd on: the kernels take no gradient)
    with torch.no_grad():
        assert model.packs_in_one_pass(model.new_cache(2, 8))
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    for chunk in (None, 3):
        spy = _Packed(model)
        e = Engine(spy, tok, max_batch_size=3, max_len=128, cuda_graph=False, prefill_chunk=chunk)
        assert e.pack_tokens_per_part == PACK_TOKENS_ONE_PASS == 0
        rids = [e.add_request(PROMPTS[0], sp)]
        first = [t for o in e.step() for t in o.new_token_ids]
        # the lone prompt's prefill packed too, as one part: one launch of the packed kernel, not torch's SDPA
        # (whose cuDNN backend plans a graph per new length on a GPU: s34-h)
        assert spy.T[0] > 1 and spy.segments[0] == [(1, spy.T[0])]
        rids += [e.add_request(p, sampled if i == 1 else sp) for i, p in enumerate(PROMPTS[1:4])]
        got = list(run(e, rids).values())
        assert any(s is not None and len(s) > 1 for s in spy.segments)
        assert all(s is not None for s, T in zip(spy.segments, spy.T) if T > 1)  # no multi-token step padded
        monkeypatch.setattr(A, "PACKED_ATTENTION", "never")
        want = [alone(model, tok, p, sampled if i == 2 else sp) for i, p in enumerate(PROMPTS[:4])]
        monkeypatch.setattr(A, "PACKED_ATTENTION", "always")
        assert first + got[0][0] == list(want[0].values())[0][0]
        assert got[1:] == [list(w.values())[0] for w in want[1:]]


def test_warm_up_launches_every_packed_attention_variant_a_long_context_takes(model, tok, monkeypatch):
    """A replica's first packed steps over long contexts must not compile attention kernels inside a request: past
    SPLIT slots a block is cut in pieces and merged (a kernel of its own), and a decoding row past SINGLE_FROM slots
    takes the one-token table (16-row tiles: another variant of both kernels), and a long prompt the wide table
    (128-row tiles: another again). Engine.warm_up's forced packed step
    runs under kernels.packed_attention.every_variant, so every (tokens a block, merged, window) variant of the
    traffic's steps was launched by the warm-up; without it the traffic takes ones the warm-up missed. Long contexts
    and prompts scaled down to this cache: SINGLE_FROM 24, SPLIT 16, WIDE_ROWS 8 tokens."""
    import contextlib
    import kernels.packed_attention as PA
    import moe.attention as A
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the one-launch kernels take CPU tensors only in the Triton interpreter (CI)")
    monkeypatch.setattr(A, "PACKED_ATTENTION", "always")
    monkeypatch.setattr(PA, "SINGLE_FROM", 24)
    monkeypatch.setattr(PA, "SPLIT", 16)
    H, G = model.layers[0].attn.packed_heads()
    R, TB = PA.group_rows(H, G)
    monkeypatch.setattr(PA, "WIDE_ROWS", 8 * R * G)  # a prompt of 8 tokens or more: the wide table
    monkeypatch.setattr(PA, "WIDE_FROM_SLOTS", 0)
    seen = []
    attend = PA._attend_table

    def spy(q, k, v, out, table, R, TB, scale):
        seen.append(("attend", TB, table.window))  # the kernels it launches, by the variants they compile
        if table.num_merges:
            seen.append(("merge", TB))
        return attend(q, k, v, out, table, R, TB, scale)
    monkeypatch.setattr(PA, "_attend_table", spy)
    ids = tok.encode(PROMPTS[1])

    def variants(every_variant):
        monkeypatch.setattr(PA, "every_variant", every_variant)
        e = Engine(model, tok, max_batch_size=2, max_len=48, cuda_graph=False)
        seen.clear()
        e.warm_up(max_prompt=5)
        warm = set(seen)
        seen.clear()
        # a row decoding past 24 slots, then a prompt joining it: a packed step with the one-token table, merged
        e.add_request(ids[:10], SamplingParams(max_new_tokens=30, ignore_eos=True))
        while int(e.cache.lengths[0]) < 26:
            e.step()
        e.add_request(ids[:3], SamplingParams(max_new_tokens=2, ignore_eos=True))
        while e.has_unfinished():
            e.step()
        return warm, set(seen)

    warm, traffic = variants(PA.every_variant)
    tb1 = PA.single_tokens_per_block(TB)
    assert {("attend", tb1, 0), ("merge", tb1)} <= traffic  # the long context's row: the one-token table, merged
    assert ("attend", PA.wide_tokens_per_block(TB), 0) in traffic  # the 10-token prompt: the wide table
    assert traffic <= warm
    warm, traffic = variants(contextlib.nullcontext)
    assert not traffic <= warm


def test_the_prefill_chunk_is_a_budget_of_a_step_fed_first_come_first_served(model, tok):
    """prefill_chunk=4 with three prompts arriving at once: every step feeds at most 4 prompt tokens in all (the
    earliest admitted prompt first, the next when it is done; the rows it does not reach wait), decoding rows
    keep decoding, and every request gets its unchunked tokens."""
    sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompts = [PROMPTS[3], PROMPTS[1], PROMPTS[0]]
    lens = [len(tok.encode(p)) for p in prompts]
    spy = _Packed(model)
    e = Engine(spy, tok, max_batch_size=3, max_len=128, cuda_graph=False, prefill_chunk=4)
    rids = [e.add_request(p, sp) for p in prompts]
    firsts, step = {}, 0
    while e.has_unfinished():
        step += 1
        for o in e.step():
            firsts.setdefault(o.request_id, step)
    # a forward's real tokens: at most the 4 prompt tokens and one per other row (decoding)
    assert max(spy.valid) <= 4 + 2 and max(spy.T) <= 4
    assert any(segs and (1, 4) in segs and any(t == 1 for n, t in segs) for segs in spy.segments)
    # the prompts in arrival order: the first's first token at step cdiv(len, 4), the others after it
    assert firsts[rids[0]] == -(-lens[0] // 4) < firsts[rids[1]] < firsts[rids[2]]
    assert firsts[rids[2]] <= -(-sum(lens) // 4) + 2
    ref = Engine(model, tok, max_batch_size=3, max_len=128, cuda_graph=False)
    want = run(ref, [ref.add_request(p, sp) for p in prompts])
    e = Engine(model, tok, max_batch_size=3, max_len=128, cuda_graph=False, prefill_chunk=4)
    assert list(run(e, [e.add_request(p, sp) for p in prompts]).values()) == list(want.values())


def test_rows_prefix_shares_the_storage_and_lengths():
    from moe.kv_cache import KVCache
    c = KVCache(3, 8)
    k, v = c.buffers(0, 2, 4, 4)
    p = c.rows_prefix(2)
    assert c.rows_prefix(3) is c and p.batch_size == 2
    pk, pv = p.buffers(0, 2, 4, 4)
    assert pk.data_ptr() == k.data_ptr() and pk.shape[0] == 2 and pk.is_contiguous()
    p.update(0, torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4), 1)
    p.advance(None, 1)
    assert c.lengths.tolist() == [1, 1, 0] and k[:2, :, 0].eq(1).all() and k[2].eq(0).all()
    pk1, _ = p.buffers(1, 2, 4, 4)  # a layer first used through the view is allocated in the base
    assert c.buffers(1, 2, 4, 4)[0].data_ptr() == pk1.data_ptr()
    p.reset([0])
    assert c.lengths.tolist() == [0, 1, 0] and p.rows_prefix(1).batch_size == 1
    with pytest.raises(ValueError, match="rows_prefix"):
        c.rows_prefix(0)


def test_chunked_prefill_keeps_the_decoding_rows_going(model, tok):
    """A long prompt joins a decoding row: it feeds 4 tokens a step and emits nothing until its last
    chunk, while the other row gets a token at every step; the prompt's first token comes at step
    cdiv(len, 4), equal to its unchunked tokens."""
    long_prompt = tok.encode(PROMPTS[1])
    sp = SamplingParams(max_new_tokens=30, ignore_eos=True)
    e = Engine(model, tok, max_batch_size=2, max_len=128, prefill_chunk=4)
    first = e.add_request(PROMPTS[0], sp)
    e.step()
    late = e.add_request(long_prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))
    n_chunks = -(-len(long_prompt) // 4)
    assert n_chunks >= 5
    seen = {first: [], late: []}
    for step in range(n_chunks):
        outs = {o.request_id: o for o in e.step()}
        assert first in outs  # the decoding row advances every step
        assert (late in outs) == (step == n_chunks - 1)
        for rid, o in outs.items():
            seen[rid] += o.new_token_ids
    while e.has_unfinished():
        for o in e.step():
            seen[o.request_id] += o.new_token_ids
    assert seen[first] == list(alone(model, tok, PROMPTS[0], sp).values())[0][0]
    assert seen[late] == list(alone(model, tok, long_prompt, SamplingParams(max_new_tokens=3, ignore_eos=True)
                                    ).values())[0][0]


def test_a_prompt_fed_in_chunks_gives_the_whole_prompts_logits(model):
    """The model on a cache row: a prompt in three chunks gives every position's logits of one
    forward of the whole prompt (float32, up to summation order)."""
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 7, 1, 60, 2, 11]])
    with torch.no_grad():
        whole = model(ids, cache=model.new_cache(1, 32))
        cache = model.new_cache(1, 32)
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 4), (4, 5), (5, 11))]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,extra", [("deepseek_v2", {}), ("deepseek_v3", {}), ("olmoe", {"clip_qkv": 8.0}),
                                          ("qwen2_moe", {"sliding_window": 3}),
                                          ("qwen3_moe", {"sliding_window": 4,
                                                         "layer_types": ["sliding_attention", "full_attention"]})])
def test_every_family_gives_the_whole_prompts_logits_chunk_by_chunk(family, extra):
    """MLA (DeepSeek), clipped q/k/v (OLMoE), shared experts and sliding windows: chunks of 1, 3 and 6 tokens on a
    cache row give one forward's logits at every position, and both rows of a batch of two (different lengths)."""
    cfg = MoEConfig.tiny(family, **extra)
    m = MoEForCausalLM(cfg)
    m.init_weights(seed=3)
    m.eval()
    ids = torch.randint(3, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False  # row 1: a 7-token prompt
    with torch.no_grad():
        whole = m(ids, cache=m.new_cache(2, 16), valid_BT=valid)
        for chunk in (1, 3, 6):
            cache, parts = m.new_cache(2, 16), []
            for a in range(0, 10, chunk):
                parts.append(m(ids[:, a:a + chunk], cache=cache, valid_BT=valid[:, a:a + chunk]))
            got = torch.cat(parts, dim=1)
            torch.testing.assert_close(got[0], whole[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1, :7], whole[1, :7], rtol=1e-5, atol=1e-5)
            assert cache.lengths.tolist() == [10, 7]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_prefill_chunk_must_be_a_positive_int(model, tok, bad):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, tok, max_batch_size=1, max_len=16, prefill_chunk=bad)


def test_stop_token_ids_and_eos(model, tok):
    ids, _, _ = list(alone(model, tok, PROMPTS[3], SamplingParams(max_new_tokens=10, ignore_eos=True)).values())[0]
    k = next(i for i in range(2, 10) if ids[i] not in ids[:i])  # first occurrence of some token
    stop_id = ids[k]
    got, text, reason = list(alone(model, tok, PROMPTS[3], SamplingParams(
        max_new_tokens=10, stop_token_ids=(stop_id,))).values())[0]
    assert got == ids[:k + 1] and reason == "stop"
    assert text == tok.decode(ids[:k])  # the stop token's text is not part of the output
    # the tokenizer's end-of-sequence ids stop a request by default, unless ignore_eos
    eos_tok = Tokenizer(tok.backend, eos_token_ids=[stop_id], bos_token_id=tok.bos_token_id)
    assert list(alone(model, eos_tok, PROMPTS[3], SamplingParams(max_new_tokens=10)).values())[0][0] == ids[:k + 1]
    got, _, reason = list(alone(model, eos_tok, PROMPTS[3], SamplingParams(max_new_tokens=10, ignore_eos=True)
                                ).values())[0]
    assert got == ids and reason == "length"


def test_stop_strings_are_trimmed_and_never_streamed(model, tok):
    prompt = PROMPTS[4]
    full = list(alone(model, tok, prompt, SamplingParams(max_new_tokens=16, ignore_eos=True)).values())[0][1]
    assert len(full) > 12
    stop = full[6:9]
    cut = full.index(stop)
    deltas = [o.new_text for o in stream_outputs(model, tok, prompt, SamplingParams(
        max_new_tokens=16, ignore_eos=True, stop=("\x00never", stop)))]
    assert "".join(deltas) == full[:cut]
    streamed = ""
    for d in deltas:
        streamed += d
        assert stop[0] not in streamed[cut:]  # no part of the stop string was ever shown
    outs = list(stream_outputs(model, tok, prompt, SamplingParams(max_new_tokens=16, ignore_eos=True, stop=stop)))
    assert outs[-1].finished and outs[-1].finish_reason == "stop"
    # a tail that might become a stop string is held back, and shown once it cannot
    plain = [o.new_text for o in stream_outputs(model, tok, prompt, SamplingParams(max_new_tokens=16,
                                                                                   ignore_eos=True))]
    cum = ["".join(plain[:i + 1]) for i in range(len(plain))]
    k = next(i for i in range(len(cum) - 1) if cum[i] and cum[i + 1] != cum[i])
    held = [o.new_text for o in stream_outputs(model, tok, prompt, SamplingParams(
        max_new_tokens=16, ignore_eos=True, stop=cum[k][-1] + "\x02"))]
    assert "".join(held[:k + 1]) == cum[k][:-1]
    assert "".join(held) == full


def test_held_back_tail():
    assert _held_back("abc", ["cde"]) == 1
    assert _held_back("abcd", ["cdx", "bcdy"]) == 3
    assert _held_back("abc", ["abc"]) == 0  # a whole stop string is a match, not a prefix
    assert _held_back("", ["x"]) == 0


def test_max_len_bounds_the_sequence(model, tok):
    ids = tok.encode(PROMPTS[0])
    got, _, reason = list(alone(model, tok, ids, SamplingParams(max_new_tokens=50, ignore_eos=True),
                                max_len=len(ids) + 3).values())[0]
    assert len(got) == 3 and reason == "length"
    e = Engine(model, tok, max_batch_size=2, max_len=len(ids))
    with pytest.raises(ValueError, match=f"prompt has {len(ids)} tokens but max_len is {len(ids)}"):
        e.add_request(ids)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        Engine(model, tok, max_len=16).add_request([1, 10 ** 6])
    with pytest.raises(ValueError, match="prompt is empty"):
        Engine(model, tok, max_len=16).add_request([])
    with pytest.raises(ValueError, match="max_batch_size=0"):
        Engine(model, tok, max_batch_size=0)


def test_abort_running_and_waiting(model, tok):
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    e = Engine(model, tok, max_batch_size=2, max_len=64)
    a, b, c = (e.add_request(p, sp) for p in PROMPTS[:3])
    e.step()  # a and b run, c waits
    assert e.abort(b) and e.abort(c)
    assert not e.abort(c) and not e.abort("nope")
    outs = e.step()
    finals = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert finals == {b: "abort", c: "abort"}
    assert {o.request_id for o in outs} == {a, b, c}
    rest = run(e, [a])
    assert rest[a][2] == "length"
    with pytest.raises(ValueError, match="already in use"):
        e2 = Engine(model, tok, max_len=16)
        e2.add_request("x", request_id="r")
        e2.add_request("y", request_id="r")


class _GreedyNext(torch.nn.Module):
    """The model behind the optional ``greedy_next`` of the engine's contract (expert-parallel serving
    offers it): each row's argmax token, counted; ``forward`` counted too."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.calls = {"greedy_next": 0, "forward": 0}

    def new_cache(self, *a):
        return self.inner.new_cache(*a)

    def forward(self, input_BT, cache=None, valid_BT=None, last_only=False):
        self.calls["forward"] += 1
        return self.inner(input_BT, cache=cache, valid_BT=valid_BT, last_only=last_only)

    def greedy_next(self, input_BT, cache, valid_BT):
        self.calls["greedy_next"] += 1
        return self.inner(input_BT, cache=cache, valid_BT=valid_BT, last_only=True)[:, 0].float().argmax(-1)


def test_a_models_greedy_next_serves_all_greedy_steps_and_the_logits_the_others(model, tok):
    """Every running request greedy: the engine takes the model's greedy_next (token ids, no logits),
    with the same tokens as the sampler; a sampled request in the batch: logits again."""
    wrapped = _GreedyNext(model)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (9, 4, 6)]
    e = Engine(wrapped, tok, max_batch_size=2, max_len=128, cuda_graph=False)
    rids = [e.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
    got = run(e, rids)
    assert wrapped.calls == {"greedy_next": 10, "forward": 0}  # 10 steps: the third request joins at step 5
    for rid, p, sp in zip(rids, PROMPTS, params):
        assert got[rid] == list(alone(model, tok, p, sp).values())[0]
    wrapped.calls.update(greedy_next=0, forward=0)
    sampled = SamplingParams(max_new_tokens=3, temperature=1.0, seed=3, ignore_eos=True)
    e = Engine(wrapped, tok, max_batch_size=2, max_len=128, cuda_graph=False)
    rids = [e.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True)),
            e.add_request(PROMPTS[1], sampled)]
    got = run(e, rids)
    assert wrapped.calls == {"greedy_next": 2, "forward": 3}  # steps 4-5: the sampled request has finished
    assert got[rids[1]] == list(alone(model, tok, PROMPTS[1], sampled).values())[0]
    assert got[rids[0]] == list(alone(model, tok, PROMPTS[0], SamplingParams(max_new_tokens=5,
                                                                              ignore_eos=True)).values())[0]


def test_seeded_sampling_does_not_depend_on_the_batch(model, tok):
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    solo = list(alone(model, tok, PROMPTS[0], sp).values())[0]
    e = Engine(model, tok, max_batch_size=3, max_len=64)
    rids = [e.add_request(PROMPTS[2], SamplingParams(max_new_tokens=5, temperature=1.3, seed=1)),
            e.add_request(PROMPTS[0], sp),
            e.add_request(PROMPTS[4], SamplingParams(max_new_tokens=10, temperature=0.7))]
    assert run(e, rids)[rids[1]] == solo
    other = list(alone(model, tok, PROMPTS[0], SamplingParams(
        max_new_tokens=10, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)).values())[0]
    assert other[0] != solo[0]


def test_generate_and_stream_agree(model, tok):
    sp = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 9, 3)]
    texts = generate(model, tok, PROMPTS[:3], sp, max_batch_size=2)
    assert texts == ["".join(stream(model, tok, p, s)) for p, s in zip(PROMPTS[:3], sp)]
    assert generate(model, tok, PROMPTS[0], sp[0]) == texts[:1]
    with pytest.raises(ValueError, match="3 prompts but 2 SamplingParams"):
        generate(model, tok, PROMPTS[:3], sp[:2])


def test_explicit_num_slots_gives_the_same_logits(model):
    """Attention over extra (masked) slots changes nothing: what a captured decode step relies on."""
    ids = torch.tensor([[5, 9, 13, 2, 7], [3, 4, 0, 0, 0]])
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        for explicit in (None, 32):
            cache = model.new_cache(2, 40)
            outs = [model(ids, cache=cache, valid_BT=valid, num_slots=explicit)]
            for step in range(4):
                nxt = torch.tensor([[11 + step], [17 + step]])
                outs.append(model(nxt, cache=cache, valid_BT=torch.ones(2, 1, dtype=torch.bool), num_slots=explicit))
            if explicit is None:
                want = outs
        for a, b in zip(outs, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # summation order over more slots
        with pytest.raises(ValueError, match="num_slots"):
            model(nxt, cache=model.new_cache(2, 40), num_slots=41)


def test_cuda_graph_refused_with_the_reason(model, tok):
    from moe.cuda_graph import DecodeGraphs, graph_support
    assert "not a CUDA device" in graph_support(model)
    with pytest.raises(ValueError, match="cannot be captured: the model is on cpu"):
        Engine(model, tok, max_batch_size=2, max_len=64, cuda_graph=True)
    with pytest.raises(ValueError, match="cannot capture"):
        DecodeGraphs(model, model.new_cache(2, 64))
    assert Engine(model, tok, max_batch_size=2, max_len=64)._graphs is None  # auto: eager on the CPU


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(tok):
    """On a GPU with the triton experts: greedy tokens replayed from graphs equal eager decoding,
    across slot buckets and with rows joining and leaving; prompts joining decoding rows packed (the engine's way)
    or padded, whole or fed 4 tokens a step, give the same tokens."""
    cfg = MoEConfig.tiny("qwen3_moe", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_ids[0])
    m = MoEForCausalLM(cfg, backend="triton", dtype=torch.float32, device="cuda")
    m.init_weights(seed=0)
    with torch.no_grad():
        m.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator(device="cuda").manual_seed(1))
    m.eval()
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (40, 7, 25)]
    outs = {}
    for graph, packed, chunk in ((False, True, None), (True, True, None), (True, False, None), (True, True, 4),
                                 (True, False, 4)):
        eng = Engine(m, tok, max_batch_size=2, max_len=96, cuda_graph=graph, prefill_chunk=chunk)
        assert eng._packed
        eng._packed, eng.pack_tokens_per_part = packed, 0  # (short prompts: packed only when told, _pays_to_pack)
        if graph:
            eng._graphs.bucket = 16  # several buckets within one run
        rids = [eng.add_request(p, sp) for p, sp in zip(PROMPTS[:3], params)]
        res = run(eng, rids)
        outs[graph, packed, chunk] = [res[r][0] for r in rids]
        if graph:
            assert len(eng._graphs.captured) >= 2
    assert all(o == outs[False, True, None] for o in outs.values())


def test_warm_up_names_the_prompt_length_that_failed(model, tok, monkeypatch):
    """A warm-up prefill that fails (e.g. out of memory at the longest prompt allowed) is a load error that names the
    length and the settings that bound it, not a bare exception."""
    e = Engine(model, tok, max_batch_size=2, max_len=64)
    forward = type(model).forward

    def failing(self, input_BT, *a, **kw):
        if input_BT.shape[1] > 20:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, input_BT, *a, **kw)

    monkeypatch.setattr(type(model), "forward", failing)
    with pytest.raises(RuntimeError, match=r"a prompt of 32 tokens failed \(OutOfMemoryError.*max_prompt_tokens: 40"):
        e.warm_up(max_prompt=40)

    def batch_failing(self, input_BT, *a, valid_BT=None, **kw):  # only when every row prefills 20 tokens at once
        if valid_BT is not None and int(valid_BT.sum()) >= 2 * 20:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, input_BT, *a, valid_BT=valid_BT, **kw)

    monkeypatch.setattr(type(model), "forward", batch_failing)
    e = Engine(model, tok, max_batch_size=2, max_len=64)
    with pytest.raises(RuntimeError, match=r"a batch of 2 prompts of 20 tokens failed.*max_batch_size \(2"):
        e.warm_up(max_prompt=20)


def test_warm_up_with_a_prefill_chunk_runs_one_prompt_past_it_and_the_burst(model, tok, monkeypatch):
    """With prefill_chunk, warm-up prompts longer than the chunk only repeat its steps: one of two chunks and a token
    stands for them; the burst still feeds the longest prompt allowed (the peak grows with the cached length), and
    no step runs more than the chunk."""
    spy = _Packed(model)
    e = Engine(spy, tok, max_batch_size=2, max_len=64, cuda_graph=False, prefill_chunk=4)
    seen = []
    add = Engine.add_request

    def record(self, prompt, params=None, request_id=None):
        seen.append(len(prompt))
        return add(self, prompt, params, request_id)

    monkeypatch.setattr(Engine, "add_request", record)
    e.warm_up(max_prompt=40)
    # then traffic: requests of 2 and 40 tokens arriving one a step, the second's chunks packed beside the first
    # decoding (the one-token parts that eager steps meet nowhere else); then of 2 and 3 tokens, packed
    assert seen == [1, 2, 3, 4, 9, 40, 40, 2, 40, 2, 3] and max(spy.T) == 4
    assert [(1, 1), (1, 4)] in spy.segments


@pytest.mark.gpu
def test_warm_up_captures_every_bucket_and_changes_no_output(tok):
    """On a GPU: Engine.warm_up captures every decode slot bucket up to max_len (capture_all), and the requests
    after it decode the tokens of an engine that never warmed up (graphs replayed from the warm-up's captures)."""
    cfg = MoEConfig.tiny("qwen3_moe", vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_ids[0])
    m = MoEForCausalLM(cfg, backend="triton", dtype=torch.float32, device="cuda")
    m.init_weights(seed=0)
    m.eval()
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (40, 7, 25)]
    outs = []
    for warm in (False, True):
        eng = Engine(m, tok, max_batch_size=2, max_len=96, cuda_graph=True)
        eng._graphs.bucket = 16  # six buckets: 16, 32, ..., 96
        if warm:
            eng.warm_up()
            assert eng.captured_graphs == eng._graphs.buckets() == [16, 32, 48, 64, 80, 96]
            assert eng._graphs.capture_all() == 0  # nothing left
        rids = [eng.add_request(p, sp) for p, sp in zip(PROMPTS[:3], params)]
        res = run(eng, rids)
        outs.append([res[r][0] for r in rids])
    assert outs[0] == outs[1]


def test_decode_benchmark_script_runs_on_cpu(tmp_path, capsys):
    """benchmarks/decode.py (eager steps, the transformers peer) on the tiny shape: the script's own check."""
    import json
    mod = load_benchmark("decode")
    assert mod.main(["--models", "tiny", "--device", "cpu", "--batch", "1,2", "--steps", "3", "--out", str(tmp_path),
                     "--peers", "transformers", "--decode-attention", "triton,sdpa", "--prompt-len", "8,12"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "decode_results.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["B"], r["attention"]) for r in rows] == [
        (p, b, a) for p in (8, 12) for b in (1, 2) for a in ("triton", "sdpa")]
    assert all(r["eager_ms"] > 0 and r["transformers_ms"] > 0 for r in rows)
    assert "resident decode" in capsys.readouterr().out


def test_decode_benchmark_routes_by_a_synthetic_trace_row_by_row(tmp_path, capsys):
    """decode.py --trace-routing: row b's token at position p takes trace request b's token p, in
    prefill and in decode steps; and the offloaded rows run with it (eager on the CPU)."""
    import json
    mod = load_benchmark("decode")
    m = mod.build("tiny", "cpu")
    handles, _ = mod.install_synthetic_routing(m, "tiny", rows=2, tokens=20, locality=0.5, affinity=0.6, seed=3)
    seen = []
    hook = m.moe_blocks()[1].router.register_forward_hook(lambda mod_, i, out: seen.append(out[0].clone()))
    cache = m.new_cache(2, 20)
    with torch.no_grad():
        m(torch.randint(3, 100, (2, 5)), cache=cache)
        m(torch.randint(3, 100, (2, 1)), cache=cache)
    hook.remove()
    for h in handles:
        h.remove()
    from routing import synthesize
    cfg = m.config
    tr = synthesize(num_layers=len(m.moe_blocks()), num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                    num_requests=2, tokens_per_request=20, popularity_skew=1.0, temporal_locality=0.5, affinity=0.6,
                    seed=3)
    req, pos = tr.request_ids_or_default(), tr.positions
    want = [[tr.expert_ids[1][(req == b) & (pos == p)][0] for b in range(2) for p in range(5)],
            [tr.expert_ids[1][(req == b) & (pos == 5)][0] for b in range(2)]]
    for got, w in zip(seen, want):
        assert torch.equal(got, torch.as_tensor(np.stack(w)).long())
    assert mod.main(["--models", "tiny", "--device", "cpu", "--batch", "2", "--steps", "4", "--out", str(tmp_path),
                     "--prompt-len", "8", "--trace-routing", "--offload-slots", "4", "--offload-policy", "lfu",
                     "--profile-steps", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "decode_results.jsonl").read_text().splitlines()]
    off = [r for r in rows if "policy" in r]
    assert [(r["policy"], r["routing"]) for r in off] == [("lfu-hl23", "trace")] and 0 < off[0]["eager_hit"] < 1
    # the bytes the timed decode steps copied; their copy floor needs a GPU's measured rate (NaN on the CPU)
    assert 0 < off[0]["eager_mb_per_step"] and off[0]["eager_copy_floor_ms"] != off[0]["eager_copy_floor_ms"]  # NaN: no GPU
    # --profile-steps: the host-side parts of an offloaded layer, labelled, in the profile's table
    prof = (tmp_path / "profile_tiny_S4_B2_lfu.txt").read_text()
    assert "moeflow.OffloadedExperts.forward" in prof and "moeflow.ExpertCache.ensure" in prof
    # --offload-policy lru,lfu: one cache, the deciding policy switched between rounds, a row each
    both = tmp_path / "both"
    assert mod.main(["--models", "tiny", "--device", "cpu", "--batch", "2", "--steps", "4", "--out", str(both),
                     "--prompt-len", "8", "--trace-routing", "--offload-slots", "4", "--offload-policy", "lru,lfu",
                     "--rounds", "2"]) == 0
    brows = [json.loads(line) for line in (both / "decode_results.jsonl").read_text().splitlines() if '"policy"' in line]
    assert [r["policy"] for r in brows] == ["lru", "lfu-hl23"] and all(r["eager_rounds"] == 1 for r in brows)
    with pytest.raises(SystemExit):
        mod.main(["--models", "tiny", "--device", "cpu", "--offload-slots", "4", "--offload-policy", "lru,belady"])
    # --offload-driver host,device: the GPU-decided cache (offload/device_cache.py) beside the host's, same routing
    dd = tmp_path / "dd"
    assert mod.main(["--models", "tiny", "--device", "cpu", "--batch", "2", "--steps", "4", "--out", str(dd),
                     "--prompt-len", "8", "--trace-routing", "--offload-slots", "4", "--offload-policy", "lru,lfu",
                     "--offload-driver", "host,device"]) == 0
    drows = [json.loads(line) for line in (dd / "decode_results.jsonl").read_text().splitlines() if '"policy"' in line]
    dev_rows = {r["policy"]: r for r in drows if r.get("driver") == "device"}
    host_rows = {r["policy"]: r for r in drows if "driver" not in r}
    assert sorted(dev_rows) == sorted(host_rows) == ["lfu-hl23", "lru"]
    for r in drows:  # issue 5's oracle bound beside every row (off a GPU at a nominal 25 GB/s)
        assert r["oracle_rate_gbs"] == 25.0 and 0 < r["oracle_ms"] and r["oracle_hit"] >= max(
            r.get("eager_hit", 0), r.get("device_eager_hit", 0)) - 0.05
    for p in dev_rows:  # the same policy decided on the device and on the host: the same hits, the same bytes
        assert 0 < dev_rows[p]["device_eager_hit"] < 1
        assert dev_rows[p]["device_eager_hit"] == pytest.approx(host_rows[p]["eager_hit"])
        assert dev_rows[p]["device_eager_mb_per_step"] == pytest.approx(host_rows[p]["eager_mb_per_step"])
    with pytest.raises(SystemExit):
        mod.main(["--models", "tiny", "--device", "cpu", "--offload-slots", "4", "--offload-driver", "gpu"])
    # --pack-experts: the same routing, the bytes of packed experts (bfloat16 on the CPU too)
    packed = tmp_path / "packed"
    assert mod.main(["--models", "tiny", "--device", "cpu", "--batch", "2", "--steps", "4", "--out", str(packed),
                     "--prompt-len", "8", "--trace-routing", "--offload-slots", "4", "--offload-policy", "lfu",
                     "--pack-experts"]) == 0
    prow = [json.loads(line) for line in (packed / "decode_results.jsonl").read_text().splitlines() if '"policy"' in line]
    assert prow[0]["model"].endswith(" packed") and prow[0]["eager_hit"] == off[0]["eager_hit"]
    bf16_mb = off[0]["eager_mb_per_step"] / 2  # the same copies of float32 experts, at 2 bytes a weight
    assert 0.74 * bf16_mb < prow[0]["eager_mb_per_step"] < 0.8 * bf16_mb  # 1.5 bytes a weight, aligned parts


def test_decode_benchmarks_policy_switch_decides_as_each_policy_alone():
    """decode.py's SwitchPolicy: every policy sees every routing and use, so the one deciding picks the victim
    that policy would pick had it run alone over the same calls."""
    from offload.policies import make_policy
    mod = load_benchmark("decode")
    sw = mod.SwitchPolicy({"lru": make_policy("lru"), "lfu": make_policy("lfu")})
    alone = {"lru": make_policy("lru"), "lfu": make_policy("lfu")}
    for pol in [sw, *alone.values()]:
        pol.bind(2, 6)
    rng = np.random.default_rng(0)
    clock = differ = 0
    for step in range(40):
        ids = rng.choice(6, size=(1, 2), replace=False, p=[0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
        for pol in [sw, *alone.values()]:
            pol.observe(0, step, ids)
        for e in ids[0]:
            clock += 1
            for pol in [sw, *alone.values()]:
                pol.touch(0, int(e), clock)
        cands = [e for e in range(6) if e not in ids[0]]
        for name in ("lru", "lfu"):
            sw.active = name
            assert sw.victim(0, cands, step) == alone[name].victim(0, cands, step)
        differ += alone["lru"].victim(0, cands, step) != alone["lfu"].victim(0, cands, step)
    assert differ > 5  # the two policies do disagree here, so the switch is what picked


def test_decode_benchmark_routes_by_a_recorded_trace_and_prefetches_its_guesses(tmp_path):
    """decode.py --trace / --lookahead: rows decode the file's requests (cut to the common length), and
    the offloaded rows add next-layer prefetch of the file's guesses and of the trace's own next layer
    (oracle). Both guess files here name the true next layer, so every prefetched expert is used."""
    import json

    from routing import synthesize
    mod = load_benchmark("decode")
    m = mod.build("tiny", "cpu")
    cfg = m.config
    L = len(m.moe_blocks())
    tr = synthesize(num_layers=L + 1, num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok, num_requests=3,
                    tokens_per_request=40, seed=5)
    tr.save(tmp_path / "t.npz")
    ids = tr.expert_ids
    np.savez(tmp_path / "t.lookahead.npz", next_ids=np.concatenate([ids[1:], np.full_like(ids[:1], -1)]))
    args = ["--models", "tiny", "--device", "cpu", "--batch", "2", "--steps", "4", "--out", str(tmp_path),
            "--prompt-len", "8", "--offload-slots", "3", "--trace", str(tmp_path / "t.npz")]
    assert mod.main(args + ["--lookahead", str(tmp_path / "t.lookahead.npz"), "--rounds", "2",
                            "--lookahead-pays", "attention"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "decode_results.jsonl").read_text().splitlines()]
    off = [r for r in rows if "policy" in r][-1]
    # lookahead+C: the same guesses prefetched while each layer also computes point C (its answer dropped)
    assert off["graph_lookahead+C_prefetch_precision"] == 1.0
    assert off["graph_lookahead+C_hit"] == off["graph_lookahead_hit"]
    assert off["graph_lookahead+C_same_steps"] == off["graph_lookahead_same_steps"]
    assert off["routing"] == "rec"
    # --rounds 2: the prefetch rows ran twice, interleaved (the eager reference once), each keeping its fastest,
    # beside the host's Python speed and the collector's pauses
    assert off["eager_rounds"] == 1 and off["graph_oracle_rounds"] == off["graph_lookahead_rounds"] == 2
    assert off["graph_oracle_host_ns"] > 0 and off["graph_oracle_gc_ms"] >= 0
    assert len(off["graph_oracle_all"]) == 2  # every round: ms, host ns, copy rate (NaN without a GPU), MB, median / max step
    assert all(len(a) == 6 and a[4] <= a[5] for a in off["graph_oracle_all"])
    for name in ("lookahead", "oracle"):
        assert off[f"graph_{name}_prefetch_precision"] == 1.0 and off[f"graph_{name}_prefetch_recall"] > 0
        assert off[f"graph_{name}_hit"] >= off["eager_hit"]
    # --offload-driver device: the same guesses prefetched by the device-driven cache (inline on the CPU)
    dd = tmp_path / "dd"
    assert mod.main([str(dd) if a == str(tmp_path) else a for a in args]
                    + ["--lookahead", str(tmp_path / "t.lookahead.npz"), "--offload-driver", "device",
                       "--lookahead-pays", "attention"]) == 0
    drow = [json.loads(line) for line in (dd / "decode_results.jsonl").read_text().splitlines() if '"driver"' in line][-1]
    for name in ("lookahead", "oracle", "lookahead+C"):
        assert drow[f"device_graph_{name}_prefetch_precision"] == 1.0 and drow[f"device_graph_{name}_prefetch_recall"] > 0
        assert drow[f"device_graph_{name}_hit"] >= drow["device_eager_hit"]
    with pytest.raises(SystemExit, match="prompt \\+ steps"):
        mod.main(args[:-4] + ["--offload-slots", "3", "--steps", "40", "--trace", str(tmp_path / "t.npz")])
    np.savez(tmp_path / "bad.npz", next_ids=ids[:, :7])
    with pytest.raises(SystemExit, match="same recording"):
        mod.main(args + ["--lookahead", str(tmp_path / "bad.npz")])
    for extra in (["--trace-routing"], ["--lookahead-k", "2"], ["--lookahead-pays", "attention"]):  # refused
        with pytest.raises(SystemExit):
            mod.main(args + extra)
    with pytest.raises(SystemExit):
        mod.main(args[:-2] + ["--lookahead", str(tmp_path / "t.lookahead.npz")])


def test_failed_graph_capture_falls_back_to_eager_decoding(model, tok):
    """A capture that fails (some op syncing with the host) warns once and the engine decodes eagerly
    from that step on, with the same tokens as an engine that never tried graphs."""
    from moe.cuda_graph import GraphCaptureError

    class Failing:
        calls = 0

        def step(self, *a):
            Failing.calls += 1
            raise GraphCaptureError("capturing a decode step (256 slots) failed: RuntimeError: test")

    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (6, 4)]
    eager = Engine(model, tok, max_batch_size=2, max_len=128)
    rids = [eager.add_request(p, sp) for p, sp in zip(PROMPTS[:2], params)]
    want = run(eager, rids)
    eng = Engine(model, tok, max_batch_size=2, max_len=128)
    eng._graphs = Failing()
    rids2 = [eng.add_request(p, sp) for p, sp in zip(PROMPTS[:2], params)]
    with pytest.warns(RuntimeWarning, match="without CUDA graphs"):
        got = run(eng, rids2)
    assert Failing.calls == 1 and eng._graphs is None
    assert [got[r][0] for r in rids2] == [want[r][0] for r in rids]


def test_decode_benchmarks_oracle_bound_of_the_timed_steps():
    """decode.py's oracle_step_ms: Belady over exactly the routing run()'s timed steps take (rows step by step,
    the prompt and two steps as warm-up), every copy hidden behind the resident step, copies only."""
    import numpy as np

    from placement.trace_routing import TraceRoutingSpec
    from routing import synthesize
    mod = load_benchmark("decode")
    tr = synthesize(num_layers=3, num_experts=8, top_k=2, num_requests=2, tokens_per_request=60,
                    temporal_locality=0.3, seed=2)
    order = np.lexsort((tr.positions, tr.request_ids_or_default()))
    spec = TraceRoutingSpec.from_trace(tr.select_tokens(order), stride=60)
    ms, hit = mod.oracle_step_ms(spec, 1, 8, 20, 8, 1e6, 1e9, compute_ms=3.0)
    assert hit > 0.9 and ms == pytest.approx(3.0)  # every expert fits (a few first uses): the resident step
    ms2, hit2 = mod.oracle_step_ms(spec, 1, 8, 20, 2, 1e6, 1e9, compute_ms=0.0)
    assert 0 < hit2 < 1
    misses_per_step = (1 - hit2) * 3 * 2  # distinct experts a step: 2 a layer at top-2, 3 layers
    assert ms2 == pytest.approx(misses_per_step * (1e6 / 1e9 + 10e-6) * 1e3, rel=0.05)  # copy time (+ latency)
    ms3, _ = mod.oracle_step_ms(spec, 2, 8, 20, 2, 1e6, 1e9, compute_ms=0.0)  # two rows: more experts a step
    assert ms3 > ms2


def test_decode_benchmarks_floors_stand_on_the_fastest_probe(capsys):
    """decode.py's rerate_to_fastest_probe: a row whose start probe read slower than a round's probe gets its copy
    floors and oracle bound at the round's rate (the start's kept); a row whose rounds read no faster is left."""
    mod = load_benchmark("decode")
    slow = {"model": "Q offloaded 32/128", "policy": "lfu", "B": 1, "slots": 32, "floor_ms": 1.0, "h2d_gbs": 25.0,
            "graph_all": [[40.0, 100.0, 50.0, 1000.0, 0.0, 0.0], [41.0, 100.0, 49.0, 1000.0, 0.0, 0.0]],
            "graph_mb_per_step": 1000.0, "graph_copy_floor_ms": 41.0, "oracle_ms": 30.0, "oracle_hit": 0.7,
            "oracle_rate_gbs": 25.0}
    fine = dict(slow, h2d_gbs=50.0, graph_copy_floor_ms=21.0, oracle_rate_gbs=50.0, oracle_ms=15.0)
    calls = []

    def oracle_at(S, B, rate_gbs):
        calls.append((S, B, rate_gbs))
        return dict(oracle_ms=15.0, oracle_hit=0.7, oracle_rate_gbs=rate_gbs)
    rows = [dict(slow), dict(fine)]
    mod.rerate_to_fastest_probe(rows, oracle_at)
    assert calls == [(32, 1, 50.0)]
    assert rows[0]["h2d_gbs"] == 50.0 and rows[0]["h2d_start_gbs"] == 25.0
    assert rows[0]["graph_copy_floor_ms"] == pytest.approx(1.0 + 1000e6 / 50e9 * 1e3)  # 21 ms, not 41
    assert rows[0]["oracle_ms"] == 15.0 and rows[0]["oracle_rate_gbs"] == 50.0
    assert rows[1] == fine
    assert "at 50.0 GB/s" in capsys.readouterr().out
    nan = dict(slow, h2d_gbs=float("nan"))  # off a GPU: nothing measured, nothing changed
    mod.rerate_to_fastest_probe([nan], oracle_at)
    assert nan["graph_copy_floor_ms"] == 41.0 and len(calls) == 1


def _expert_variants(token_counts, shape, device_name="NVIDIA H200") -> set:
    """The launch constants the experts' kernels take on a GPU for each token count of a step: the config
    kernels.launch_config picks (tuned table or default) and the token alignment's launches, read from the kernels' own
    dispatch (align_tokens) with recording launchers, so no GPU is needed. shape: (experts, top-k, ffn, hidden)."""
    import kernels.align as A
    from kernels.launch_config import _pick_config
    E, K, ffn, hidden = shape
    out, seen = set(), []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: seen.append((self.name, tuple(sorted(kw.items()))))

    saved = A._align, A._count, A._scatter
    A._align, A._count, A._scatter = Recorder("align"), Recorder("count"), Recorder("scatter")
    try:
        for n in sorted(set(token_counts)):
            cfg = _pick_config(n, K, E, ffn, hidden, device_name, False)
            seen.clear()
            A.align_tokens(torch.zeros(n, K, dtype=torch.int32), E, cfg.block_m)
            out.add((repr(cfg), tuple(seen)))
    finally:
        A._align, A._count, A._scatter = saved
    return out


# the published shapes (experts, top-k, ffn, hidden) and the default model's
SHAPES = {"default": (8, 2, 128, 256), "mixtral": (8, 2, 14336, 4096), "qwen3": (128, 8, 768, 2048),
          "olmoe": (64, 8, 1024, 2048), "dsv2lite": (64, 6, 1408, 2048), "qwen2moe": (60, 4, 1408, 2048)}


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_warm_up_token_counts_meet_every_expert_kernel_variant(name):
    """moe.generate.warm_up_token_counts (the step sizes Engine.warm_up runs): every launch variant of the experts'
    kernels that a step of 1..3072 tokens takes on an H200 is taken by one of them (DeepSeek-V2-Lite's top-6
    included). Before session 32 the parallel alignment's chunk changed at (2^j + 1)^2 pairs, which no step size
    of the warm-up met (Qwen3-30B-A3B at 137-144 and 529-672 tokens)."""
    from moe.generate import warm_up_token_counts
    E, K, _, _ = shape = SHAPES[name]
    for hi in (65, 130, 520, 1536, 3072):  # a warm-up reaches some count: the variants up to it, by steps up to it
        everything = _expert_variants(range(1, hi + 1), shape)
        assert everything == _expert_variants(warm_up_token_counts(1, hi, K), shape), hi
    assert len(everything) >= 8


def test_warm_up_meets_every_expert_kernel_variant_of_staggered_traffic(model, tok):
    """A replica's first requests arriving a few at a time (some steps one prompt beside decoding rows, some several
    prompts at once) must not compile a kernel inside their latency: every launch variant of the experts' kernels
    their steps take on a GPU (the token alignment's constants and the GEMM config, which follow a step's token
    count) was taken by a step of Engine.warm_up. A fresh replica's first such requests compiled two alignment
    variants when the warm-up's steps stopped at the longest prompt (s32-g, BENCHMARKS 8e). Checked for the
    default model's shape, Qwen3-30B-A3B's (its tuned H200 table) and Mixtral-8x7B's; and the check finds what a
    warm-up to 9-token prompts misses."""
    from moe.layers import Experts
    counts = []
    forward = Experts.forward

    def spy(self, x_TD, ids, w):
        counts.append(x_TD.shape[0])
        return forward(self, x_TD, ids, w)

    def traffic(max_prompt, seed):
        e = Engine(model, tok, max_batch_size=8, max_len=136, cuda_graph=False)
        e.pack_tokens_per_part = 2048  # a GPU's choice of when to pack
        counts.clear()
        e.warm_up(max_prompt=max_prompt)
        warm = list(counts)
        counts.clear()
        rng = np.random.default_rng(seed)
        pending = [rng.integers(3, 400, n).tolist() for n in [64] * 16 + rng.integers(1, 66, 8).tolist()]
        while pending or e.has_unfinished():
            for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):
                if pending:
                    e.add_request(pending.pop(), SamplingParams(max_new_tokens=int(rng.integers(2, 40)), ignore_eos=True))
            e.step()
        return warm, list(counts)

    Experts.forward = spy
    try:
        runs = [traffic(65, seed) for seed in (0, 1)]
        short = traffic(9, 0)
    finally:
        Experts.forward = forward
    shapes = [SHAPES[k] for k in ("default", "qwen3", "mixtral", "olmoe")]
    for warm, seen in runs:
        assert max(seen) > 65  # steps of several prompts, past the longest one
        for shape in shapes:
            assert _expert_variants(seen, shape) <= _expert_variants(warm, shape), shape
    assert not _expert_variants(short[1], shapes[0]) <= _expert_variants(short[0], shapes[0])


def test_warm_up_leaves_the_engine_as_new(model, tok):
    """Engine.warm_up: one-row prompts of 1, 2^k and 2^k + 1 tokens up to the longest allowed (a prefill and a
    decode step each), then max_batch_size rows of the longest prompt at once; afterwards the engine is idle, the
    next request gets the id it would have had, the outputs are a fresh engine's, and an offloaded model's cache
    statistics count none of the warm-up's steps."""
    from offload import OffloadConfig, apply_offload
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    e = Engine(model, tok, max_batch_size=3, max_len=64)
    # prompts 1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33 and 62 (max_len - 2): 12 x 2 steps; prompts arriving together
    # for steps of 64, 65, 128 and 129 tokens (62 + 2, 62 + 3, 62 + 62 + 4, 62 + 62 + 5): 4 x 2; the batch: 2 steps;
    # then rows requests of 2, 62, 2 tokens arriving one a step, 4 tokens each: the last arrives at step 3 and
    # decodes to step 6 (one request of 2 tokens, 2 steps, with rows=1, and no steps of several prompts); then
    # prompts of 2 and 3 tokens one a step, 3 tokens each, the second's prefill packed beside the first's decode (the
    # wide table's run under every_variant): 4 steps
    spy = _Packed(model)
    e = Engine(spy, tok, max_batch_size=3, max_len=64)
    assert e.warm_up() == 12 * 2 + 4 * 2 + 2 + 6 + 4
    assert {64, 65, 128, 129} <= set(spy.valid)
    assert spy.segments[-3] == [(1, 1), (1, 3)]  # packed, though it saves two padded tokens (pack_tokens_per_part 256)
    assert e.pack_tokens_per_part == 256
    e = Engine(model, tok, max_batch_size=3, max_len=64)
    assert not e.has_unfinished() and e.warm_up(rows=1) == 12 * 2 + 2 + 2
    assert e.warm_up(rows=1, max_prompt=10) == 8 * 2 + 2 + 2  # 1, 2, 3, 4, 5, 8, 9 and 10
    assert e.captured_graphs == []  # on the CPU steps run eagerly
    rids = [e.add_request(p, params) for p in PROMPTS[:3]]
    assert rids[0] == "req-0"
    fresh = Engine(model, tok, max_batch_size=3, max_len=64)
    assert run(e, rids) == run(fresh, [fresh.add_request(p, params) for p in PROMPTS[:3]])
    off = apply_offload(copy.deepcopy(model), OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False))
    e = Engine(off, tok, max_batch_size=2, max_len=64)
    e.warm_up()
    st = off.offload_cache.stats()
    assert st["hits"] + st["misses"] == 0
    e.add_request(PROMPTS[0], params)
    with pytest.raises(RuntimeError, match="idle engine"):
        e.warm_up()
