import numpy as np

from routing import PathPredictor, RoutingTrace, record_sequences, save_features
from routing.cli import main

from ._standin import StandinMoE


def test_synth_train_eval_stats(tmp_path, capsys):
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    common = ["--layers", "4", "--experts", "8", "--requests", "8", "--tokens", "32", "--planted", "4"]
    assert main(["predictor", "synth", str(train), *common, "--seed", "1"]) == 0
    assert main(["predictor", "synth", str(test), *common, "--seed", "1", "--requests", "4"]) == 0
    assert main(["predictor", "train", str(train), "--out", str(tmp_path / "p.npz")]) == 0
    p = PathPredictor.load(tmp_path / "p.npz")
    assert p.num_layers == 4 and p.num_experts == 8
    capsys.readouterr()
    assert main(["predictor", "eval", str(tmp_path / "p.npz"), str(test), "--train", str(train)]) == 0
    out = capsys.readouterr().out
    for name in ("predictor", "popularity", "previous-path", "nearest-trace", "R@1", "R@all"):
        assert name in out
    assert main(["predictor", "stats", str(train)]) == 0
    assert "reuse distance" in capsys.readouterr().out


def test_train_with_hidden_features_needs_the_model(tmp_path, capsys):
    model = StandinMoE(mix=0.0)
    seqs = np.random.default_rng(0).integers(0, 50, (6, 8)).tolist()
    trace, feats = record_sequences(model, seqs, hidden_layers=[0, 1])
    trace.save(tmp_path / "t.npz")
    save_features(tmp_path / "f.npz", feats)
    # hidden states of only two of four layers: a clear error, not a crash
    assert main(["predictor", "train", str(tmp_path / "t.npz"), "--out", str(tmp_path / "p.npz"),
                 "--features", str(tmp_path / "f.npz")]) == 2
    assert "hidden_<l>" in capsys.readouterr().err
    assert main(["predictor", "train", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "p.npz")]) == 2
    assert isinstance(RoutingTrace.load(tmp_path / "t.npz"), RoutingTrace)


def _record_tiny(tmp_path, tokens: int) -> tuple[str, object]:
    """`moe predictor record` of the tiny test model on a short text: (model dir, the folder holding t.npz and
    t.features.npz)."""
    from moe.tiny import ensure_tiny_model
    model_dir = str(ensure_tiny_model())
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 60 + "class A:\n    pass\n" * 40)
    out = tmp_path / "rec"
    assert main(["predictor", "record", model_dir, "--text", str(text), "--out", str(out), "--name", "t",
                 "--tokens", str(tokens), "--seq-len", "64", "--device", "cpu", "--dtype", "float32"]) == 0
    return model_dir, out


def test_record_then_train_then_offload_with_the_predictor(tmp_path, capsys):
    """`moe predictor record MODEL --text ...` writes a trace with token ids and the hidden states;
    `train --features` fits the predictor and its probes on them; offloading takes the pair."""
    import numpy as np

    from routing import RoutingTrace, hidden_matrix, load_features
    model_dir, out = _record_tiny(tmp_path, 400)
    trace = RoutingTrace.load(out / "t.npz")
    assert trace.num_tokens == 400 and trace.token_ids is not None and len(np.unique(trace.request_ids)) == 7
    hidden = hidden_matrix(load_features(out / "t.features.npz"), trace.num_layers)
    assert hidden.shape[:2] == (400, trace.num_layers) and hidden.dtype == np.float16
    assert "moe predictor train" in capsys.readouterr().out
    assert main(["predictor", "train", str(out / "t.npz"), "--features", str(out / "t.features.npz"),
                 "--out", str(tmp_path / "p.npz")]) == 0
    assert (tmp_path / "p.probe.npz").is_file()
    # the default is the cheaper live predictor, without the exact-set sources (BENCHMARKS 7e)
    assert PathPredictor.load(tmp_path / "p.npz").config.match_layers == 0
    # without the hidden states: the trace alone, no features file
    assert main(["predictor", "record", model_dir, "--text", str(tmp_path / "a.txt"), "--out", str(out), "--name", "u",
                 "--tokens", "100", "--no-features", "--device", "cpu"]) == 0
    assert (out / "u.npz").is_file() and not (out / "u.features.npz").exists()
    assert main(["predictor", "record", model_dir, "--text", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err


def test_train_with_point_c_then_eval_then_offload(tmp_path, capsys):
    """`train --attention --model DIR`: the model decodes the trace's requests and point C's logits join the
    hidden states; the predictor file says so, so loading it (here, eval, and offloading through
    offload_objects) reads C again, and an offloaded model then hands it C's logits live."""
    import torch

    import moe
    from offload import OffloadConfig, apply_offload
    from offload.cli_args import offload_objects
    from routing import AttentionLookahead, ProbeLookahead
    model_dir, out = _record_tiny(tmp_path, 256)
    common = ["--features", str(out / "t.features.npz")]
    assert main(["predictor", "train", str(out / "t.npz"), *common, "--out", str(tmp_path / "x.npz"), "--attention"]) == 2
    assert "--attention needs --features and --model" in capsys.readouterr().err
    assert main(["predictor", "train", str(out / "t.npz"), *common, "--model", model_dir, "--attention",
                 "--out", str(tmp_path / "p.npz")]) == 0
    assert "point C decoded" in capsys.readouterr().out
    p = offload_objects(predictor_file=str(tmp_path / "p.npz"))["predictor"]
    assert isinstance(p.lookahead, AttentionLookahead) and isinstance(p.lookahead.base, ProbeLookahead)
    assert main(["predictor", "eval", str(tmp_path / "p.npz"), str(out / "t.npz"), *common]) == 2
    assert "reads point C (trained with --attention)" in capsys.readouterr().err
    assert main(["predictor", "eval", str(tmp_path / "p.npz"), str(out / "t.npz"), *common, "--model", model_dir]) == 0
    # offloaded generation with it: C's logits handed live, the text the resident model's
    tok = moe.Tokenizer.from_dir(model_dir)
    base = moe.load_model(model_dir, dtype=torch.float32).eval()
    want = moe.generate(base, tok, ["def f(x):"], moe.SamplingParams(max_new_tokens=6))
    m = apply_offload(moe.load_model(model_dir, dtype=torch.float32).eval(),
                      OffloadConfig(slots_per_layer=2, device="cpu", calibrate=False, policy="predictor",
                                    prefetch="predictor", predictor=p, prefetch_budget=2))
    assert m.moe_blocks()[0].experts.lookahead_attention
    assert moe.generate(m, tok, ["def f(x):"], moe.SamplingParams(max_new_tokens=6)) == want
