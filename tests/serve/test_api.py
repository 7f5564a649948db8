"""OpenAI request validation and response shapes (no server)."""
import json
import math

import pytest

from serve.api import (SSE_DONE, ApiError, ServeLimits, completion_response, parse_chat, parse_completion,
                       parse_json_body, sse, stream_chunk, usage_chunk)

SERVED = ["m"]
LIM = ServeLimits(max_tokens=100, max_body_bytes=1000, max_stop=2)


def _err(fn, *a) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*a)
    return e.value


def test_completion_defaults_and_normalisation():
    r = parse_completion({"prompt": ["hello"]}, SERVED, LIM)
    assert (r.kind, r.model, r.prompt, r.max_tokens, r.temperature, r.top_p, r.stop, r.stream) == \
        ("completion", "m", "hello", 16, 1.0, 1.0, [], False)
    assert r.request_id.startswith("cmpl-")
    r = parse_completion({"prompt": [1, 2, 3], "max_tokens": 5.0, "stop": "\n", "seed": 3, "model": "m",
                          "stream": True, "stream_options": {"include_usage": True}}, SERVED, LIM)
    assert (r.prompt, r.max_tokens, r.stop, r.seed, r.include_usage) == ([1, 2, 3], 5, ["\n"], 3, True)


def test_chat_parts_roles_and_default_max_tokens():
    r = parse_chat({"messages": [{"role": "developer", "content": "be brief"},
                                 {"role": "user", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]}, SERVED, LIM)
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert r.max_tokens is None and r.request_id.startswith("chatcmpl-")
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 7},
                      SERVED, LIM).max_tokens == 7


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "x", "max_tokens": 101}, "max_tokens", "<= 100"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "integer"),
    ({"prompt": "x", "max_tokens": False}, "max_tokens", "integer"),
    ({"prompt": "x", "temperature": math.nan}, "temperature", "finite"),
    ({"prompt": "x", "temperature": math.inf}, "temperature", "finite"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", "between 0.0 and 2.0"),
    ({"prompt": "x", "top_p": -0.1}, "top_p", "between"),
    ({"prompt": "x", "seed": -1}, "seed", ">= 0"),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop", "at most 2"),
    ({"prompt": "x", "stop": [""]}, "stop", "non-empty"),
    ({"prompt": "x", "stream": "yes"}, "stream", "boolean"),
    ({"prompt": "x", "stream_options": []}, "stream_options", "object"),
    ({"prompt": "x", "logprobs": 3}, "logprobs", "not supported"),
    ({"prompt": "x", "best_of": 2}, "best_of", "only 1"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": [1, -2]}, "prompt", "negative"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": [True]}, "prompt", "string or array"),
    ({"prompt": "x", "model": 3}, "model", "string"),
])
def test_completion_rejections_name_the_field(body, param, words):
    e = _err(parse_completion, body, SERVED, LIM)
    assert e.status == 400 and e.param == param and words in e.message, e.message
    assert e.to_dict()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_body_checks():
    e = _err(parse_completion, {"prompt": "x", "model": "other"}, SERVED, LIM)
    assert e.status == 404 and e.code == "model_not_found" and "'other'" in e.message
    assert _err(parse_json_body, b"x" * 1001, LIM).status == 413
    assert "not valid JSON" in _err(parse_json_body, b"{", LIM).message
    assert "JSON object" in _err(parse_json_body, b'"s"', LIM).message
    assert _err(parse_json_body, b"\xff\xfe", LIM).status == 400
    assert parse_json_body(b'{"a": 1}', LIM) == {"a": 1}


def test_chat_rejections():
    for body, param in [({"messages": []}, "messages"), ({"messages": ["hi"]}, "messages[0]"),
                        ({"messages": [{"role": "user"}]}, "messages[0].content"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                         "messages[0].content")]:
        assert _err(parse_chat, body, SERVED, LIM).param == param


def test_limits_are_checked():
    with pytest.raises(ValueError, match="max_tokens"):
        ServeLimits(max_tokens=0)
    with pytest.raises(ValueError, match="max_waiting"):
        ServeLimits(max_waiting=-1)
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServeLimits(max_body_bytes=True)


def test_response_and_chunk_shapes():
    c = parse_completion({"prompt": "x"}, SERVED, LIM)
    out = completion_response(c, "hi", "length", 3, 2)
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == "hi"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    ch = parse_chat({"messages": [{"role": "user", "content": "x"}]}, SERVED, LIM)
    out = completion_response(ch, "hi", "stop", 3, 1)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"] == {"role": "assistant",
                                                                                   "content": "hi"}
    first = stream_chunk(ch, None, None, role=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert stream_chunk(ch, "a", None)["choices"][0]["delta"] == {"content": "a"}
    assert stream_chunk(ch, "", "stop")["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop",
                                                          "logprobs": None}
    assert usage_chunk(c, 1, 2)["choices"] == []
    frame = sse({"a": 1})
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n") and json.loads(frame[6:]) == {"a": 1}
    assert SSE_DONE == b"data: [DONE]\n\n"
