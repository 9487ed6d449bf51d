"""GLM-4.7 reasoning / tool-call parsers: streamed (any split) == one-shot, and the one-shot parse is right."""

from __future__ import annotations

import json
import random

import pytest

from server.output_parser import ChatOutputParser
from server.reasoning_parser import split_reasoning
from server.tool_parser import ToolSchemas, convert_value, parse_tool_calls

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                },
                "required": ["city"],
            },
        },
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
    {
        "type": "function",
        "function": {"name": "list_files", "parameters": {"type": "object", "properties": {}}},
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "$defs": {"Filt": {"type": "object"}},
                "properties": {
                    "filters": {"$ref": "#/$defs/Filt"},
                    "limit": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "mode": {"enum": ["fast", "exact"]},
                    "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
            },
        },
    },
]

CODE = 'def f(x):\n    return "hi \\"there\\"" + x\n\n  '
CASES = {
    "reasoning_then_text": (
        True,
        "The user greets me.\nI should answer briefly.</think>Hello! How can I help you today?",
        {
            "reasoning": "The user greets me.\nI should answer briefly.",
            "content": "Hello! How can I help you today?",
            "calls": [],
        },
    ),
    "tool_call_ends_reasoning": (
        True,
        "Need the weather; call the tool.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value><arg_key>metric</arg_key><arg_value>true</arg_value>"
        "</tool_call>",
        {
            "reasoning": "Need the weather; call the tool.",
            "content": "",
            "calls": [("get_weather", {"city": "Paris", "days": 3, "metric": True})],
        },
    ),
    "text_and_several_calls": (
        True,
        "Plan: write, list, search.</think>I'll do three things.\n"
        "<tool_call>write_file<arg_key>path</arg_key><arg_value>/tmp/a b.py</arg_value><arg_key>content</arg_key>"
        "<arg_value>" + CODE + "</arg_value></tool_call>\n"
        "<tool_call>list_files</tool_call>\n"
        '<tool_call>search<arg_key>filters</arg_key><arg_value>{"lang": ["py", "rs"], "deep": {"x": null}}'
        "</arg_value><arg_key>limit</arg_key><arg_value> 10 </arg_value><arg_key>ratio</arg_key><arg_value>0.5"
        '</arg_value><arg_key>tags</arg_key><arg_value>["a", "<b>"]</arg_value><arg_key>mode</arg_key>'
        "<arg_value>exact</arg_value><arg_key>note</arg_key><arg_value>  keep  spaces </arg_value></tool_call>",
        {
            "reasoning": "Plan: write, list, search.",
            "content": "I'll do three things.\n",
            "calls": [
                ("write_file", {"path": "/tmp/a b.py", "content": CODE}),
                ("list_files", {}),
                (
                    "search",
                    {
                        "filters": {"lang": ["py", "rs"], "deep": {"x": None}},
                        "limit": 10,
                        "ratio": 0.5,
                        "tags": ["a", "<b>"],
                        "mode": "exact",
                        "note": "  keep  spaces ",
                    },
                ),
            ],
        },
    ),
    "thinking_off_glm45_newlines": (
        False,
        "Sure.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>New York</arg_value>\n</tool_call>"
        '<tool_call>unknown_tool\n<arg_key>x</arg_key>\n<arg_value>{"k": 1}</arg_value>\n<arg_key>y</arg_key>'
        "<arg_value>plain</arg_value></tool_call>",
        {
            "reasoning": "",
            "content": "Sure.",
            "calls": [("get_weather", {"city": "New York"}), ("unknown_tool", {"x": {"k": 1}, "y": "plain"})],
        },
    ),
    "explicit_think_tag_and_lookalikes": (
        True,
        "<think>a < b, and </thin is not a tag</think>x <tool is not a call; 3 < 4 </think> stays",
        {
            "reasoning": "a < b, and </thin is not a tag",
            "content": "x <tool is not a call; 3 < 4 </think> stays",
            "calls": [],
        },
    ),
    "text_after_calls": (
        False,
        "<tool_call>list_files</tool_call>\n\n<tool_call>list_files</tool_call> Done, waiting.",
        {"reasoning": "", "content": " Done, waiting.", "calls": [("list_files", {}), ("list_files", {})]},
    ),
    "truncated_in_reasoning": (
        True,
        "Still thinking about </thi",
        {"reasoning": "Still thinking about </thi", "content": "", "calls": []},
    ),
    "truncated_in_string_value": (
        False,
        "<tool_call>write_file<arg_key>path</arg_key><arg_value>x.txt</arg_value><arg_key>content</arg_key>"
        "<arg_value>line1\nline2</arg_va",
        {
            "reasoning": "",
            "content": "",
            "calls": [("write_file", {"path": "x.txt", "content": "line1\nline2"})],
        },
    ),
    "unicode": (
        True,
        '用户想要天气。🌧</think>好的<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京 "市"</arg_value>'
        "</tool_call>",
        {
            "reasoning": "用户想要天气。🌧",
            "content": "好的",
            "calls": [("get_weather", {"city": '北京 "市"'})],
        },
    ),
}


def run_stream(starts_in_reasoning: bool, chunks: list[str], tools=TOOLS):
    parser = ChatOutputParser(starts_in_reasoning=starts_in_reasoning, tools=tools, parse_tools=True)
    reasoning, content, calls = "", "", {}
    events = []
    for i, chunk in enumerate(chunks + [""]):
        events.extend(parser.feed(chunk, final=i == len(chunks)))
    for ev in events:
        if ev[0] == "reasoning":
            assert ev[1]
            reasoning += ev[1]
        elif ev[0] == "content":
            assert ev[1]
            content += ev[1]
        elif ev[0] == "tool_start":
            assert ev[1] not in calls and ev[1] == len(calls)
            calls[ev[1]] = {"id": ev[2], "name": ev[3], "arguments": ""}
        else:
            assert ev[0] == "tool_args" and ev[2]
            calls[ev[1]]["arguments"] += ev[2]
    out_calls = [calls[i] for i in range(len(calls))]
    # the parser's own record equals what was streamed
    assert parser.reasoning == reasoning and parser.content == content
    assert [(c.id, c.name, c.arguments) for c in parser.tool_calls] == [
        (c["id"], c["name"], c["arguments"]) for c in out_calls
    ]
    return reasoning, content, [(c["name"], c["arguments"]) for c in out_calls]


def one_shot(starts, text, tools=TOOLS):
    """The reference: the pure parsers on the whole text."""
    split = split_reasoning(text, starts, final=True)
    parsed = parse_tool_calls(split.content, ToolSchemas(tools), final=True)
    assert all(c.complete for c in parsed.calls)
    return split.reasoning, parsed.content, [(c.name, c.arguments) for c in parsed.calls]


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_shot_parse(name):
    starts, text, expected = CASES[name]
    reasoning, content, calls = one_shot(starts, text)
    assert reasoning == expected["reasoning"]
    assert content == expected["content"]
    assert [(n, json.loads(a)) for n, a in calls] == expected["calls"]
    assert run_stream(starts, [text]) == (reasoning, content, calls)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_two_way_split_matches_one_shot(name):
    starts, text, _ = CASES[name]
    ref = one_shot(starts, text)
    for i in range(len(text) + 1):
        assert run_stream(starts, [text[:i], text[i:]]) == ref, f"split at {i}: {text[:i]!r} | {text[i:]!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_char_by_char_and_multi_token_chunks(name):
    starts, text, _ = CASES[name]
    ref = one_shot(starts, text)
    assert run_stream(starts, list(text)) == ref
    rng = random.Random(name)
    for _ in range(30):
        chunks, pos = [], 0
        while pos < len(text):
            n = rng.randint(1, 12)
            chunks.append(text[pos : pos + n])
            pos += n
        assert run_stream(starts, chunks) == ref


def test_arguments_stream_progressively():
    """String values are streamed while they are written, not only at the end."""
    starts, text, _ = CASES["text_and_several_calls"]
    parser = ChatOutputParser(starts_in_reasoning=starts, tools=TOOLS, parse_tools=True)
    cut = text.index("return")
    parser.feed(text[:cut])
    assert parser.tool_calls and parser.tool_calls[0].name == "write_file"
    assert parser.tool_calls[0].arguments.startswith('{"path": "/tmp/a b.py", "content": "def f(x):\\n')


def test_zero_arg_call_streamed_before_close_gets_braces():
    parser = ChatOutputParser(starts_in_reasoning=False, tools=TOOLS, parse_tools=True)
    ev = parser.feed("<tool_call>list_files")
    assert ev == []  # name not known to be complete yet
    ev = parser.feed("</tool_call>")
    assert ev[0][0] == "tool_start" and ev[0][3] == "list_files"
    assert ev[1] == ("tool_args", 0, "{}")


def test_no_tools_leaves_markup_in_content():
    parser = ChatOutputParser(starts_in_reasoning=False, parse_tools=False)
    text = "<tool_call>x</tool_call>"
    assert parser.feed(text, final=True) == [("content", text)]


def test_parallel_tool_calls_false_keeps_first():
    parser = ChatOutputParser(
        starts_in_reasoning=False, tools=TOOLS, parse_tools=True, parallel_tool_calls=False
    )
    parser.feed(
        "<tool_call>list_files</tool_call><tool_call>get_weather<arg_key>city</arg_key>"
        "<arg_value>x</arg_value></tool_call>",
        final=True,
    )
    assert [c.name for c in parser.tool_calls] == ["list_files"]


def test_split_reasoning_thinking_off_and_holdback():
    assert split_reasoning("hi</think>x", False).content == "hi</think>x"
    s = split_reasoning("abc</th", True)
    assert s.reasoning == "abc" and s.in_reasoning
    assert split_reasoning("abc</th", True, final=True).reasoning == "abc</th"
    s = split_reasoning("<thi", False)
    assert s.content == "" and s.reasoning == ""


@pytest.mark.parametrize(
    "raw,types,expected",
    [
        (" 42 ", frozenset({"integer"}), 42),
        ("5.0", frozenset({"integer"}), 5),
        ("1e3", frozenset({"number"}), 1000.0),
        ("True", frozenset({"boolean"}), True),
        ("false", frozenset({"boolean"}), False),
        ("{'a': 1}", frozenset({"object"}), {"a": 1}),
        ("not json", frozenset({"object"}), "not json"),
        ("  spaced  ", frozenset({"string"}), "  spaced  "),
        ('"quoted"', frozenset({"string"}), '"quoted"'),
        ("42", frozenset({"string"}), "42"),
        ("42", None, 42),
        ("hello", None, "hello"),
        ("null", frozenset({"integer", "null"}), None),
        # not strict JSON (NaN / Infinity / overflow, nesting past the interpreter's stack): kept as raw text
        ("NaN", frozenset({"number"}), "NaN"),
        ("-Infinity", None, "-Infinity"),
        ("1e999", frozenset({"number"}), "1e999"),
        ("[1, 1e999]", frozenset({"array"}), "[1, 1e999]"),
        ("[" * 1500 + "]" * 1500, None, "[" * 1500 + "]" * 1500),
        ("[" * 1500, frozenset({"array"}), "[" * 1500),
        ('{"a": ' * 1200 + "1" + "}" * 1200, frozenset({"object"}), '{"a": ' * 1200 + "1" + "}" * 1200),
    ],
)
def test_convert_value(raw, types, expected):
    assert convert_value(raw, types) == expected


def test_tool_call_arguments_are_always_strict_json():
    """Whatever the model writes as a value, `arguments` is JSON a strict decoder reads (clients decode it; the
    Anthropic route re-encodes it with allow_nan=False)."""
    values = ["NaN", "Infinity", "-1e999", "[" * 3000 + "]" * 3000, "[1," * 30000 + "1]", "{1, 2}", "9**9**9"]
    body = "".join(f"<arg_key>k{i}</arg_key><arg_value>{v}</arg_value>" for i, v in enumerate(values))
    for final in (False, True):
        (call,) = parse_tool_calls(f"<tool_call>f{body}</tool_call>", ToolSchemas(None), final=final).calls
        args = json.loads(call.arguments, parse_constant=lambda c: pytest.fail(f"{c} in arguments"))
        assert args == {f"k{i}": v for i, v in enumerate(values)}


def test_schema_types():
    s = ToolSchemas(TOOLS)
    assert s.types("search", "filters") == {"object"}
    assert s.is_string("search", "mode")
    assert s.is_string("search", "note")
    assert not s.is_string("search", "limit")
    assert s.types("nope", "x") is None


def test_parse_tool_calls_holds_partial_tags():
    schemas = ToolSchemas(TOOLS)
    assert parse_tool_calls("abc<tool_", schemas).content == "abc"
    assert parse_tool_calls("abc<tool_", schemas, final=True).content == "abc<tool_"
    p = parse_tool_calls("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Pa</arg_v", schemas)
    assert p.calls[0].arguments == '{"city": "Pa'


def test_fuzz_streaming_equals_pure_parsers(caplog):
    """Random mixes of GLM tags, partial tags and text (well-formed or not), random chunking: the incremental
    streaming parser must give exactly what the pure parsers give on the whole text, with no divergence."""
    pieces = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
              "</arg_value>", "get_weather", "city", "days", "Paris", " ", "\n", "<", "</", "x", '{"a": 1}', "3",
              "list_files", "<tool", "</thi", "write_file", "content", "<arg_", '"q"']  # fmt: skip
    rng = random.Random(1234)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        starts = rng.random() < 0.5
        chunks, pos = [], 0
        while pos < len(text):
            n = rng.randint(1, 8)
            chunks.append(text[pos : pos + n])
            pos += n
        assert run_stream(starts, chunks) == one_shot(starts, text), (text, starts, chunks)
    assert "diverged" not in caplog.text
