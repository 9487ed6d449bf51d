"""OpenAI Responses API: POST /v1/responses (what the Codex CLI and newer OpenAI SDK code use).

The request becomes a chat request and runs through the shared serving layer (server/chat_serving.py), like
the chat and Anthropic routes:

- `instructions` -> a system message first; `input` a string (one user message) or a list of items:
  messages (`role` user / system / developer / assistant, content a string or input_text / output_text parts),
  `function_call` (-> an assistant tool call), `function_call_output` (-> a tool message), `reasoning` (its
  reasoning_text content, else its summary, else its `encrypted_content`, which this server fills with the plain
  reasoning text -> reasoning_content). Consecutive reasoning / assistant message / function_call items form one
  assistant turn. Other item types (web_search_call, ...) carry nothing the model can use and are skipped.
- `tools`: function tools (`{"type": "function", "name", "parameters", ...}`); other tool types (web_search,
  custom, local_shell, ...) are skipped. `tool_choice` none / auto / required / {"type": "function", "name"}.
- `max_output_tokens`, `temperature`, `top_p`, `parallel_tool_calls`, `reasoning.effort` ("none" / "minimal"
  turn GLM-4.7's thinking off), `text.format` (text / json_object / json_schema: enforced like
  response_format), `chat_template_kwargs`, `top_k`, `seed`, ... as on the chat route.
- Not kept: responses are not stored (`store` is accepted and ignored), so `previous_response_id` is refused
  with a 400 (send the whole conversation in `input`, as Codex does), and so are `conversation` and `prompt`
  (stored conversations, reusable prompts); GET/DELETE /v1/responses/{id} do not exist. `background: true`
  and logprobs (`top_logprobs` > 0, `include` "message.output_text.logprobs") are refused with a 400 too, and so
  is a `reasoning.effort` outside the openai SDK's values.

Output items: `reasoning` (content [reasoning_text]; `encrypted_content` when `include` asks for
"reasoning.encrypted_content"), `message` (one output_text part), `function_call` per parsed tool call.
Streaming sends the documented events in order, each with a `sequence_number`: response.created,
response.in_progress, per item response.output_item.added, then reasoning_text.delta / .done, or
content_part.added, output_text.delta / .done, content_part.done, or function_call_arguments.delta / .done,
then response.output_item.done; finally response.completed (or response.incomplete when max_output_tokens cut
the answer; response.failed after an error).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from server.chat_serving import (
    REASONING_EFFORTS,
    ChatResult,
    PreparedChat,
    iterate_generations,
    prepare_chat,
    request_log,
    run_chat,
)
from server.chat_template import content_text
from server.errors import APIError, bad_request, not_supported
from server.protocol import ChatCompletionRequest, LooseModel, validation_error
from server.serving import ServerState, read_body, request_origin, strip_stop_token_text
from server.sse import ClientDisconnected, SSEResponse, run_or_disconnect, sse_event

logger = logging.getLogger("glint.server")

router = APIRouter()

_PASS_THROUGH = ("temperature", "top_p", "parallel_tool_calls", "stream")
_EXTRA_PASS_THROUGH = (
    "chat_template_kwargs", "top_k", "min_p", "seed", "stop", "ignore_eos", "min_tokens", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "logit_bias",
)  # fmt: skip


# Responses fields that name objects stored on OpenAI's side (a conversation, a reusable prompt template): like
# previous_response_id, refused (this server keeps no state)
STORED_OBJECT_FIELDS = ("conversation", "prompt")
# the `include` value that asks for logprobs on output_text parts (not implemented: a 400, like top_logprobs > 0)
LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ResponsesRequest(LooseModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = True
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    background: bool | None = None  # true: refused (no background mode)
    top_logprobs: int | None = None  # > 0: refused (no logprobs on output_text parts)
    # max_tool_calls caps calls to OpenAI's built-in tools (web search, file search, ...), which this server does
    # not have (function calls are not counted against it): accepted and ignored, with the other unknown fields


# ------------------------------------------------------------------------------------------------- input


def _item_text(content: Any, where: str) -> str:
    if isinstance(content, list):  # input_text / output_text / text parts (refusal parts keep their text)
        content = [
            {"type": "text", "text": p.get("refusal", "")} if isinstance(p, dict) and p.get("type") == "refusal" else p
            for p in content
        ]
    return content_text(content, where) or ""


def _reasoning_text(item: dict[str, Any]) -> str:
    for key, kind in (("content", "reasoning_text"), ("summary", "summary_text")):
        parts = item.get(key)
        if isinstance(parts, list):
            text = "".join(str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("type") == kind)
            if text:
                return text
    enc = item.get("encrypted_content")
    return enc if isinstance(enc, str) else ""


def to_chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """instructions + input items -> chat messages (one assistant turn per run of assistant-side items)."""
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        out.append({"role": "user", "content": req.input})
        return out
    turn: dict[str, Any] | None = None  # the assistant turn being collected
    skipped: set[str] = set()  # item types skipped (named if nothing readable is left)

    def assistant() -> dict[str, Any]:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            out.append(turn)
        return turn

    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(
                    f"{where}.role must be user, system, developer or assistant; got {role!r}", param=f"{where}.role"
                )
            text = _item_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                msg = assistant()
                msg["content"] += text
            else:
                turn = None
                out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "reasoning":
            msg = assistant()
            msg["reasoning_content"] = msg.get("reasoning_content", "") + _reasoning_text(item)
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise bad_request(f"{where}.name is required", param=f"{where}.name")
            call = {
                "id": item.get("call_id") or item.get("id"),
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
            }
            assistant().setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            turn = None
            output = item.get("output")
            text = output if isinstance(output, str) else _item_text(output, f"{where}.output")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text})
        else:
            logger.debug("skipping a %r input item", kind)
            skipped.add(str(kind))
    if not out and skipped:  # (no input items at all: the chat template's own error)
        raise bad_request(f"input holds no item this server can read (skipped item types: "
                          f"{', '.join(sorted(skipped))})", param="input")
    return out


def to_chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict):
            raise bad_request(f"tools[{i}] must be an object", param=f"tools[{i}]")
        if t.get("type") != "function":
            logger.debug("skipping a %r tool", t.get("type"))
            continue
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out or None


def _tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            return {"type": "function", "function": {"name": choice.get("name")}}
        raise bad_request(f"tool_choice type {choice.get('type')!r} is not supported", param="tool_choice.type")
    if not tools and choice in ("auto", "none"):
        return None  # e.g. only non-function tools were sent
    return choice


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad_request("text.format must be an object", param="text.format")
    if fmt.get("type") != "json_schema":
        return fmt  # text / json_object, as response_format
    schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": schema}


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.previous_response_id:
        raise bad_request(
            "previous_response_id is not supported: this server does not store responses; send the whole "
            "conversation in input",
            param="previous_response_id",
        )
    extra = req.model_extra or {}
    for name in STORED_OBJECT_FIELDS:  # ignoring one would drop part of the prompt without a word
        if extra.get(name) is not None:
            raise bad_request(
                f"{name} is not supported: this server stores no conversations or prompts; send the whole "
                "conversation in input (and the instructions in instructions)",
                param=name,
            )
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise bad_request("max_output_tokens must be at least 1", param="max_output_tokens")
    if req.background:
        raise bad_request("background mode is not supported: this server stores no responses to poll; send "
                          "background: false", param="background", code="unsupported_parameter")
    if req.top_logprobs or LOGPROBS_INCLUDE in (req.include or []):
        param = "top_logprobs" if req.top_logprobs else "include"
        raise not_supported("logprobs on /v1/responses (use /v1/chat/completions)", param=param)
    tools = to_chat_tools(req.tools)
    body: dict[str, Any] = {
        "model": req.model,
        "messages": to_chat_messages(req),
        "tools": tools,
        "tool_choice": _tool_choice(req.tool_choice, tools),
        "max_completion_tokens": req.max_output_tokens,
        "response_format": _response_format(req.text),
    }
    for key in _PASS_THROUGH:
        if getattr(req, key, None) is not None:
            body[key] = getattr(req, key)
    effort = (req.reasoning or {}).get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad_request(f"reasoning.effort must be one of {', '.join(REASONING_EFFORTS)}; got {effort!r}",
                          param="reasoning.effort")
    if effort is not None:
        body["reasoning_effort"] = effort  # the chat route turns thinking off for "none" / "minimal"
    for key in _EXTRA_PASS_THROUGH:
        if key in extra:
            body[key] = extra[key]
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from None
    # Codex sends its reasoning items back (include: reasoning.encrypted_content) for the model to keep using:
    # Preserved Thinking, as on /v1/messages (server/anthropic_api.py _clear_thinking), under the server's defaults
    chat.set_route_template_defaults({"clear_thinking": False})
    return chat


# ------------------------------------------------------------------------------------------------ output


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class _Response:
    """The response object, shared by the streaming and non-streaming paths."""

    def __init__(self, req: ResponsesRequest, prep: PreparedChat) -> None:
        self.req, self.prep = req, prep
        self.output: list[dict[str, Any]] = []
        self.encrypted_reasoning = "reasoning.encrypted_content" in (req.include or [])

    def reasoning_item(self, text: str, status: str = "completed") -> dict[str, Any]:
        item: dict[str, Any] = {
            "type": "reasoning",
            "id": _item_id("rs"),
            "summary": [],
            "content": [{"type": "reasoning_text", "text": text}],
            "status": status,
        }
        if self.encrypted_reasoning:
            item["encrypted_content"] = text  # not encrypted: the plain reasoning, read back on input
        return item

    @staticmethod
    def message_item(text: str, status: str = "completed") -> dict[str, Any]:
        return {
            "type": "message",
            "id": _item_id("msg"),
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text else [],
        }

    @staticmethod
    def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": "fc_" + call_id.removeprefix("call_"),
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": status,
        }

    def body(self, status: str, usage: dict[str, Any] | None, incomplete: str | None = None,
             error: dict[str, Any] | None = None) -> dict[str, Any]:
        req, prep = self.req, self.prep
        return {
            "id": prep.rid,
            "object": "response",
            "created_at": prep.created,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": prep.model,
            "output": self.output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
            "store": False,
            "temperature": prep.params.temperature,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [],
            "top_p": prep.params.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": req.metadata or {},
        }


def _usage(prompt: int, cached: int, output: int, reasoning: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }


def _status(engine_reason: str | None) -> tuple[str, str | None]:
    if engine_reason == "abort":
        raise APIError(503, "the request was aborted by the engine", headers={"Retry-After": "1"})
    if engine_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None


@router.post("/v1/responses")
async def responses(request: Request) -> Response:
    arrival = time.monotonic()
    state: ServerState = request.app.state.glint
    log = request_log(request)
    log["endpoint"] = "responses"
    req = await read_body(state, request, ResponsesRequest)
    chat_req = to_chat_request(req)
    prep = await prepare_chat(state, chat_req, log, arrival, id_prefix="resp_",
                              origin=request_origin(state, request))
    if req.stream:
        return SSEResponse(_stream(state, req, prep), on_disconnect=lambda: log.update(disconnected=True))
    try:
        res = await run_or_disconnect(request.receive, run_chat(state, prep))
    except ClientDisconnected:
        log["disconnected"] = True
        return Response(status_code=499)
    finally:
        prep.gen.close()
    return JSONResponse(_full_body(req, prep, res))


def _full_body(req: ResponsesRequest, prep: PreparedChat, res: ChatResult) -> dict[str, Any]:
    out = _Response(req, prep)
    p = prep.parsers[0]
    if p.reasoning:
        out.output.append(out.reasoning_item(p.reasoning))
    if p.content or not (p.tool_calls or p.reasoning):  # as streamed: a message item only for text, or if empty
        out.output.append(out.message_item(p.content))
    for c in p.tool_calls:
        out.output.append(out.call_item(c.id, c.name, c.arguments))
    status, incomplete = _status(res.reasons[0])
    prep.gen.log["finish_reason"] = incomplete or ("tool_calls" if p.tool_calls else "stop")
    usage = _usage(prep.gen.prompt_len, prep.gen.num_cached_tokens, res.completion_tokens, res.reasoning_tokens)
    return out.body(status, usage, incomplete)


class _StreamWriter:
    """Turns parser events into the Responses streaming events, one open output item at a time."""

    def __init__(self, resp: _Response) -> None:
        self.resp = resp
        self.seq = 0
        self.item: dict[str, Any] | None = None  # the open item
        self.text = ""  # its text / arguments so far

    def event(self, kind: str, **fields: Any) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse_event(kind, body)

    @property
    def index(self) -> int:
        return len(self.resp.output) - 1

    def open(self, item: dict[str, Any]) -> list[str]:
        events = self.close()
        self.resp.output.append(item)
        self.item, self.text = item, ""
        events.append(self.event("response.output_item.added", output_index=self.index, item={**item}))
        if item["type"] == "message":
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=self.index,
                                     content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return events

    def delta(self, fragment: str) -> str:
        item = self.item
        assert item is not None
        self.text += fragment
        if item["type"] == "reasoning":
            return self.event("response.reasoning_text.delta", item_id=item["id"], output_index=self.index,
                              content_index=0, delta=fragment)
        if item["type"] == "message":
            return self.event("response.output_text.delta", item_id=item["id"], output_index=self.index,
                              content_index=0, delta=fragment, logprobs=[])
        return self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=self.index,
                          delta=fragment)

    def close(self) -> list[str]:
        item = self.item
        if item is None:
            return []
        self.item = None
        i, text, events = self.index, self.text, []
        if item["type"] == "reasoning":
            done = self.resp.reasoning_item(text)
            done["id"] = item["id"]
            events.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=i,
                                     content_index=0, text=text))
        elif item["type"] == "message":
            done = self.resp.message_item(text)
            done["id"] = item["id"]
            done["content"] = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=i,
                                     content_index=0, text=text, logprobs=[]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=i,
                                     content_index=0, part=done["content"][0]))
        else:
            arguments = text or "{}"
            done = self.resp.call_item(item["call_id"], item["name"], arguments)
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                     name=item["name"], arguments=arguments))
        self.resp.output[i] = done
        events.append(self.event("response.output_item.done", output_index=i, item=done))
        return events


async def _stream(state: ServerState, req: ResponsesRequest, prep: PreparedChat) -> AsyncIterator[str]:
    gen, parser = prep.gen, prep.parsers[0]
    resp = _Response(req, prep)
    w = _StreamWriter(resp)
    output_tokens = reasoning_tokens = 0
    try:
        yield w.event("response.created", response=resp.body("in_progress", None))
        yield w.event("response.in_progress", response=resp.body("in_progress", None))
        status, incomplete = "completed", None
        async for item in iterate_generations([gen], None):
            if item is None:
                continue
            for d in item[1]:
                output_tokens += len(d.new_token_ids)
                was_reasoning = parser.in_reasoning
                events = parser.feed(strip_stop_token_text(state, d, prep.params), final=d.finished)
                if was_reasoning and parser.in_reasoning:
                    reasoning_tokens += len(d.new_token_ids)
                for ev in events:
                    kind = ev[0]
                    if kind in ("reasoning", "content"):
                        want = "reasoning" if kind == "reasoning" else "message"
                        if w.item is None or w.item["type"] != want:
                            new = resp.reasoning_item("", "in_progress") if want == "reasoning" else \
                                resp.message_item("", "in_progress")
                            for e in w.open(new):
                                yield e
                        yield w.delta(ev[1])
                    elif kind == "tool_start":
                        for e in w.open(resp.call_item(ev[2], ev[3], "", "in_progress")):
                            yield e
                    else:
                        yield w.delta(ev[2])
                if d.finished:
                    status, incomplete = _status(d.finish_reason)
        for e in w.close():
            yield e
        if not resp.output:  # an empty answer is still one (empty) message
            for e in w.open(resp.message_item("", "in_progress")) + w.close():
                yield e
        gen.log["finish_reason"] = incomplete or ("tool_calls" if parser.has_tool_calls else "stop")
        gen.log["reasoning_tokens"] = reasoning_tokens
        usage = _usage(gen.prompt_len, gen.num_cached_tokens, output_tokens, reasoning_tokens)
        final = "response.incomplete" if status == "incomplete" else "response.completed"
        yield w.event(final, response=resp.body(status, usage, incomplete))
    except APIError as e:
        gen.log["error"] = e.message
        yield w.event("response.failed", response=resp.body("failed", None, error=_error(e)))
    except Exception as e:
        logger.exception("error while streaming %s", prep.rid)
        gen.log["error"] = type(e).__name__
        err = APIError(500, "internal error while streaming the response")
        yield w.event("response.failed", response=resp.body("failed", None, error=_error(err)))
    finally:
        gen.close()


def _error(e: APIError) -> dict[str, Any]:
    return {"code": e.code or e.type, "message": e.message}
