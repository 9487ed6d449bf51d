"""Request fields a fuzz pass found accepted but wrong or ignored, on a live tiny server with scripted outputs: each
is now a 400 in the route's own error shape (OpenAI's nested error, Anthropic's envelope on /v1/messages), and the
values that ask for something this server does (or for nothing) still pass.

- reasoning_effort (chat) / reasoning.effort (responses): the openai SDK's values only
- /v1/messages thinking: Anthropic's type and budget_tokens checks (>= 1024; one >= max_tokens is let through)
- /v1/messages tool_choice any / tool without tools (auto / none pass: see server/anthropic_api.py)
- /v1/responses background: true, top_logprobs > 0, include message.output_text.logprobs
- chat echo: true (vLLM's chat echo is not implemented); chat `thinking.type` (Z.ai's) outside its values"""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "glint-tiny"
SCRIPTS = {"plain": ["Hello", " there."], "think": ["Hm.", "</think>", "Answer."]}
ANTHROPIC = {"anthropic-version": "2023-06-01"}
TOOLS = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    scripts = tmp_path_factory.mktemp("scripts") / "scripts.json"
    scripts.write_text(json.dumps(SCRIPTS))
    srv = launch_server("--stats-interval", "0", env={"GLINT_TEST_SCRIPTS": str(scripts)})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def chat(http, **kw) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "<<script:plain>>"}], **kw}
    return http.post("/v1/chat/completions", json=body)


def responses(http, **kw) -> httpx.Response:
    return http.post("/v1/responses", json={"model": MODEL, "input": "<<script:plain>>", "max_output_tokens": 5, **kw})


def messages(http, path: str = "/v1/messages", headers: dict | None = None, **kw) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "<<script:think>>"}], **kw}
    if path == "/v1/messages":
        body.setdefault("max_tokens", 20)
    return http.post(path, json=body, headers={**ANTHROPIC, **(headers or {})})


def openai_400(r: httpx.Response, param: str, code: str | None = None) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


def anthropic_400(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    return body["error"]["message"]


# --------------------------------------------------------------------------------------------- reasoning effort


def test_chat_reasoning_effort_outside_the_sdks_values_is_400(http):
    for bad in ("extreme", "HIGH", ""):
        assert "reasoning_effort must be one of" in openai_400(chat(http, reasoning_effort=bad), "reasoning_effort")
    r = chat(http, reasoning_effort="extreme", stream=True)  # refused before the stream starts
    openai_400(r, "reasoning_effort")
    for ok in ("none", "minimal", "low", "medium", "high", "xhigh", "max"):  # the openai SDK's ReasoningEffort
        assert chat(http, reasoning_effort=ok).status_code == 200, ok


def test_chat_thinking_type_outside_zai_values_is_400(http):
    """Z.ai's chat `thinking: {type}`: an unknown type was ignored (thinking stayed as it was). A type-less object
    (`{"clear_thinking": false}`) only sets its other keys."""
    for bad in ({"type": "on"}, {"type": "ENABLED"}, {"type": 1}):
        assert "thinking.type must be one of" in openai_400(chat(http, thinking=bad), "thinking.type")
    for ok in ({"type": "enabled"}, {"type": "disabled"}, {"type": "adaptive"}, None, {}, {"clear_thinking": False}):
        assert chat(http, thinking=ok).status_code == 200, ok


def test_responses_reasoning_effort_outside_the_sdks_values_is_400(http):
    for bad in ("extreme", 5, ["low"]):
        r = responses(http, reasoning={"effort": bad})
        assert "reasoning.effort must be one of" in openai_400(r, "reasoning.effort")
    for ok in ("none", "minimal", "low", "high", "xhigh", None):
        assert responses(http, reasoning={"effort": ok}).status_code == 200, ok
    assert responses(http, reasoning={"summary": "auto"}).status_code == 200


# ------------------------------------------------------------------------------------------ Anthropic thinking


def test_anthropic_thinking_type_outside_enabled_disabled_adaptive_is_400(http):
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        for bad in ({"type": "on"}, {"type": "ENABLED"}, {}, {"budget_tokens": 2048}):
            assert "thinking.type" in anthropic_400(messages(http, path, thinking=bad)), (path, bad)


def test_anthropic_thinking_budget_tokens_is_checked_as_anthropic_does(http):
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        for bad, words in (({"type": "enabled"}, "Field required"),
                           ({"type": "enabled", "budget_tokens": None}, "Field required"),
                           ({"type": "enabled", "budget_tokens": 1023}, "greater than or equal to 1024"),
                           ({"type": "enabled", "budget_tokens": -5}, "greater than or equal to 1024"),
                           ({"type": "enabled", "budget_tokens": "2048"}, "valid integer"),
                           ({"type": "enabled", "budget_tokens": 2048.5}, "valid integer"),
                           ({"type": "enabled", "budget_tokens": True}, "valid integer")):
            message = anthropic_400(messages(http, path, max_tokens=4096, thinking=bad) if path == "/v1/messages"
                                    else messages(http, path, thinking=bad))
            assert "thinking.enabled.budget_tokens" in message and words in message, (path, bad, message)
    # valid: budget in range (a whole-number float too), below max_tokens
    for budget in (1024, 2048.0):
        r = messages(http, max_tokens=4097, thinking={"type": "enabled", "budget_tokens": budget})
        assert r.status_code == 200 and [b["type"] for b in r.json()["content"]] == ["thinking", "text"], r.text
    ok = messages(http, "/v1/messages/count_tokens", thinking={"type": "enabled", "budget_tokens": 1024})
    assert ok.status_code == 200, ok.text
    # a budget >= max_tokens is not refused (Anthropic refuses it without the interleaved-thinking beta; Claude
    # Code and LiteLLM send it at times): the budget never cuts, max_tokens does
    for headers in ({}, {"anthropic-beta": "fine-grained-tool-streaming-2025-05-14, interleaved-thinking-2025-05-14"}):
        for stream in (False, True):
            r = messages(http, max_tokens=20, stream=stream, thinking={"type": "enabled", "budget_tokens": 8192},
                         headers=headers)
            assert r.status_code == 200, r.text
    # disabled / adaptive take no budget
    for thinking in ({"type": "disabled"}, {"type": "adaptive"}):
        assert messages(http, max_tokens=20, thinking=thinking).status_code == 200, thinking


# ---------------------------------------------------------------------------------------- tool_choice sans tools


def test_anthropic_tool_choice_that_forces_a_call_needs_tools(http):
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
            message = anthropic_400(messages(http, path, tool_choice=choice))
            assert message == "tool_choice may only be specified while providing tools", message
            # tools that are all server tools (not run here) leave none to call either
            server_only = [{"type": "web_search_20250305", "name": "web_search"}]
            anthropic_400(messages(http, path, tool_choice=choice, tools=server_only))
        for bad in ({"type": "sometimes"}, {}):  # an unknown type is a 400 with or without tools
            assert "unknown tool_choice type" in anthropic_400(messages(http, path, tool_choice=bad))
            assert "unknown tool_choice type" in anthropic_400(messages(http, path, tool_choice=bad, tools=TOOLS))
        # auto / none ask for nothing a tool-less request does not already do: they pass (our choice)
        for choice in ({"type": "auto"}, {"type": "none"}, {"type": "auto", "disable_parallel_tool_use": True}):
            assert messages(http, path, tool_choice=choice).status_code == 200, (path, choice)
        for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}, {"type": "auto"}):
            assert messages(http, path, tool_choice=choice, tools=TOOLS).status_code == 200, (path, choice)


def test_chat_tool_choice_without_tools_stays_as_at_openai(http):
    """The chat route's rule, unchanged (OpenAI's and vLLM's): none passes, every other choice needs tools. The
    choices that force a call need tools on all three routes."""
    for choice in ("required", "auto", {"type": "function", "function": {"name": "get_weather"}}):
        openai_400(chat(http, tool_choice=choice), "tool_choice")
    assert chat(http, tool_choice="none").status_code == 200
    openai_400(responses(http, tool_choice="required"), "tool_choice")
    for choice in ("auto", "none"):
        assert responses(http, tool_choice=choice).status_code == 200, choice


# ----------------------------------------------------------------------------------- /v1/responses unsupported


def test_responses_background_mode_is_400(http):
    r = responses(http, background=True)
    assert "background mode is not supported" in openai_400(r, "background", "unsupported_parameter")
    openai_400(responses(http, background=True, stream=True), "background", "unsupported_parameter")
    openai_400(responses(http, background={"x": 1}), "background")  # not a boolean
    for ok in (False, None):
        assert responses(http, background=ok).status_code == 200, ok


def test_responses_logprobs_are_400_not_ignored(http):
    for kw in ({"top_logprobs": 3}, {"top_logprobs": -1},
               {"include": ["message.output_text.logprobs"]},
               {"include": ["reasoning.encrypted_content", "message.output_text.logprobs"], "top_logprobs": 0}):
        param = "top_logprobs" if kw.get("top_logprobs") else "include"
        assert "logprobs on /v1/responses" in openai_400(responses(http, **kw), param, "unsupported_parameter"), kw
    openai_400(responses(http, top_logprobs="many"), "top_logprobs")
    for ok in ({"top_logprobs": 0}, {"top_logprobs": None}, {"include": ["reasoning.encrypted_content"]}):
        assert responses(http, **ok).status_code == 200, ok


def test_responses_max_tool_calls_is_accepted(http):
    # it caps OpenAI's built-in tools, which this server does not have: nothing to apply
    assert responses(http, max_tool_calls=1).status_code == 200


# ------------------------------------------------------------------------------------------------- chat echo


def test_chat_echo_true_is_400(http):
    for stream in (False, True):
        r = chat(http, echo=True, stream=stream)
        assert "echo on chat completions" in openai_400(r, "echo", "unsupported_parameter")
    for ok in (False, None):
        assert chat(http, echo=ok).status_code == 200, ok
    # the completions route's echo is implemented and unaffected
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "<<script:plain>>", "max_tokens": 2, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("<<script:plain>>"), r.text
