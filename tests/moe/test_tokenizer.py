"""Tokenizer: round trips, special ids from the config files, chat templates, incremental decoding."""
import json
import shutil

import pytest

from moe.tiny import ensure_tiny_model
from moe.tokenizer import REPLACEMENT_CHAR, Tokenizer, TokenizerError

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld", "数据 and 🙂🚀 emoji", "  spaces\tand\ttabs  ", "a"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return ensure_tiny_model(cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer.from_dir(tiny_dir)


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id  # the post-processor adds BOS
    assert tok.decode(ids) == text  # BOS is special: skipped when decoding
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_ids_come_from_the_config_files(tok, tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert tok.eos_token_ids == [cfg["eos_token_id"]]
    assert tok.bos_token_id == cfg["bos_token_id"]
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"


def test_eos_list_is_merged_from_all_files(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 1]}))
    tok = Tokenizer.from_dir(d)
    eos = json.loads((d / "config.json").read_text())["eos_token_id"]
    assert tok.eos_token_ids == list(dict.fromkeys([7, 1, eos]))


def test_incremental_decoding_never_emits_broken_characters(tok):
    text = "naïve café — 数据库 🙂🚀 done"
    prompt = tok.encode("prefix ")
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode("utf-8")) // 4  # multi-byte characters span several tokens
    det = tok.detokenizer(prompt)
    deltas = [det.push(i) for i in ids]
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "" in deltas  # some tokens end mid-character and were held back
    assert "".join(deltas) + det.flush() == text


def test_incremental_decoding_of_arbitrary_ids_equals_full_decode(tok):
    import random
    rng = random.Random(0)
    for _ in range(5):
        ids = [rng.randrange(tok.vocab_size) for _ in range(40)]
        det = tok.detokenizer()
        out = "".join(det.push(i) for i in ids) + det.flush()
        assert out == tok.decode(ids)


def test_chat_template_renders_with_generation_prompt(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<s><|system|>\nbe brief</s>\n<|user|>\nhi</s>\n<|assistant|>\n"
    assert not tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|assistant|>\n")
    ids = tok.encode(text)
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS and the post-processor's are not doubled


def test_chat_template_from_list_and_jinja_file(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "D{{ messages[0]['content'] }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text("J{{ messages|length }}")
    assert Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"


def test_chat_template_is_sandboxed(tok):
    evil = Tokenizer(tok.backend, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="chat template"):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    raising = Tokenizer(tok.backend, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="only user turns"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(tok.backend).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_json(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="no tokenizer.json in .*m; .*copy tokenizer.json"):
        Tokenizer.from_dir(d)


def test_corrupt_tokenizer_json(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    raw = (d / "tokenizer.json").read_bytes()
    (d / "tokenizer.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TokenizerError, match="tokenizer.json could not be read.*corrupt or truncated"):
        Tokenizer.from_dir(d)


def test_corrupt_tokenizer_config(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(d)


def test_special_id_outside_vocabulary(tiny_dir, tmp_path):
    d = copy_dir(tiny_dir, tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 10 ** 6}))
    with pytest.raises(TokenizerError, match="1000000 .*outside the vocabulary"):
        Tokenizer.from_dir(d)


def test_tiny_model_is_deterministic(tmp_path):
    a = ensure_tiny_model(cache_dir=tmp_path / "a")
    b = ensure_tiny_model(cache_dir=tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert ensure_tiny_model(cache_dir=tmp_path / "a") == a  # built once, then reused
