"""benchmarks/lookahead_points.py: the hooks read the tensors the docstring names (BENCHMARKS 7f)."""
import numpy as np
import pytest
import torch

from moe.config import MoEConfig
from moe.model import MoEForCausalLM
from tests.conftest import load_benchmark


def _four_layers():
    torch.manual_seed(0)
    return MoEForCausalLM(MoEConfig.tiny("mixtral", num_hidden_layers=4, num_experts=8, num_experts_per_tok=2)).eval()


def test_points_on_a_model_whose_layers_pass_the_residual_through():
    """With attention and experts writing nothing, every layer's input is the embedding. Then the residual
    after layer l (B) is exactly what layer l+1's router sees, and so is layer l's router input rescaled to
    the next norm gain (A'): both must read the next routing perfectly, while A (the norm gains differ)
    need not. A hook on the wrong tensor, or a shift of one layer, breaks the 1.0s."""
    model = _four_layers()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.o_proj.weight.zero_()
            layer.mlp.experts.w2.zero_()
            layer.post_attention_layernorm.weight.uniform_(0.2, 3.0)  # gains that differ per layer
    seqs = [torch.randint(0, model.config.vocab_size, (24,)).tolist() for _ in range(3)]
    res = load_benchmark("lookahead_points").lookahead_points(model, seqs)
    assert set(res) == {"A", "A'", "B"} and all(len(v) == 3 for v in res.values())
    assert min(res["B"]) == 1.0 and min(res["A'"]) > 0.999
    assert min(res["A"]) < 1.0  # the unscaled gains do change the top-k somewhere


def test_point_c_reads_through_the_next_attention():
    """With the experts writing nothing but attention active, the residual entering layer l's experts is what
    enters layer l+1, so layer l+1's own attention on it, then its norm and router (C), is exactly layer l+1's
    routing; B (the residual after layer l, without layer l+1's attention) need not be. A wrong layer's
    attention, norm or router, or a cache slot the guess corrupts, breaks the 1.0s."""
    model = _four_layers()
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.experts.w2.zero_()
            layer.attn.o_proj.weight.mul_(8.0)  # attention moves the residual a lot
    seqs = [torch.randint(0, model.config.vocab_size, (12,)).tolist() for _ in range(3)] + [[5, 6, 7]]
    mod = load_benchmark("lookahead_points")
    c = mod.attention_point(model, seqs, batch=2)
    assert len(c) == 3 and min(c) == 1.0
    c2 = mod.attention_point(model, seqs, batch=2, ahead=2)  # layers l+1 and l+2's attention, then l+2's router
    assert c2[0] == 0.0 and min(c2[1:]) == 1.0
    assert min(mod.lookahead_points(model, seqs)["B"]) < 1.0


def test_lookahead_ids_writes_point_c_guesses_in_the_traces_token_order(tmp_path):
    """benchmarks/lookahead_ids.py --guess attention: the model that recorded the trace decodes its held-out requests
    and point C's guesses land at each token's place in the written trace. With the experts writing nothing, C is
    the next layer's routing exactly, so a guess put at another token's place (the split shuffles the
    requests) would read less than 1.0."""
    from moe.checkpoint import save_pretrained
    from routing.record import record_trace

    model = _four_layers()
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.experts.w2.zero_()
            layer.attn.o_proj.weight.mul_(8.0)
    save_pretrained(model, tmp_path / "m")
    seqs = [torch.randint(0, model.config.vocab_size, (10,)).tolist() for _ in range(6)]
    trace, _ = record_trace(model, seqs, features=False)
    mod = load_benchmark("lookahead_ids")
    _, held = trace.split_requests(0.5, seed=0)
    nxt = mod.attention_guesses(mod.load_recorder(tmp_path / "m", held, "cpu"), held)
    assert nxt.shape == (4, held.num_tokens, 2) and (nxt[-1] == -1).all()
    assert mod.one_ahead_recall(nxt, held) == 1.0


def test_predictor_benchmark_prints_point_c_beside_its_rows():
    """benchmarks/predictor.py --attention: point C's one-ahead recall per target layer on the test requests, from
    the model that recorded the trace; with the experts writing nothing it reads the next routing exactly."""
    from routing.record import record_trace

    model = _four_layers()
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.experts.w2.zero_()
            layer.attn.o_proj.weight.mul_(8.0)
    seqs = [torch.randint(0, model.config.vocab_size, (10,)).tolist() for _ in range(4)]
    trace, _ = record_trace(model, seqs, features=False)
    mod = load_benchmark("predictor")
    ids, logits = mod.attention_features(model, trace)
    assert ids.shape == (4, trace.num_tokens, 2) and logits.shape == (trace.num_tokens, 4, 8)
    assert (logits[:, -1] == 0).all() and (np.abs(logits[:, :-1]).sum(-1) > 0).all()
    # the logits are the guesses' own: their top-k is the guess
    top = np.sort(np.argsort(-logits[:, :-1], axis=-1)[..., :2], -1)
    assert (top == np.sort(ids[:-1].transpose(1, 0, 2), -1)).all()
    row = mod.attention_row(ids, trace)
    assert row.startswith("point C") and "1.000 1.000 1.000; mean 1.000" in row


def test_a_predictor_on_point_c_reads_what_c_reads():
    """routing.AttentionLookahead: point C's logits (recorded beside the hidden states) replace the probes' next layer.
    Where C is exact (experts writing nothing, attention moving the residual), the lean predictor with it as its
    lookahead reads the next layer (near) perfectly, above the predictor on the probes alone, which cannot see the
    next layer's attention; two ahead it keeps the probes' reading."""
    from routing import AttentionLookahead, PathPredictor, PopularityBaseline, PredictorConfig, ProbeLookahead, evaluate
    from routing.record import hidden_matrix, record_trace

    model = _four_layers()
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.experts.w2.zero_()
            layer.attn.o_proj.weight.mul_(8.0)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, model.config.vocab_size, (16,), generator=g).tolist() for _ in range(32)]
    trace, feats = record_trace(model, seqs)
    hidden = hidden_matrix(feats, trace.num_layers).astype(np.float32)
    ids, logits = load_benchmark("predictor").attention_features(model, trace)
    train, test = trace.split_requests(0.5, seed=0)
    tm = np.isin(trace.request_ids_or_default(), np.unique(train.request_ids_or_default()))
    probes = ProbeLookahead.fit(train, hidden[tm], span=2)
    plain = PathPredictor.fit(train, PredictorConfig(match_layers=0), features={"hidden_NLD": hidden[tm]},
                              lookahead=probes)
    both = np.concatenate([hidden, logits], -1)
    cl = AttentionLookahead(4, 8, 2, base=probes, fallback=PopularityBaseline.fit(train))
    assert cl.name == "probe-lookahead+attention" and cl.span == 2
    with_c = PathPredictor.fit(train, PredictorConfig(match_layers=0), features={"hidden_NLD": both[tm]}, lookahead=cl)
    r_plain = evaluate(plain, test, {"hidden_NLD": hidden[~tm]})
    r_c = evaluate(with_c, test, {"hidden_NLD": both[~tm]})
    r_cl = evaluate(cl, test, {"hidden_NLD": both[~tm]})
    assert r_cl["1"]["mean_recall"] > 0.999
    assert r_c["1"]["mean_recall"] > 0.99 and r_c["1"]["mean_recall"] > r_plain["1"]["mean_recall"] + 0.05
    assert r_c["2"]["mean_recall"] >= r_plain["2"]["mean_recall"] - 0.01
    with pytest.raises(ValueError, match="C's logits last"):
        AttentionLookahead(4, 8, 2).lookahead_logits(hidden[:3, 0], 0)
