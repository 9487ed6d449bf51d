"""What agentic clients send and expect (issue #18), on a live tiny server with scripted outputs:

Anthropic route (Claude Code's requests): thinking follows Anthropic's semantics (no field = off), mid-conversation
system messages, output_config / metadata / cache_control / unknown beta fields accepted, documented `ping`
events (never SSE comments); OpenAI routes send no SSE comments by default; unknown models are 404
model_not_found on every route; every refused request's log line says why; POST /v1/responses (items in and
out, tool calls, the streaming event order, the openai SDK's responses client)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import httpx
import openai
import pytest
from conftest import metric
from transformers import AutoTokenizer

from model.tiny import tiny_model_dir
from server.anthropic_api import MessagesRequest
from server.anthropic_api import to_chat_request as anthropic_to_chat
from server.chat_serving import ChatPlan
from server.chat_template import ChatTemplate, normalize_messages, template_kwargs
from server.errors import APIError
from server.responses_api import ResponsesRequest
from server.responses_api import to_chat_request as responses_to_chat

MODEL = "glint-tiny"
SCRIPTS = {
    "plain": ["Hello", " there."],
    "think": ["Let me", " think.", "</think>", "Answer."],
    "slow": [{"text": "first", "sleep": 0.6}, " second"],
    "tool": [
        "Need a file.",
        "</think>",
        "<tool_call>read_file",
        "<arg_key>path</arg_key><arg_value>a.py</arg_value>",
        "<arg_key>lines</arg_key><arg_value>3</arg_value></tool_call>",
    ],
}
FILE_TOOL_PARAMS = {
    "type": "object",
    "properties": {"path": {"type": "string"}, "lines": {"type": "integer"}},
    "required": ["path"],
}


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    scripts = tmp_path_factory.mktemp("scripts") / "scripts.json"
    scripts.write_text(json.dumps(SCRIPTS))
    srv = launch_server("--stats-interval", "0", "--ping-interval", "0.2", env={"GLINT_TEST_SCRIPTS": str(scripts)})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def sse(text: str) -> list[tuple[str | None, dict]]:
    events = []
    for block in text.split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln]
        if not lines:
            continue
        assert not any(ln.startswith(":") for ln in lines), f"an SSE comment: {lines}"
        name = next((ln[7:] for ln in lines if ln.startswith("event: ")), None)
        data = "".join(ln[6:] for ln in lines if ln.startswith("data: "))
        events.append((name, json.loads(data) if data != "[DONE]" else {"done": True}))
    return events


def messages(http, content: str, **kw) -> dict:
    body = {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": content}], **kw}
    r = http.post("/v1/messages?beta=true", json=body, headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------ Anthropic


def test_anthropic_thinking_semantics(http):
    # no thinking field: thinking is off, the whole answer is text (content[0].text exists)
    msg = messages(http, "<<script:plain>>")
    assert msg["content"] == [{"type": "text", "text": "Hello there."}] and msg["stop_reason"] == "end_turn"
    assert messages(http, "<<script:plain>>", thinking={"type": "disabled"})["content"][0]["type"] == "text"
    for thinking in ({"type": "enabled", "budget_tokens": 2048}, {"type": "adaptive"}):
        msg = messages(http, "<<script:think>>", thinking=thinking, max_tokens=4096)  # max_tokens > budget_tokens
        assert [b["type"] for b in msg["content"]] == ["thinking", "text"], msg
        assert msg["content"][0]["thinking"] == "Let me think." and msg["content"][1]["text"] == "Answer."


def test_anthropic_thinking_maps_to_the_template():
    def kwargs(**kw):
        req = anthropic_to_chat(MessagesRequest.model_validate({"max_tokens": 5, "messages": [], **kw}))
        return template_kwargs({}, req.chat_template_kwargs, req.reasoning_effort, req.thinking)

    assert kwargs()["enable_thinking"] is False
    assert kwargs(thinking={"type": "disabled"})["enable_thinking"] is False
    assert kwargs(thinking={"type": "enabled", "budget_tokens": 1024})["enable_thinking"] is True
    assert kwargs(thinking={"type": "adaptive"})["enable_thinking"] is True
    # an explicit template kwarg still wins
    assert kwargs(chat_template_kwargs={"enable_thinking": True})["enable_thinking"] is True


def _anthropic_prompt(tail: list[dict], **kw) -> str:
    """The prompt text the Anthropic route renders for [user "q", *tail] with the tiny chat template."""
    msgs = [{"role": "user", "content": "q"}, *tail]
    req = anthropic_to_chat(MessagesRequest.model_validate({"max_tokens": 5, "messages": msgs, **kw}))
    tpl = ChatTemplate(AutoTokenizer.from_pretrained(tiny_model_dir("bf16")))
    kwargs = template_kwargs(req.route_template_defaults, req.chat_template_kwargs, req.reasoning_effort, req.thinking)
    return tpl.render(
        normalize_messages(req.messages),
        kwargs=kwargs,
        add_generation_prompt=req.add_generation_prompt is not False,
        continue_final_message=bool(req.continue_final_message),
    )


def test_claude_code_billing_line_is_dropped():
    """Claude Code's per-conversation billing line (server/anthropic_api.py BILLING_HEADER) never reaches the
    prompt, as its own system block or as the first line of a system string; other text mentioning it stays."""
    base = _anthropic_prompt([], system=[{"type": "text", "text": "You are Claude Code."}])
    for billing in ("x-anthropic-billing-header: cc_version=2.1.197.a3f; cc_entrypoint=cli;",
                    "x-anthropic-billing-header: cc_version=2.1.197.0b1; cc_entrypoint=sdk-ts; cch=71fea;"):
        blocks = [{"type": "text", "text": billing}, {"type": "text", "text": "You are Claude Code."}]
        assert _anthropic_prompt([], system=blocks) == base
        assert _anthropic_prompt([], system=billing + "\nYou are Claude Code.") == base
    kept = "Quote: x-anthropic-billing-header: cc_version=1"
    assert kept in _anthropic_prompt([], system=[{"type": "text", "text": kept}])
    two_lines = "x-anthropic-billing-header: a\nsecond line"  # a string system: only its first line goes
    assert "second line" in _anthropic_prompt([], system=[{"type": "text", "text": two_lines}])


READ_TOOL = [{"name": "read_file", "description": "Read a file",
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}]
REASONING = "The user wants a.py read. I should call read_file."


def _tool_turn(reminder: bool) -> list[dict]:
    """[assistant: thinking + text + tool_use, user: its tool_result (+ a system-reminder text, as Claude Code
    adds: the template then sees a new user turn)] after the first user message."""
    result = [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "print('hi')"}]
    if reminder:
        result.append({"type": "text", "text": "<system-reminder>Keep the todo list current.</system-reminder>"})
    return [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": REASONING, "signature": "s"},
                                          {"type": "text", "text": "I'll read the file."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "read_file",
                                           "input": {"path": "a.py"}}]},
        {"role": "user", "content": result},
    ]


def test_anthropic_route_preserves_thinking_unless_told():
    """Past turns' thinking stays in the prompt on /v1/messages (Preserved Thinking), also once a new user turn
    arrives; Z.ai's thinking.clear_thinking and Anthropic's clear_thinking context edit can clear it."""
    on = {"tools": READ_TOOL, "thinking": {"type": "adaptive"}}
    assert REASONING in _anthropic_prompt(_tool_turn(reminder=True), **on)
    assert REASONING in _anthropic_prompt(_tool_turn(reminder=False), **on)
    cleared = _anthropic_prompt(_tool_turn(reminder=True), **{**on, "thinking": {"type": "adaptive",
                                                                                 "clear_thinking": True}})
    assert REASONING not in cleared
    keep_all = {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]}
    keep_one = {"edits": [{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}}]}
    assert REASONING in _anthropic_prompt(_tool_turn(reminder=True), **on, context_management=keep_all)
    assert REASONING not in _anthropic_prompt(_tool_turn(reminder=True), **on, context_management=keep_one)


def test_server_default_template_kwargs_win_over_the_route_default():
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("bf16"))
    msgs = [{"role": "user", "content": "q"}, *_tool_turn(reminder=True)]
    req = anthropic_to_chat(MessagesRequest.model_validate(
        {"max_tokens": 5, "messages": msgs, "tools": READ_TOOL, "thinking": {"type": "adaptive"}}))
    for server_defaults, kept in (({}, True), ({"clear_thinking": True}, False)):
        state = SimpleNamespace(chat_template=ChatTemplate(tok, default_kwargs=server_defaults), tokenizer=tok)
        prompt, _ = ChatPlan(state, req).render(state)
        assert (REASONING in prompt) is kept, server_defaults


def test_a_tool_turn_reuses_the_previous_turns_tokens():
    """The KV of turn 1 (its prompt and the tokens the model generated) is a prefix of turn 2's prompt, also
    when turn 2 is a new user turn (a tool result with a text block): only the new tail needs a prefill."""
    tpl = ChatTemplate(AutoTokenizer.from_pretrained(tiny_model_dir("bf16")))
    on = {"tools": READ_TOOL, "thinking": {"type": "adaptive"}}
    generated = (f"{REASONING}</think>I'll read the file.<tool_call>read_file<arg_key>path</arg_key>"
                 "<arg_value>a.py</arg_value></tool_call>")
    turn1 = tpl.encode(_anthropic_prompt([], **on)) + tpl.encode(generated)
    for reminder in (False, True):
        turn2 = tpl.encode(_anthropic_prompt(_tool_turn(reminder), **on))
        assert turn2[:len(turn1)] == turn1, reminder


def test_responses_follow_up_keeps_the_chains_reasoning():
    """A user follow-up after a Codex tool chain (/v1/responses): the chain's reasoning stays in the prompt
    (Preserved Thinking), so the follow-up's prompt starts with the tokens the chain already has in the KV cache."""
    tpl = ChatTemplate(AutoTokenizer.from_pretrained(tiny_model_dir("bf16")))
    chain = [
        {"role": "user", "content": "Fix the bug."},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": REASONING}]},
        {"type": "function_call", "call_id": "call_1", "name": "read_file", "arguments": '{"path": "a.py"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "print('hi')"},
    ]
    tools = [{"type": "function", "name": "read_file", "parameters": FILE_TOOL_PARAMS}]

    def prompt(items):
        req = responses_to_chat(ResponsesRequest.model_validate({"input": items, "tools": tools}))
        kw = template_kwargs(req.route_template_defaults, req.chat_template_kwargs, req.reasoning_effort,
                             req.thinking)
        return tpl.render(normalize_messages(req.messages), kwargs=kw)

    before, after = prompt(chain), prompt([*chain, {"role": "user", "content": "Now add a test."}])
    assert REASONING in after
    cut = before.rindex("<|assistant|>")  # the generation prompt of the turn before the follow-up
    assert after.startswith(before[:cut])


def test_anthropic_assistant_prefill_is_continued():
    """A final assistant message is the start of the answer (Anthropic's prefill): the prompt ends with its text,
    not with a new assistant turn (it used to render as a finished turn followed by `<|assistant|>`)."""
    for thinking in (None, {"type": "enabled", "budget_tokens": 1024}):
        kw = {"thinking": thinking} if thinking else {}
        prompt = _anthropic_prompt([{"role": "assistant", "content": "The answer is"}], **kw)
        assert prompt.endswith("<|assistant|></think>The answer is"), prompt
        blocks = [{"type": "text", "text": "{\"a\":"}]
        assert _anthropic_prompt([{"role": "assistant", "content": blocks}], **kw).endswith("</think>{\"a\":")
    # an empty final assistant message is as if it were absent
    assert _anthropic_prompt([{"role": "assistant", "content": ""}]) == _anthropic_prompt([])
    assert _anthropic_prompt([]).endswith("q<|assistant|></think>")
    # a final assistant tool call stays history (a new turn follows)
    call = {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}}
    assert _anthropic_prompt([{"role": "assistant", "content": [call]}]).endswith("</tool_call><|assistant|></think>")
    with pytest.raises(APIError) as err:
        _anthropic_prompt([{"role": "assistant", "content": "The answer is "}])
    assert err.value.status == 400 and "trailing whitespace" in str(err.value)


def test_anthropic_prefill_answer_holds_only_the_continuation(http):
    body = {
        "model": MODEL,
        "max_tokens": 20,
        "messages": [
            {"role": "user", "content": "<<script:plain>>"},
            {"role": "assistant", "content": "Sure:"},
        ],
    }
    msg = http.post("/v1/messages", json=body).json()
    assert msg["content"] == [{"type": "text", "text": "Hello there."}], msg
    events = sse(http.post("/v1/messages", json={**body, "stream": True}).text)
    text = "".join(d["delta"].get("text", "") for name, d in events if name == "content_block_delta")
    assert text == "Hello there."
    bad = {**body, "messages": [*body["messages"][:1], {"role": "assistant", "content": "Sure: "}]}
    r = http.post("/v1/messages", json=bad)
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert "trailing whitespace" in r.json()["error"]["message"]


def test_claude_code_request_shape_is_accepted(http):
    """The fields Claude Code 2.1 sends: mid-conversation system message, adaptive thinking, output_config,
    metadata, cache_control on blocks, context_management and other beta fields."""
    body = {
        "model": MODEL,
        "max_tokens": 32000,
        "stream": True,
        "thinking": {"type": "adaptive"},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc_account__session_1"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        ],
        "tools": [
            {
                "name": "read_file",
                "description": "Read a file",
                "input_schema": {**FILE_TOOL_PARAMS, "$schema": "http://json-schema.org/draft-07/schema#",
                                 "additionalProperties": False},
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        ],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<<script:think>>", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "The user switched to plan mode."},
            {"role": "user", "content": [{"type": "text", "text": "go on"}]},
        ],
    }
    r = http.post("/v1/messages?beta=true", json=body, headers={"anthropic-beta": "mid-conversation-system-2026-04-07"})
    assert r.status_code == 200, r.text
    events = sse(r.text)
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    text = "".join(d["delta"].get("text", "") for n, d in events if n == "content_block_delta")
    assert text == "Answer."
    count = http.post("/v1/messages/count_tokens", json={k: body[k] for k in ("model", "system", "tools", "messages")})
    assert count.status_code == 200 and count.json()["input_tokens"] > 0
    without = {**body, "messages": [body["messages"][0], body["messages"][2]]}
    count2 = http.post("/v1/messages/count_tokens", json={k: without[k] for k in ("model", "system", "tools", "messages")})
    assert count.json()["input_tokens"] > count2.json()["input_tokens"]  # the mid-conversation system text counts


def test_conversations_with_different_billing_lines_share_the_cached_system_prompt(http):
    """Two Claude Code conversations (different first messages, so different billing lines) share the system
    prompt's KV: the second request reads it from the prefix cache (usage.cache_read_input_tokens)."""
    system = " ".join(f"Rule {i}: keep the code tidy and the tests honest." for i in range(60))
    usage = []
    for fingerprint, question in (("a3f", "first conversation"), ("0c7", "another conversation")):
        blocks = [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.197.{fingerprint}; "
                                           "cc_entrypoint=cli;"},
                  {"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]
        usage.append(messages(http, f"<<script:plain>> {question}", system=blocks)["usage"])
    system_tokens = usage[0]["input_tokens"] - 40  # the system prompt is most of the prompt (~600 of its tokens)
    assert system_tokens > 400, usage
    assert usage[1]["cache_read_input_tokens"] >= system_tokens - 16, usage


def test_a_conversation_sent_again_is_tokenized_from_the_cache(http):
    """Agentic clients resend the whole conversation every turn: the second turn tokenizes only its new messages,
    the rest comes from the tokenizer cache (server/prompt_encoder.py; its exactness: tests/server/
    test_prompt_encoder.py), as /metrics counts it."""
    system = " ".join(f"Note {i}: the cache keeps message pieces." for i in range(40))
    first = [{"role": "user", "content": "<<script:plain>> turn one"}]
    second = [*first, {"role": "assistant", "content": "Answer."}, {"role": "user", "content": "<<script:plain>> two"}]

    def totals() -> tuple[float, float]:
        text = http.get("/metrics").text
        return (metric(text, "glint:tokenizer_cache_hit_chars_total") or 0.0,
                metric(text, "glint:tokenizer_cache_miss_chars_total") or 0.0)

    hit0, miss0 = totals()
    usage1 = messages(http, None, system=system, messages=first)["usage"]
    hit1, miss1 = totals()
    usage2 = messages(http, None, system=system, messages=second)["usage"]
    hit2, miss2 = totals()
    assert miss1 - miss0 > len(system) and hit1 - hit0 < len(system)  # a new system prompt: tokenized
    assert hit2 - hit1 > len(system)  # the second turn found the system prompt and the first turn's message
    assert 0 < miss2 - miss1 < len(system)  # and tokenized only what was new

    def prompt(u: dict) -> int:  # Anthropic's input_tokens leave out what the prefix cache read
        return u["input_tokens"] + u["cache_read_input_tokens"]

    assert prompt(usage2) > prompt(usage1) and usage2["cache_read_input_tokens"] > 0


def test_anthropic_pings_during_silence_and_no_comments(http):
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "<<script:slow>>"}]}
    events = sse(http.post("/v1/messages", json=body).text)  # sse() fails on any comment line
    names = [n for n, _ in events]
    first_delta = names.index("content_block_delta")
    assert names.count("ping") >= 2 and names.index("ping") < first_delta  # 0.6 s silence, --ping-interval 0.2


def test_openai_streams_have_no_comments_by_default(http):
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "<<script:slow>>"}]}
    r = http.post("/v1/chat/completions", json=body)
    events = sse(r.text)  # every line is JSON data, as SGLang's bench_serving.py expects
    assert events[-1][1] == {"done": True}
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "<<script:slow>>", "max_tokens": 5, "stream": True})
    assert sse(r.text)[-1][1] == {"done": True}


def test_unknown_model_is_404_everywhere(http, server):
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert MODEL in r.json()["error"]["message"]
    r = http.post("/v1/completions", json={"model": "nope", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/responses", json={"model": "nope", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/messages", json={"model": "claude-opus-4-1", "max_tokens": 2, "messages": chat["messages"]})
    assert r.status_code == 404 and r.json() == {
        "type": "error", "error": {"type": "not_found_error", "message": r.json()["error"]["message"]}
    }
    # no model named: the served one
    r = http.post("/v1/chat/completions", json={**chat, "model": None})
    assert r.status_code == 200 and r.json()["model"] == MODEL
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(**chat)


def test_refused_requests_log_why(http, server):
    http.post("/v1/chat/completions", json={"messages": "nope"}, headers={"X-Request-Id": "why-1"})
    http.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
              headers={"X-Request-Id": "why-2"})
    http.get("/v1/nothing-here", headers={"X-Request-Id": "why-3"})
    http.post("/v1/messages", content=b"{bad", headers={"X-Request-Id": "why-4", "content-type": "application/json"})
    text = server.wait_for_log(*(f"request_id=why-{i}" for i in range(1, 5)))
    lines = [ln for ln in text.splitlines() if "glint.requests" in ln]
    for rid, why in (("why-1", "messages"), ("why-2", "does not exist"), ("why-3", "no route"), ("why-4", "JSON")):
        line = next(ln for ln in lines if f"request_id={rid}" in ln)
        assert "error=" in line and why in line.split("error=", 1)[1], line


# ------------------------------------------------------------------------------------------ Responses API


def responses(http, **body) -> dict:
    r = http.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_responses_items_out(http):
    resp = responses(http, input="<<script:think>>", max_output_tokens=20)
    assert resp["object"] == "response" and resp["status"] == "completed" and resp["id"].startswith("resp_")
    assert [o["type"] for o in resp["output"]] == ["reasoning", "message"]
    assert resp["output"][0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert resp["output"][1]["content"][0]["type"] == "output_text"
    assert resp["output"][1]["content"][0]["text"] == "Answer."
    u = resp["usage"]
    assert u["output_tokens"] == 4 and u["output_tokens_details"]["reasoning_tokens"] == 2
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    # reasoning off: only the message
    for effort in ("none", "minimal"):
        resp = responses(http, input="<<script:plain>>", reasoning={"effort": effort})
        assert [o["type"] for o in resp["output"]] == ["message"], effort
        assert resp["output"][0]["content"][0]["text"] == "Hello there."
    # cut by max_output_tokens: incomplete
    resp = responses(http, input="<<script:think>>", max_output_tokens=2)
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": "max_output_tokens"}
    # ... inside the reasoning: only the reasoning item, as the stream has it (no empty message item)
    assert [o["type"] for o in resp["output"]] == ["reasoning"], resp["output"]
    r = http.post("/v1/responses", json={"model": MODEL, "input": "<<script:think>>", "max_output_tokens": 2,
                                         "stream": True})
    done = [d for name, d in sse(r.text) if name == "response.incomplete"]
    assert [o["type"] for o in done[0]["response"]["output"]] == ["reasoning"]


def test_responses_tool_calls_and_history(http):
    tools = [{"type": "function", "name": "read_file", "description": "Read", "parameters": FILE_TOOL_PARAMS},
             {"type": "web_search"}]
    resp = responses(http, input="<<script:tool>>", tools=tools, include=["reasoning.encrypted_content"])
    kinds = [o["type"] for o in resp["output"]]
    assert kinds == ["reasoning", "function_call"], resp["output"]
    call = resp["output"][1]
    assert call["name"] == "read_file" and json.loads(call["arguments"]) == {"path": "a.py", "lines": 3}
    assert call["call_id"].startswith("call_") and call["status"] == "completed"
    assert resp["output"][0]["encrypted_content"] == "Need a file."
    # the next turn sends the items back with the tool's output
    history = [
        {"role": "user", "content": [{"type": "input_text", "text": "read a.py"}]},
        resp["output"][0],
        call,
        {"type": "function_call_output", "call_id": call["call_id"], "output": "print('hi')"},
    ]
    resp2 = responses(http, input=history, tools=tools, instructions="You are a coder.", max_output_tokens=3)
    assert resp2["status"] in ("completed", "incomplete")
    req = ResponsesRequest.model_validate({"input": history, "instructions": "Be brief."})
    msgs = responses_to_chat(req).messages
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[2]["reasoning_content"] == "Need a file."
    assert msgs[2]["tool_calls"][0]["id"] == call["call_id"] and msgs[3]["tool_call_id"] == call["call_id"]


def test_responses_stream_event_order(http):
    tools = [{"type": "function", "name": "read_file", "parameters": FILE_TOOL_PARAMS}]
    r = http.post("/v1/responses", json={"model": MODEL, "input": "<<script:tool>>", "tools": tools, "stream": True})
    events = sse(r.text)
    assert all(name == data["type"] for name, data in events)
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    names = [n for n, _ in events]
    assert names == [
        "response.created", "response.in_progress",
        "response.output_item.added", *["response.reasoning_text.delta"] * names.count("response.reasoning_text.delta"),
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * names.count("response.function_call_arguments.delta"),
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    args = "".join(d["delta"] for n, d in events if n == "response.function_call_arguments.delta")
    assert json.loads(args) == {"path": "a.py", "lines": 3}
    final = events[-1][1]["response"]
    assert [o["type"] for o in final["output"]] == ["reasoning", "function_call"]
    assert final["output"][1]["arguments"] == args and final["usage"]["output_tokens"] == 5


def test_responses_with_the_openai_sdk(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    resp = client.responses.create(model=MODEL, input="<<script:think>>", instructions="Be brief.")
    assert resp.output_text == "Answer." and resp.output[0].type == "reasoning"
    with client.responses.stream(model=MODEL, input="<<script:plain>>", reasoning={"effort": "none"}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello there." == final.output_text
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    # the other stored objects are refused too, never ignored (the prompt would lose their content)
    for field, value in (("conversation", "conv_123"), ("prompt", {"id": "pmpt_123"})):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(model=MODEL, input="hi", extra_body={field: value})
        assert e.value.param == field and "not supported" in e.value.message


def test_anthropic_output_config_format_is_enforced(http):
    schema = {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["word", "n"],
        "additionalProperties": False,
    }
    body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "json please"}],
            "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": schema}}}
    msg = http.post("/v1/messages", json=body).json()  # the real tiny model, under the grammar
    assert msg["stop_reason"] == "end_turn" and msg["content"][0]["type"] == "text", msg
    value = json.loads(msg["content"][0]["text"])
    assert set(value) == {"word", "n"} and isinstance(value["n"], int) and len(value["word"]) <= 8
    bad = {**body, "output_config": {"format": {"type": "json_schema", "schema": {"type": "strung"}}}}
    r = http.post("/v1/messages", json=bad)
    assert r.status_code == 400 and "strung" in r.json()["error"]["message"]


def test_anthropic_messages_of_unknown_blocks_only_name_them():
    """A user message whose blocks are all of types the server skips leaves no conversation: the 400 names the
    skipped types (it used to say "messages must be a non-empty list" of a non-empty list)."""
    req = MessagesRequest.model_validate(
        {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "bogus"}, {"type": "other"}]}]}
    )
    with pytest.raises(APIError) as err:
        anthropic_to_chat(req)
    assert err.value.status == 400 and "skipped block types: bogus, other" in str(err.value)
    # a readable block next to them: accepted, the unknown one skipped
    blocks = [{"type": "bogus"}, {"type": "text", "text": "hi"}]
    ok = MessagesRequest.model_validate({"max_tokens": 5, "messages": [{"role": "user", "content": blocks}]})
    assert [m["content"] for m in anthropic_to_chat(ok).messages] == ["hi"]


def test_responses_input_of_unknown_items_only_names_them():
    req = ResponsesRequest.model_validate({"input": [{"type": "web_search_call"}, {"type": "bogus"}]})
    with pytest.raises(APIError) as err:
        responses_to_chat(req)
    assert err.value.status == 400 and "skipped item types: bogus, web_search_call" in str(err.value)
    ok = ResponsesRequest.model_validate({"input": [{"type": "bogus"}, {"role": "user", "content": "hi"}]})
    assert [m["content"] for m in responses_to_chat(ok).messages] == ["hi"]
