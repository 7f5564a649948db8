"""The whole server over HTTP: Ray Serve on 127.0.0.1, the tiny model on CPU, the official openai client.

Serve starts once for the module (see ``server``); the replica-kill test runs last because it
restarts the model replica. Run inside a loopback-only network namespace:
``unshare -n sh -c 'ip link set lo up; .venv/bin/python -m pytest tests/serve -q'``.
"""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

API_KEY = "test-key-123"
MODEL = "moeflow-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    """The tiny model and tokenizer in this process, for in-process generation to compare with."""
    import moe
    from moe.tiny import ensure_tiny_model
    from serve.engine_deployment import moe_api

    _, Tokenizer, SamplingParams = moe_api()
    path = str(ensure_tiny_model())
    model, tok = moe.load_model(path), Tokenizer.from_dir(path)

    def generate(prompts, **params):
        from moe.generate import generate as gen
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # see serve/engine_deployment.py: 2 threads crawl on a loaded 2-core box
        try:
            return gen(model, tok, prompts, SamplingParams(**params))
        finally:
            torch.set_num_threads(threads)

    return {"tok": tok, "generate": generate}


@pytest.fixture(scope="module")
def server(ray_session):
    from ray import serve

    from serve.api import ServeLimits
    from serve.app import ServeConfig, build_app

    port = _free_port()
    cfg = ServeConfig(model="tiny", device="cpu", api_key=API_KEY, max_batch_size=8, max_len=256,
                      replica_cpus=0.1, ingress_cpus=0.1, health_check_period_s=1.0,
                      limits=ServeLimits(max_prompt_tokens=96, max_tokens=200, max_body_bytes=32 * 1024,
                                         max_concurrency=40, max_waiting=64))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(cfg), name="moeflow", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def _client(url):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def _post(url, path, body, key=API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, headers={**headers, "Content-Type": "application/json"},
                          timeout=60, **kw)
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


def _scrape(url) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(url + "/metrics", timeout=30).text
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples, name, **labels):
    """Sum of the samples of ``name`` whose labels include ``labels`` (e.g. over the replica label)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def test_health_models_and_auth(server):
    assert httpx.get(server + "/health", timeout=30).json() == {"status": "ok"}
    models = _client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    for key in (None, "wrong"):
        r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=key)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    r = httpx.get(server + "/v1/models", timeout=30)
    assert r.status_code == 401


def test_openai_client_completion_and_chat_equal_in_process_greedy(server, reference):
    client = _client(server)
    prompt = "def parse(text):"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == reference["generate"]([prompt], max_new_tokens=12)[0]
    assert out.usage.prompt_tokens == len(reference["tok"].encode(prompt))
    assert out.usage.completion_tokens <= 12 and out.choices[0].finish_reason in ("stop", "length")

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    expected = reference["generate"]([reference["tok"].apply_chat_template(messages)], max_new_tokens=10)[0]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected


def test_streaming_completion_and_chat(server, reference):
    client = _client(server)
    prompt = "class Reader:"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reference["generate"]([prompt], max_new_tokens=16, ignore_eos=True)[0]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16

    messages = [{"role": "user", "content": "hello"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    deltas = list(stream)
    assert deltas[0].choices[0].delta.role == "assistant"
    content = "".join(d.choices[0].delta.content or "" for d in deltas)
    assert content == reference["generate"]([reference["tok"].apply_chat_template(messages)], max_new_tokens=8)[0]

    # the raw stream is OpenAI's SSE framing and ends with [DONE]
    with httpx.stream("POST", server + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_per_request_seed_and_sampling_params(server, reference):
    client = _client(server)
    kw = dict(model=MODEL, prompt="import os", max_tokens=10, temperature=1.0, top_p=0.9, extra_body={"top_k": 50})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    assert a == reference["generate"](["import os"], max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50,
                                      seed=7)[0]
    assert client.completions.create(model=MODEL, prompt="import os", max_tokens=10, stop=["("], temperature=0) \
        .choices[0].text == reference["generate"](["import os"], max_new_tokens=10, stop=("(",))[0]


BAD_REQUESTS = [
    # (path, body, status, param, words in the message)
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ', 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens", "<= 200"),
    ("/v1/completions", '{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", "string"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n", "n=1"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "word " * 300}, 400, "prompt", "limit is 96 tokens"),
    ("/v1/completions", {"prompt": "x" * 40000}, 413, None, "limit is 32768 bytes"),
    ("/v1/completions", {"prompt": "a b c", "max_tokens": 200, "stream": True}, 200, None, ""),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "non-empty array"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "robot"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ("/v1/nothing", {"prompt": "x"}, 404, None, "Not Found"),
]


def test_bad_requests_get_4xx_with_message_and_server_keeps_serving(server, reference):
    for path, body, status, param, words in BAD_REQUESTS:
        r = _post(server, path, body)
        assert r.status_code == status, (path, body, r.status_code, r.text[:300])
        if status != 200:
            err = r.json()["error"]
            assert words in err["message"], (body, err)
            assert err["param"] == param, (body, err)
            assert err["type"] in ("invalid_request_error",)
    # prompt + max_tokens past the context: named, with both numbers
    prompt = "word"
    while len(reference["tok"].encode(prompt)) < 60:
        prompt += " word"
    r = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 200})
    assert r.status_code == 400 and "maximum context length is 256" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    ok = _client(server).completions.create(model=MODEL, prompt="def parse(text):", max_tokens=12, temperature=0)
    assert ok.choices[0].text == reference["generate"](["def parse(text):"], max_new_tokens=12)[0]


def test_32_concurrent_streaming_clients(server, reference):
    import openai

    prompts = [f"def f{i}(x, y={i}):" for i in range(32)]
    expected = reference["generate"](prompts, max_new_tokens=6, ignore_eos=True)

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        parts, reasons = [], []
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        return "".join(parts), reasons[-1]

    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    assert [t for t, _ in results] == expected
    assert all(reason == "length" for _, reason in results)


def test_concurrency_limit_gives_429_and_releases_every_slot(server):
    # the module's server admits 40 requests at once; 41 long streams arrive together (none can end before
    # the last arrives: the first 8 need 200 engine steps, the rest wait behind them), so one is refused
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def main():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            send = lambda: client.send(client.build_request("POST", server + "/v1/completions", json=body,  # noqa
                                                            headers=headers), stream=True)
            held = await asyncio.gather(*(send() for _ in range(41)))
            try:
                refused = [json.loads(await r.aread()) for r in held if r.status_code == 429]
                codes = [r.status_code for r in held]
            finally:
                for r in held:  # every client leaves: each request must be aborted and its slot released
                    await r.aclose()
            return codes, refused

    codes, refused = asyncio.run(main())
    assert sorted(codes) == [200] * 40 + [429], codes
    err = refused[0]["error"]
    assert err["type"] == "rate_limit_error" and "concurrency limit" in err["message"]
    deadline = time.time() + 60
    while True:
        after = _scrape(server)
        if _value(after, "moeflow_http_requests_in_flight") == 0 and \
                _value(after, "moeflow_requests_running") + _value(after, "moeflow_requests_waiting") == 0:
            break
        assert time.time() < deadline, "slots or engine rows were not released after the clients left"
        time.sleep(0.5)
    r = _post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_metrics_parse_move_and_cover_the_dashboard(server):
    from serve.metrics import series_names

    before = _scrape(server)
    assert _value(before, "moeflow_replica_up") == 1.0
    assert _value(before, "moeflow_parallel_strategy_info", strategy="single") == 1.0
    r = _post(server, "/v1/completions", {"prompt": "import sys", "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200
    _post(server, "/v1/completions", {"prompt": "x", "max_tokens": -1})
    after = _scrape(server)

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("moeflow_requests_total", endpoint="completions", outcome="length") == 1
    assert delta("moeflow_requests_total", endpoint="completions", outcome="invalid") == 1
    assert delta("moeflow_generation_tokens_total") == 5
    assert delta("moeflow_prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert delta("moeflow_time_to_first_token_seconds_count") == 1
    # one gap per streamed piece after the first; a lagging consumer may get several tokens in one piece
    assert 1 <= delta("moeflow_inter_token_latency_seconds_count") <= 4
    assert delta("moeflow_e2e_request_latency_seconds_count") == 1
    assert delta("moeflow_engine_steps_total") >= 5
    # the tiny model has 2 MoE layers, top-2 routing: every routed token adds 2 per layer
    for layer in ("0", "1"):
        moved = delta("moeflow_expert_load_tokens_total", layer=layer)
        assert moved > 0 and moved % 2 == 0
    assert _value(after, "moeflow_requests_running") == 0 and _value(after, "moeflow_requests_waiting") == 0

    exported = series_names()
    scraped = {name for name, _ in after}
    assert scraped <= exported, scraped - exported
    dash = json.load(open("serve/dashboards/moeflow.json"))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    for expr in exprs:
        names = re.findall(r"\bmoeflow_[a-z0-9_]+", expr)
        assert names and set(names) <= exported, expr


def test_client_disconnect_aborts_the_request(server):
    before = _scrape(server)
    with httpx.stream("POST", server + "/v1/completions",
                      json={"prompt": "while True:", "max_tokens": 200, "ignore_eos": True, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]  # a few chunks arrive, then the client goes away
    assert any(g.startswith("data: {") for g in got)
    deadline = time.time() + 30
    while time.time() < deadline:
        after = _scrape(server)
        if _value(after, "moeflow_requests_running") + _value(after, "moeflow_requests_waiting") == 0 and \
                _value(after, "moeflow_requests_total", endpoint="completions", outcome="abort") > \
                _value(before, "moeflow_requests_total", endpoint="completions", outcome="abort"):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the aborted request is still in the engine after 30 s")
    # the engine stopped well before the 200 steps the request would have needed
    steps = _value(after, "moeflow_engine_steps_total") - _value(before, "moeflow_engine_steps_total")
    assert steps < 200
    time.sleep(0.5)
    assert _value(_scrape(server), "moeflow_engine_steps_total") == _value(after, "moeflow_engine_steps_total")


def test_non_streaming_client_that_gives_up_aborts_the_request(server):
    before = _scrape(server)
    # 0.2 s: with 0.5 s the whole request (200 tokens of the tiny model) sometimes finished first on
    # the dev machine (session 16), so nothing timed out; the request reaches the engine in milliseconds
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 200, "ignore_eos": True},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=0.2)
    deadline = time.time() + 30
    while True:
        after = _scrape(server)
        if _value(after, "moeflow_requests_total", endpoint="completions", outcome="abort") > \
                _value(before, "moeflow_requests_total", endpoint="completions", outcome="abort") and \
                _value(after, "moeflow_requests_running") + _value(after, "moeflow_requests_waiting") == 0:
            break
        assert time.time() < deadline, "the abandoned request was not aborted"
        time.sleep(0.2)
    # the engine dropped it: far fewer steps than the 200 it would have needed
    assert _value(after, "moeflow_engine_steps_total") - _value(before, "moeflow_engine_steps_total") < 200


def test_killing_the_replica_mid_request_gives_a_clean_error_then_recovers(server, reference):
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "ModelReplica" in a["name"]]
    assert len(replicas) == 1, replicas
    actor = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
    lines = []
    with httpx.stream("POST", server + "/v1/completions",
                      json={"prompt": "for i in range(10):", "max_tokens": 200, "ignore_eos": True, "stream": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        it = r.iter_lines()
        lines.append(next(it))
        ray.kill(actor, no_restart=True)
        lines += [ln for ln in it if ln]
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][len("data: "):])["error"]
    assert err["code"] == "replica_failed" and "retry" in err["message"]

    expected = reference["generate"](["def parse(text):"], max_new_tokens=12)[0]
    deadline = time.time() + 120
    while True:
        r = _post(server, "/v1/completions", {"prompt": "def parse(text):", "max_tokens": 12, "temperature": 0})
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == expected
            break
        assert r.status_code == 503, r.text  # a clean "retry" while the new replica starts
        assert time.time() < deadline, "the service did not recover within 120 s"
        time.sleep(1)
    assert httpx.get(server + "/health", timeout=30).status_code == 200
