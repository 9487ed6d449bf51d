"""OpenAI routes: POST /v1/chat/completions and POST /v1/completions.

Streaming follows OpenAI's recorded shape: a role chunk per choice, content / reasoning / tool-call delta
chunks (a tool call's first delta carries id, type and name with empty arguments; later ones only argument
fragments), one chunk per choice with an empty delta and the finish_reason, a usage chunk with `choices: []`
when `stream_options.include_usage`, then `data: [DONE]`. With --keepalive-interval (off by default: some
clients JSON-parse every line) comment lines (`: keep-alive`) fill silences longer than that (long prefills). Errors after the headers are sent become an SSE `error` object.
"""

from __future__ import annotations

import logging
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from server.chat_serving import (
    MAX_TOP_LOGPROBS,
    ChatResult,
    PreparedChat,
    chat_finish_reason,
    check_n,
    check_prompt_logprobs,
    include_usage,
    iterate_generations,
    openai_usage,
    output_for_log,
    prepare_chat,
    reasoning_fields,
    request_log,
    run_chat,
    state_of,
)
from server.engine_client import new_request_id
from server.errors import APIError, bad_request, not_supported, sse_error_event
from server.prompt_encoder import encode_text
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving import (
    CompletionLogprobs,
    Generation,
    ServerState,
    chat_logprobs,
    make_sampling_params,
    prompt_logprobs_json,
    read_body,
    request_origin,
    resolve_max_tokens,
    run_blocking,
    strip_stop_token_text,
)
from server.sse import DONE, KEEPALIVE, ClientDisconnected, SSEResponse, run_or_disconnect, sse_data
from server.structured_output import request_grammar, structured_output

logger = logging.getLogger("glint.server")

router = APIRouter()

MAX_PROMPTS = 1024  # a completions request's prompt list


# ================================================================================================ chat


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()
    state = state_of(request)
    log = request_log(request)
    log["endpoint"] = "chat"
    req = await read_body(state, request, ChatCompletionRequest)
    prep = await prepare_chat(state, req, log, arrival, origin=request_origin(state, request))
    if req.stream:
        return SSEResponse(_chat_stream(state, prep), on_disconnect=lambda: log.update(disconnected=True))
    try:
        result = await run_or_disconnect(request.receive, run_chat(state, prep))
    except ClientDisconnected:
        log["disconnected"] = True
        return Response(status_code=499)
    finally:
        prep.gen.close()
    return JSONResponse(_chat_body(state, prep, result))


def _chat_body(state: ServerState, prep: PreparedChat, res: ChatResult) -> dict[str, Any]:
    plan = prep.plan
    choices = []
    for i, p in enumerate(prep.parsers):
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in p.tool_calls
        ]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": p.content if (p.content or not calls) else None,
            "refusal": None,
        }
        message.update(reasoning_fields(state, p.reasoning or None))
        if calls:
            message["tool_calls"] = calls
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": None
                if plan.logprobs is None
                else {"content": chat_logprobs(state, res.token_ids[i], res.logprobs[i], plan.top_logprobs)},
                "finish_reason": chat_finish_reason(res.reasons[i], bool(calls)),
                "stop_reason": res.stop_reasons[i],
            }
        )
    prep.gen.log["finish_reason"] = ",".join(sorted({c["finish_reason"] for c in choices}))
    if state.config.log_requests == "full":
        prep.gen.log["output"] = output_for_log(prep.parsers[0])
    body = {
        "id": prep.rid,
        "object": "chat.completion",
        "created": prep.created,
        "model": prep.model,
        "choices": choices,
        "usage": openai_usage(
            prep.gen.prompt_len, res.completion_tokens, prep.gen.num_cached_tokens, res.reasoning_tokens
        ),
    }
    if plan.prompt_logprobs is not None:  # vLLM's: top-level, beside the choices
        body["prompt_logprobs"] = prompt_logprobs_json(
            state, prep.prompt_ids, res.prompt_logprobs, plan.prompt_logprobs
        )
    return body


async def _chat_stream(state: ServerState, prep: PreparedChat) -> AsyncIterator[str]:
    plan, gen, parsers, params, rid = prep.plan, prep.gen, prep.parsers, prep.params, prep.rid
    want_usage = include_usage(plan.req)
    base = {"id": rid, "object": "chat.completion.chunk", "created": prep.created, "model": prep.model}

    def chunk(
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: Any = None,
        **extra: Any,
    ) -> str:
        c = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **extra}
        body = {**base, "choices": [c]}
        if want_usage:
            body["usage"] = None
        return sse_data(body)

    completion_tokens = 0
    reasoning_tokens = 0
    finish: list[str] = []
    try:
        for i in range(plan.n):
            yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
        async for item in iterate_generations([gen], state.config.keepalive_interval or None):
            if item is None:
                yield KEEPALIVE
                continue
            for d in item[1]:
                i = d.index
                p = parsers[i]
                completion_tokens += len(d.new_token_ids)
                was_reasoning = p.in_reasoning
                events = p.feed(strip_stop_token_text(state, d, params), final=d.finished)
                if was_reasoning and p.in_reasoning:
                    reasoning_tokens += len(d.new_token_ids)
                lp = None
                if plan.logprobs is not None and d.new_logprobs:
                    lp = {"content": chat_logprobs(state, d.new_token_ids, d.new_logprobs, plan.top_logprobs)}
                for ev in events:
                    kind = ev[0]
                    if kind == "content":
                        delta: dict[str, Any] = {"content": ev[1]}
                    elif kind == "reasoning":
                        delta = reasoning_fields(state, ev[1])
                    elif kind == "tool_start":
                        delta = {
                            "tool_calls": [
                                {
                                    "index": ev[1],
                                    "id": ev[2],
                                    "type": "function",
                                    "function": {"name": ev[3], "arguments": ""},
                                }
                            ]
                        }
                    else:
                        delta = {"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]}
                    yield chunk(i, delta, logprobs=lp)
                    lp = None
                if d.finished:
                    reason = chat_finish_reason(d.finish_reason, p.has_tool_calls)
                    finish.append(reason)
                    yield chunk(i, {}, reason, logprobs=lp, stop_reason=d.stop_reason)
                elif lp is not None:
                    yield chunk(i, {}, logprobs=lp)
        gen.log["finish_reason"] = ",".join(sorted(set(finish)))
        gen.log["reasoning_tokens"] = reasoning_tokens
        if state.config.log_requests == "full":
            gen.log["output"] = output_for_log(parsers[0])
        if want_usage:
            yield sse_data(
                {
                    **base,
                    "choices": [],
                    "usage": openai_usage(
                        gen.prompt_len, completion_tokens, gen.num_cached_tokens, reasoning_tokens
                    ),
                }
            )
        yield DONE
    except APIError as e:
        gen.log["error"] = e.message
        yield sse_error_event(e)
        yield DONE
    except Exception as e:  # noqa: BLE001
        logger.exception("error while streaming %s", rid)
        gen.log["error"] = f"{type(e).__name__}"
        yield sse_error_event(APIError(500, "internal error while streaming the response"))
        yield DONE
    finally:
        gen.close()


# ================================================================================================ completions


class CompletionPrompt:
    def __init__(self, text: str | None, ids: list[int]) -> None:
        self.text = text
        self.ids = ids


def _prompts(state: ServerState, prompt: Any) -> list[CompletionPrompt]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    elif isinstance(prompt, list):
        items = list(prompt)
    else:
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            param="prompt",
        )
    if not items:
        raise bad_request("prompt must not be empty", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            ids = encode_text(state.tokenizer, p, add_special_tokens=True) if p else []
            out.append(CompletionPrompt(p, ids))
        else:
            out.append(CompletionPrompt(None, [int(t) for t in p]))
        if not out[-1].ids:
            raise bad_request("prompt must not be empty", param="prompt")
    return out


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    state = state_of(request)
    log = request_log(request)
    log["endpoint"] = "completions"
    req = await read_body(state, request, CompletionRequest)
    n = check_n(req.n)
    grammar = request_grammar(req.response_format, req.model_extra)
    if req.suffix:
        raise not_supported("suffix", param="suffix")
    if req.best_of is not None and req.best_of != n:
        raise not_supported("best_of other than n", param="best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="logprobs")
    prompt_lp = check_prompt_logprobs(req.prompt_logprobs, req.stream)
    echo = bool(req.echo)
    # the engine's prompt logprobs serve both the echo's logprobs and vLLM's prompt_logprobs: the larger count
    engine_prompt_lp = max(
        (x for x in (prompt_lp, req.logprobs if echo else None) if x is not None), default=None
    )
    scoring = req.max_tokens == 0
    if scoring and not echo:
        raise bad_request(
            "max_tokens must be at least 1 (0 is only allowed with echo, for scoring)", param="max_tokens"
        )
    model = state.response_model(req.model)
    state.check_ready()
    origin = request_origin(state, request)
    prompts = await run_blocking(state, _prompts, state, req.prompt)
    rid = new_request_id("cmpl")
    gens, param_sets = [], []
    for k, p in enumerate(prompts):
        max_tokens = resolve_max_tokens(
            state, 1 if scoring else req.max_tokens, len(p.ids), param="max_tokens", prompt_param="prompt"
        )
        params = make_sampling_params(
            state,
            req=req,
            max_tokens=max_tokens,
            n=n,
            logprobs=req.logprobs,
            prompt_logprobs=engine_prompt_lp,
            skip_special_tokens=req.skip_special_tokens if req.skip_special_tokens is not None else True,
            structured_output=structured_output(state, grammar, False),
        )
        sub_log: dict[str, Any] = {} if k else log
        gens.append(Generation(state, f"{rid}-{k}", n=n, prompt_len=len(p.ids), log=sub_log, arrival=arrival,
                               origin=origin))
        param_sets.append(params)
    log.update(engine_id=rid, model=model, stream=bool(req.stream), n=n, prompts=len(prompts))
    try:
        for gen, p, params in zip(gens, prompts, param_sets):
            await gen.start(p.ids, params, p.text)
    except BaseException:
        for gen in gens:
            gen.close()
        raise
    ctx = _CompletionContext(state, req, prompts, gens, param_sets, n, echo, scoring, rid, model, prompt_lp)
    if req.stream:
        return SSEResponse(ctx.stream(), on_disconnect=lambda: log.update(disconnected=True))
    try:
        body = await run_or_disconnect(request.receive, ctx.full())
    except ClientDisconnected:
        log["disconnected"] = True
        return Response(status_code=499)
    finally:
        for gen in gens:
            gen.close()
    return JSONResponse(body)


class _CompletionContext:
    def __init__(
        self,
        state: ServerState,
        req: CompletionRequest,
        prompts: list[CompletionPrompt],
        gens: list[Generation],
        params: list[Any],
        n: int,
        echo: bool,
        scoring: bool,
        rid: str,
        model: str,
        prompt_lp: int | None = None,
    ) -> None:
        self.state, self.req, self.prompts, self.gens, self.params = state, req, prompts, gens, params
        self.n, self.echo, self.scoring, self.rid, self.model = n, echo, scoring, rid, model
        self.prompt_lp = prompt_lp  # vLLM's prompt_logprobs (top-k), None when not asked for
        self.prompt_lp_dicts: list[Any] = [None] * len(prompts)  # the engine's, per prompt
        self.created = int(time.time())
        self.want_lp = req.logprobs is not None
        total = len(prompts) * n
        self.texts = [""] * total
        self.lps = [
            CompletionLogprobs(state, req.logprobs or 0) if self.want_lp else None for _ in range(total)
        ]
        self.reasons: list[str | None] = [None] * total
        self.stop_reasons: list[Any] = [None] * total
        self.started = [False] * total
        self.completion_tokens = 0

    def _echo_prefix(self, k: int, index: int, d: Any) -> str:
        """On a choice's first delta: the prompt text (and its logprobs) when echo is on."""
        if not self.echo:
            return ""
        p = self.prompts[k]
        text = p.text if p.text is not None else self.state.tokenizer.decode(p.ids)
        lp = self.lps[index]
        if lp is not None:
            plp = d.prompt_logprobs or [None] * len(p.ids)
            for j, tok in enumerate(p.ids):
                lp.add(tok, plp[j] if j < len(plp) else None)
            lp.offset = len(text)
        return text

    def _consume(self, k: int, d: Any) -> tuple[int, str, int]:
        """Fold one delta; returns (choice index, new text, logprob entries before this delta)."""
        index = k * self.n + d.index
        if d.prompt_logprobs is not None and self.prompt_lp_dicts[k] is None:
            self.prompt_lp_dicts[k] = d.prompt_logprobs
        lp = self.lps[index]
        lp_start = len(lp) if lp is not None else 0
        text = ""
        if not self.started[index]:
            self.started[index] = True
            text = self._echo_prefix(k, index, d)
        if not self.scoring:
            new_text = strip_stop_token_text(self.state, d, self.params[k])
            self.completion_tokens += len(d.new_token_ids)
            if lp is not None:
                for j, tok in enumerate(d.new_token_ids):
                    lp.add(tok, d.new_logprobs[j] if d.new_logprobs else {})
            text += new_text
        self.texts[index] += text
        if d.finished:
            self.reasons[index] = "length" if self.scoring else self._finish(d.finish_reason)
            self.stop_reasons[index] = d.stop_reason
        return index, text, lp_start

    @staticmethod
    def _finish(reason: str | None) -> str:
        if reason == "abort":
            raise APIError(503, "the request was aborted by the engine", headers={"Retry-After": "1"})
        return reason or "stop"

    def openai_usage(self) -> dict[str, Any]:
        prompt = sum(len(p.ids) for p in self.prompts)
        cached = sum(g.num_cached_tokens for g in self.gens)
        return openai_usage(prompt, self.completion_tokens, cached)

    async def full(self) -> dict[str, Any]:
        async for item in iterate_generations(self.gens, None):
            if item is None:
                continue
            k, batch = item
            for d in batch:
                self._consume(k, d)
        choices = [
            {
                "index": i,
                "text": self.texts[i],
                "logprobs": self.lps[i].as_dict() if self.lps[i] is not None else None,
                "finish_reason": self.reasons[i],
                "stop_reason": self.stop_reasons[i],
            }
            for i in range(len(self.texts))
        ]
        if self.prompt_lp is not None:  # vLLM's: on every choice, for its prompt
            per_prompt = [
                prompt_logprobs_json(self.state, p.ids, self.prompt_lp_dicts[k], self.prompt_lp)
                for k, p in enumerate(self.prompts)
            ]
            for c in choices:
                c["prompt_logprobs"] = per_prompt[c["index"] // self.n]
        self.gens[0].log["finish_reason"] = ",".join(sorted({str(c["finish_reason"]) for c in choices}))
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.openai_usage(),
        }

    async def stream(self) -> AsyncIterator[str]:
        want_usage = include_usage(self.req)
        base = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.model}

        def chunk(index: int, text: str, logprobs: Any, finish: str | None = None, **extra: Any) -> str:
            body = {
                **base,
                "choices": [
                    {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish, **extra}
                ],
            }
            if want_usage:
                body["usage"] = None
            return sse_data(body)

        try:
            async for item in iterate_generations(self.gens, self.state.config.keepalive_interval or None):
                if item is None:
                    yield KEEPALIVE
                    continue
                k, batch = item
                for d in batch:
                    index, text, lp_start = self._consume(k, d)
                    lp = self.lps[index]
                    lp_part = lp.as_dict(lp_start) if lp is not None else None
                    if text or (lp is not None and len(lp) > lp_start):
                        yield chunk(index, text, lp_part)
                    if d.finished:
                        yield chunk(
                            index, "", None, self.reasons[index], stop_reason=self.stop_reasons[index]
                        )
            self.gens[0].log["finish_reason"] = ",".join(sorted({str(r) for r in self.reasons}))
            if want_usage:
                yield sse_data({**base, "choices": [], "usage": self.openai_usage()})
            yield DONE
        except APIError as e:
            self.gens[0].log["error"] = e.message
            yield sse_error_event(e)
            yield DONE
        except Exception as e:  # noqa: BLE001
            logger.exception("error while streaming %s", self.rid)
            self.gens[0].log["error"] = type(e).__name__
            yield sse_error_event(APIError(500, "internal error while streaming the response"))
            yield DONE
        finally:
            for gen in self.gens:
                gen.close()
