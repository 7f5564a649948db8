"""`moe` end to end, in process: main([...]) on the tiny on-the-fly model, output checked against
the library's own generate()."""
import io
import re
import shutil
import textwrap

import pytest

import moe.cli as cli
import moe.tiny as tiny
from moe import SamplingParams, Tokenizer, generate, load_model
from moe.cli import ProgressBar, main


@pytest.fixture(autouse=True)
def isolated(tmp_path_factory, monkeypatch):
    """Tiny-model cache in a temp dir, and no embedded default model (whatever the tree holds)."""
    cache = tmp_path_factory.getbasetemp() / "moeflow-cache"
    monkeypatch.setenv("MOEFLOW_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiny, "ASSETS_DEFAULT", cache / "no-default-model")
    return cache


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.ensure_tiny_model(cache_dir=tmp_path_factory.getbasetemp() / "moeflow-cache")


@pytest.fixture(scope="module")
def lib(tiny_dir):
    return load_model(tiny_dir), Tokenizer.from_dir(tiny_dir)


def expected(lib, prompt, **kw):
    model, tok = lib
    return generate(model, tok, [prompt], SamplingParams(**kw))[0]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("generate", "train", "predictor", "place", "serve"):
        assert name in out
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--prompt", "--chat", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed",
                 "--stop", "--dtype", "--device", "--backend"):
        assert flag in out


def test_generate_on_the_tiny_default_says_so(capsys, lib):
    assert main(["generate", "--prompt", "def main(argv):", "--max-new-tokens", "12"]) == 0
    cap = capsys.readouterr()
    assert cap.out == expected(lib, "def main(argv):", max_new_tokens=12) + "\n"
    assert "tiny UNTRAINED model built on the fly" in cap.err
    assert "loading weights" in cap.err and "100%" in cap.err
    assert "12 generated" in cap.err and "finished: length" in cap.err


def test_generate_from_a_model_dir_with_sampling_and_stop(capsys, lib, tiny_dir):
    # --device cpu: the expected text comes from the library on the CPU, and a seeded sample on a GPU
    # draws from the GPU's generator
    args = ["generate", str(tiny_dir), "-p", "import os", "-n", "16", "--temperature", "0.9", "--top-p", "0.95",
            "--top-k", "40", "--seed", "3", "--device", "cpu"]
    assert main(args) == 0
    cap = capsys.readouterr()
    want = expected(lib, "import os", max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=3)
    assert cap.out == want + "\n" and "UNTRAINED" not in cap.err
    assert main(args) == 0 and capsys.readouterr().out == cap.out  # seeded: reproducible
    stop = want[4:6]
    assert main(args + ["--stop", stop, "--stop", "\x01never"]) == 0
    assert capsys.readouterr().out == want[:want.index(stop)] + "\n"


def test_chat_goes_through_the_template(capsys, lib):
    model, tok = lib
    assert main(["generate", "tiny", "-p", "hello", "--chat", "--system", "be brief", "-n", "6"]) == 0
    prompt = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert capsys.readouterr().out == expected(lib, prompt, max_new_tokens=6) + "\n"


def test_embedded_default_is_used_when_present(capsys, monkeypatch, tiny_dir, tmp_path, lib):
    default = tmp_path / "default"
    shutil.copytree(tiny_dir, default)
    monkeypatch.setattr(tiny, "ASSETS_DEFAULT", default)
    assert main(["generate", "-p", "x = 1", "-n", "4"]) == 0
    cap = capsys.readouterr()
    assert "UNTRAINED" not in cap.err and cap.out == expected(lib, "x = 1", max_new_tokens=4) + "\n"


def test_text_is_streamed_piece_by_piece(tiny_dir):
    writes = []

    class Recorder(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    args = cli.build_parser("generate").parse_args(["generate", str(tiny_dir), "-p", "class A:", "-n", "10"])
    assert cli.run_generate(args, stdout=Recorder(), stderr=io.StringIO()) == 0
    assert len([w for w in writes if w != "\n"]) >= 3  # one write per delta, not one at the end


@pytest.mark.parametrize("argv,needle", [
    (["generate", "/no/such/model", "-p", "hi"], "model directory /no/such/model does not exist"),
    (["generate", "-p", "hi", "--top-p", "0"], "top_p=0.0"),
    (["generate", "-p", "hi", "--temperature", "nan"], "temperature=nan"),
    (["generate", "-p", "hi", "-n", "0"], "max_new_tokens=0"),
    (["generate", "-p", "hi", "--top-k", "-2"], "top_k=-2"),
    (["generate", "-p", "hi", "--system", "s"], "--system only applies with --chat"),
    (["generate", "-p", "hi", "--device", "tpu:7"], "--device"),
    (["generate", "-p", "hi", "-n", "many"], "invalid int value: 'many'"),
    (["generate", "-p", "hi", "--dtype", "int3"], "invalid choice: 'int3'"),
    (["generate"], "--prompt"),
    (["generate", "-p", "hi", "--prefill-chunk", "0"], "--prefill-chunk '0': give a token count >= 1"),
    (["generate", "-p", "hi", "--prefill-chunk", "big"], "'auto' or 'off'"),
])
def test_user_mistakes_are_one_line_errors(capsys, argv, needle):
    assert main(argv) == 2
    cap = capsys.readouterr()
    assert needle in cap.err
    assert "Traceback" not in cap.err + cap.out


def test_broken_model_dir_is_a_clean_error(capsys, tiny_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    (bad / "tokenizer.json").unlink()
    assert main(["generate", str(bad), "-p", "hi"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    (bad / "model.safetensors").rename(bad / "weights.bin")
    shutil.copy(tiny_dir / "tokenizer.json", bad / "tokenizer.json")
    assert main(["generate", str(bad), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


def test_lazy_commands_register_or_report_unavailable(capsys, monkeypatch, tmp_path):
    pkg = tmp_path / "fakecmds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(textwrap.dedent("""
        def register(subparsers):
            p = subparsers.add_parser("hello", help="say hello")
            p.add_argument("--name", default="world")
            p.set_defaults(func=lambda args: print(f"hello {args.name}") or 7)
    """))
    (pkg / "broken.py").write_text("raise RuntimeError('half-written module')\n")
    (pkg / "noregister.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "LAZY_COMMANDS", {
        "hello": ("fakecmds.good", "greets"), "crash": ("fakecmds.broken", "crashes on import"),
        "missing": ("fakecmds.nothere", "not written yet"), "bare": ("fakecmds.noregister", "no register")})
    assert main(["hello", "--name", "moe"]) == 7
    assert capsys.readouterr().out == "hello moe\n"
    assert main(["missing", "--some-flag"]) == 1
    assert "`moe missing` is not available yet: fakecmds.nothere is not part of this installation" \
        in capsys.readouterr().err
    assert main(["crash"]) == 1
    assert "RuntimeError: half-written module" in capsys.readouterr().err
    assert main(["bare"]) == 1
    assert "has no register(subparsers)" in capsys.readouterr().err
    assert main(["--help"]) == 0  # nothing imported: every command still listed
    out = capsys.readouterr().out
    assert all(name in out for name in ("hello", "crash", "missing", "bare", "generate"))


def test_progress_bar():
    log = io.StringIO()
    bar = ProgressBar(stream=log)
    for done in range(0, 101, 5):
        bar(done * 2**20, 100 * 2**20)
    bar(100 * 2**20, 100 * 2**20)
    lines = log.getvalue()
    assert lines.count("\n") == 1 and "\r" not in lines and "100% 100.0/100.0 MiB" in lines

    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty = Tty()
    bar = ProgressBar(stream=tty, width=10)
    for done in range(0, 101):
        bar(done, 100)
    text = tty.getvalue()
    assert text.count("\r") == 101 and text.endswith("\n") and "[#####-----]  50%" in text


def test_tiny_default_is_a_checkpoint_transformers_reads(lib, tiny_dir):
    """The on-the-fly model is a real Mixtral checkpoint: transformers gives the same logits."""
    import torch
    transformers = pytest.importorskip("transformers")
    model, tok = lib
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    text = "def f(x):\n    return x"
    assert hf_tok(text).input_ids == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_gpu_memory_offloads_and_changes_nothing(capsys, lib, tiny_dir, policy):
    """`--gpu-memory` applies expert offloading (one slot per layer here): same greedy text."""
    want = expected(lib, "import os", max_new_tokens=10)
    assert main(["generate", str(tiny_dir), "--prompt", "import os", "-n", "10", "--device", "cpu",
                 "--gpu-memory", "300MiB", "--offload-policy", policy]) == 0
    cap = capsys.readouterr()
    assert cap.out == want + "\n"
    # the summary says where the experts were and what moving them took (float32 on the CPU: not packed)
    line = [ln for ln in cap.err.splitlines() if "offload:" in ln]
    assert len(line) == 1 and "experts per layer on cpu, copied float32" in line[0] and "% hits" in line[0]
    # and which cache decides, and why (the default driver 'auto': the host's on a CPU)
    assert "moe: offload driver auto -> host: the device driver runs on a CUDA device, not cpu" in cap.err
    # --offload-driver device: the cache decided on the device, the same text
    assert main(["generate", str(tiny_dir), "--prompt", "import os", "-n", "10", "--device", "cpu",
                 "--gpu-memory", "300MiB", "--offload-policy", policy, "--offload-driver", "device"]) == 0
    cap = capsys.readouterr()
    assert cap.out == want + "\n" and "decided on the device" in cap.err


@pytest.mark.parametrize("driver", ["host", "device"])
def test_the_offload_summary_says_what_prefetch_did(capsys, lib, tiny_dir, driver):
    """With --offload-prefetch the summary line says how many copies were prefetches, how many of those were used,
    and how much of what was not cached they brought ahead of time; without it, nothing of the kind."""
    want = expected(lib, "import os", max_new_tokens=10)
    base = ["generate", str(tiny_dir), "--prompt", "import os", "-n", "10", "--device", "cpu",
            "--gpu-memory", "300MiB", "--offload-driver", driver, "--offload-reserve", "0"]
    assert main(base + ["--offload-prefetch", "attention"]) == 0
    cap = capsys.readouterr()
    assert cap.out == want + "\n"
    line = [ln for ln in cap.err.splitlines() if "offload" in ln and "expert uses" in ln][0]
    assert re.search(r"copies|fills", line) and re.search(r", \d+ of them prefetched \(\d+% used; they brought "
                                                          r"\d+% of the uncached uses ahead of time\)", line), line
    assert main(base) == 0
    assert "prefetched" not in capsys.readouterr().err


def test_wrong_offload_flags_fail_before_the_weights_load(capsys, tiny_dir, tmp_path):
    """A flag combination offloading refuses, or a probes file that is not there, is said before the checkpoint
    loads (on a 90 GB model that is minutes), not after."""
    base = ["generate", str(tiny_dir), "--prompt", "x", "-n", "2", "--device", "cpu", "--gpu-memory", "300MiB"]
    for extra, said in ((["--offload-prefetch", "probe"], "go together"),
                        (["--offload-prefetch", "probe", "--offload-probes", str(tmp_path / "none.npz")], "not found"),
                        (["--offload-policy", "lru", "--offload-lfu-half-life", "5"], "needs policy='lfu'")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert said in err and "loading weights" not in err, (extra, err)


def test_generate_counts_its_kv_cache_in_the_offload_budget(capsys, tiny_dir, lib):
    """moe generate --gpu-memory: the sequence's KV cache (prompt + --max-new-tokens, made up front) comes out of the
    budget before the experts: one slot a layer plus half that cache is refused before the load, naming the cache's
    bytes; with the whole cache it generates."""
    from moe.checkpoint import model_skeleton
    from offload.apply import _fmt_bytes, _model_bytes, kv_cache_bytes
    _, tok = lib
    sk = model_skeleton(tiny_dir)
    n = 200
    kv = kv_cache_bytes(sk.config, 1, len(tok.encode("x")) + n, sk.dtype)
    L = len(sk.moe_blocks())
    eb, dense = _model_bytes(sk, sk.moe_blocks())  # (its counting is tested in tests/offload/test_config_store.py)
    assert 0 < kv // 2 < L * eb  # (half the cache fits beside one slot a layer, the whole does not)
    base = ["generate", str(tiny_dir), "--prompt", "x", "-n", str(n), "--device", "cpu", "--offload-reserve", "0",
            "--ignore-eos"]
    assert main(base + ["--gpu-memory", str(dense + L * eb + kv // 2)]) == 2
    err = capsys.readouterr().err
    assert f"KV cache {_fmt_bytes(kv)}" in err and "loading weights" not in err, err
    assert main(base + ["--gpu-memory", str(dense + L * eb + kv)]) == 0
    assert "1 of " in capsys.readouterr().err  # one slot a layer


def test_offloaded_generate_chunks_a_prompt_whose_activations_exceed_the_reserve(capsys, lib, tiny_dir):
    """--gpu-memory with --prefill-chunk auto (the default): a reserve too small for the whole prompt's activations
    (offload.prefill_chunk_for) feeds it in chunks, says so, and gives the resident model's greedy text; a resident
    model, or --prefill-chunk off, feeds it whole and says nothing."""
    prompt = "import os\nimport sys\n\nclass Config(object):\n    def __init__(self, path):\n        self.path = path\n"
    from moe.checkpoint import model_skeleton
    from offload import prefill_activation_bytes
    want = expected(lib, prompt, max_new_tokens=6)
    n = len(lib[1].encode(prompt))
    sk = model_skeleton(tiny_dir)
    reserve = prefill_activation_bytes(sk.config, 1, 32, n + 6, sk.dtype)  # 32 tokens fit, 64 do not
    assert n > 32
    base = ["generate", str(tiny_dir), "--prompt", prompt, "-n", "6", "--device", "cpu"]
    off = base + ["--gpu-memory", "300MiB", "--offload-reserve", str(reserve)]
    assert main(off) == 0
    cap = capsys.readouterr()
    assert cap.out == want + "\n" and f"the prompt's {n} tokens are fed 32 a step" in cap.err, cap.err
    # the summary gives the prefill apart from the decode, with its chunks
    assert re.search(rf"moe: {n} prompt tokens in [\d.]+ s \([\d.]+ tokens/s, 2 chunks of 32\); 6 generated in "
                     r"[\d.]+ s \(the first at [\d.]+ s, then [\d.]+ tokens/s\), finished: length", cap.err), cap.err
    for argv in (off + ["--prefill-chunk", "off"], base, off + ["--offload-reserve", "256MiB"]):
        assert main(argv) == 0
        cap = capsys.readouterr()
        assert cap.out == want + "\n" and "a step" not in cap.err and "chunks" not in cap.err
        assert f"moe: {n} prompt tokens in " in cap.err
    assert main(base + ["--prefill-chunk", "5"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_a_sequence_past_the_trained_context_is_warned_about(capsys, lib, tiny_dir, tmp_path):
    """prompt + --max-new-tokens beyond max_position_embeddings still generates (rotary positions compute), with a
    warning that names the numbers and the fix; within it, no warning. (The tiny model, its context cut to 16.)"""
    import json
    short = tmp_path / "short"
    shutil.copytree(tiny_dir, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 16
    (short / "config.json").write_text(json.dumps(cfg))
    n = len(lib[1].encode("import os"))
    base = ["generate", str(short), "--prompt", "import os", "--device", "cpu", "--ignore-eos"]
    assert main(base + ["-n", str(17 - n)]) == 0
    err = capsys.readouterr().err
    assert (f"the prompt's {n} tokens + --max-new-tokens {17 - n} exceed the model's context of 16 tokens"
            in err and "lower --max-new-tokens" in err), err
    assert main(base + ["-n", str(16 - n)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_gpu_memory_too_small_is_a_clean_error(capsys, tiny_dir):
    """A budget that cannot hold one layer's active experts is said before the weights load (from the model's
    shapes: moe.checkpoint.model_skeleton), with the fixes."""
    assert main(["generate", str(tiny_dir), "--prompt", "x", "-n", "2", "--device", "cpu",
                 "--gpu-memory", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert "moe generate: error: gpu_memory=" in err and "Raise gpu_memory" in err and "Traceback" not in err
    assert "loading weights" not in err
    # the reserve it names can be lowered from the command line: a budget the default reserve leaves no room in
    # holds the experts with less kept free
    small = ["generate", str(tiny_dir), "--prompt", "x", "-n", "2", "--device", "cpu", "--gpu-memory", "64MiB"]
    assert main(small) == 2
    err = capsys.readouterr().err
    assert "reserve 256.00 MiB" in err and "--offload-reserve" in err and "loading weights" not in err
    assert main(small + ["--offload-reserve", "8MiB"]) == 0
    assert "experts per layer on cpu" in capsys.readouterr().err
