"""Request-body schemas in the server's OpenAPI document (GET /openapi.json, behind the API key).

The generation routes read their bodies by hand (server/protocol.py), so FastAPI knows nothing about them;
this module attaches JSON schemas built from the pydantic models, with the ranges the server enforces and a
concrete shape for messages, tools and prompts (the models keep those loose to accept what real clients send).
The document describes valid requests; schema-based fuzzers (tests/server/test_server_fuzz.py) derive valid
and invalid ones from it.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute

from server.anthropic_api import MIN_THINKING_BUDGET, CountTokensRequest, MessagesRequest
from server.chat_serving import MAX_N, MAX_TOP_LOGPROBS, REASONING_EFFORTS
from server.openai_api import MAX_PROMPTS
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.responses_api import ResponsesRequest
from server.validation import LOGIT_BIAS_LIMIT, SEED_MAX, SEED_MIN


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace `{"$ref": "#/$defs/X"}` by X (the OpenAPI document has no $defs of its own)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(copy.deepcopy(defs[ref.split("/")[-1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
_CHAT_MESSAGE = {
    "type": "object",
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART, "maxItems": 4}]},
        "name": {"type": "string"},
        "tool_call_id": {"type": "string"},
    },
    "required": ["role", "content"],
}
_TOOL_PARAMETERS = {
    "type": "object",
    "properties": {
        "type": {"enum": ["object"]},
        "properties": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["string", "integer", "number", "boolean", "array", "object"]}
                },
            },
        },
        "required": {"type": "array", "items": {"type": "string"}},
    },
}
_OPENAI_TOOL = {
    "type": "object",
    "properties": {
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "description": {"type": "string"},
                "parameters": _TOOL_PARAMETERS,
            },
            "required": ["name"],
        },
    },
    "required": ["type", "function"],
}
_SAMPLING_RANGES = {
    "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1}),
    "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "top_k": _nullable({"type": "integer", "minimum": -1}),
    "n": _nullable({"type": "integer", "minimum": 1, "maximum": MAX_N}),
    "seed": _nullable({"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX}),
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "repetition_penalty": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 10}),
    "min_tokens": _nullable({"type": "integer", "minimum": 0}),
    "stop": {
        "anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
            {"type": "null"},
        ]
    },
    "logit_bias": _nullable(
        {
            "type": "object",
            "propertyNames": {"pattern": "^[0-9]{1,5}$"},
            "additionalProperties": {
                "type": "number",
                "minimum": -LOGIT_BIAS_LIMIT,
                "maximum": LOGIT_BIAS_LIMIT,
            },
        }
    ),
    "response_format": _nullable(
        {"type": "object", "properties": {"type": {"enum": ["text"]}}, "required": ["type"]}
    ),
}


def _model_schema(model: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    schema = _inline_defs(model.model_json_schema())
    for name, sub in overrides.items():
        if name in schema["properties"]:
            schema["properties"][name] = sub
    return schema


def request_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(method, path) -> JSON schema of the request body."""
    max_tokens = _nullable({"type": "integer", "minimum": 1})
    chat = _model_schema(
        ChatCompletionRequest,
        {
            **_SAMPLING_RANGES,
            "messages": {"type": "array", "items": _CHAT_MESSAGE, "minItems": 1, "maxItems": 4},
            "max_tokens": max_tokens,
            "max_completion_tokens": max_tokens,
            "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
            "prompt_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
            "tools": _nullable({"type": "array", "items": _OPENAI_TOOL, "minItems": 1, "maxItems": 3}),
            "tool_choice": {"anyOf": [{"enum": ["none", "auto"]}, {"type": "null"}]},
            "reasoning_effort": _nullable({"enum": list(REASONING_EFFORTS)}),
            "echo": _nullable({"enum": [False]}),
            "chat_template_kwargs": _nullable(
                {"type": "object", "properties": {"enable_thinking": {"type": "boolean"}}}
            ),
        },
    )
    completion = _model_schema(
        CompletionRequest,
        {
            **_SAMPLING_RANGES,
            "prompt": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "minItems": 1,
                        "maxItems": MAX_PROMPTS,
                    },
                    {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                ]
            },
            "max_tokens": max_tokens,
            "logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
            "prompt_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}),
            "best_of": {"type": "null"},
            "suffix": {"type": "null"},
        },
    )
    anthropic_message = {
        "type": "object",
        "properties": {
            "role": {"enum": ["user", "assistant"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART, "maxItems": 4}]},
        },
        "required": ["role", "content"],
    }
    anthropic_tools = _nullable(
        {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "description": {"type": "string"},
                    "input_schema": _TOOL_PARAMETERS,
                },
                "required": ["name", "input_schema"],
            },
        }
    )
    anthropic_common = {
        "messages": {"type": "array", "items": anthropic_message, "minItems": 1, "maxItems": 4},
        "system": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]},
        "tools": anthropic_tools,
        "tool_choice": _nullable(
            {
                "type": "object",
                "properties": {"type": {"enum": ["auto", "any", "none"]}},
                "required": ["type"],
            }
        ),
        "thinking": {
            "anyOf": [
                {"type": "object", "properties": {"type": {"enum": ["disabled", "adaptive"]}}, "required": ["type"]},
                {
                    "type": "object",
                    "properties": {
                        "type": {"enum": ["enabled"]},
                        "budget_tokens": {"type": "integer", "minimum": MIN_THINKING_BUDGET},
                    },
                    "required": ["type", "budget_tokens"],
                },
                {"type": "null"},
            ]
        },
    }
    messages = _model_schema(
        MessagesRequest,
        {
            **anthropic_common,
            "max_tokens": {"type": "integer", "minimum": 1},
            "temperature": _SAMPLING_RANGES["temperature"],
            "top_p": _SAMPLING_RANGES["top_p"],
            "top_k": _SAMPLING_RANGES["top_k"],
            "stop_sequences": _nullable(
                {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}
            ),
        },
    )
    count = _model_schema(CountTokensRequest, anthropic_common)
    input_item = {
        "type": "object",
        "properties": {
            "type": {"enum": ["message"]},
            "role": {"enum": ["system", "developer", "user", "assistant"]},
            "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART, "maxItems": 4}]},
        },
        "required": ["role", "content"],
    }
    responses = _model_schema(
        ResponsesRequest,
        {
            "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": input_item, "maxItems": 4}]},
            "instructions": _nullable({"type": "string"}),
            "max_output_tokens": max_tokens,
            "temperature": _SAMPLING_RANGES["temperature"],
            "top_p": _SAMPLING_RANGES["top_p"],
            "tools": _nullable(
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 2,
                    "items": {
                        "type": "object",
                        "properties": {
                            "type": {"enum": ["function"]},
                            "name": {"type": "string", "minLength": 1},
                            "parameters": _TOOL_PARAMETERS,
                        },
                        "required": ["type", "name"],
                    },
                }
            ),
            "tool_choice": _nullable({"enum": ["auto", "none"]}),
            "previous_response_id": {"type": "null"},
            "background": _nullable({"enum": [False]}),
            "top_logprobs": _nullable({"enum": [0]}),
            "reasoning": _nullable(
                {"type": "object", "properties": {"effort": _nullable({"enum": list(REASONING_EFFORTS)})}}
            ),
            "text": _nullable({"type": "object", "properties": {"format": _SAMPLING_RANGES["response_format"]}}),
        },
    )
    tokenize = _model_schema(
        TokenizeRequest,
        {
            "messages": _nullable({"type": "array", "items": _CHAT_MESSAGE, "minItems": 1, "maxItems": 4}),
            "tools": _nullable({"type": "array", "items": _OPENAI_TOOL, "minItems": 1, "maxItems": 3}),
            "chat_template_kwargs": chat["properties"]["chat_template_kwargs"],
        },
    )
    detokenize = _model_schema(
        DetokenizeRequest, {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": 64}}
    )
    utilities = {(method, f"{prefix}/{name}"): schema for prefix in ("", "/v1")
                 for method, name, schema in (("POST", "tokenize", tokenize), ("POST", "detokenize", detokenize))}
    return {
        **utilities,
        ("POST", "/v1/responses"): responses,
        ("POST", "/v1/chat/completions"): chat,
        ("POST", "/v1/completions"): completion,
        ("POST", "/v1/messages"): messages,
        ("POST", "/v1/messages/count_tokens"): count,
    }


def add_request_schemas(routers: list[APIRouter]) -> None:
    """Attach the schemas to the routers' routes (before the app includes them)."""
    schemas = request_schemas()
    for route in (r for router in routers for r in router.routes):
        if not isinstance(route, APIRoute):
            continue
        for method in route.methods:
            schema = schemas.get((method, route.path))
            if schema is not None:
                route.openapi_extra = {
                    "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
                }
