"""Structured output: `response_format` (json_object / json_schema), forced tool calls (`tool_choice` required /
a named function) and the structured-output fields of vLLM (`structured_outputs` json / regex / choice / grammar /
json_object, and the older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`) and SGLang
(`json_schema`, `regex`, `ebnf`) -> an llguidance grammar the engine enforces token by token (engine/grammar.py).
A grammar may be Lark or GBNF (llguidance converts GBNF).

- json_object: any JSON object; json_schema: that schema (strict or not, it is enforced). JSON is written
  compactly (no free whitespace between tokens), so a model cannot pad it forever.
- Forced tool calls: GLM-4.7's own call format, `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...
  </tool_call>` (one call, or several with parallel_tool_calls): the name is one of the offered tools, the keys
  are the tool's properties (required ones first, in schema order, then optional ones in schema order, each at
  most once), a string value is raw text (its enum / maxLength honoured), any other value is JSON following
  the property's schema.
- With thinking on, the grammar starts after `</think>`: the reasoning before it is free text.
- A thinking budget (`thinking.budget_tokens`) caps that free text: the engine forces `</think>` after that many
  output tokens (engine.sampling_params.ThinkingBudget).

An invalid schema is a 400 naming the problem (llguidance's validator), raised before the engine sees it.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from engine.sampling_params import StructuredOutput, ThinkingBudget
from server.errors import bad_request, not_supported
from server.validation import load_json

JSON_OPTIONS = {"whitespace_flexible": False}
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>")
THINK_END = "</think>"


def _checked(grammar: str, param: str, what: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise bad_request(f"{what} cannot be enforced: {error}", param=param)
    return grammar


def json_grammar(schema: Any, param: str) -> str:
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{param} must be a JSON schema (an object)", param=param)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise bad_request(f"{param} is not a usable JSON schema: {e}", param=param) from None
    return _checked(grammar, param, f"the JSON schema in {param}")


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar of a chat/completions `response_format`; None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise bad_request("response_format must be an object", param="response_format")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_grammar({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request(
                "response_format type 'json_schema' needs json_schema: {name, schema, strict}",
                param="response_format.json_schema",
            )
        if "schema" not in spec:
            raise bad_request("response_format.json_schema.schema is required", param="response_format.json_schema.schema")
        return json_grammar(spec["schema"], "response_format.json_schema.schema")
    raise bad_request(
        f"unknown response_format type {kind!r} (text, json_object or json_schema)", param="response_format.type"
    )


# Other servers' structured-output request fields, which their clients send as extra body fields: vLLM's
# `structured_outputs` object and its older guided_* fields, SGLang's regex / json_schema / ebnf. Each maps to a
# kind of llguidance.grammar_from ("grammar": Lark or GBNF/EBNF).
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar", "regex": "regex", "json_schema": "json", "ebnf": "grammar"}
STRUCTURED_OUTPUTS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                      "json_object": "json_object"}
# structured_outputs options that change nothing here: JSON is always written without free whitespace (so any
# whitespace rule holds), and there is one backend, without fallback
IGNORED_OPTIONS = ("disable_any_whitespace", "whitespace_pattern", "disable_fallback", "backend", "_backend")


def _extra_constraints(extra: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(param, kind, value) of every structured-output field of another server's API in the request."""
    found = [(f, kind, extra[f]) for f, kind in GUIDED_FIELDS.items() if extra.get(f) is not None]
    so = extra.get("structured_outputs")
    if so is None:
        return found
    if not isinstance(so, dict):
        raise bad_request("structured_outputs must be an object", param="structured_outputs")
    for key, value in so.items():
        if value is None or value is False or key in IGNORED_OPTIONS:
            continue
        if key not in STRUCTURED_OUTPUTS:
            raise not_supported(f"structured_outputs.{key}", param=f"structured_outputs.{key}")
        found.append((f"structured_outputs.{key}", STRUCTURED_OUTPUTS[key], value))
    return found


def _constraint_grammar(param: str, kind: str, value: Any) -> str:
    if kind == "json_object":
        return json_grammar({"type": "object"}, param)
    if kind == "json":
        if isinstance(value, str):  # SGLang's json_schema is a string of JSON (checked as a body is: depth, NaN)
            value = load_json(value, param)
        return json_grammar(value, param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{param} must be a non-empty list of strings", param=param)
        value = json.dumps(value)
    elif not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty string", param=param)
    try:
        grammar = llguidance.grammar_from(kind, value)
    except ValueError as e:  # a GBNF grammar llguidance cannot convert to Lark (other errors: _checked below)
        raise bad_request(f"the {kind} in {param} cannot be enforced: {e}", param=param) from None
    return _checked(grammar, param, f"the {kind} in {param}")


def request_grammar(response_format: Any, extra: dict[str, Any] | None) -> str | None:
    """The grammar of `response_format`, or of one of the other servers' structured-output fields in `extra`
    (the request's extra body fields); None for free text. Two constraints in one request are a 400."""
    grammar = response_format_grammar(response_format)
    found = _extra_constraints(extra or {})
    if not found:
        return grammar
    names = (["response_format"] if grammar is not None else []) + [param for param, _, _ in found]
    if len(names) > 1:
        raise bad_request(f"one structured-output constraint per request, got {', '.join(names)}", param=names[1])
    return _constraint_grammar(*found[0])


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _value_rule(sub: Any) -> str:
    """A tool argument's value: raw text for strings (an enum: one of its values; maxLength: at most that
    many characters), JSON following the schema for anything else."""
    if not isinstance(sub, dict) or sub == {}:
        return "TEXT"
    if sub.get("type") == "string":
        if isinstance(sub.get("enum"), list) and all(isinstance(v, str) for v in sub["enum"]) and sub["enum"]:
            return "(" + " | ".join(_lark_str(v) for v in sub["enum"]) + ")"
        limit = sub.get("maxLength")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
            return f"/(?s:.{{0,{limit}}})/"
        return "TEXT"
    return f"%json {json.dumps(sub, ensure_ascii=False)}"


def tool_call_grammar(tools: list[dict[str, Any]], parallel: bool, tokenizer: Any) -> str:
    """A Lark grammar (llguidance dialect) for one or more GLM-4.7 tool calls to `tools`."""
    vocab = tokenizer.get_vocab()
    tag = {t: (t if t in vocab else _lark_str(t)) for t in TOOL_TOKENS}  # special tokens where the tokenizer has them
    rules = ["TEXT: /(?s:.*)/", f"start: call{'+' if parallel else ''}"]
    calls = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
        props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
        required = [k for k in params.get("required") or [] if k in props]
        optional = [k for k in props if k not in required]
        args = []
        for j, key in enumerate(required + optional):
            value = _value_rule(props[key])
            name = f"arg_{i}_{j}"
            rules.append(
                f"{name}: {tag['<arg_key>']} {_lark_str(key)} {tag['</arg_key>']} {tag['<arg_value>']} {value} "
                f"{tag['</arg_value>']}"
            )
            args.append(name if key in required else f"{name}?")
        rules.append(f"call_{i}: {tag['<tool_call>']} {_lark_str(fn['name'])} {' '.join(args)} {tag['</tool_call>']}")
        calls.append(f"call_{i}")
    rules.append("call: " + " | ".join(calls))
    grammar = llguidance.LLMatcher.grammar_from_lark("\n".join(rules))
    return _checked(grammar, "tools", "the forced tool call (tool_choice) with these tool parameters")


def think_end_id(tokenizer: Any) -> int | None:
    """The id of `</think>` (one token in GLM-4.7's vocabulary), None for a tokenizer without it."""
    tid = tokenizer.convert_tokens_to_ids(THINK_END)
    return tid if isinstance(tid, int) and tid != tokenizer.unk_token_id else None


def thinking_budget(state: Any, budget_tokens: int | None, starts_in_reasoning: bool) -> ThinkingBudget | None:
    """The engine's ThinkingBudget for a request whose output starts inside the reasoning: `</think>` is forced
    after `budget_tokens` output tokens unless the model wrote it before."""
    if budget_tokens is None or not starts_in_reasoning:
        return None
    think_end = think_end_id(state.tokenizer)
    return ThinkingBudget(budget_tokens, think_end) if think_end is not None else None


def structured_output(state: Any, grammar: str | None, starts_in_reasoning: bool) -> StructuredOutput | None:
    """The engine's StructuredOutput for a request (the grammar waits for `</think>` when thinking is on)."""
    if grammar is None:
        return None
    think_end = think_end_id(state.tokenizer) if starts_in_reasoning else None
    after = (think_end,) if think_end is not None else ()
    return StructuredOutput(grammar, state.config.engine.get("tokenizer") or state.model_path, after)
