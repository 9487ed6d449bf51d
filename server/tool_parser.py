"""GLM-4.7 tool-call parser.

Format (GLM-4.7 compact form; GLM-4.5/4.6 put newlines between the parts, which is accepted too):

    <tool_call>NAME<arg_key>K1</arg_key><arg_value>V1</arg_value>...</tool_call>
    <tool_call>NAME</tool_call>                      (zero-argument call)

Values are raw text. A value whose parameter is string-typed in the tool's JSON schema is kept byte-exact
(whitespace and quotes included); other values are JSON-decoded (then Python-literal-decoded, then left as the
raw string; so is a value that is not strict JSON: NaN, Infinity, nested deeper than 64 levels) and coerced to the
schema's number/boolean type. `arguments` is emitted as a JSON object string that strict decoders read.

Like the reasoning parser this is a pure function of the accumulated text: `parse_tool_calls(text, tools,
final)` returns only what can no longer change. For an open call that means: the name once it is complete, and
a *prefix* of the final arguments JSON (complete pairs, plus the escaped part of a string value being written),
so a streaming caller diffs the argument strings and sends only the new suffix.
"""

from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass, field
from typing import Any

from server.reasoning_parser import partial_tag_suffix_len
from server.validation import MAX_JSON_DEPTH

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
ARG_KEY_START = "<arg_key>"
ARG_KEY_END = "</arg_key>"
ARG_VALUE_START = "<arg_value>"
ARG_VALUE_END = "</arg_value>"

_WS = " \t\r\n"


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # the full JSON object when `complete`, else a prefix of it
    complete: bool


@dataclass(frozen=True)
class ToolParse:
    content: str  # text outside tool-call blocks released so far
    calls: list[ParsedToolCall] = field(default_factory=list)
    # Where the last `<tool_call>` starts (-1: none) and how many calls come before it. Everything before that
    # point is final, so a streaming caller may re-parse from there only (see output_parser.py).
    last_call_start: int = -1
    calls_before_last: int = 0


# ----------------------------------------------------------------------------------------------------
# Schema typing


class ToolSchemas:
    """Parameter types of the request's tools, looked up by (tool name, argument name)."""

    def __init__(self, tools: list[dict[str, Any]] | None) -> None:
        self._params: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        for tool in tools or []:
            fn = tool.get("function", tool) if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                continue
            params = fn.get("parameters") or fn.get("input_schema") or {}
            if not isinstance(params, dict):
                params = {}
            props = params.get("properties") or {}
            self._params[fn["name"]] = (props if isinstance(props, dict) else {}, params)
        self._cache: dict[tuple[str, str], frozenset[str] | None] = {}

    def types(self, tool: str, arg: str) -> frozenset[str] | None:
        """JSON-schema types allowed for the argument, or None when unknown."""
        key = (tool, arg)
        if key not in self._cache:
            entry = self._params.get(tool)
            types = None
            if entry is not None and isinstance(entry[0].get(arg), dict):
                found: set[str] = set()
                _collect_types(entry[0][arg], entry[1], found, depth=0)
                types = frozenset(found) or None
            self._cache[key] = types
        return self._cache[key]

    def is_string(self, tool: str, arg: str) -> bool:
        types = self.types(tool, arg)
        return types is not None and "string" in types and types <= {"string", "null"}


def _json_type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "array"
    return "object"


def _resolve_ref(ref: str, root: dict[str, Any]) -> dict[str, Any] | None:
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, dict) else None


def _collect_types(schema: dict[str, Any], root: dict[str, Any], out: set[str], depth: int) -> None:
    if depth > 16:
        return
    if isinstance(schema.get("$ref"), str):
        target = _resolve_ref(schema["$ref"], root)
        if target is not None:
            _collect_types(target, root, out, depth + 1)
    t = schema.get("type")
    if isinstance(t, str):
        out.add(t)
    elif isinstance(t, list):
        out.update(x for x in t if isinstance(x, str))
    if "enum" in schema and isinstance(schema["enum"], list):
        out.update(_json_type_of(v) for v in schema["enum"])
    if "const" in schema:
        out.add(_json_type_of(schema["const"]))
    for combo in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(combo) or []:
            if isinstance(sub, dict):
                _collect_types(sub, root, out, depth + 1)


def _json_safe(value: Any) -> bool:
    """Whether a decoded value re-encodes as strict JSON that clients can decode again: finite numbers only
    (no NaN / Infinity, which json.loads and literal_eval accept), nested at most MAX_JSON_DEPTH levels."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return False
        if isinstance(node, (dict, list, tuple)):
            if depth >= MAX_JSON_DEPTH:
                return False
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return True


def _decode(text: str) -> tuple[Any, bool]:
    """A raw value as JSON (else a Python literal); (None, False) when it is neither or not strict JSON."""
    try:
        value = json.loads(text)
        return (value, True) if _json_safe(value) else (None, False)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the interpreter's stack
        pass
    if len(text) > 100_000:
        return None, False
    try:
        value = ast.literal_eval(text)
        if not _json_safe(value):
            return None, False
        json.dumps(value)  # only JSON-representable literals (no sets, bytes, complex, tuples keys...)
        return value, True
    except Exception:
        return None, False


def convert_value(raw: str, types: frozenset[str] | None) -> Any:
    """Type one raw argument value (see the module docstring)."""
    if types is not None and "string" in types and types <= {"string", "null"}:
        return raw
    text = raw.strip(_WS)
    value, ok = _decode(text)
    if types is None:
        return value if ok else raw
    if ok:
        kind = _json_type_of(value)
        if kind in types or (kind == "integer" and "number" in types):
            return value
        if kind == "number" and "integer" in types and value.is_integer():
            return int(value)
        if "string" in types:
            return raw
        return value
    low = text.lower()
    if "boolean" in types and low in ("true", "false"):
        return low == "true"
    if "null" in types and low in ("null", "none"):
        return None
    return raw


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------
# Parsing


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _parse_call_body(body: str, closed: bool, final: bool, schemas: ToolSchemas) -> ParsedToolCall | None:
    """One call's text between `<tool_call>` and `</tool_call>` (or the end of the text when still open)."""
    release = closed or final
    k = body.find(ARG_KEY_START)
    if k < 0:
        if not release:
            return None  # the name may still be growing
        name_text = body
        if not closed:
            hold = partial_tag_suffix_len(name_text, TOOL_CALL_END, ARG_KEY_START)
            name_text = name_text[: len(name_text) - hold]
        name = name_text.strip()
        return ParsedToolCall(name, "{}", True) if name else None
    name = body[:k].strip()
    if not name:
        return None
    pairs: list[tuple[str, str]] = []
    pending: tuple[str, str] | None = None  # (key, partial value) of a value still being written
    pos = k
    while True:
        pos = _skip_ws(body, pos)
        if not body.startswith(ARG_KEY_START, pos):
            break  # end of text, a partial tag, or junk: ignored
        key_end = body.find(ARG_KEY_END, pos + len(ARG_KEY_START))
        if key_end < 0:
            break  # key still being written
        key = body[pos + len(ARG_KEY_START) : key_end].strip()
        pos = _skip_ws(body, key_end + len(ARG_KEY_END))
        if not body.startswith(ARG_VALUE_START, pos):
            break  # value not started yet (or junk)
        vstart = pos + len(ARG_VALUE_START)
        vend = body.find(ARG_VALUE_END, vstart)
        if vend < 0:
            pending = (key, body[vstart:])
            break
        pairs.append((key, body[vstart:vend]))
        pos = vend + len(ARG_VALUE_END)

    parts = [f"{_dumps(key)}: {_dumps(convert_value(raw, schemas.types(name, key)))}" for key, raw in pairs]
    if release:
        if pending is not None:  # truncated output: keep what the model wrote of the last value
            key, raw = pending
            raw = raw[: len(raw) - partial_tag_suffix_len(raw, ARG_VALUE_END, TOOL_CALL_END)]
            parts.append(f"{_dumps(key)}: {_dumps(convert_value(raw, schemas.types(name, key)))}")
        return ParsedToolCall(name, "{" + ", ".join(parts) + "}", True)
    args = "{" + ", ".join(parts)
    if pending is not None and schemas.is_string(name, pending[0]):
        key, raw = pending
        raw = raw[: len(raw) - partial_tag_suffix_len(raw, ARG_VALUE_END)]
        args += (", " if parts else "") + f"{_dumps(key)}: " + _dumps(raw)[:-1]
    return ParsedToolCall(name, args, False)


def parse_tool_calls(text: str, schemas: ToolSchemas, final: bool = False) -> ToolParse:
    """Split content text into plain text and tool calls (see the module docstring).

    Plain text before the first call is kept verbatim; text between or after calls is kept only when it is not
    blank, and only once it is known to be followed by another call or by the end of the output.
    """
    first = text.find(TOOL_CALL_START)
    if first < 0:
        if final:
            return ToolParse(text, [])
        return ToolParse(text[: len(text) - partial_tag_suffix_len(text, TOOL_CALL_START)], [])
    content = [text[:first]]
    calls: list[ParsedToolCall] = []
    pos = first
    while True:
        last_start, before_last = pos, len(calls)
        body_start = pos + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body_start)
        if end < 0:
            call = _parse_call_body(text[body_start:], closed=False, final=final, schemas=schemas)
            if call is not None:
                calls.append(call)
            break
        call = _parse_call_body(text[body_start:end], closed=True, final=final, schemas=schemas)
        if call is not None:
            calls.append(call)
        pos = end + len(TOOL_CALL_END)
        nxt = text.find(TOOL_CALL_START, pos)
        if nxt < 0:
            if final and text[pos:].strip(_WS):
                content.append(text[pos:])
            break
        if text[pos:nxt].strip(_WS):
            content.append(text[pos:nxt])
        pos = nxt
    return ToolParse("".join(content), calls, last_start, before_last)
