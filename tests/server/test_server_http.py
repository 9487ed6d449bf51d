"""The live server over raw HTTP: auth, error shapes, utility routes, Anthropic routes, keep-alives, overload,
and client disconnects (the engine request is aborted and its KV pages come back)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

KEYS = ("key-one", "key-two")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
SCRIPTS = {
    "slow_first_token": [{"text": "first", "sleep": 0.6}, " second", " third"],
    # 12 steps of 0.4 s: outlives a 1 s client timeout however fast the tiny model runs
    "slow_steps": [{"text": " tick", "sleep": 0.4}] * 12,
    "anthropic_tool": [
        "I need the weather.",
        "</think>",
        "Checking.",
        "<tool_call>get_weather",
        "<arg_key>city</arg_key><arg_value>Par",
        "is</arg_value>",
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>",
    ],
}
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    }
]


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    scripts = tmp_path_factory.mktemp("scripts") / "scripts.json"
    scripts.write_text(json.dumps(SCRIPTS))
    srv = launch_server(
        "--api-key",
        *KEYS,
        "--max-running-requests",
        "2",
        "--max-queued-requests",
        "1",
        "--keepalive-interval",
        "0.1",
        "--served-model-name",
        "glm-4.7",
        "glm",
        "--allowed-origins",
        "http://example.com",
        "--metrics-public",
        env={"GLINT_TEST_SCRIPTS": str(scripts)},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def metrics_text(http) -> str:
    r = http.get("/metrics")
    assert r.status_code == 200
    return r.text


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def engine_stats(http) -> dict:
    return http.get("/server_info", headers=AUTH).json()["engine"]


def wait_until(fn, timeout=30.0, interval=0.05, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not reached in {timeout}s: {what}")


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert "Traceback" not in r.text
    return err


def chat_body(text="hello", **kw):
    return {"model": "glm", "messages": [{"role": "user", "content": text}], "max_tokens": 3, **kw}


# ------------------------------------------------------------------------------------------ utility routes


def test_health_root_models_metrics(http):
    assert http.get("/health").status_code == 200  # no key needed
    assert http.head("/").status_code == 200
    assert http.get("/").status_code == 401 and http.get("/", headers=AUTH).status_code == 200
    r = http.get("/v1/models", headers=AUTH)
    data = r.json()["data"]
    assert [m["id"] for m in data] == ["glm-4.7", "glm"] and all(m["max_model_len"] > 0 for m in data)
    text = metrics_text(http)
    for name in (
        "glint:num_requests_running",
        "glint:num_requests_waiting",
        "glint:kv_cache_usage_perc",
        "glint:prefix_cache_hit_rate",
        "glint:time_to_first_token_seconds_bucket",
        "glint:inter_token_latency_seconds_bucket",
        "glint:e2e_request_latency_seconds_bucket",
        "glint:prompt_tokens_total",
        "glint:generation_tokens_total",
        "glint:kv_cache_capacity_tokens",
    ):
        assert name in text, name
    assert 'model_name="glm-4.7"' in text


def test_auth(http):
    err = assert_openai_error(
        http.post("/v1/chat/completions", json=chat_body()), 401, code="invalid_api_key"
    )
    assert err["type"] == "authentication_error"
    assert_openai_error(
        http.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer wrong"}), 401
    )
    assert_openai_error(http.get("/v1/models"), 401)
    assert http.post("/v1/chat/completions", json=chat_body(), headers=AUTH).status_code == 200
    assert (
        http.post("/v1/chat/completions", json=chat_body(), headers={"x-api-key": KEYS[1]}).status_code == 200
    )
    r = http.options(
        "/v1/chat/completions",
        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 200  # CORS preflight (--allowed-origins) needs no key
    assert r.headers["access-control-allow-origin"] == "http://example.com"
    r = http.options(
        "/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers  # only the allowed origin
    # --metrics-public: /metrics without a key; /health_generate runs a generation, so it needs one
    assert http.get("/metrics").status_code == 200 and http.get("/health").status_code == 200
    assert http.get("/health_generate").status_code == 401
    assert http.get("/health_generate", headers=AUTH).status_code == 200


def test_request_id_header(http):
    r = http.post("/v1/chat/completions", json=chat_body(), headers={**AUTH, "X-Request-Id": "my-req-42"})
    assert r.headers["x-request-id"] == "my-req-42"
    r = http.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
    assert len(r.headers["x-request-id"]) >= 16
    assert http.get("/nope", headers=AUTH).headers.get("x-request-id")


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_are_openai_shaped_400s(http):
    url = "/v1/chat/completions"
    h = {**AUTH, "Content-Type": "application/json"}
    assert_openai_error(http.post(url, content=b"{not json", headers=h), 400)
    assert_openai_error(http.post(url, content=b"", headers=h), 400)
    assert_openai_error(http.post(url, content=b"[1, 2]", headers=h), 400)
    assert_openai_error(http.post(url, json={"model": "m"}, headers=AUTH), 400, param="messages")
    assert_openai_error(http.post(url, json=chat_body(n="abc"), headers=AUTH), 400, param="n")
    assert_openai_error(
        http.post(url, json=chat_body(temperature="hot"), headers=AUTH), 400, param="temperature"
    )
    assert_openai_error(http.post(url, json=chat_body(top_p=5), headers=AUTH), 400, param="top_p")
    assert_openai_error(
        http.post(url, json={"messages": [{"role": "wizard", "content": "x"}]}, headers=AUTH),
        400,
        param="messages[0].role",
    )
    assert_openai_error(http.post(url, json=chat_body(tools=[]), headers=AUTH), 400, param="tools")
    assert_openai_error(
        http.post(url, json=chat_body(logprobs=False, top_logprobs=3), headers=AUTH),
        400,
        param="top_logprobs",
    )
    assert_openai_error(http.post(url, json=chat_body(logit_bias={"999999": 5}), headers=AUTH), 400)
    assert_openai_error(http.post("/v1/completions", json={"prompt": [], "max_tokens": 2}, headers=AUTH), 400)
    assert_openai_error(
        http.post("/v1/completions", json={"prompt": "x", "suffix": "y"}, headers=AUTH), 400, param="suffix"
    )
    assert_openai_error(
        http.post("/v1/completions", json={"prompt": [999999], "max_tokens": 2}, headers=AUTH), 400
    )
    assert_openai_error(http.get("/v1/does-not-exist", headers=AUTH), 404)
    assert_openai_error(http.get("/v1/chat/completions", headers=AUTH), 405)


# ------------------------------------------------------------------------------------------ Anthropic


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        name = next((ln[7:] for ln in lines if ln.startswith("event: ")), None)
        data = "".join(ln[6:] for ln in lines if ln.startswith("data: "))
        events.append((name, json.loads(data)))
    return events


def test_anthropic_messages_basic(http):
    headers = {"x-api-key": KEYS[1], "anthropic-version": "2023-06-01", "anthropic-beta": "x"}
    body = {
        "model": "glm-4.7",
        "max_tokens": 5,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "metadata": {"user_id": "u"},
    }
    r = http.post("/v1/messages?beta=true", json=body, headers=headers)
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["id"].startswith("msg_")
    assert msg["model"] == "glm-4.7" and msg["stop_reason"] in ("end_turn", "max_tokens")
    assert msg["usage"]["input_tokens"] > 0 and msg["usage"]["output_tokens"] >= 1
    assert all(b["type"] in ("text", "thinking") for b in msg["content"])
    r = http.post(
        "/v1/messages/count_tokens", json={"model": "glm", "messages": body["messages"]}, headers=headers
    )
    short = r.json()["input_tokens"]
    r = http.post(
        "/v1/messages/count_tokens",
        headers=headers,
        json={"model": "glm", "messages": body["messages"], "tools": ANTHROPIC_TOOLS},
    )
    assert r.status_code == 200 and r.json()["input_tokens"] > short > 0


def test_anthropic_tool_use_and_streaming(http):
    headers = {"Authorization": f"Bearer {KEYS[0]}", "anthropic-version": "2023-06-01"}
    body = {
        "model": "glm",
        "max_tokens": 2048,  # above thinking.budget_tokens, as Anthropic requires
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "auto"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "<<script:anthropic_tool>>"}],
    }
    msg = http.post("/v1/messages", json=body, headers=headers).json()
    assert msg["stop_reason"] == "tool_use"
    kinds = [b["type"] for b in msg["content"]]
    assert kinds == ["thinking", "text", "tool_use"]
    assert msg["content"][0]["thinking"] == "I need the weather."
    assert msg["content"][1]["text"] == "Checking."
    tool = msg["content"][2]
    assert tool["name"] == "get_weather" and tool["input"] == {"city": "Paris", "days": 2}
    assert tool["id"].startswith("toolu_")

    r = http.post("/v1/messages", json={**body, "stream": True}, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in sse_events(r.text) if e[0] != "ping"]
    names = [e[0] for e in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in events)
    blocks, partial = {}, {}
    for name, data in events:
        if name == "content_block_start":
            blocks[data["index"]] = data["content_block"]
        elif name == "content_block_delta":
            d = data["delta"]
            b = blocks[data["index"]]
            if d["type"] == "thinking_delta":
                b["thinking"] += d["thinking"]
            elif d["type"] == "text_delta":
                b["text"] += d["text"]
            elif d["type"] == "input_json_delta":
                partial[data["index"]] = partial.get(data["index"], "") + d["partial_json"]
    assert [blocks[i]["type"] for i in sorted(blocks)] == ["thinking", "text", "tool_use"]
    assert blocks[0]["thinking"] == "I need the weather." and blocks[1]["text"] == "Checking."
    assert json.loads(partial[2]) == {"city": "Paris", "days": 2}
    assert names.count("content_block_start") == names.count("content_block_stop") == 3
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"

    history = {
        "model": "glm",
        "max_tokens": 3,
        "tools": ANTHROPIC_TOOLS,
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "call it", "signature": ""},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "text", "text": "thanks"},
                ],
            },
        ],
    }
    assert http.post("/v1/messages", json=history, headers=headers).status_code == 200


def test_anthropic_errors(http):
    r = http.post(
        "/v1/messages",
        json={"model": "glm", "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": KEYS[0]},
    )
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    r = http.post("/v1/messages", json={"model": "glm", "max_tokens": 5, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


# ------------------------------------------------------------------------------------------ streaming


def test_keepalive_comments_and_sdk_ignores_them(http, server):
    # the scripted first step takes 0.6 s (like a long prefill): the stream must not stay silent meanwhile
    body = chat_body("<<script:slow_first_token>>", max_tokens=40, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        lines = [ln for ln in r.iter_lines()]
    first_data = next(i for i, ln in enumerate(lines) if '"first"' in ln)
    assert lines[:first_data].count(": keep-alive") >= 2
    assert lines[-2] == "data: [DONE]" or lines[-1] == "data: [DONE]"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[1], max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="glm", messages=[{"role": "user", "content": "<<script:slow_first_token>>"}], stream=True
        )
    )
    reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
    assert reasoning == "first second third" and chunks[-1].choices[0].finish_reason == "stop"
    r = http.post(
        "/v1/messages",
        headers=AUTH,
        json={
            "model": "glm",
            "max_tokens": 10,
            "stream": True,
            "messages": [{"role": "user", "content": "<<script:slow_first_token>>"}],
        },
    )
    assert "event: ping" in r.text


def _start_stream(server, results: list, key: int):
    def run():
        # scripted 0.4 s steps: still streaming when the clients hang up, however fast the tiny model runs
        body = chat_body(f"<<script:slow_steps>> long request {key}", max_tokens=400, stream=True)
        try:
            with httpx.stream(
                "POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60
            ) as r:
                results.append(("status", key, r.status_code))
                for _ in r.iter_lines():
                    if stop_flags[key].is_set():
                        break
        except Exception as e:  # noqa: BLE001
            results.append(("error", key, repr(e)))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


stop_flags = {k: threading.Event() for k in range(3)}


def test_overload_429_then_disconnect_frees_everything(http, server):
    results: list = []
    stats0 = engine_stats(http)
    aborted0 = metric(metrics_text(http), "glint:num_aborted_requests_total")
    threads = [_start_stream(server, results, 0), _start_stream(server, results, 1)]
    wait_until(lambda: metric(metrics_text(http), "glint:num_requests_running") == 2, what="2 running")
    threads.append(_start_stream(server, results, 2))
    wait_until(lambda: metric(metrics_text(http), "glint:num_requests_waiting") == 1, what="1 waiting")
    r = http.post("/v1/chat/completions", json=chat_body(), headers=AUTH)
    err = assert_openai_error(r, 429, code="server_overloaded")
    assert err["type"] == "rate_limit_error" and r.headers["retry-after"]
    assert engine_stats(http)["used_kv_blocks"] > 0
    for flag in stop_flags.values():
        flag.set()  # the clients hang up mid-stream
    for t in threads:
        t.join(30)
    assert sorted(x[1] for x in results if x[0] == "status") == [0, 1, 2]
    wait_until(
        lambda: (
            metric(metrics_text(http), "glint:num_requests_running") == 0
            and metric(metrics_text(http), "glint:num_requests_waiting") == 0
        )
    )
    s = wait_until(lambda: (lambda s: s if s["used_kv_blocks"] == 0 else None)(engine_stats(http)))
    assert s["free_kv_blocks"] == s["total_kv_blocks"] - s["cached_kv_blocks"]
    assert s["total_kv_blocks"] == stats0["total_kv_blocks"]
    assert metric(metrics_text(http), "glint:num_aborted_requests_total") >= aborted0 + 3


def test_non_streaming_disconnect_aborts(http, server):
    aborted0 = metric(metrics_text(http), "glint:num_aborted_requests_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/chat/completions",
            headers=AUTH,
            timeout=1.0,
            json=chat_body("<<script:slow_steps>>", max_tokens=450),
        )
    wait_until(lambda: metric(metrics_text(http), "glint:num_aborted_requests_total") >= aborted0 + 1)
    wait_until(lambda: metric(metrics_text(http), "glint:num_requests_running") == 0)
    s = wait_until(lambda: (lambda s: s if s["used_kv_blocks"] == 0 else None)(engine_stats(http)))
    assert s["free_kv_blocks"] == s["total_kv_blocks"] - s["cached_kv_blocks"]
    assert "disconnected=true" in server.log_text()


def test_per_request_log_lines(server):
    text = server.log_text()
    assert "aborted=true" in text and "request_id=my-req-42" in text
    assert "key-one" not in text and "key-two" not in text  # keys are redacted in the start-up log
    assert "'api_key': ['<redacted>', '<redacted>']" in text
