"""`moe train` and the corpus recipe: the stdlib corpus and tokenizer, a tiny model whose loss
falls within a CPU-sized budget, checkpoints that transformers and moeflow load with equal
logits, exact resume, the recipes' sizes, and a training path that never imports Ray/OR-Tools."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.corpus import EOS_TEXT, CorpusConfig, build_corpus, is_heldout, read_documents, train_tokenizer
from moe.losses import BalanceConfig, RouterAuxCollector
from moe.train import (TrainConfig, build_model, list_checkpoints, load_recipe, lr_at, parameter_counts, train)

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {"model_type": "mixtral", "vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 32,
              "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 256,
              "tie_word_embeddings": True, "rope_theta": 10000.0}
TINY_TRAIN = dict(max_steps=30, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=4, eval_every=15,
                  eval_tokens=2048, log_every=1, save_dtype="float32", seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two OpenMP threads on a crowded 2-core machine spin-wait on each other; one is faster here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    build_corpus(d, CorpusConfig(max_total_bytes=200_000, heldout_fraction=0.1))
    train_tokenizer(read_documents(d / "train.txt"), d / "tokenizer", vocab_size=320)
    return d


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    metrics = train(TrainConfig(**TINY_TRAIN), out, str(corpus), model_dict=TINY_MODEL, quiet=True)
    return out, metrics


# --- corpus and tokenizer ---------------------------------------------------------------------------
def test_corpus_walk_is_deterministic_and_skips_tests(tmp_path):
    root = tmp_path / "lib"
    kept = [f"pkg/m{i}.py" for i in range(20)]
    for rel in kept + ["pkg/test_b.py", "test/test_x.py", "tests/y.py", "site-packages/z.py", "pkg/c.txt",
                       "encodings/cp1.py"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\nx = 1\n")
    cfg = CorpusConfig(root=str(root), heldout_fraction=0.3)
    m1 = build_corpus(tmp_path / "o1", cfg)
    m2 = build_corpus(tmp_path / "o2", cfg)
    assert sorted(m1["files"]["train"] + m1["files"]["heldout"]) == sorted(kept)
    assert m1["files"]["train"] == sorted(m1["files"]["train"])  # walk order is sorted
    assert m1["source"] == "python-files" and m1["root"] == str(root)  # not the stdlib: the manifest says so
    for side in ("train", "heldout"):
        assert m1["files"][side], side
        assert (tmp_path / "o1" / f"{side}.txt").read_bytes() == (tmp_path / "o2" / f"{side}.txt").read_bytes()
        for rel in m1["files"][side]:
            assert is_heldout(rel, 0.3) == (side == "heldout")
    with pytest.raises(ValueError, match="heldout_fraction"):
        CorpusConfig(heldout_fraction=0.0)


def test_mixed_corpus_gives_each_kind_its_share_interleaved(tmp_path):
    """--mix: files of several kinds by name ending, each kind an equal share of the byte limit, taken in the order of
    a hash of the path (kinds and folders interleaved, so a limit does not keep the walk's first packages alone), and
    each kind's held-out text also written alone (requests of one kind for routing traces)."""
    from moe.corpus import parse_mix
    root = tmp_path / "site"
    files = {**{f"a{i // 10}/m{i}.py": "x = 1\n" * 50 for i in range(60)},
             **{f"b/inc/h{i}.h": "#define X 1\n" * 50 for i in range(60)},
             **{f"c{i}.dist-info/METADATA": "Some prose here.\n" * 50 for i in range(30)},
             "b/skip.so": "no", "z/notes.rst": "not asked for"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    mix = parse_mix("code=.py; c=.h,.hpp ;prose=METADATA")
    assert mix == (("code", (".py",)), ("c", (".h", ".hpp")), ("prose", ("METADATA",)))
    cfg = CorpusConfig(root=str(root), heldout_fraction=0.2, max_total_bytes=30 * 600, mix=mix)
    m = build_corpus(tmp_path / "o", cfg)
    assert m["source"] == "mixed-files" and set(m["mix"]) == {"code", "c", "prose"}
    taken = m["files"]["train"] + m["files"]["heldout"]
    assert not any(f.endswith((".so", ".rst")) for f in taken)
    kinds = {k: [f for f in m["files"]["train"] if cfg.kind_of(f.rsplit("/", 1)[-1]) == k] for k in m["mix"]}
    # each kind stops at its share of the train side (its last file may cross it): 4800 bytes of 300 / 600 / 850-byte
    # files
    size = {"code": 300, "c": 600, "prose": 850}
    assert {k: len(v) for k, v in kinds.items()} == {k: -(-4800 // n) for k, n in size.items()}
    assert m["bytes_by_kind"]["train.code"] == 4800
    assert len({f.split("/")[0] for f in kinds["code"]}) > 2  # not the first folders of the walk alone
    assert m["files"]["train"] != sorted(m["files"]["train"])  # hash order, kinds interleaved
    for k in m["mix"]:
        held = (tmp_path / "o" / f"heldout.{k}.txt").read_text()
        docs = [d for d in held.split(EOS_TEXT) if d.strip()]
        assert all(cfg.kind_of(d.split("\n", 1)[0].rsplit("/", 1)[-1]) == k for d in docs)
    assert build_corpus(tmp_path / "o2", cfg)["files"] == m["files"]  # deterministic
    with pytest.raises(ValueError, match="KIND=ENDING"):
        parse_mix("code")
    with pytest.raises(ValueError, match="twice"):
        parse_mix("a=.py;a=.h")


def test_stdlib_corpus_and_tokenizer(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["source"] == "python-stdlib"
    assert manifest["num_files"]["train"] > 0 and manifest["num_files"]["heldout"] > 0
    assert not set(manifest["files"]["train"]) & set(manifest["files"]["heldout"])
    assert all("/test/" not in f and not f.startswith("test/") for f in manifest["files"]["train"])
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(corpus / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size() == 320 and tok.token_to_id(EOS_TEXT) == 0
    text = "def f(x):\n    return x  # ünïcode\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode("a" + EOS_TEXT + "b").ids.count(0) == 1  # the separator is one special token
    cfg = json.loads((corpus / "tokenizer" / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == cfg["bos_token"] == EOS_TEXT and "messages" in cfg["chat_template"]
    assert len(read_documents(corpus / "heldout.txt")) == manifest["num_files"]["heldout"]


def test_tokenizer_loads_in_transformers_with_chat_template(corpus):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    assert tok.eos_token == EOS_TEXT
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "user: hi\nassistant:"


# --- settings ---------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("kw,match", [({"batch_size": 0}, "batch_size"), ({"lr": 0.0}, "lr"),
                                      ({"precision": "fp8"}, "precision"), ({"capacity_factor": 0.0,
                                                                             "jitter_eps": 2.0}, "jitter_eps")])
def test_train_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_recipe_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"max_step": 3})
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"train": {}}))
    with pytest.raises(ValueError, match="model_type"):
        load_recipe(bad)
    bare = tmp_path / "config.json"
    bare.write_text(json.dumps(TINY_MODEL))
    assert load_recipe(bare) == (TINY_MODEL, {})
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "missing.json")


def test_shipped_recipes_fit_their_promises():
    from moe.config import MoEConfig
    from moe.model import MoEForCausalLM

    def build(name):
        model_d, train_d = load_recipe(REPO / "moe" / "recipes" / f"{name}.json")
        TrainConfig.from_dict(train_d)
        cfg = MoEConfig.from_hf_dict(model_d)
        return cfg, parameter_counts(MoEForCausalLM(cfg, device="meta"))

    cfg, default = build("default")
    assert cfg.model_type == "mixtral" and cfg.num_experts >= 8 and cfg.num_experts_per_tok == 2
    assert cfg.num_hidden_layers >= 4
    assert default["total"] * 2 <= 15_000_000  # bf16 bytes of the shipped checkpoint
    dcfg, dense = build("dense_baseline")
    assert dcfg.num_experts == 1 and dcfg.moe_intermediate_size == 2 * cfg.moe_intermediate_size
    assert abs(dense["active"] - default["active"]) / default["active"] < 0.005
    lcfg, _ = build("large_traces")
    assert (lcfg.num_hidden_layers, lcfg.num_experts, lcfg.num_experts_per_tok) == (16, 64, 8)
    # BENCHMARKS 7f's width test: the same depth and experts, only 4x wider
    wcfg, wide = build("large_traces_wide")
    assert (wcfg.num_hidden_layers, wcfg.num_experts, wcfg.num_experts_per_tok) == (16, 64, 8)
    assert (wcfg.hidden_size, wcfg.moe_intermediate_size) == (4 * lcfg.hidden_size, 4 * lcfg.moe_intermediate_size)
    assert 4.1e8 < wide["total"] < 4.3e8  # the 418M the recipe's comment states
    # and its shared-expert test: the same routed experts, one Qwen2-MoE shared expert 4x an expert's ffn
    scfg, _ = build("large_traces_shared")
    assert scfg.model_type == "qwen2_moe" and scfg.hidden_size == lcfg.hidden_size
    assert (scfg.num_experts, scfg.num_experts_per_tok, scfg.moe_intermediate_size) == (64, 8, lcfg.moe_intermediate_size)
    assert scfg.shared_expert_intermediate_size == 4 * lcfg.moe_intermediate_size
    # and its depth test (7g): the same layer twice as many times, nothing else changed
    dpcfg, _ = build("large_traces_deep")
    assert dpcfg.num_hidden_layers == 2 * lcfg.num_hidden_layers
    assert dpcfg.replace(num_hidden_layers=lcfg.num_hidden_layers) == lcfg
    recipes = REPO / "moe" / "recipes"
    assert load_recipe(recipes / "large_traces_deep.json")[1] == load_recipe(recipes / "large_traces.json")[1]
    # and three times the depth (7h): Qwen3-30B-A3B's 48 layers, nothing else changed
    d48, _ = build("large_traces_48")
    assert d48.num_hidden_layers == 48 and d48.replace(num_hidden_layers=lcfg.num_hidden_layers) == lcfg
    assert load_recipe(recipes / "large_traces_48.json")[1] == load_recipe(recipes / "large_traces.json")[1]
    # and Qwen3-30B-A3B's routing shape (48 layers x 128 experts, top-8) for decode.py's Qwen3 rows: only the experts
    q3, _ = build("large_traces_qwen3")
    assert (q3.num_hidden_layers, q3.num_experts, q3.num_experts_per_tok) == (48, 128, 8)
    assert q3.replace(num_experts=64) == d48
    assert load_recipe(recipes / "large_traces_qwen3.json")[1] == load_recipe(recipes / "large_traces.json")[1]


# --- training ---------------------------------------------------------------------------------------
def test_tiny_model_loss_falls(trained):
    out, metrics = trained
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[0] > math.log(320) - 0.3  # starts near uniform
    assert metrics["train_loss"] < losses[0] - 1.0
    assert metrics["eval_loss"] < math.log(320) - 1.0
    assert [e["step"] for e in metrics["evals"]] == [15, 30]
    assert metrics["evals"][1]["eval_loss"] < metrics["evals"][0]["eval_loss"]
    assert metrics["steps"] == 30 and metrics["tokens"] == 30 * 8 * 32
    assert 1.0 <= metrics["balance"]["max_over_mean"] < 4.0 and all("cv" in e for e in log if "loss" in e)


def test_checkpoint_reloads_in_transformers_and_moeflow_with_equal_logits(trained):
    transformers = pytest.importorskip("transformers")
    from moe.checkpoint import load_model
    out, _ = trained
    final = out / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in final.iterdir()}
    ours = load_model(final, dtype=torch.float32)
    ours.eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    theirs.eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids)
        b = theirs(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the float32 checkpoint is the trained model itself
    ckpt = load_model(list_checkpoints(out)[-1], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ckpt(ids), a, rtol=0, atol=0)


def test_resume_continues_identically(corpus, tmp_path):
    from safetensors.torch import load_file
    cfg = dict(TINY_TRAIN, max_steps=6, save_every=3, eval_every=0, keep=3)
    out = tmp_path / "run"
    train(TrainConfig(**cfg), out, str(corpus), model_dict=TINY_MODEL, quiet=True)
    straight = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    straight_opt = load_file(str(out / "checkpoint-6" / "optimizer.safetensors"))
    log_straight = (out / "log.jsonl").read_text().splitlines()
    with pytest.raises(ValueError, match="--resume"):
        train(TrainConfig(**cfg), out, str(corpus), model_dict=TINY_MODEL, quiet=True)
    shutil.rmtree(out / "checkpoint-6")  # as if the job died after step 3's checkpoint
    (out / "log.jsonl").write_text("")
    m = train(TrainConfig(**cfg), out, str(corpus), model_dict=TINY_MODEL, resume=True, quiet=True)
    assert m["steps"] == 6
    resumed = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    resumed_opt = load_file(str(out / "checkpoint-6" / "optimizer.safetensors"))
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    for k in straight_opt:
        assert torch.equal(straight_opt[k], resumed_opt[k]), k
    # the steps after the checkpoint logged the same losses
    after = [e for e in map(json.loads, log_straight) if e["step"] > 3 and "loss" in e]
    again = [e for e in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(after) == 3
    assert [e["loss"] for e in after] == [e["loss"] for e in again]


def test_bf16_autocast_and_capacity_on_cpu(corpus, tmp_path):
    cfg = TrainConfig(**dict(TINY_TRAIN, max_steps=2, eval_every=0, log_every=1, precision="bf16",
                             capacity_factor=0.5, jitter_eps=0.01))
    m = train(cfg, tmp_path / "bf16", str(corpus), model_dict=TINY_MODEL, quiet=True)
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["eval_loss"])
    log = [json.loads(x) for x in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert all(e["dropped"] > 0 for e in log if "loss" in e)  # capacity 0.5 must drop


def test_mixed_precision_experts_patch_and_restore(corpus):
    from moe.train import mixed_precision_experts, resolve_corpus, restore_experts
    cfg = TrainConfig(**TINY_TRAIN)
    model = build_model(TINY_MODEL, None, resolve_corpus(str(corpus), None, None, None).tokenizer, cfg,
                        torch.device("cpu"))
    keys = list(model.state_dict())
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = model(ids)
    patched = mixed_precision_experts(model)
    assert len(patched) == 2 and mixed_precision_experts(model) == []  # never patched twice
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref)  # no autocast: the plain forward
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids)
    assert low.dtype == torch.bfloat16 and (low.float() - ref).abs().max() < 0.1
    restore_experts(patched)
    assert all("forward" not in b.experts.__dict__ for b in model.moe_blocks())
    assert list(model.state_dict()) == keys


def test_collector_on_a_whole_model_counts_drops(corpus):
    cfg = TrainConfig(**TINY_TRAIN)
    from moe.train import resolve_corpus
    model = build_model(TINY_MODEL, None, resolve_corpus(str(corpus), None, None, None).tokenizer, cfg,
                        torch.device("cpu"))
    ids = torch.randint(0, 320, (2, 16))
    with RouterAuxCollector(model, BalanceConfig(capacity_factor=-1.0)) as col:
        model(ids)
        aux = col.collect()
    assert aux.load_LE.shape == (2, 4) and int(aux.load_LE.sum()) == 2 * 32 * 2
    assert aux.capacity <= 16  # adaptive: never above |f| * mean = 1.0 * 32*2/4
    assert aux.dropped == int((aux.load_LE - aux.capacity).clamp(min=0).sum())
    assert not model.moe_blocks()[0].router._forward_hooks  # hooks removed on exit


def test_cli_end_to_end_never_imports_ray_or_ortools(corpus, tmp_path):
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"model": TINY_MODEL, "train": dict(TINY_TRAIN, max_steps=2)}))
    out = tmp_path / "cli"
    code = f"""
import sys, json
from moe.train import main
assert main(["--config", {str(recipe)!r}, "--data", {str(corpus)!r}, "--out", {str(out)!r}, "--quiet"]) == 0
assert main(["--eval-only", "--init", {str(out / 'final')!r}, "--data", {str(corpus)!r}, "--seq-len", "32"]) == 0
assert main(["--init", {str(out / 'final')!r}, "--data", {str(corpus)!r}]) == 2  # no --out: an error, not a crash
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "ortools"))
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines[0]["steps"] == 2 and "eval_loss" in lines[1]
    assert "--out DIR is required" in r.stderr


def test_register_adds_train_and_corpus_commands():
    import argparse
    from moe.train import register
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["train", "--config", "x.json", "--data", "d", "--out", "o", "--max-steps", "5", "--lr", "0.1"])
    assert a.max_steps == 5 and a.lr == 0.1 and callable(a.func)
    c = p.parse_args(["corpus", "out", "--vocab-size", "1000"])
    assert c.vocab_size == 1000 and callable(c.func)


def test_grad_accumulation_equals_one_big_batch(corpus, tmp_path):
    from safetensors.torch import load_file
    common = dict(TINY_TRAIN, max_steps=1, eval_every=0, lb_coef=0.0)  # the lb loss is not additive over batches
    # on the CPU in fp32 wherever the suite runs: on a GPU "auto" trains under bf16 autocast, where
    # two half batches round differently from one whole batch
    train(TrainConfig(**dict(common, batch_size=8, grad_accum=1)), tmp_path / "big", str(corpus),
          model_dict=TINY_MODEL, quiet=True, device="cpu")
    train(TrainConfig(**dict(common, batch_size=4, grad_accum=2)), tmp_path / "acc", str(corpus),
          model_dict=TINY_MODEL, quiet=True, device="cpu")
    a = load_file(str(tmp_path / "big" / "checkpoint-1" / "model.safetensors"))
    b = load_file(str(tmp_path / "acc" / "checkpoint-1" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_continue_training_from_a_checkpoint(trained, corpus, tmp_path):
    out, first = trained
    m = train(TrainConfig(**dict(TINY_TRAIN, max_steps=3, eval_every=0, lr=1e-3, warmup_steps=0)),
              tmp_path / "more", str(corpus), init=str(out / "final"), quiet=True)
    assert m["steps"] == 3 and m["eval_loss"] < math.log(320) - 1.0  # it started from the trained weights
    with pytest.raises(ValueError, match="exactly one"):
        train(TrainConfig(**TINY_TRAIN), tmp_path / "x", str(corpus), model_dict=TINY_MODEL,
              init=str(out / "final"), quiet=True)


def test_max_minutes_holds_when_steps_slow_down(corpus, tmp_path, monkeypatch):
    """--max-minutes fits max_steps to the step time measured at steps 5-25; when the steps then get slower (s28:
    a 4.5-minute run was still going at 5:10 and was killed with nothing written), the run stops early and still
    evaluates, saves and writes final/ within the minutes. A fake clock: 0.1 s a step to step 25, 1 s after."""
    import moe.train as mt

    clock = {"t": 1000.0, "step": 0}
    real_loss = mt.lm_loss

    def slow_loss(*a, **k):
        clock["step"] += 1
        clock["t"] += 0.1 if clock["step"] <= 25 else 1.0
        return real_loss(*a, **k)
    monkeypatch.setattr(mt, "lm_loss", slow_loss)
    monkeypatch.setattr(mt, "time", type("FakeTime", (), {"time": staticmethod(lambda: clock["t"])}))
    cfg = TrainConfig(**dict(TINY_TRAIN, max_steps=400, eval_every=0, log_every=10, max_minutes=1.0))
    m = train(cfg, tmp_path / "run", str(corpus), model_dict=TINY_MODEL, quiet=True)
    assert m["stopped_early"] and 25 < m["steps"] < 400
    assert clock["t"] - 1000.0 <= 60.0  # everything after loading, on the fake clock
    assert (tmp_path / "run" / "final" / "config.json").exists() and m["eval_loss"] is not None
    # the steps the early fit planned (its 0.1 s a step) were cut: without the stop it would run to ~430 s
    assert m["config"]["max_steps"] == m["steps"]
