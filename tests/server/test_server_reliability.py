"""Issue #22 at the edge, against a live tiny server with an API key: every bad request is a clear 400/413
(and the next good request still succeeds), no 5xx, safe defaults (auth on every route but /health, /version
and HEAD /; no CORS unless asked), log lines that cannot be forged, and a quiet client hang-up before the
body. The schema fuzz run is in test_server_fuzz.py."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

KEY = "rel-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_REQUEST_BYTES = 1 << 20
MAX_MODEL_LEN = 512
FORGED = "\r\n12:00:00 WARNING [server] glint.server: FORGED LINE \x1b[31mred\x1b[0m \x9b2J"


@pytest.fixture(scope="module")
def server(launch_server):
    srv = launch_server(
        "--api-key",
        KEY,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--stats-interval",
        "0",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def post_raw(http: httpx.Client, url: str, body: object | bytes) -> httpx.Response:
    """POST JSON written by json.dumps (ASCII escapes, so lone surrogates travel as \\udXXX)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(url, content=data, headers={"Content-Type": "application/json"})


def good_request_succeeds(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def assert_error(r: httpx.Response, status: int, param: str | None, anthropic: bool = False) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    if anthropic:
        assert body["type"] == "error" and body["error"]["message"], body
        return body["error"]
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error"), err
    if param is not None:
        assert err["param"] == param, err
    return err


def chat(content: object = "hi", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_args_history(depth: int) -> dict:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"a": ' + nested(depth) + "}"},
    }
    return {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        "max_tokens": 2,
    }


S = "\ud800"  # a lone surrogate: not text, and not encodable as UTF-8
BAD_CASES = [
    # (id, route, body, status, param); each is followed by a good request that must succeed
    ("seed-2^64", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": 2**64}, 400, "seed"),
    ("seed-below-2^63", "/v1/chat/completions", chat(seed=-(2**63) - 1), 400, "seed"),
    ("seed-huge-n2", "/v1/chat/completions", chat(seed=10**30, n=2), 400, "seed"),
    (
        "seed-messages",
        "/v1/messages",
        {"max_tokens": 4, "seed": 2**64, "messages": [{"role": "user", "content": "hi"}]},
        400,
        None,
    ),
    ("seed-float", "/v1/completions", {"prompt": "hi", "max_tokens": 4, "seed": 1.5}, 400, "seed"),
    ("surrogate-content", "/v1/chat/completions", chat(S), 400, "messages[0].content"),
    (
        "surrogate-content-stream",
        "/v1/chat/completions",
        chat(f"a{S}b", stream=True),
        400,
        "messages[0].content",
    ),
    ("surrogate-prompt", "/v1/completions", {"prompt": S, "max_tokens": 2}, 400, "prompt"),
    ("surrogate-prompt-list", "/v1/completions", {"prompt": ["ok", S], "max_tokens": 2}, 400, "prompt[1]"),
    ("surrogate-model", "/v1/chat/completions", chat(model=f"glm{S}", stream=True), 400, "model"),
    ("surrogate-key", "/v1/chat/completions", {**chat(), "metadata": {S: 1}}, 400, "metadata"),
    (
        "surrogate-anthropic",
        "/v1/messages",
        {"max_tokens": 2, "messages": [{"role": "user", "content": S}]},
        400,
        None,
    ),
    ("deep-body", "/v1/completions", b'{"prompt": ' + nested(100_000).encode() + b"}", 400, None),
    (
        "deep-body-65",
        "/v1/chat/completions",
        b'{"messages": [], "x": ' + nested(65).encode() + b"}",
        400,
        None,
    ),
    (
        "deep-tool-args",
        "/v1/chat/completions",
        deep_args_history(100_000),
        400,
        "messages[1].tool_calls[0].function.arguments",
    ),
    ("deep-tool-args-70", "/v1/chat/completions", deep_args_history(70), 400, None),
    (
        "surrogate-tool-args",
        "/v1/chat/completions",
        {
            **deep_args_history(1),
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": "\\ud800"}'},
                        }
                    ],
                },
            ],
        },
        400,
        "messages[1].tool_calls[0].function.arguments.a",
    ),
    (
        "nan-literal",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        None,
    ),
    (
        "logit-bias-infinity",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": Infinity}}',
        400,
        None,
    ),
    (
        "logit-bias-1e999",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1e999}}',
        400,
        "logit_bias.5",
    ),
    ("logit-bias-101", "/v1/chat/completions", chat(logit_bias={"5": 101}), 400, "logit_bias.5"),
    (
        "logit-bias--100.5",
        "/v1/completions",
        {"prompt": "x", "max_tokens": 2, "logit_bias": {"5": -100.5}},
        400,
        "logit_bias.5",
    ),
    ("logit-bias-key", "/v1/chat/completions", chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    (
        "temperature-1e999",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e999}',
        400,
        "temperature",
    ),
    (
        "tool-params-string",
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
        400,
        "tools[0].function.parameters.type",
    ),
    (
        "tool-params-not-object",
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "abc"}}]),
        400,
        "tools[0].function.parameters",
    ),
    (
        "tool-properties-list",
        "/v1/chat/completions",
        chat(
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": ["a"]}},
                }
            ]
        ),
        400,
        "tools[0].function.parameters.properties",
    ),
    (
        "tool-property-type",
        "/v1/chat/completions",
        chat(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"type": "str"}}},
                    },
                }
            ]
        ),
        400,
        "tools[0].function.parameters.properties.a.type",
    ),
    (
        "tool-anyof-int",
        "/v1/chat/completions",
        chat(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"anyOf": 5}}},
                    },
                }
            ]
        ),
        400,
        "tools[0].function.parameters.properties.a.anyOf",
    ),
    (
        "anthropic-input-schema",
        "/v1/messages",
        {
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "f", "input_schema": {"type": "array"}}],
        },
        400,
        None,
    ),
    ("prompt-list-1025", "/v1/completions", {"prompt": ["a"] * 1025, "max_tokens": 1}, 400, "prompt"),
]


@pytest.mark.parametrize("route,body,status,param", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_input_is_a_clear_4xx_then_the_server_still_serves(http, route, body, status, param):
    r = post_raw(http, route, body)
    assert_error(r, status, param, anthropic=route.startswith("/v1/messages"))
    assert "Traceback" not in r.text
    good_request_succeeds(http)


@pytest.mark.parametrize(
    "body",
    [
        chat(seed=2**64 - 1),
        chat(seed=-(2**63)),
        {"prompt": "hi", "max_tokens": 2, "seed": 0, "logit_bias": {"5": 100, "6": -100}},
        chat(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                            "required": ["a"],
                        },
                    },
                }
            ]
        ),
        chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        deep_args_history(40),
        {"prompt": ["a"] * 8, "max_tokens": 1},
    ],
    ids=[
        "seed-2^64-1",
        "seed--2^63",
        "logit-bias-100",
        "tool-anyof",
        "tool-no-params",
        "tool-args-40-deep",
        "prompt-list-8",
    ],
)
def test_valid_extremes_are_accepted(http, body):
    route = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = post_raw(http, route, body)
    assert r.status_code == 200, r.text
    good_request_succeeds(http)


def test_request_too_large_is_413(http, server):
    body = {"prompt": "a " * MAX_REQUEST_BYTES, "max_tokens": 1}
    r = post_raw(http, "/v1/completions", body)
    err = assert_error(r, 413, None)
    assert err["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit applies while the body streams in
        piece = b'{"prompt": "' + b"a" * 4096
        yield piece
        for _ in range(MAX_REQUEST_BYTES // 4096 + 2):
            yield b"a" * 4096
        yield b'", "max_tokens": 1}'

    r = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, None)
    r = http.post(
        "/v1/messages",
        content=json.dumps(
            {"max_tokens": 1, "messages": [{"role": "user", "content": "a" * MAX_REQUEST_BYTES}]}
        ),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    good_request_succeeds(http)


def test_client_gone_before_its_body_is_quiet(http, server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nX-Request-Id: early-hangup\r\n"
            b'Content-Length: 100000\r\n\r\n{"messages": ['
        )
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "early-hangup" not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(ln for ln in server.log_text().splitlines() if "request_id=early-hangup" in ln)
    assert '"POST /v1/chat/completions" 499 ' in line and "disconnected=true" in line, line
    good_request_succeeds(http)


def test_api_key_guards_every_route_but_health_version_and_head_root(server):
    with httpx.Client(base_url=server.url, timeout=60) as anon:
        assert anon.get("/health").status_code == 200
        assert anon.get("/version").status_code == 200
        assert anon.head("/").status_code == 200
        for path in ("/", "/metrics", "/health_generate", "/openapi.json", "/server_info", "/v1/models"):
            r = anon.get(path)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert anon.options("/v1/chat/completions").status_code == 401  # no CORS: no preflight exemption
        for path in ("/", "/metrics", "/health_generate", "/openapi.json", "/server_info", "/v1/models"):
            assert anon.get(path, headers=AUTH).status_code == 200, path
        schema = anon.get("/openapi.json", headers=AUTH).json()
        body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
        assert "messages" in body["content"]["application/json"]["schema"]["required"]


def test_no_cors_headers_by_default(http):
    preflight = http.options(
        "/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    r = http.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_log_lines_escape_control_characters(http, server):
    r = http.post(
        "/v1/chat/completions", json=chat(model=f"glm{FORGED}"), headers={"X-Request-Id": "forge-1"}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # logged all the same
    r = http.get("/v1/nope%0d%0a12:00:00%20INFO%20x%1b[2J")
    assert r.status_code == 404
    server.wait_for_log("request_id=forge-1", "/v1/nope")
    # (the engine's weight-loading progress bar draws itself with CR: that one line is not ours)
    raw = b"\n".join(ln for ln in server.log_path.read_bytes().split(b"\n") if b"Loading weights" not in ln)
    assert b"\x1b" not in raw and b"\r" not in raw and "\x9b".encode() not in raw
    lines = raw.decode().split("\n")
    assert not any(ln.startswith("12:00:00") for ln in lines)
    line = next(ln for ln in lines if "request_id=forge-1" in ln)
    assert '"glm\\r\\n12:00:00 WARNING' in line and "\\u001b[31m" in line and "\\u009b2J" in line, line
    assert any("\\u000d\\u000a12:00:00 INFO x\\u001b[2J" in ln for ln in lines if '" 404 ' in ln)


def test_no_5xx_and_no_traceback_in_the_whole_run(server):
    text = server.log_text()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    assert not re.search(r'glint\.requests: .*" 5\d\d ', text)
