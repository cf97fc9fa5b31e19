#!/usr/bin/env python3
"""`wgpt serve` driven by the official `openai` Python client (and raw HTTP where the client
cannot send what is tested). Run by tests/serve.rs:

    python3 tests/serve_openai.py BASE_URL API_KEY MODEL_NAME

against a server started with `--api-key API_KEY --served-model-name MODEL_NAME --max-batch 8`
on the small model tests/serve.rs writes (context 128). Prints `ok: <test>` per test and
`all passed` at the end; any failure is an exception (non-zero exit)."""

import http.client
import json
import socket
import sys
import threading
import time
import urllib.parse

import openai
from openai import OpenAI

BASE, KEY, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
HOST, PORT = urllib.parse.urlparse(BASE).hostname, urllib.parse.urlparse(BASE).port
client = OpenAI(base_url=BASE + "/v1", api_key=KEY, max_retries=0, timeout=60)

PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "1 2 3", "Paris is", "GPT-2 is a", "x y z", "A"]


def complete(prompt, max_tokens=16, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, **kw)


def greedy(prompt, max_tokens=16, **kw):
    return complete(prompt, max_tokens, temperature=0, **kw)


def extra(obj, name):
    """A field beyond OpenAI's schema (vLLM's token_ids, ...), kept by the client's models."""
    v = getattr(obj, name, None)
    if v is None and getattr(obj, "model_extra", None):
        v = obj.model_extra.get(name)
    return v


def raw(method, path, body=None, headers=None, auth=True, version11=True):
    """One request on a fresh connection: (status, headers, body bytes)."""
    conn = http.client.HTTPConnection(HOST, PORT, timeout=30)
    h = {"Content-Type": "application/json"}
    if auth:
        h["Authorization"] = "Bearer " + KEY
    h.update(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, data


def check_error_body(body, param="any", code="any", kind="invalid_request_error"):
    assert isinstance(body, dict) and set(body) == {"error"}, body
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    assert isinstance(e["message"], str) and e["message"], e
    assert e["type"] == kind, e
    if param != "any":
        assert e["param"] == param, (param, e)
    if code != "any":
        assert e["code"] == code, (code, e)
    return e


def expect_error(exc, status, fn, param="any", code="any", kind="invalid_request_error"):
    try:
        fn()
    except exc as e:
        assert e.status_code == status, (e.status_code, status, e)
        return check_error_body(e.response.json(), param, code, kind)
    raise AssertionError(f"expected {exc.__name__} ({status})")


def metric(name):
    status, _, data = raw("GET", "/metrics", auth=False)
    assert status == 200
    for line in data.decode().splitlines():
        if line.startswith(name + " "):
            return int(line.split()[1])
    raise AssertionError(f"no {name} in /metrics:\n{data.decode()}")


TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


@test
def models_and_health():
    status, _, body = raw("GET", "/health", auth=False)
    assert status == 200, status
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL], models
    assert models.data[0].object == "model" and extra(models.data[0], "max_model_len") == 128
    assert client.models.retrieve(MODEL).id == MODEL
    expect_error(openai.NotFoundError, 404, lambda: client.models.retrieve("no-such-model"), code="model_not_found")
    assert metric("wgpt_slots") == 8


@test
def a_completion():
    r = greedy("Hello world", 16)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL, r
    assert len(r.choices) == 1 and r.choices[0].index == 0 and isinstance(r.choices[0].text, str)
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop"), c
    assert r.usage.prompt_tokens == 2, r.usage  # "Hello", " world"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 16, r.usage
    assert c.text and c.logprobs is None
    # greedy is deterministic; the default max_tokens is 16
    assert greedy("Hello world", 16).choices[0].text == c.text
    d = client.completions.create(model=MODEL, prompt="Hello world", temperature=0)
    assert d.choices[0].text == c.text and d.usage.completion_tokens == r.usage.completion_tokens
    # no model field at all is the served model (vLLM)
    status, _, body = raw("POST", "/v1/completions", {"prompt": "Hello world", "max_tokens": 16, "temperature": 0})
    assert status == 200 and json.loads(body)["choices"][0]["text"] == c.text, body


@test
def streamed_equals_whole():
    for prompt in ["Once upon a time", "1 2 3"]:
        whole = greedy(prompt, 24)
        chunks = list(greedy(prompt, 24, stream=True, stream_options={"include_usage": True}))
        assert all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks)
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == whole.choices[0].text, (text, whole.choices[0].text)
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        assert finals == [whole.choices[0].finish_reason], finals
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage, chunks[-1]
        assert all(ch.usage is None for ch in chunks[:-1])
        plain = list(greedy(prompt, 24, stream=True))
        assert "".join(ch.choices[0].text for ch in plain) == text
        assert all(ch.usage is None for ch in plain)


@test
def seeds_reproduce():
    a = complete("Hello world", 12, temperature=1, seed=42).choices[0].text
    assert complete("Hello world", 12, temperature=1, seed=42).choices[0].text == a
    others = [complete("Hello world", 12, temperature=1, seed=s).choices[0].text for s in (1, 2, 3, 4)]
    assert any(o != a for o in others), (a, others)
    # no seed: a random one each time
    unseeded = {complete("Hello world", 12, temperature=1).choices[0].text for _ in range(4)}
    assert len(unseeded) > 1, unseeded
    # top_k (vLLM's extension) 1 is greedy whatever the temperature
    assert complete("Hello world", 12, temperature=1, seed=5, extra_body={"top_k": 1}).choices[0].text == greedy("Hello world", 12).choices[0].text
    # a small top_p still samples reproducibly
    t = complete("Paris is", 12, temperature=1, top_p=0.5, seed=9).choices[0].text
    assert complete("Paris is", 12, temperature=1, top_p=0.5, seed=9).choices[0].text == t


@test
def concurrent_requests_equal_their_solo_results():
    solo = [greedy(p, 40).choices[0].text for p in PROMPTS]
    got = [None] * len(PROMPTS)
    errors = []
    start = threading.Barrier(len(PROMPTS))

    def one(i):
        try:
            start.wait()
            got[i] = greedy(PROMPTS[i], 40).choices[0].text
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert got == solo, list(zip(got, solo))
    # they were decoded together (continuous batching), not one after another
    assert metric("wgpt_requests_running_max") >= 2


@test
def bad_inputs_are_openai_errors():
    bad = openai.BadRequestError
    cases = [
        (dict(max_tokens="ten"), "max_tokens", "invalid_type"),
        (dict(max_tokens=0), "max_tokens", "invalid_value"),
        (dict(max_tokens=500), "max_tokens", "context_length_exceeded"),
        (dict(prompt=[1] * 200), "prompt", "context_length_exceeded"),
        (dict(prompt="hello " * 200), "prompt", "context_length_exceeded"),
        (dict(prompt=[50300]), "prompt", "invalid_value"),
        (dict(prompt=[]), "prompt", "invalid_value"),
        (dict(prompt=["a", 1]), "prompt", "invalid_type"),
        (dict(temperature=-1), "temperature", "invalid_value"),
        (dict(temperature="hot"), "temperature", "invalid_type"),
        (dict(top_p=0), "top_p", "invalid_value"),
        (dict(top_p=1.5), "top_p", "invalid_value"),
        (dict(n=0), "n", "invalid_value"),
        (dict(n=1000), "n", "invalid_value"),
        (dict(best_of=3), "best_of", "unsupported_value"),
        (dict(presence_penalty=0.5), "presence_penalty", "unsupported_value"),
        (dict(frequency_penalty=1), "frequency_penalty", "unsupported_value"),
        (dict(suffix="end"), "suffix", "unsupported_value"),
        (dict(logit_bias={"50256": -100}), "logit_bias", "unsupported_value"),
        (dict(logprobs=50), "logprobs", "invalid_value"),
        (dict(logprobs=1, echo=True), "echo", "unsupported_value"),
        (dict(stop=5), "stop", "invalid_type"),
        (dict(stream="yes"), "stream", "invalid_type"),
        (dict(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
        (dict(extra_body={"top_k": -5}), "top_k", "invalid_value"),
        (dict(extra_body={"frobnicate": 1}), "frobnicate", "unknown_parameter"),
    ]
    for kw, param, code in cases:
        args = dict(model=MODEL, prompt="Hello", max_tokens=4)
        args.update(kw)
        expect_error(bad, 400, lambda: client.completions.create(**args), param=param, code=code)
    # accepted at their defaults
    ok = complete("Hello", 4, temperature=0, presence_penalty=0, frequency_penalty=0, best_of=1, user="u", suffix=None)
    assert len(ok.choices) == 1
    # unknown model: 404
    expect_error(openai.NotFoundError, 404, lambda: client.completions.create(model="gpt-4", prompt="x"), param="model", code="model_not_found")
    # chat: GPT-2 has no chat template
    e = expect_error(bad, 400, lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]), code="chat_template_missing")
    assert "chat template" in e["message"], e
    # a wrong API key, and none at all: 401
    wrong = OpenAI(base_url=BASE + "/v1", api_key="wrong-key", max_retries=0, timeout=30)
    expect_error(openai.AuthenticationError, 401, lambda: wrong.completions.create(model=MODEL, prompt="x"), code="invalid_api_key", kind="authentication_error")
    expect_error(openai.AuthenticationError, 401, lambda: wrong.models.list(), kind="authentication_error")
    for path, method in [("/v1/completions", "POST"), ("/v1/models", "GET")]:
        status, _, body = raw(method, path, {"prompt": "x"}, auth=False)
        assert status == 401, (path, status)
        check_error_body(json.loads(body), code="invalid_api_key", kind="authentication_error")
    # malformed JSON, a body that is not an object
    for body in ['{"prompt": "x", ', "[1, 2]", "not json", ""]:
        status, _, data = raw("POST", "/v1/completions", body)
        assert status == 400, (body, status)
        check_error_body(json.loads(data), param=None, code="invalid_json")
    # an oversized body: 413
    status, _, data = raw("POST", "/v1/completions", json.dumps({"prompt": "x" * (2 << 20)}))
    assert status == 413, status
    check_error_body(json.loads(data), code="request_too_large")
    # wrong method: 405 with Allow; unknown paths: 404
    for method, path, allow in [("GET", "/v1/completions", "POST"), ("DELETE", "/v1/models", "GET"), ("POST", "/health", "GET")]:
        status, headers, data = raw(method, path)
        assert status == 405 and headers.get("allow") == allow, (method, path, status, headers)
        check_error_body(json.loads(data), code="method_not_allowed")
    for path in ["/v1/nothing", "/nothing", "/"]:
        status, _, data = raw("GET", path)
        assert status == 404, (path, status)
        check_error_body(json.loads(data), code="not_found")
    # and the server goes on serving
    assert greedy("Hello world", 16).choices[0].text == greedy("Hello world", 16).choices[0].text


def stream_request(prompt, max_tokens, version="HTTP/1.1", **fields):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body.update(fields)
    body = json.dumps(body).encode()
    head = (
        f"POST /v1/completions {version}\r\nHost: {HOST}:{PORT}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    s = socket.create_connection((HOST, PORT), timeout=30)
    s.sendall(head.encode() + body)
    return s


@test
def a_client_that_disconnects_frees_its_slot():
    before = greedy("The quick brown fox", 16).choices[0].text
    cancelled = metric("wgpt_requests_cancelled_total")
    for p in PROMPTS[:4]:
        # 120 tokens (ignore_eos: no early end); closed after the first event
        s = stream_request(p, 120, ignore_eos=True)
        got = b""
        while b"data: " not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200"), got
        s.close()
    # the server's next writes fail: it gives the sequences up and the engine frees their slots
    deadline = time.time() + 20
    while metric("wgpt_requests_cancelled_total") < cancelled + 4 or metric("wgpt_requests_running") != 0:
        assert time.time() < deadline, "the disconnected streams were not cancelled, or their slots not freed"
        time.sleep(0.02)
    assert metric("wgpt_requests_cancelled_total") == cancelled + 4
    assert greedy("The quick brown fox", 16).choices[0].text == before


@test
def a_client_that_gives_up_on_a_whole_completion_frees_its_slots():
    cancelled = metric("wgpt_requests_cancelled_total")
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 120, "n": 8, "ignore_eos": True, "temperature": 1})
    s = socket.create_connection((HOST, PORT), timeout=30)
    s.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    deadline = time.time() + 20
    while metric("wgpt_requests_running") == 0:  # started
        assert time.time() < deadline
        time.sleep(0.005)
    s.close()
    while metric("wgpt_requests_cancelled_total") < cancelled + 8 or metric("wgpt_requests_running") != 0:
        assert time.time() < deadline, "the abandoned request's sequences were not cancelled"
        time.sleep(0.02)


@test
def http10_stream_ends_with_the_connection():
    s = stream_request("Hello world", 6, version="HTTP/1.0")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    # hyper answers an HTTP/1.0 request as HTTP/1.0, header names in lower case (both are
    # case-insensitive and either version is valid here): compare without case
    status, head = head.split(b"\r\n", 1)[0], head.lower()
    assert status.startswith(b"HTTP/1.") and b" 200 " in status, status
    assert b"content-type: text/event-stream" in head and b"connection: close" in head, head
    assert b"chunked" not in head, head  # HTTP/1.0 has no chunked framing: the body ends with the connection
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events
    text = "".join(json.loads(e[len("data: "):])["choices"][0]["text"] for e in events[:-1])
    assert text == greedy("Hello world", 6).choices[0].text


@test
def return_token_ids():
    r = greedy("Hello world", 8, extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert extra(c, "prompt_token_ids") == [15496, 995], c
    ids = extra(c, "token_ids")
    assert isinstance(ids, list) and len(ids) == r.usage.completion_tokens, (ids, r.usage)
    chunks = list(greedy("Hello world", 8, stream=True, extra_body={"return_token_ids": True}))
    assert extra(chunks[0].choices[0], "prompt_token_ids") == [15496, 995]
    assert [i for ch in chunks for i in extra(ch.choices[0], "token_ids")] == ids
    assert "".join(ch.choices[0].text for ch in chunks) == c.text


@test
def token_id_prompts():
    ids = [15496, 995]  # "Hello world"
    r = greedy(ids, 12, extra_body={"return_token_ids": True})
    assert r.choices[0].text == greedy("Hello world", 12).choices[0].text
    gen = extra(r.choices[0], "token_ids")
    # the same sequence, its first 4 new tokens now in the prompt (prefilled, not decoded)
    r2 = greedy(ids + gen[:4], 8, extra_body={"return_token_ids": True})
    assert extra(r2.choices[0], "token_ids") == gen[4:12], (gen, extra(r2.choices[0], "token_ids"))
    # a list of token-id lists: one choice each
    r3 = greedy([ids, [464, 2068, 7586, 21831]], 12)  # "The quick brown fox"
    assert [c.index for c in r3.choices] == [0, 1]
    assert r3.choices[0].text == r.choices[0].text
    assert r3.choices[1].text == greedy("The quick brown fox", 12).choices[0].text
    assert r3.usage.prompt_tokens == 6


@test
def logprobs():
    r = greedy("Once upon a time", 10, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    k = len(lp.tokens)
    assert k == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0, lp
    if c.finish_reason == "length":
        assert k == 10
    for tok, l, top, off in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert l <= 0 and 3 <= len(top) <= 4 and tok in top, (tok, l, top)
        assert abs(max(top.values()) - l) < 1e-6, (l, top)  # greedy: the most likely token
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    if "\ufffd" not in c.text:
        assert "".join(lp.tokens) == c.text
    # streamed: the same tokens, log-probabilities and offsets, a chunk at a time
    chunks = [ch.choices[0] for ch in greedy("Once upon a time", 10, logprobs=3, stream=True)]
    got = [x for ch in chunks if ch.logprobs for x in zip(ch.logprobs.tokens, ch.logprobs.token_logprobs, ch.logprobs.text_offset)]
    assert got == list(zip(lp.tokens, lp.token_logprobs, lp.text_offset)), got
    # logprobs=0: the sampled token's only
    z = greedy("Once upon a time", 4, logprobs=0).choices[0].logprobs
    assert all(len(t) == 1 for t in z.top_logprobs), z


@test
def echo():
    plain = greedy("Once upon a time", 8).choices[0].text
    assert greedy("Once upon a time", 8, echo=True).choices[0].text == "Once upon a time" + plain
    streamed = "".join(ch.choices[0].text for ch in greedy("Once upon a time", 8, echo=True, stream=True))
    assert streamed == "Once upon a time" + plain
    assert greedy([15496, 995], 4, echo=True).choices[0].text.startswith("Hello world")


@test
def n_and_lists_of_prompts():
    one = lambda p, seed: complete(p, 10, temperature=1, seed=seed).choices[0].text  # noqa: E731
    r = complete("Paris is", 10, n=2, temperature=1, seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [one("Paris is", 7), one("Paris is", 8)]  # seeds seed + i
    assert r.usage.prompt_tokens == 2
    r = complete(["Paris is", "Once upon a time"], 10, n=2, temperature=1, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [one("Paris is", 7), one("Paris is", 8), one("Once upon a time", 7), one("Once upon a time", 8)]
    assert r.usage.prompt_tokens == 2 + 4 and r.usage.completion_tokens == sum(
        complete(p, 10, temperature=1, seed=s).usage.completion_tokens for p in ["Paris is", "Once upon a time"] for s in (7, 8))
    # streamed: chunks of the four choices interleave; each one's text is the same
    texts = {}
    finished = set()
    for ch in complete(["Paris is", "Once upon a time"], 10, n=2, temperature=1, seed=7, stream=True):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finished.add(c.index)
    assert [texts[i] for i in range(4)] == [c.text for c in r.choices] and finished == {0, 1, 2, 3}
    # greedy, a list of prompts: each as alone
    g = greedy(PROMPTS[:3], 12)
    assert [c.text for c in g.choices] == [greedy(p, 12).choices[0].text for p in PROMPTS[:3]]


@test
def stop_strings():
    base = greedy("Paris is", 30).choices[0].text
    assert len(base) >= 8, base
    stop = base[4:8]
    want = base[: base.find(stop)]
    r = greedy("Paris is", 30, stop=[stop, "never-in-the-text"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop", (base, stop, r.choices[0])
    assert "".join(ch.choices[0].text for ch in greedy("Paris is", 30, stop=stop, stream=True)) == want


for t in TESTS:
    t0 = time.time()
    t()
    print(f"ok: {t.__name__} ({time.time() - t0:.2f} s)", flush=True)
print("all passed")
