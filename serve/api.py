"""The OpenAI HTTP protocol: request validation, response and stream-chunk builders, errors.

No Ray and no model here: this module turns a request body into a checked ``GenerationRequest``
(or an ``ApiError`` whose JSON is the OpenAI error object) and turns engine output into the
OpenAI response objects. The ingress (``serve/app.py``) and the benchmark both use it.

Validation is written by hand rather than with pydantic models so that every rejection says,
in OpenAI's own error shape, which field was wrong, what it held, and what is allowed:
``{"error": {"message": ..., "type": "invalid_request_error", "param": "max_tokens", "code": ...}}``.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


class ApiError(Exception):
    """A request the server refuses; ``status`` is the HTTP status, the rest is OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_dict(cls, status: int, d: dict) -> "ApiError":
        e = d.get("error", d)
        return cls(status, e.get("message", ""), e.get("type", "server_error"), e.get("param"), e.get("code"))


@dataclass
class ServeLimits:
    """Limits the server enforces on every request; each breach is a 4xx with a message.

    max_prompt_tokens: longest prompt (after the chat template) in tokens.
    max_tokens: largest ``max_tokens`` a client may ask for (also the chat default cap).
    max_body_bytes: largest request body.
    max_concurrency: requests the ingress handles at once; beyond it, 429.
    max_waiting: requests a model replica queues beyond its running batch; beyond it, 429.
    max_stop: number of stop strings a request may carry.
    """
    max_prompt_tokens: int = 1536
    max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    max_concurrency: int = 256
    max_waiting: int = 128
    max_stop: int = 8

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_tokens", "max_body_bytes", "max_concurrency", "max_stop"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ServeLimits.{name} ({v!r}) must be a positive integer")
        if isinstance(self.max_waiting, bool) or not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ValueError(f"ServeLimits.max_waiting ({self.max_waiting!r}) must be an integer >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationRequest:
    """A checked request, the same for both endpoints; travels from the ingress to a replica.

    Exactly one of ``prompt`` (text or token ids) and ``messages`` (chat) is set; the replica, which
    holds the tokenizer, applies the chat template and checks the prompt length.
    """
    kind: str                                  # "completion" | "chat"
    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None              # None: as many as the limit and the context allow
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False                   # vLLM's extension: generate exactly max_tokens
    stream: bool = False
    include_usage: bool = False
    request_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


# ---- body and field parsing --------------------------------------------------------------------

def parse_json_body(raw: bytes, limits: ServeLimits) -> dict:
    if len(raw) > limits.max_body_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {limits.max_body_bytes} bytes",
                       code="body_too_large")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(v), type(v).__name__)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _int(body: dict, key: str, default, lo: int | None = None, hi: int | None = None, hint: str = ""):
    v = body.get(key)
    if v is None:
        return default
    # JSON true is a Python bool, which is an int subclass: refuse it explicitly
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise _bad(key, f"'{key}' must be an integer, got {_type_name(v)} {json.dumps(v)[:50]}")
    v = int(v)
    if lo is not None and v < lo:
        raise _bad(key, f"'{key}' is {v}; it must be >= {lo}{hint}")
    if hi is not None and v > hi:
        raise _bad(key, f"'{key}' is {v}; it must be <= {hi}{hint}")
    return v


def _float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(key, f"'{key}' must be a number, got {_type_name(v)} {json.dumps(v)[:50]}")
    v = float(v)
    if not math.isfinite(v):
        raise _bad(key, f"'{key}' must be a finite number, got {v}")
    if v < lo or v > hi:
        raise _bad(key, f"'{key}' is {v}; it must be between {lo} and {hi}")
    return v


def _top_p(body: dict) -> float:
    v = _float(body, "top_p", 1.0, 0.0, 1.0)
    if v == 0.0:
        raise _bad("top_p", "'top_p' is 0; it must be in (0, 1] (use 1 to switch nucleus sampling off)")
    return v


def _bool(body: dict, key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, f"'{key}' must be a boolean, got {_type_name(v)}")
    return v


def _stop(body: dict, limits: ServeLimits) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise _bad("stop", "'stop' must be a non-empty string or an array of non-empty strings")
    if len(v) > limits.max_stop:
        raise _bad("stop", f"'stop' has {len(v)} strings; at most {limits.max_stop} are allowed")
    return list(v)


def _reject_unsupported(body: dict) -> None:
    # features we do not implement are refused rather than silently ignored
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad("n", f"'n' is {json.dumps(n)}; only n=1 is supported (send several requests instead)")
    best_of = body.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or best_of != 1):
        raise _bad("best_of", f"'best_of' is {json.dumps(best_of)}; only 1 is supported")
    for key in ("logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        v = body.get(key)
        if v not in (None, False, 0, {}, []):
            raise _bad(key, f"'{key}' is not supported by this server; remove it from the request")


def _model(body: dict, served: list[str]) -> str:
    m = body.get("model")
    if m is None:
        return served[0]
    if not isinstance(m, str):
        raise _bad("model", f"'model' must be a string, got {_type_name(m)}")
    if m not in served:
        raise ApiError(404, f"the model '{m[:100]}' does not exist; this server serves {served}",
                       param="model", code="model_not_found")
    return m


def _common(kind: str, body: dict, served: list[str], limits: ServeLimits, default_max_tokens) -> dict:
    _reject_unsupported(body)
    key = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _bad("stream_options", f"'stream_options' must be an object, got {_type_name(stream_options)}")
    stream = _bool(body, "stream", False)
    return dict(
        model=_model(body, served),
        max_tokens=_int(body, key, default_max_tokens, lo=1, hi=limits.max_tokens,
                        hint=f" (the server's max_tokens limit is {limits.max_tokens})"),
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        top_k=_int(body, "top_k", 0, lo=-1, hi=1 << 20),
        seed=_int(body, "seed", None, lo=0, hi=(1 << 63) - 1),
        stop=_stop(body, limits),
        ignore_eos=_bool(body, "ignore_eos", False),
        stream=stream,
        include_usage=bool(stream and stream_options and _bool(stream_options, "include_usage", False)),
        request_id=("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex,
    )


def parse_completion(body: dict, served: list[str], limits: ServeLimits) -> GenerationRequest:
    """Check a ``/v1/completions`` body; raise ``ApiError`` naming the bad field."""
    if "prompt" not in body:
        raise _bad("prompt", "'prompt' is required (a string, or an array of token ids)")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one prompt: OpenAI clients send ["text"]
    if isinstance(p, str):
        if not p:
            raise _bad("prompt", "'prompt' is empty; send at least one character")
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if min(p) < 0:
            raise _bad("prompt", f"'prompt' holds a negative token id ({min(p)})")
    elif isinstance(p, list) and len(p) > 1:
        raise _bad("prompt", "batched prompts are not supported; send one prompt per request")
    else:
        raise _bad("prompt", f"'prompt' must be a non-empty string or array of token ids, got {_type_name(p)}")
    return GenerationRequest(kind="completion", prompt=p, **_common("completion", body, served, limits, 16))


_ROLES = ("system", "user", "assistant", "developer", "tool")


def parse_chat(body: dict, served: list[str], limits: ServeLimits) -> GenerationRequest:
    """Check a ``/v1/chat/completions`` body; message contents are flattened to plain text."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", f"'messages' must be a non-empty array, got {_type_name(msgs)}")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}].role is {json.dumps(role)}; use one of {list(_ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood by a text model
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"messages[{i}].content", f"messages[{i}].content has a part that is not "
                               "{'type': 'text', 'text': ...}; only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", f"messages[{i}].content must be a string, got {_type_name(content)}")
        clean.append({"role": "system" if role == "developer" else role, "content": content})
    return GenerationRequest(kind="chat", messages=clean, **_common("chat", body, served, limits, None))


# ---- responses ---------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(req: GenerationRequest, text: str, finish_reason: str | None,
                        prompt_tokens: int, completion_tokens: int) -> dict:
    base = {"id": req.request_id, "created": int(time.time()), "model": req.model,
            "usage": usage(prompt_tokens, completion_tokens)}
    if req.kind == "chat":
        return {**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason, "logprobs": None}]}
    return {**base, "object": "text_completion", "choices": [{
        "index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def stream_chunk(req: GenerationRequest, text: str | None, finish_reason: str | None,
                 role: bool = False) -> dict:
    """One streamed chunk; for chat, the first chunk carries the role and later ones the text."""
    base = {"id": req.request_id, "created": int(time.time()), "model": req.model}
    if req.kind == "chat":
        delta: dict = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        return {**base, "object": "chat.completion.chunk", "choices": [{
            "index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    return {**base, "object": "text_completion", "choices": [{
        "index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(req: GenerationRequest, prompt_tokens: int, completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": req.request_id, "created": int(time.time()), "model": req.model, "object": obj,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def models_response(served: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "moeflow"}
                                       for m in served]}
