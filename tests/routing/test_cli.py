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


def test_record_then_train_then_offload_with_the_predictor(tmp_path, capsys):
    """`moe predictor record MODEL --text ...` writes a trace with token ids and the hidden states;
    `train --features` fits the predictor and its probes on them; offloading takes the pair."""
    import numpy as np

    from moe.tiny import ensure_tiny_model
    from routing import RoutingTrace, hidden_matrix, load_features
    model_dir = str(ensure_tiny_model())
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 60 + "class A:\n    pass\n" * 40)
    out = tmp_path / "rec"
    assert main(["predictor", "record", model_dir, "--text", str(text), "--out", str(out), "--name", "t",
                 "--tokens", "400", "--seq-len", "64", "--device", "cpu", "--dtype", "float32"]) == 0
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
    assert main(["predictor", "record", model_dir, "--text", str(text), "--out", str(out), "--name", "u",
                 "--tokens", "100", "--no-features", "--device", "cpu"]) == 0
    assert (out / "u.npz").is_file() and not (out / "u.features.npz").exists()
    assert main(["predictor", "record", model_dir, "--text", str(tmp_path / "none.txt"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
