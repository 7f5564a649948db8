"""The tokenizer of a model directory: ``tokenizer.json`` plus the special ids and chat template
that live beside it, and an incremental detokenizer for streaming.

Where things come from (a Hugging Face model directory):
- ``tokenizer.json``: the ``tokenizers`` pipeline (normaliser, pre-tokeniser, model, decoder).
- ``tokenizer_config.json``: ``bos_token`` / ``eos_token`` (a string or ``{"content": ...}``),
  ``chat_template`` (a string, or a list of named templates), ``add_bos_token``.
- ``chat_template.jinja``: newer transformers versions save the template here instead.
- ``generation_config.json`` and ``config.json``: ``eos_token_id`` (an int or a list) and
  ``bos_token_id``. The end-of-sequence ids of all three files are merged, in that order.

Byte-level BPE splits one character across several tokens, so decoding a prefix of the output
can end in half a character (U+FFFD). ``IncrementalDetokenizer`` holds text back until the
bytes complete a character and never emits a broken one.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

REPLACEMENT_CHAR = "\ufffd"


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable (the message names the file and the fix)."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); restore the file from the model's source") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(data).__name__}; "
                             "restore the file from the model's source")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Text <-> token ids for one model, with its special ids and chat template."""

    def __init__(self, backend, *, bos_token_id: int | None = None, eos_token_ids: Iterable[int] = (),
                 chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        self.backend = backend  # a tokenizers.Tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        self.bos_token = bos_token if bos_token is not None else self._id_text(bos_token_id)
        eos0 = self.eos_token_ids[0] if self.eos_token_ids else None
        self.eos_token = eos_token if eos_token is not None else self._id_text(eos0)

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"no tokenizer.json in {root}; moeflow needs the fast-tokenizer file "
                                 "(copy tokenizer.json from the model's Hugging Face repository, or save it "
                                 "with transformers' tokenizer.save_pretrained)")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises a plain Exception for any parse failure
            raise TokenizerError(f"{tj} could not be read as a tokenizers file ({e}); "
                                 "the file is corrupt or truncated: restore it from the model's source") from e
        tcfg = _read_json(root / "tokenizer_config.json")
        gcfg = _read_json(root / "generation_config.json")
        mcfg = _read_json(root / "config.json")

        bos_text = _token_text(tcfg.get("bos_token"))
        eos_text = _token_text(tcfg.get("eos_token"))
        eos_ids = _as_id_list(gcfg.get("eos_token_id")) + _as_id_list(mcfg.get("eos_token_id"))
        if eos_text is not None and backend.token_to_id(eos_text) is not None:
            eos_ids.append(backend.token_to_id(eos_text))
        bos_ids = (_as_id_list(gcfg.get("bos_token_id")) + _as_id_list(mcfg.get("bos_token_id"))
                   + ([backend.token_to_id(bos_text)] if bos_text and backend.token_to_id(bos_text) is not None
                      else []))
        vocab = backend.get_vocab_size(with_added_tokens=True)
        for i in eos_ids + bos_ids:
            if not 0 <= i < vocab:
                raise TokenizerError(f"special token id {i} in {root} is outside the vocabulary "
                                     f"(size {vocab}); fix eos_token_id / bos_token_id in the config files")

        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = root / "chat_template.jinja"
        if not template and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, bos_token_id=bos_ids[0] if bos_ids else None, eos_token_ids=eos_ids,
                   chat_template=template or None, bos_token=bos_text, eos_token=eos_text)

    def _id_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    # --- text <-> ids ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}; decode ids with tok.decode")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        # a chat template usually writes the BOS text itself; when the post-processor adds a BOS
        # too, the prompt would start with two of them, which models were never trained on
        bos = self.bos_token_id
        if add_special_tokens and bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos \
                and self.bos_token and text.startswith(self.bos_token):
            ids = ids[1:]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: Iterable[int] = ()) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, prompt_ids)

    # --- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render a conversation with the model's template (in a sandboxed Jinja environment)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (no chat_template in tokenizer_config.json "
                             "and no chat_template.jinja); pass a plain prompt instead of chat messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r}")
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise ValueError(f"the chat template refused the conversation: {message}")

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        # the same environment settings transformers uses, so templates render identically
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        except TemplateError as e:
            raise ValueError(f"the model's chat template failed to render ({e}); "
                             "check chat_template in tokenizer_config.json") from e


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decoding is done over a short window: ``ids[prefix:]`` is decoded and compared with the
    decoding of ``ids[prefix:read]`` (the tokens whose text was already emitted), so decoders
    that depend on neighbouring tokens (SentencePiece's leading space) see the context they need.
    A delta is held back while the window's text ends in U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        # a few prompt tokens give the decoder its left context; their text is never emitted
        self.ids: list[int] = list(prompt_ids)[-4:]
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is unfinished)."""
        self.ids.append(int(token_id))
        dec = self.tokenizer.decode
        prefix_text = dec(self.ids[self.prefix:self.read])
        new_text = dec(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Text still held back at the end of the sequence (an unfinished character decodes as U+FFFD)."""
        dec = self.tokenizer.decode
        prefix_text = dec(self.ids[self.prefix:self.read])
        new_text = dec(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]


__all__ = ["Tokenizer", "TokenizerError", "IncrementalDetokenizer"]
