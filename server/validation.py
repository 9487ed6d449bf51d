"""Edge checks on request JSON that pydantic does not do: parsing with bounded depth, no lone surrogates, only
finite numbers, seeds and logit_bias in the ranges OpenAI documents, tool parameters that are JSON schemas.

Every failure is an APIError(400) that names the offending field, raised before anything reaches the
tokenizer, the chat template or the engine.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from server.errors import bad_request

MAX_JSON_DEPTH = 64  # request bodies and JSON strings inside them (tool-call arguments)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes (OpenAI/vLLM accept it)
LOGIT_BIAS_LIMIT = 100.0

_SURROGATE = re.compile("[\ud800-\udfff]")
_SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(raw: bytes | str, where: str | None = None, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for untrusted text: NaN/Infinity literals, nesting deeper than `max_depth`, lone surrogates
    and non-finite numbers (1e999) are 400s. `where` names the field the text came from (None: the body)."""
    what = f"{where}" if where else "the request body"
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise bad_request(f"{what} is nested more than {max_depth} levels deep", param=where) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"{what} is not valid JSON: {e}", param=where) from None
    check_json_value(value, where or "", max_depth)
    return value


def check_json_value(value: Any, where: str = "", max_depth: int = MAX_JSON_DEPTH) -> None:
    """Walk a decoded JSON value (iteratively): depth, lone surrogates in strings and keys, finite floats."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        node, path, depth = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                raise bad_request(
                    f"{path or 'a string'} contains a lone UTF-16 surrogate (not valid Unicode text)",
                    param=path or None,
                )
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise bad_request(f"{path or 'a number'} must be a finite number", param=path or None)
        elif isinstance(node, (dict, list)):
            if depth >= max_depth:
                raise bad_request(
                    f"{path or 'the request body'} is nested more than {max_depth} levels deep",
                    param=path or None,
                )
            if isinstance(node, dict):
                for k, v in node.items():
                    child = f"{path}.{k}" if path else str(k)
                    if isinstance(k, str) and _SURROGATE.search(k):
                        raise bad_request(
                            f"a key in {path or 'the request body'} contains a lone UTF-16 surrogate",
                            param=path or None,
                        )
                    stack.append((v, child, depth + 1))
            else:
                for i, v in enumerate(node):
                    stack.append((v, f"{path}[{i}]", depth + 1))


def check_seed(seed: Any, param: str = "seed") -> None:
    if seed is None:
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise bad_request(f"{param} must be an integer", param=param)
    if not SEED_MIN <= seed <= SEED_MAX:
        raise bad_request(f"{param} must be an integer in [-2**63, 2**64 - 1], got {seed}", param=param)


def check_logit_bias(bias: Any, param: str = "logit_bias") -> None:
    """OpenAI: a map from token id (a decimal string) to a bias in [-100, 100]."""
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise bad_request(f"{param} must be an object mapping token ids to numbers", param=param)
    for key, value in bias.items():
        where = f"{param}.{key}"
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
            raise bad_request(
                f"{param} keys must be token ids (non-negative integers), got {key!r}", param=param
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad_request(f"{where} must be a finite number", param=where)
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise bad_request(f"{where} must be in [-100, 100], got {value}", param=where)


def check_tool_parameters(schema: Any, where: str) -> None:
    """A tool's parameters: a JSON-schema object (`type` "object" if given, `properties` a map of schemas)."""
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON schema object", param=where)
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise bad_request(
            f"{where}.type must be 'object' (a tool takes an object of arguments)", param=f"{where}.type"
        )
    check_json_schema(schema, where)


def check_json_schema(schema: Any, where: str) -> None:
    """Structural check of a JSON schema (what the tool-call parser reads must have the right shape)."""
    stack: list[tuple[Any, str]] = [(schema, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise bad_request(f"{path} must be a JSON schema (an object or a boolean)", param=path)
        t = node.get("type")
        if t is not None:
            names = t if isinstance(t, list) else [t]
            if not names or not all(isinstance(x, str) and x in _SCHEMA_TYPES for x in names):
                raise bad_request(
                    f"{path}.type must be one of {sorted(_SCHEMA_TYPES)} or a list of them",
                    param=f"{path}.type",
                )
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            sub = node.get(key)
            if sub is None:
                continue
            if not isinstance(sub, dict):
                raise bad_request(f"{path}.{key} must be an object of schemas", param=f"{path}.{key}")
            stack.extend((v, f"{path}.{key}.{k}") for k, v in sub.items())
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            sub = node.get(key)
            if sub is None:
                continue
            if not isinstance(sub, list) or not sub:
                raise bad_request(f"{path}.{key} must be a non-empty list of schemas", param=f"{path}.{key}")
            stack.extend((v, f"{path}.{key}[{i}]") for i, v in enumerate(sub))
        for key in ("items", "additionalProperties", "not", "contains", "propertyNames"):
            if key in node:
                sub = node[key]
                if key == "items" and isinstance(sub, list):  # draft-4 tuple form
                    stack.extend((v, f"{path}.items[{i}]") for i, v in enumerate(sub))
                else:
                    stack.append((sub, f"{path}.{key}"))
        required = node.get("required")
        if required is not None and not (
            isinstance(required, list) and all(isinstance(x, str) for x in required)
        ):
            raise bad_request(f"{path}.required must be a list of property names", param=f"{path}.required")
        if "enum" in node and not isinstance(node["enum"], list):
            raise bad_request(f"{path}.enum must be a list", param=f"{path}.enum")
        if "$ref" in node and not isinstance(node["$ref"], str):
            raise bad_request(f"{path}.$ref must be a string", param=f"{path}.$ref")
