"""The serving layer every generation route shares (no route module imports another).

Chat requests from any wire format (OpenAI chat, Anthropic messages, OpenAI responses) become a
`ChatCompletionRequest` and go through `ChatPlan` (tools, tool_choice, template kwargs, structured output),
`prepare_chat` (render, tokenize, sampling parameters, engine request) and `run_chat` or the route's own
streaming loop over `iterate_generations`, feeding the GLM output parsers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator

from fastapi import Request

from server.chat_template import (
    THINKING_TYPES,
    normalize_messages,
    normalize_tools,
    prompt_starts_in_reasoning,
    template_kwargs,
)
from server.engine_client import new_request_id
from server.errors import APIError, bad_request, not_supported
from server.output_parser import ChatOutputParser
from server.protocol import ChatCompletionRequest
from server.serving import (
    Generation,
    Origin,
    ServerState,
    make_sampling_params,
    resolve_max_tokens,
    run_blocking,
    strip_stop_token_text,
)
from server.structured_output import request_grammar, structured_output, thinking_budget, tool_call_grammar

logger = logging.getLogger("glint.server")

MAX_N = 64
MAX_TOP_LOGPROBS = 20
# OpenAI's reasoning_effort values (the openai SDK's ReasoningEffort). GLM-4.7 can only think or not: "none" and
# "minimal" turn thinking off (chat_template.THINKING_OFF_EFFORTS), every other value leaves it on; a value outside
# this list is a 400, never a silent "thinking on".
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")


def request_log(request: Request) -> dict[str, Any]:
    return request.scope.setdefault("state", {}).setdefault("glint_log", {})


def state_of(request: Request) -> ServerState:
    return request.app.state.glint


def check_n(n: int | None) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {n}", param="n")
    return n


def check_prompt_logprobs(value: int | None, stream: bool | None) -> int | None:
    """vLLM's `prompt_logprobs` (the top-k per prompt token): vLLM's -1 (the whole vocabulary) and more than
    MAX_TOP_LOGPROBS are refused, and so is streaming (vLLM refuses it too: the answer is not streamed)."""
    if value is None:
        return None
    if not 0 <= value <= MAX_TOP_LOGPROBS:
        whole = " (-1, the whole vocabulary, is not supported)" if value == -1 else ""
        raise bad_request(
            f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {value}{whole}",
            param="prompt_logprobs",
        )
    if stream:
        raise bad_request("prompt_logprobs is not supported with streaming", param="prompt_logprobs")
    return value


def _thinking_budget_tokens(thinking: dict[str, Any] | None) -> int | None:
    """`thinking: {"type": "enabled", "budget_tokens": N}` (Anthropic's shape, on the chat route too): the reasoning
    is cut (`</think>` forced) after N output tokens. Other types carry no budget."""
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled" or thinking.get("budget_tokens") is None:
        return None
    budget = thinking["budget_tokens"]
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise bad_request(f"thinking.budget_tokens must be an integer >= 0, got {budget!r}",
                          param="thinking.budget_tokens")
    return budget


def include_usage(req: Any) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


async def iterate_generations(
    gens: list[Generation], keepalive: float | None
) -> AsyncIterator[tuple[int, list[Any]] | None]:
    """Delta batches of several generations as they come: (generation index, batch), or None (keep-alive)."""
    if len(gens) == 1:
        async for batch in gens[0].batches(keepalive):
            yield None if batch is None else (0, batch)
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for batch in gen.batches():
                queue.put_nowait((i, batch))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait(e)
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            try:
                item = await asyncio.wait_for(queue.get(), keepalive) if keepalive else await queue.get()
            except asyncio.TimeoutError:
                yield None
                continue
            if isinstance(item, BaseException):
                raise item
            if item[1] is None:
                remaining -= 1
                continue
            yield item
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t



# ================================================================================================ chat


def chat_finish_reason(engine_reason: str | None, has_tool_calls: bool) -> str:
    if engine_reason == "length":
        return "length"
    if engine_reason == "abort":
        raise APIError(503, "the request was aborted by the engine", headers={"Retry-After": "1"})
    return "tool_calls" if has_tool_calls else "stop"


class ChatPlan:
    """Everything decided about a chat request before it is sent to the engine."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest) -> None:
        self.req = req
        self.n = check_n(req.n)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs"
                )
        if req.reasoning_effort is not None and req.reasoning_effort not in REASONING_EFFORTS:
            raise bad_request(
                f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}; got {req.reasoning_effort!r}",
                param="reasoning_effort",
            )
        thinking_type = req.thinking.get("type") if isinstance(req.thinking, dict) else None
        if thinking_type is not None and thinking_type not in THINKING_TYPES:  # Z.ai's {"type": ...}; a type-less
            # {"clear_thinking": false} only sets that kwarg
            raise bad_request(
                f"thinking.type must be one of {', '.join(THINKING_TYPES)}; got {thinking_type!r}",
                param="thinking.type",
            )
        self.thinking_budget = _thinking_budget_tokens(req.thinking)
        if req.echo:  # vLLM's chat echo (the last message's content before the output) is not implemented
            raise not_supported("echo on chat completions", param="echo")
        self.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        self.top_logprobs = req.top_logprobs or 0
        self.prompt_logprobs = check_prompt_logprobs(req.prompt_logprobs, req.stream)
        tools = normalize_tools(req.tools)
        choice = req.tool_choice
        if choice is None:
            choice = "auto" if tools else "none"
        self.parse_tools = False
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise bad_request(
                    f"tool_choice must be none, auto, required or a named function; got {choice!r}",
                    param="tool_choice",
                )
            if choice != "none":
                # auto also needs tools here, as at OpenAI and vLLM (/v1/messages and /v1/responses let a tool-less
                # auto / none through; a choice that forces a call needs tools on every route)
                if not tools:
                    raise bad_request(f"tool_choice {choice!r} needs tools", param="tool_choice")
                self.parse_tools = True
        elif isinstance(choice, dict):
            fn = choice.get("function") if isinstance(choice.get("function"), dict) else {}
            name = fn.get("name") or choice.get("name")
            match = [t for t in tools or [] if t["function"]["name"] == name]
            if not match:
                raise bad_request(
                    f"tool_choice names function {name!r}, which is not in tools", param="tool_choice"
                )
            tools = match  # only the named tool is offered, and the grammar forces a call to it
            self.parse_tools = True
        else:
            raise bad_request("tool_choice must be a string or an object", param="tool_choice")
        self.tools = tools
        self.parallel_tool_calls = req.parallel_tool_calls is not False
        # structured output: a forced tool call (required / named) wins over response_format
        forced = self.parse_tools and choice != "auto"
        self.grammar = (
            tool_call_grammar(tools, self.parallel_tool_calls, state.tokenizer)
            if forced
            else request_grammar(req.response_format, req.model_extra)
        )
        self.messages = normalize_messages(req.messages)
        self.kwargs = template_kwargs(
            {**req.route_template_defaults, **state.chat_template.default_kwargs}, req.chat_template_kwargs,
            req.reasoning_effort, req.thinking,
        )
        if req.chat_template:
            logger.debug("ignoring a chat_template sent in the request (never run client Jinja)")

    def render(self, state: ServerState) -> tuple[str, list[int]]:
        prompt = state.chat_template.render(
            self.messages,
            self.tools,
            kwargs=self.kwargs,
            add_generation_prompt=self.req.add_generation_prompt is not False,
            continue_final_message=bool(self.req.continue_final_message),
        )
        return prompt, state.chat_template.encode(prompt)

    def parser(self, starts_in_reasoning: bool) -> ChatOutputParser:
        return ChatOutputParser(
            starts_in_reasoning=starts_in_reasoning,
            tools=self.tools,
            parse_tools=self.parse_tools,
            parallel_tool_calls=self.parallel_tool_calls,
        )


def reasoning_fields(state: ServerState, text: str | None) -> dict[str, Any]:
    mode = state.config.reasoning_field
    out: dict[str, Any] = {}
    if mode in ("reasoning_content", "both"):
        out["reasoning_content"] = text
    if mode in ("reasoning", "both"):
        out["reasoning"] = text
    return out


class PreparedChat:
    """A chat request rendered, tokenized and accepted by the engine."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    plan: ChatPlan
    gen: Generation
    parsers: list[ChatOutputParser]
    params: Any
    rid: str
    model: str
    created: int
    prompt_ids: list[int]


async def prepare_chat(
    state: ServerState,
    req: ChatCompletionRequest,
    log: dict[str, Any],
    arrival: float,
    id_prefix: str = "chatcmpl",
    origin: Origin = Origin(),
) -> PreparedChat:
    if req.model:
        log["model"] = req.model  # in the log line even when the name is refused
    model = state.response_model(req.model)
    plan = await run_blocking(state, ChatPlan, state, req)  # decodes tool-call arguments: off the loop
    state.check_ready()
    prompt, prompt_ids = await run_blocking(state, plan.render, state)
    starts_in_reasoning = prompt_starts_in_reasoning(prompt)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = resolve_max_tokens(
        state,
        requested,
        len(prompt_ids),
        param="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
        prompt_param="messages",
    )
    params = make_sampling_params(
        state,
        req=req,
        max_tokens=max_tokens,
        n=plan.n,
        logprobs=plan.logprobs,
        prompt_logprobs=plan.prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens if req.skip_special_tokens is not None else False,
        structured_output=structured_output(state, plan.grammar, starts_in_reasoning),
        thinking_budget=thinking_budget(state, plan.thinking_budget, starts_in_reasoning),
    )
    rid = new_request_id(id_prefix)
    log.update(
        engine_id=rid,
        model=model,
        stream=bool(req.stream),
        n=plan.n,
        messages=len(plan.messages),
        tools=len(plan.tools or []),
        thinking=starts_in_reasoning,
    )
    if state.config.log_requests in ("params", "full"):
        log["params"] = params_summary(params)
    if state.config.log_requests == "full":
        log["prompt"] = prompt
    gen = Generation(state, rid, n=plan.n, prompt_len=len(prompt_ids), log=log, arrival=arrival, origin=origin)
    await gen.start(prompt_ids, params, prompt)
    parsers = [plan.parser(starts_in_reasoning) for _ in range(plan.n)]
    return PreparedChat(
        plan=plan, gen=gen, parsers=parsers, params=params, rid=rid, model=model, created=int(time.time()),
        prompt_ids=prompt_ids,
    )


def params_summary(params: Any) -> dict[str, Any]:
    keys = (
        "n",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "max_tokens",
        "min_tokens",
        "stop",
        "ignore_eos",
        "logprobs",
        "prompt_logprobs",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    )
    return {k: getattr(params, k) for k in keys}


class ChatResult:
    def __init__(self, n: int) -> None:
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[Any]] = [[] for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.stop_reasons: list[Any] = [None] * n
        self.reasoning_tokens = 0
        self.prompt_logprobs: list[Any] | None = None  # the engine's, when the request asked for them

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


async def run_chat(state: ServerState, prep: PreparedChat) -> ChatResult:
    """Drive a non-streaming chat request to its end, feeding the parsers."""
    res = ChatResult(prep.plan.n)
    async for batch in prep.gen.batches():
        for d in batch:
            p = prep.parsers[d.index]
            was_reasoning = p.in_reasoning
            p.feed(strip_stop_token_text(state, d, prep.params), final=d.finished)
            if was_reasoning and p.in_reasoning:
                res.reasoning_tokens += len(d.new_token_ids)
            res.token_ids[d.index].extend(d.new_token_ids)
            if d.new_logprobs:
                res.logprobs[d.index].extend(d.new_logprobs)
            if d.prompt_logprobs is not None and res.prompt_logprobs is None:
                res.prompt_logprobs = d.prompt_logprobs
            if d.finished:
                res.reasons[d.index], res.stop_reasons[d.index] = d.finish_reason, d.stop_reason
    prep.gen.log["reasoning_tokens"] = res.reasoning_tokens
    return res


def output_for_log(p: ChatOutputParser) -> str:
    calls = "".join(f"\n[tool_call {c.name} {c.arguments}]" for c in p.tool_calls)
    return (f"<think>{p.reasoning}</think>" if p.reasoning else "") + p.content + calls


def openai_usage(prompt: int, completion: int, cached: int, reasoning: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage
