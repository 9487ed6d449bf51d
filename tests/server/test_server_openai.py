"""The live server (tiny checkpoint, real engine) through the real `openai` client.

The tiny model writes gibberish, so these tests check structure. Reasoning and tool-call streaming go end to
end with the test-only scripted-output engine (tests/server/scripted_engine.py): the engine really runs, but the text of
each step is replaced by the next chunk of a realistic GLM-4.7 output.
"""

from __future__ import annotations

import json
import re
import time

import anthropic
import httpx
import openai
import pytest

from server.anthropic_api import MessagesRequest, to_chat_request
from server.structured_output import request_grammar

SCRIPTS = {
    # thinking on: reasoning, then a tool call without </think>; arguments arrive in small pieces
    "reason_tool": [
        "The user wants",
        " the weather in Paris.",
        "<tool_call>",
        "get_weather",
        "<arg_key>",
        "city",
        "</arg_key>",
        "<arg_value>",
        "Par",
        "is",
        "</arg_value>",
        "<arg_key>days</arg_key><arg_value>",
        "3",
        "</arg_value>",
        "</tool_call>",
    ],
    "reason_text": ["Let me think", " about it.", "</think>", "Hello", " world!"],
    "two_calls": [
        "Plan.",
        "</think>",
        "Running two tools.\n",
        "<tool_call>list_files</tool_call>\n",
        "<tool_call>write_file<arg_key>path</arg_key><arg_value>a.txt</arg_value>",
        '<arg_key>content</arg_key><arg_value>line1\n  "quoted"\n',
        "</arg_value></tool_call>",
    ],
    "tool_no_think": [
        "<tool_call>get_weather<arg_key>city</arg_key>",
        "<arg_value>Oslo</arg_value></tool_call>",
    ],
    # values that are not strict JSON: NaN for an integer, a number past float range, nesting past Python's stack
    "odd_values": [
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value>",
        "<arg_key>days</arg_key><arg_value>NaN</arg_value><arg_key>scale</arg_key><arg_value>1e999</arg_value>",
        "<arg_key>deep</arg_key><arg_value>" + "[" * 1500 + "]" * 1500 + "</arg_value></tool_call>",
    ],
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "list_files", "parameters": {"type": "object", "properties": {}}},
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            },
        },
    },
]

MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    scripts = tmp_path_factory.mktemp("scripts") / "scripts.json"
    scripts.write_text(json.dumps(SCRIPTS))
    srv = launch_server(
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--stats-interval",
        "1",
        env={"GLINT_TEST_SCRIPTS": str(scripts)},
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="dummy", max_retries=0, timeout=120)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------------ basics


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["glint-tiny"]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_non_streaming(client):
    raw = client.chat.completions.with_raw_response.create(
        model="glint-tiny", messages=user("Hello there"), max_tokens=8, temperature=0
    )
    assert raw.headers.get("x-request-id")
    resp = raw.parse()
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == "glint-tiny"
    (choice,) = resp.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 0 and 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # thinking is on by default: the gibberish lands in reasoning_content unless the model wrote </think>
    msg = choice.message
    assert isinstance(msg.content, str) and (msg.content or msg.model_extra.get("reasoning_content"))


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model="glint-tiny",
        messages=user("Stream please"),
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].finish_reason is None
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    finish = chunks[-2]
    assert finish.choices[0].finish_reason == "length"
    d = finish.choices[0].delta
    assert d.content is None and d.tool_calls is None and d.role is None
    assert all(c.usage is None for c in chunks[:-1])
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


def test_chat_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="glint-tiny", messages=user("x"), max_tokens=3, stream=True))
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


def test_n2(client):
    resp = client.chat.completions.create(
        model="glint-tiny", messages=user("two answers"), n=2, max_tokens=5, temperature=1.0, seed=1
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    chunks = list(
        client.chat.completions.create(
            model="glint-tiny",
            messages=user("two answers"),
            n=2,
            max_tokens=5,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(f.index for f in finishes) == [0, 1]
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]


def test_logprobs(client):
    resp = client.chat.completions.create(
        model="glint-tiny",
        messages=user("logprobs"),
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    streamed = []
    for c in client.chat.completions.create(
        model="glint-tiny",
        messages=user("logprobs"),
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        if c.choices and c.choices[0].logprobs:
            streamed.extend(c.choices[0].logprobs.content)
    assert len(streamed) == 6 and all(len(e.top_logprobs) == 2 for e in streamed)


def test_sampling_extras_accepted(client):
    resp = client.chat.completions.create(
        model="glint-tiny",
        messages=user("params"),
        max_completion_tokens=4,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=0.2,
        stop=["\n\n"],
        user="u1",
        metadata={"a": "b"},
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "ignore_eos": True,
            "some_unknown_field": 1,
        },
    )
    assert resp.usage.completion_tokens == 4


def test_max_tokens_clamped_to_context(client):
    # a prompt near the end of the context and a huge max_tokens: clamped to the room left, not a 400
    resp = client.completions.create(
        model="glint-tiny", prompt=[10] * (MAX_MODEL_LEN - 6), max_tokens=10**6, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 6 and resp.usage.total_tokens == MAX_MODEL_LEN


def test_prompt_too_long_is_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="glint-tiny", messages=user("word " * 3000), max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in e.value.message


def test_prompt_too_long_on_the_anthropic_route_says_so_as_anthropic_does(server):
    # Claude Code auto-compacts only on "prompt is too long" and reads "<n> tokens > <limit>" from the message
    client = anthropic.Anthropic(base_url=server.url, api_key="dummy", max_retries=0, timeout=120)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="glint-tiny", max_tokens=5, messages=user("word " * 3000))
    m = re.search(r"prompt is too long[^0-9]*(\d+)\s*tokens?\s*>\s*(\d+)", e.value.message, re.IGNORECASE)
    assert m is not None, e.value.message
    assert int(m.group(1)) > MAX_MODEL_LEN and int(m.group(2)) == MAX_MODEL_LEN - 1


def test_invalid_response_formats_are_400s_naming_the_problem(client):
    for fmt, param, words in (
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
         "response_format.json_schema.schema", "objectx"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
         "response_format.json_schema.schema", "missing"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "required"),
        ({"type": "xml"}, "response_format.type", "xml"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="glint-tiny", messages=user("json"), max_tokens=5, response_format=fmt
            )
        assert e.value.param == param and words in e.value.message, e.value.message
    resp = client.chat.completions.create(
        model="glint-tiny", messages=user("json"), max_tokens=2, response_format={"type": "text"}
    )
    assert resp.choices


def test_invalid_params_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="glint-tiny", messages=user("x"), max_tokens=3, temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="glint-tiny", messages=user("x"), max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="glint-tiny", messages=[], max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="glint-tiny",
            messages=user("x"),
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="glint-tiny",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ],
            max_tokens=3,
        )


def test_history_with_tool_calls(client):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "I should call the tool.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    resp = client.chat.completions.create(model="glint-tiny", messages=messages, tools=TOOLS, max_tokens=3)
    assert resp.choices[0].finish_reason in ("stop", "length", "tool_calls")
    bad = [dict(m) for m in messages]
    bad[2] = {
        **bad[2],
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}
        ],
    }
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="glint-tiny", messages=bad, tools=TOOLS, max_tokens=3)
    assert "messages[2]" in e.value.message


# ------------------------------------------------------------------------------------------------ completions


def test_completions_prompts(client):
    resp = client.completions.create(
        model="glint-tiny", prompt="Once upon a time", max_tokens=4, extra_body={"ignore_eos": True}
    )
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert len(resp.choices) == 1 and resp.usage.completion_tokens == 4
    resp = client.completions.create(model="glint-tiny", prompt=["a b c", "d e f"], max_tokens=2, n=2)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    resp = client.completions.create(model="glint-tiny", prompt=[10, 20, 30, 40], max_tokens=2)
    assert resp.usage.prompt_tokens == 4
    resp = client.completions.create(model="glint-tiny", prompt=[[10, 20], [30, 40, 50]], max_tokens=2)
    assert len(resp.choices) == 2 and resp.usage.prompt_tokens == 5


def test_completions_echo_logprobs_scoring(client):
    prompt = "The quick brown fox"
    resp = client.completions.create(model="glint-tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    (choice,) = resp.choices
    assert choice.text == prompt
    lp = choice.logprobs
    n_prompt = resp.usage.prompt_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.top_logprobs[0] is None and all(len(t) >= 1 for t in lp.top_logprobs[1:])
    assert resp.usage.completion_tokens == 0
    resp = client.completions.create(
        model="glint-tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=1, extra_body={"ignore_eos": True}
    )
    choice = resp.choices[0]
    assert choice.text.startswith(prompt) and len(choice.logprobs.tokens) == n_prompt + 3


def test_completions_stream(client):
    chunks = list(
        client.completions.create(
            model="glint-tiny",
            prompt="Stream",
            max_tokens=5,
            stream=True,
            logprobs=1,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"
    n_lp = sum(len(c.choices[0].logprobs.tokens) for c in chunks[:-1] if c.choices and c.choices[0].logprobs)
    assert n_lp == 5


# ------------------------------------------------------------------------------------------------ scripted GLM


def _accumulate(chunks):
    """What a client reassembles from a chat stream (the SDK's accumulation rules), with shape checks."""
    reasoning, content, calls, finish = "", "", {}, None
    for c in chunks:
        if not c.choices:
            continue
        ch = c.choices[0]
        d = ch.delta
        extra = d.model_extra or {}
        reasoning += extra.get("reasoning_content") or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function.name is None and tc.function.arguments
                calls[tc.index]["arguments"] += tc.function.arguments
        if ch.finish_reason:
            assert finish is None and not (d.content or d.tool_calls or extra.get("reasoning_content"))
            finish = ch.finish_reason
    return reasoning, content, [calls[i] for i in sorted(calls)], finish


def test_scripted_reasoning_then_tool_call(client):
    kw = dict(model="glint-tiny", messages=user("<<script:reason_tool>>"), tools=TOOLS, max_tokens=100)
    resp = client.chat.completions.create(**kw)
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning_content"] == "The user wants the weather in Paris."
    assert msg.content is None
    (call,) = msg.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    reasoning, content, calls, finish = _accumulate(client.chat.completions.create(**kw, stream=True))
    assert reasoning == "The user wants the weather in Paris." and content == ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 3})
    ]
    assert calls[0]["arguments"] == call.function.arguments


def test_scripted_reasoning_and_text(client):
    kw = dict(model="glint-tiny", messages=user("<<script:reason_text>>"), max_tokens=100)
    resp = client.chat.completions.create(**kw)
    msg = resp.choices[0].message
    assert msg.model_extra["reasoning_content"] == "Let me think about it."
    assert msg.content == "Hello world!" and resp.choices[0].finish_reason == "stop"
    reasoning, content, calls, finish = _accumulate(client.chat.completions.create(**kw, stream=True))
    assert (reasoning, content, calls, finish) == ("Let me think about it.", "Hello world!", [], "stop")


def test_scripted_two_calls_zero_arg_and_exact_strings(client):
    kw = dict(model="glint-tiny", messages=user("<<script:two_calls>>"), tools=TOOLS, max_tokens=100)
    resp = client.chat.completions.create(**kw)
    msg = resp.choices[0].message
    assert msg.content == "Running two tools.\n"
    names = [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]
    assert names == [("list_files", {}), ("write_file", {"path": "a.txt", "content": 'line1\n  "quoted"\n'})]
    assert msg.tool_calls[0].function.arguments == "{}"
    _, content, calls, finish = _accumulate(client.chat.completions.create(**kw, stream=True))
    assert content == "Running two tools.\n" and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == names
    assert len({c["id"] for c in calls}) == 2


def test_scripted_truncated_by_max_tokens(client):
    resp = client.chat.completions.create(model="glint-tiny", messages=user("<<script:reason_text>>"), max_tokens=2)
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.model_extra["reasoning_content"] == "Let me think about it."


def test_thinking_off_kwargs_and_reasoning_effort(client):
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}):
        resp = client.chat.completions.create(
            model="glint-tiny", messages=user("<<script:tool_no_think>>"), tools=TOOLS, max_tokens=50, extra_body=extra
        )
        msg = resp.choices[0].message
        assert msg.model_extra.get("reasoning_content") is None
        assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Oslo"}
    # tool_choice none: the markup stays text
    resp = client.chat.completions.create(
        model="glint-tiny",
        messages=user("<<script:tool_no_think>>"),
        tools=TOOLS,
        tool_choice="none",
        max_tokens=50,
        reasoning_effort="none",
    )
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].message.content.startswith("<tool_call>get_weather")


def test_open_server_accepts_any_or_no_key(server):
    for headers in ({}, {"Authorization": "Bearer None"}, {"x-api-key": "whatever"}):
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers=headers,
            json={"messages": user("x"), "max_tokens": 1},
        )
        assert r.status_code == 200, r.text


def test_stats_line_and_request_log(server):
    # the stats line is logged on the next --stats-interval (1 s) tick after activity: give it a few ticks
    deadline = time.monotonic() + 5
    text = server.log_text()
    while "Avg generation throughput" not in text and time.monotonic() < deadline:
        time.sleep(0.1)
        text = server.log_text()
    assert "KV cache capacity" in text and "glint server ready at http://" in text
    assert "Avg generation throughput" in text and "Prefix cache hit rate" in text
    assert '"POST /v1/chat/completions" 200' in text
    assert "Hello there" not in text  # no prompt text in the request log by default


# ------------------------------------------------------------------------- other servers' structured outputs

NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def test_vllm_and_sglang_structured_output_fields_are_enforced(client):
    """vLLM's structured_outputs / guided_* and SGLang's regex / json_schema / ebnf extra fields constrain the
    output as response_format does (the tiny model's random weights would write none of these by chance)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    completions = (
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[0-9]{3}-[a-c]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[a-c]{2}", t)),
        ({"structured_outputs": {"choice": ["left", "right"], "disable_any_whitespace": True}},
         lambda t: t in ("left", "right")),
        ({"ebnf": 'root ::= "go" ("up" | "down")'}, lambda t: t in ("goup", "godown")),  # GBNF, as SGLang takes
        ({"guided_grammar": 'start: "x" DIGIT\nDIGIT: /[0-9]/'}, lambda t: re.fullmatch("x[0-9]", t)),  # Lark
    )
    for extra, ok in completions:
        for seed in (0, 1):
            resp = client.completions.create(model="glint-tiny", prompt="Answer:", max_tokens=24, temperature=1.0,
                                             seed=seed, extra_body=extra)
            text = resp.choices[0].text
            assert ok(text) and resp.choices[0].finish_reason == "stop", (extra, text)
    chats = (
        ({"structured_outputs": {"json": schema}}, lambda t: set(json.loads(t)) == {"n", "ok"}),
        ({"guided_json": json.dumps(schema)}, lambda t: set(json.loads(t)) == {"n", "ok"}),
        ({"json_schema": json.dumps(schema)}, lambda t: set(json.loads(t)) == {"n", "ok"}),  # SGLang: a string
        ({"regex": "(ab|cd)x"}, lambda t: t in ("abx", "cdx")),
    )
    for extra, ok in chats:
        resp = client.chat.completions.create(model="glint-tiny", messages=user("go"), max_tokens=60,
                                              temperature=1.0, seed=3, extra_body={**extra, **NO_THINKING})
        text = resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "stop" and ok(text), (extra, text)
    # any JSON object: a random model's keys run on past max_tokens, so only the start is checkable here
    extra = {"structured_outputs": {"json_object": True}, **NO_THINKING}
    resp = client.chat.completions.create(model="glint-tiny", messages=user("go"), max_tokens=8, temperature=1.0,
                                          seed=3, extra_body=extra)
    assert resp.choices[0].message.content.startswith("{")
    assert request_grammar(None, {"structured_outputs": {"json_object": True}}) == \
        request_grammar({"type": "json_object"}, None)


def test_bad_structured_output_fields_are_400s_naming_the_field(client):
    for extra, param, words in (
        ({"guided_regex": "[a-"}, "guided_regex", "regex"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
        ({"json_schema": "[" * 3000 + "]" * 3000}, "json_schema", "nested more than"),
        ({"guided_json": '{"type": "number", "minimum": NaN}'}, "guided_json", "not valid JSON"),
        ({"ebnf": "root ::= ("}, "ebnf", "cannot be enforced"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "not supported"),
        ({"structured_outputs": "x"}, "structured_outputs", "object"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one structured-output constraint"),
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex", "response_format, regex"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="glint-tiny", messages=user("x"), max_tokens=5, extra_body=extra)
        assert e.value.param == param and words in e.value.message, (extra, e.value.message)


def test_tool_call_values_that_are_not_strict_json_stay_text(server):
    """A call whose values are NaN, 1e999 or nested deeper than Python's stack: 200s whose arguments a strict
    JSON decoder reads (those values as strings), never a 500 (RecursionError; Anthropic's NaN input)."""
    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in tool-call arguments"))

    want = {"city": "Oslo", "days": "NaN", "scale": "1e999", "deep": "[" * 1500 + "]" * 1500}
    msgs = user("<<script:odd_values>>")
    body = {"model": "glint-tiny", "messages": msgs, "tools": TOOLS, "max_tokens": 50}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert strict(r.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == want
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert not [e for e in events if "error" in e], events[-1]
    args = "".join(tc["function"].get("arguments", "") for e in events for c in e["choices"]
                   for tc in c["delta"].get("tool_calls") or [])
    assert strict(args) == want
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    r = httpx.post(f"{server.url}/v1/messages", json={"model": "glint-tiny", "messages": msgs, "tools": tools,
                                                      "max_tokens": 50}, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert [b["input"] for b in r.json()["content"] if b["type"] == "tool_use"] == [want]


def test_vllm_fields_this_server_does_not_implement_are_400s_not_ignored(client):
    for field, value in (("allowed_token_ids", [1, 2]), ("bad_words", ["x"]), ("truncate_prompt_tokens", 8),
                         ("logits_processors", ["m.P"]), ("use_beam_search", True),
                         ("return_tokens_as_token_ids", True)):
        for call in (lambda e: client.completions.create(model="glint-tiny", prompt="x", max_tokens=2, extra_body=e),
                     lambda e: client.chat.completions.create(model="glint-tiny", messages=user("x"), max_tokens=2,
                                                              extra_body=e)):
            with pytest.raises(openai.BadRequestError) as err:
                call({field: value})
            assert err.value.param == field and err.value.code == "unsupported_parameter", err.value.message
    # the values that ask for nothing pass (clients send vLLM's defaults)
    resp = client.completions.create(model="glint-tiny", prompt="x", max_tokens=2,
                                     extra_body={"use_beam_search": False, "bad_words": [], "allowed_token_ids": None})
    assert resp.choices[0].text is not None


# ------------------------------------------------------------------------------------------------ token utilities


def test_tokenize_a_chat_counts_what_the_chat_route_bills(server, client):
    """/tokenize with messages + tools renders as /v1/chat/completions does: its count is that request's
    usage.prompt_tokens; with a tool more, more tokens; /v1/tokenize is the same route."""
    messages = [{"role": "system", "content": "Be brief."}, *user("What is the weather in Paris?")]
    resp = client.chat.completions.create(model="glint-tiny", messages=messages, tools=TOOLS, max_tokens=1)
    http = httpx.Client(base_url=server.url, timeout=60)
    r = http.post("/tokenize", json={"model": "glint-tiny", "messages": messages, "tools": TOOLS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == resp.usage.prompt_tokens == len(body["tokens"])
    assert body["max_model_len"] == MAX_MODEL_LEN and body["token_strs"] is None
    fewer = http.post("/v1/tokenize", json={"messages": messages, "tools": TOOLS[:1]}).json()
    assert 0 < fewer["count"] < body["count"]
    # the rendered prompt ends in the generation prompt unless asked otherwise
    bare = http.post("/tokenize", json={"messages": messages, "tools": TOOLS, "add_generation_prompt": False})
    assert bare.json()["count"] < body["count"]


def test_tokenize_a_text_and_detokenize_it_back(server, client):
    http = httpx.Client(base_url=server.url, timeout=60)
    text = "Once upon a time, in <|user|> land"
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 3
    assert all(isinstance(t, str) and t for t in body["token_strs"])
    # the ids are the ones /v1/completions feeds the engine for the same text
    done = client.completions.create(model="glint-tiny", prompt=text, max_tokens=1)
    with_specials = http.post("/tokenize", json={"prompt": text}).json()
    assert with_specials["count"] == done.usage.prompt_tokens >= body["count"]
    back = http.post("/detokenize", json={"model": "glint-tiny", "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    assert http.post("/v1/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    assert http.post("/tokenize", json={"prompt": "", "add_special_tokens": False}).json()["count"] == 0


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "a"}]}, None),
        ("/tokenize", {"messages": "hi"}, "messages"),
        ("/detokenize", {"tokens": [1, -1]}, "tokens"),
        ("/detokenize", {"tokens": [10**12]}, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
        ("/detokenize", {}, "tokens"),
    ],
)
def test_token_utilities_answer_bad_input_with_a_400(server, path, body, param):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param
    r = httpx.post(server.url + path, json={**body, "model": "nope"}, timeout=60)
    assert r.status_code in (400, 404)


def test_thinking_budget_cuts_the_reasoning(server):
    """`thinking: {type: enabled, budget_tokens: N}` (chat) and Anthropic's budget_tokens: the engine forces
    `</think>` after N output tokens, so the reasoning is the unbudgeted run's first N tokens and an answer follows.
    The real tiny model (no script), greedy, eos ignored."""
    body = {"model": "glint-tiny", "messages": user("Describe the weather in Oslo."), "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "logprobs": True}

    def tokens(resp: dict) -> list[str]:
        return [c["token"] for c in resp["choices"][0]["logprobs"]["content"]]

    free = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    assert "</think>" not in tokens(free)[:5]  # the tiny model does not end its reasoning by itself here
    cut = httpx.post(server.url + "/v1/chat/completions", json={
        **body, "thinking": {"type": "enabled", "budget_tokens": 4}}, timeout=60).json()
    assert tokens(cut)[:4] == tokens(free)[:4] and tokens(cut)[4] == "</think>", (tokens(free), tokens(cut))
    msg = cut["choices"][0]["message"]
    assert msg["reasoning_content"] == "".join(tokens(free)[:4]).strip()
    assert msg["content"] and cut["usage"]["completion_tokens"] == 12
    # thinking off: the prompt ends with </think>, so the output is all answer and no budget applies
    off = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    plain = httpx.post(server.url + "/v1/chat/completions", json=off, timeout=60).json()
    budgeted = httpx.post(server.url + "/v1/chat/completions", json={
        **off, "thinking": {"type": "enabled", "budget_tokens": 4}, "chat_template_kwargs": {"enable_thinking": False}},
        timeout=60).json()
    assert tokens(budgeted) == tokens(plain) and "</think>" not in tokens(budgeted)[4:5]
    for bad in (-1, "4", True):
        r = httpx.post(server.url + "/v1/chat/completions", json={
            **body, "thinking": {"type": "enabled", "budget_tokens": bad}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "thinking.budget_tokens", r.text
    # Anthropic's budget_tokens reaches the chat request the engine's budget is built from (its floor, 1,024,
    # is past this server's 512-token context: checked here as a unit)
    chat = to_chat_request(MessagesRequest(model="m", max_tokens=2000, messages=[{"role": "user", "content": "q"}],
                                           thinking={"type": "enabled", "budget_tokens": 1500}))
    assert chat.thinking == {"type": "enabled", "budget_tokens": 1500}
    assert to_chat_request(MessagesRequest(model="m", max_tokens=20, messages=[{"role": "user", "content": "q"}],
                                           thinking={"type": "adaptive"})).thinking == {"type": "enabled"}
