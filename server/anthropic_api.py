"""Anthropic Messages API: POST /v1/messages (+ streaming events) and POST /v1/messages/count_tokens.

The request is converted to a chat request (system -> system message, tool_result blocks -> tool messages,
tool_use blocks -> assistant tool_calls with dict arguments, thinking blocks -> reasoning_content, tools'
input_schema -> parameters, tool_choice auto/any/tool/none, thinking {type} -> enable_thinking) and runs
through the same template, engine request and GLM parsers as /v1/chat/completions. Output: thinking / text /
tool_use content blocks; streaming sends message_start, content_block_start / _delta / _stop per block
(thinking_delta, text_delta, input_json_delta), message_delta with the stop_reason, message_stop, and `ping`
events (one after message_start, then one per --ping-interval of silence; never SSE comments). Errors use
Anthropic's envelope (see server/errors.py).

Claude Code compatibility: mid-conversation `system` messages become system turns; `thinking` follows
Anthropic's semantics (absent or `disabled` = off, `enabled` / `adaptive` = on) and Anthropic's checks (type,
budget_tokens >= 1024; the budget is enforced); `tool_choice` any / tool without tools is a 400; `output_config.format`
(json_schema) is enforced like response_format; `output_config.effort`, `metadata`, `cache_control` on any
block and unknown (beta) fields are accepted and ignored.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from server.chat_template import THINKING_TYPES, content_text
from server.errors import APIError, bad_request, not_supported
from server.protocol import ChatCompletionRequest, LooseModel, validation_error
from server.chat_serving import ChatPlan, iterate_generations, prepare_chat, request_log, run_chat
from server.serving import ServerState, read_body, request_origin, run_blocking, strip_stop_token_text
from server.sse import ClientDisconnected, SSEResponse, run_or_disconnect, sse_event
from server.validation import check_tool_parameters

logger = logging.getLogger("glint.server")

router = APIRouter()

# The end of every stream, also after an `error` event (the SDKs stop at the error; a plain SSE reader still
# sees the message end).
MESSAGE_STOP = sse_event("message_stop", {"type": "message_stop"})
PING = sse_event("ping", {"type": "ping"})
MIN_THINKING_BUDGET = 1024  # Anthropic's floor for thinking.budget_tokens


class MessagesRequest(LooseModel):
    model: str | None = None
    max_tokens: int
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = False
    thinking: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None  # accepted; user_id is not used
    output_config: dict[str, Any] | None = None  # effort: ignored; format: structured output


class CountTokensRequest(LooseModel):
    model: str | None = None
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content blocks", param=where)
    for j, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise bad_request(f"{where}[{j}] must be a content block with a type", param=f"{where}[{j}]")
    return content


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        parts = []
        for j, part in enumerate(content if isinstance(content, list) else [content]):
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, dict) and part.get("type") in ("image", "document"):
                raise not_supported(f"{part['type']} blocks in tool results", param=f"{where}.content[{j}]")
            else:
                raise bad_request(f"{where}.content[{j}] must be a text block", param=f"{where}.content[{j}]")
        text = "\n".join(parts)
    if block.get("is_error"):
        text = f"Error: {text}" if text else "Error"
    return text


# Claude Code (>= 2.1.69) starts its system prompt with a billing line for Anthropic's servers,
# "x-anthropic-billing-header: cc_version=2.1.197.e03; cc_entrypoint=sdk-cli; ...", whose suffix hashes characters
# of the conversation's first user message (so it differs between projects and for each subagent, whose first
# message is its task) and whose entrypoint differs between `claude` and `claude -p`; some setups add a `cch` hash.
# GLM's template renders the tools first (~29K of Claude Code 2.1.197's ~34K-token first request) and the system
# text after them, so the line splits only the system text (~5K tokens) from the cache. It means nothing to the
# model: dropped.
BILLING_HEADER = "x-anthropic-billing-header:"


def _is_billing_line(text: Any) -> bool:
    return isinstance(text, str) and text.startswith(BILLING_HEADER) and "\n" not in text.strip()


def _system_blocks(content: Any) -> Any:
    """System text blocks keep only their text (cache_control and other block fields do not apply); a client
    billing line (BILLING_HEADER: a text block of its own, or the first line of a string) is dropped."""
    if isinstance(content, list):
        return [
            {"type": "text", "text": b.get("text", "")} if isinstance(b, dict) and b.get("type") == "text" else b
            for b in content
            if not (isinstance(b, dict) and b.get("type") == "text" and _is_billing_line(b.get("text")))
        ]
    if isinstance(content, str) and content.startswith(BILLING_HEADER):
        first, _, rest = content.partition("\n")
        return rest if _is_billing_line(first) else content
    return content


def to_chat_messages(req: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ignored: set[str] = set()  # block types skipped in user messages (named if nothing readable is left)
    if req.system is not None:
        system = content_text(_system_blocks(req.system), "system")
        if system:
            out.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", param=where)
        role = m.get("role")
        if role in ("ctx", "msg"):
            role = "user"
        if role not in ("user", "assistant", "system"):
            raise bad_request(
                f"{where}.role must be 'user', 'assistant' or 'system', got {role!r}", param=f"{where}.role"
            )
        if role == "system":  # a mid-conversation system message (beta mid-conversation-system-*)
            text = content_text(_system_blocks(m.get("content", "")), f"{where}.content")
            if text:
                out.append({"role": "system", "content": text})
            continue
        blocks = _blocks(m.get("content", ""), f"{where}.content")
        if role == "user":
            texts: list[str] = []
            for j, b in enumerate(blocks):
                kind = b["type"]
                if kind == "text":
                    texts.append(str(b.get("text", "")))
                elif kind == "tool_result":
                    out.append(
                        {
                            "role": "tool",
                            "tool_call_id": str(b.get("tool_use_id", "")),
                            "content": _tool_result_text(b, f"{where}.content[{j}]"),
                        }
                    )
                elif kind in ("image", "document", "search_result"):
                    raise not_supported(
                        f"{kind} content blocks (this model is text-only)", param=f"{where}.content[{j}]"
                    )
                else:
                    logger.debug("ignoring a %r block in a user message", kind)
                    ignored.add(kind)
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
        else:
            texts, reasoning, calls = [], [], []
            for b in blocks:
                kind = b["type"]
                if kind == "text":
                    texts.append(str(b.get("text", "")))
                elif kind == "thinking":
                    reasoning.append(str(b.get("thinking", "")))
                elif kind == "tool_use":
                    args = b.get("input") if isinstance(b.get("input"), dict) else {}
                    calls.append(
                        {
                            "id": b.get("id"),
                            "type": "function",
                            "function": {"name": b.get("name", ""), "arguments": args},
                        }
                    )
                # redacted_thinking and server-tool blocks carry nothing the model can use
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if reasoning:
                msg["reasoning_content"] = "\n".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    if not out and ignored:  # (no messages at all: the chat template's own error)
        raise bad_request("messages hold no content this server can read (skipped block types: "
                          f"{', '.join(sorted(ignored))})", param="messages")
    return out


def to_chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad_request(f"tools[{i}].name is required", param=f"tools[{i}].name")
        if t.get("type") not in (None, "custom") and "input_schema" not in t:
            logger.debug("ignoring server tool %r (%r)", t.get("name"), t.get("type"))
            continue
        schema = t.get("input_schema")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        check_tool_parameters(schema, f"tools[{i}].input_schema")
        fn = {"name": t["name"], "parameters": schema}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out or None


def to_chat_request(req: Any, *, stream: bool = False) -> ChatCompletionRequest:
    tools = to_chat_tools(req.tools)
    tool_choice: Any = None
    parallel = True
    tc = req.tool_choice
    if tc is not None:
        kind = tc.get("type")
        if kind not in ("auto", "any", "tool", "none"):
            raise bad_request(f"unknown tool_choice type {kind!r}", param="tool_choice.type")
        # Anthropic refuses every tool_choice sent without tools ("tool_choice may only be specified while
        # providing tools"). Our choice: a choice that forces a tool call (any, tool) is refused without tools, as
        # required / a named function are on the chat route; auto and none ask for nothing a tool-less request
        # does not already do and pass (as on /v1/responses), so a client that always sends one keeps working.
        if not tools and kind in ("any", "tool"):
            raise bad_request("tool_choice may only be specified while providing tools" if not req.tools else
                              "tool_choice forces a tool call, but this server runs none of the server tools sent "
                              "(send a custom tool with an input_schema)", param="tool_choice")
        if tools:
            parallel = not tc.get("disable_parallel_tool_use", False)
            if kind == "tool":
                tool_choice = {"type": "function", "function": {"name": tc.get("name")}}
            else:
                tool_choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
    messages = to_chat_messages(req)
    last = req.messages[-1] if req.messages else None
    prefill = isinstance(last, dict) and last.get("role") == "assistant" and _assistant_prefill(messages)
    body: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "tools": tools,
        "tool_choice": tool_choice,
        "parallel_tool_calls": parallel,
        "stream": stream,
    }
    if prefill:  # the answer continues the final assistant message: no new assistant turn
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    body["thinking"] = {"type": "enabled" if thinking_enabled(req.thinking) else "disabled"}
    if req.thinking and req.thinking.get("type") == "enabled":  # checked by thinking_enabled: a whole number >= 1024
        body["thinking"]["budget_tokens"] = int(req.thinking["budget_tokens"])
    clear = _clear_thinking(req)
    if clear is not None:
        body["thinking"]["clear_thinking"] = clear
    response_format = _response_format(req)
    if response_format is not None:
        body["response_format"] = response_format
    for key in ("max_tokens", "temperature", "top_p", "top_k"):
        if getattr(req, key, None) is not None:
            body[key] = getattr(req, key)
    if getattr(req, "stop_sequences", None):
        body["stop"] = req.stop_sequences
    extra = req.model_extra or {}
    for key in ("chat_template_kwargs", "min_p", "seed", "ignore_eos", "min_tokens", "repetition_penalty"):
        if key in extra:
            body[key] = extra[key]
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    chat.set_route_template_defaults({"clear_thinking": False})  # Preserved Thinking unless told otherwise
    return chat


def _clear_thinking(req: Any) -> bool | None:
    """Whether past turns' reasoning leaves the prompt, where the request says so: Z.ai's
    `thinking.clear_thinking`, or Anthropic's context editing (`clear_thinking_20251015`: keep "all" keeps every
    thinking block, any other `keep` clears older ones; the template keeps those after the last user turn only).
    None: the route's default, Preserved Thinking (`clear_thinking` false, under the server's
    --default-chat-template-kwargs): Claude Code sends every thinking block back, Zhipu recommends keeping them
    for agentic work, and a prompt that drops them when a user turn arrives no longer starts with the tokens the
    model generated, so the earlier turns' KV could not be reused (bench/RESULTS.md, session 31)."""
    if isinstance(req.thinking, dict) and isinstance(req.thinking.get("clear_thinking"), bool):
        return req.thinking["clear_thinking"]
    management = (req.model_extra or {}).get("context_management")
    edits = management.get("edits") if isinstance(management, dict) else None
    for edit in edits if isinstance(edits, list) else []:
        if isinstance(edit, dict) and str(edit.get("type", "")).startswith("clear_thinking"):
            return edit.get("keep") != "all"
    return None


def _assistant_prefill(messages: list[dict[str, Any]]) -> bool:
    """Called when the request ends with an assistant message. Anthropic's prefill: a final assistant message
    with text is the start of the answer, which the model continues (the response holds only the continuation).
    An empty final assistant message is dropped, as if it were absent; one with tool calls stays history.
    Trailing whitespace is refused with Anthropic's error (it would tokenize differently from the model writing
    the same text)."""
    if messages[-1].get("tool_calls"):
        return False
    text = messages[-1]["content"]
    if not text:
        messages.pop()
        return False
    if text != text.rstrip():
        raise bad_request("messages: final assistant content cannot end with trailing whitespace", param="messages")
    return True


def thinking_enabled(thinking: Any) -> bool:
    """Anthropic semantics: no `thinking` field (or `disabled`) = no thinking; `enabled` (with its
    budget_tokens) and `adaptive` (the model decides; GLM-4.7 then always thinks) = thinking on.

    Checked as Anthropic checks it, with its wording (clients match on the same errors): a type outside these
    three is a 400, and `enabled` needs an integer budget_tokens >= 1024 (a whole-number float passes, as at
    Anthropic). Anthropic also wants max_tokens above the budget; this server does not refuse a budget >= max_tokens
    (Claude Code and LiteLLM send such requests at times; it worked here before the check existed): the budget
    then never cuts. The engine enforces the budget: `</think>` is forced after budget_tokens output tokens
    (engine.sampling_params.ThinkingBudget); max_tokens caps thinking and answer together."""
    if thinking is None:
        return False
    if not isinstance(thinking, dict):
        raise bad_request("thinking must be an object such as {'type': 'enabled'}", param="thinking")
    kind = thinking.get("type")
    if kind not in THINKING_TYPES:
        raise bad_request(f"thinking.type: Input tag {kind!r} does not match any of the expected tags: "
                          f"{', '.join(repr(t) for t in THINKING_TYPES)}", param="thinking.type")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        where = "thinking.enabled.budget_tokens"
        if budget is None:
            raise bad_request(f"{where}: Field required", param="thinking.budget_tokens")
        if isinstance(budget, float) and budget.is_integer():
            budget = int(budget)
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise bad_request(f"{where}: Input should be a valid integer", param="thinking.budget_tokens")
        if budget < MIN_THINKING_BUDGET:
            raise bad_request(f"{where}: Input should be greater than or equal to {MIN_THINKING_BUDGET}",
                              param="thinking.budget_tokens")
    return kind != "disabled"


def _response_format(req: Any) -> dict[str, Any] | None:
    """`output_config.format` (or the older beta `output_format`): {"type": "json_schema", "schema": {...}}
    -> the chat route's response_format. `output_config.effort` does not apply to GLM-4.7 and is ignored."""
    config = req.output_config if isinstance(req.output_config, dict) else {}
    fmt = config.get("format") or (req.model_extra or {}).get("output_format")
    if fmt is None:
        return None
    where = "output_config.format" if config.get("format") else "output_format"
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise bad_request(f"{where} must be {{'type': 'json_schema', 'schema': {{...}}}}", param=where)
    if not isinstance(fmt.get("schema"), dict):
        raise bad_request(f"{where}.schema must be a JSON schema object", param=f"{where}.schema")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def _stop_reason(engine_reason: str | None, stop_reason: Any, has_tool_calls: bool) -> tuple[str, str | None]:
    if engine_reason == "length":
        return "max_tokens", None
    if engine_reason == "abort":
        raise APIError(503, "the request was aborted by the engine")
    if has_tool_calls:
        return "tool_use", None
    if isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _usage(prompt: int, cached: int, output: int) -> dict[str, int]:
    return {
        "input_tokens": prompt - cached,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    arrival = time.monotonic()
    state: ServerState = request.app.state.glint
    log = request_log(request)
    log["endpoint"] = "messages"
    req = await read_body(state, request, MessagesRequest)
    if req.max_tokens < 1:
        raise bad_request("max_tokens must be at least 1", param="max_tokens")
    chat_req = to_chat_request(req, stream=bool(req.stream))
    prep = await prepare_chat(state, chat_req, log, arrival, id_prefix="msg_",
                              origin=request_origin(state, request))
    if req.stream:
        return SSEResponse(_stream(state, prep), on_disconnect=lambda: log.update(disconnected=True))
    try:
        res = await run_or_disconnect(request.receive, run_chat(state, prep))
    except ClientDisconnected:
        log["disconnected"] = True
        return Response(status_code=499)
    finally:
        prep.gen.close()
    p = prep.parsers[0]
    content: list[dict[str, Any]] = []
    if p.reasoning:
        content.append({"type": "thinking", "thinking": p.reasoning, "signature": ""})
    if p.content:
        content.append({"type": "text", "text": p.content})
    for c in p.tool_calls:
        content.append(
            {"type": "tool_use", "id": _tool_id(c.id), "name": c.name, "input": _json_obj(c.arguments)}
        )
    stop_reason, stop_sequence = _stop_reason(res.reasons[0], res.stop_reasons[0], p.has_tool_calls)
    log["finish_reason"] = stop_reason
    return JSONResponse(
        {
            "id": prep.rid,
            "type": "message",
            "role": "assistant",
            "model": prep.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": _usage(prep.gen.prompt_len, prep.gen.num_cached_tokens, res.completion_tokens),
        }
    )


def _json_obj(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def _stream(state: ServerState, prep: Any) -> AsyncIterator[str]:
    gen, parser = prep.gen, prep.parsers[0]
    output_tokens = 0
    block = {"index": -1, "kind": None}

    def open_block(kind: str, content_block: dict[str, Any]) -> list[str]:
        events = close_block()
        block["index"] += 1
        block["kind"] = kind
        events.append(
            sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": block["index"], "content_block": content_block},
            )
        )
        return events

    def close_block() -> list[str]:
        if block["kind"] is None:
            return []
        events = []
        if block["kind"] == "thinking":
            events.append(
                sse_event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": block["index"],
                        "delta": {"type": "signature_delta", "signature": ""},
                    },
                )
            )
        events.append(
            sse_event("content_block_stop", {"type": "content_block_stop", "index": block["index"]})
        )
        block["kind"] = None
        return events

    def delta(d: dict[str, Any]) -> str:
        return sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": block["index"], "delta": d}
        )

    try:
        yield sse_event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": prep.rid,
                    "type": "message",
                    "role": "assistant",
                    "model": prep.model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": _usage(gen.prompt_len, 0, 0),
                },
            },
        )
        yield PING  # as Anthropic does after message_start; then one per --ping-interval of silence
        stop_reason, stop_sequence = "end_turn", None
        async for item in iterate_generations([gen], state.config.ping_interval or None):
            if item is None:
                yield PING
                continue
            for d in item[1]:
                output_tokens += len(d.new_token_ids)
                for ev in parser.feed(strip_stop_token_text(state, d, prep.params), final=d.finished):
                    kind = ev[0]
                    if kind == "reasoning":
                        if block["kind"] != "thinking":
                            for e in open_block(
                                "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                            ):
                                yield e
                        yield delta({"type": "thinking_delta", "thinking": ev[1]})
                    elif kind == "content":
                        if block["kind"] != "text":
                            for e in open_block("text", {"type": "text", "text": ""}):
                                yield e
                        yield delta({"type": "text_delta", "text": ev[1]})
                    elif kind == "tool_start":
                        for e in open_block(
                            "tool_use",
                            {"type": "tool_use", "id": _tool_id(ev[2]), "name": ev[3], "input": {}},
                        ):
                            yield e
                    else:
                        yield delta({"type": "input_json_delta", "partial_json": ev[2]})
                if d.finished:
                    stop_reason, stop_sequence = _stop_reason(
                        d.finish_reason, d.stop_reason, parser.has_tool_calls
                    )
        for e in close_block():
            yield e
        gen.log["finish_reason"] = stop_reason
        yield sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                "usage": {
                    "output_tokens": output_tokens,
                    "input_tokens": gen.prompt_len - gen.num_cached_tokens,
                    "cache_read_input_tokens": gen.num_cached_tokens,
                },
            },
        )
        yield MESSAGE_STOP
    except APIError as e:
        gen.log["error"] = e.message
        yield sse_event("error", e.anthropic_body())
        yield MESSAGE_STOP
    except Exception as e:  # noqa: BLE001
        logger.exception("error while streaming %s", prep.rid)
        gen.log["error"] = type(e).__name__
        yield sse_event(
            "error", APIError(500, "internal error while streaming the response").anthropic_body()
        )
        yield MESSAGE_STOP
    finally:
        gen.close()


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    state: ServerState = request.app.state.glint
    log = request_log(request)
    log["endpoint"] = "count_tokens"
    req = await read_body(state, request, CountTokensRequest)
    state.response_model(req.model)
    chat_req = to_chat_request(req)
    plan = await run_blocking(state, ChatPlan, state, chat_req)
    _, ids = await run_blocking(state, plan.render, state)
    log["prompt_tokens"] = len(ids)
    return JSONResponse({"input_tokens": len(ids)})
