"""Token utilities (the routes vLLM and SGLang serve next to the generation API): POST /tokenize turns a text or a
chat into the ids this server would feed the engine, POST /detokenize turns ids back into text. Both run on the
server's worker pool and never reach the engine. A chat is rendered exactly as /v1/chat/completions renders it
(server/chat_serving.py ChatPlan), so its count equals that request's usage.prompt_tokens. Also under /v1/."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from server.chat_serving import ChatPlan, request_log
from server.errors import bad_request
from server.prompt_encoder import encode_text
from server.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest, validation_error
from server.serving import ServerState, read_body, run_blocking

router = APIRouter()

CHAT_FIELDS = ("messages", "tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message")


def tokenize_ids(state: ServerState, req: TokenizeRequest) -> list[int]:
    """The ids of the request's text, or of its chat as the chat route renders it."""
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give either prompt (a text) or messages (a chat)", param="prompt")
    if req.prompt is not None:
        return encode_text(state.tokenizer, req.prompt, add_special_tokens=req.add_special_tokens is not False)
    try:
        chat = ChatCompletionRequest.model_validate({k: getattr(req, k) for k in CHAT_FIELDS})
    except ValidationError as e:
        raise validation_error(e) from None
    prompt, ids = ChatPlan(state, chat).render(state)
    return encode_text(state.tokenizer, prompt, add_special_tokens=True) if req.add_special_tokens else ids


def tokenize_body(state: ServerState, req: TokenizeRequest) -> dict[str, Any]:
    """The response: {count, max_model_len, tokens, token_strs (the vocabulary's strings, when asked; else null)}."""
    ids = tokenize_ids(state, req)
    strs = [str(t) for t in state.tokenizer.convert_ids_to_tokens(ids)] if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize_text(state: ServerState, ids: list[int]) -> str:
    """The text of `ids`, special tokens kept; an id outside the tokenizer's vocabulary is a 400."""
    size = len(state.tokenizer)
    bad = next((t for t in ids if not 0 <= t < size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {size})", param="tokens")
    return state.tokenizer.decode(ids, skip_special_tokens=False)


@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(request: Request) -> Response:
    state: ServerState = request.app.state.glint
    log = request_log(request)
    log["endpoint"] = "tokenize"
    req = await read_body(state, request, TokenizeRequest)
    state.response_model(req.model)
    body = await run_blocking(state, tokenize_body, state, req)
    log["prompt_tokens"] = body["count"]
    return JSONResponse(body)


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(request: Request) -> Response:
    state: ServerState = request.app.state.glint
    log = request_log(request)
    log["endpoint"] = "detokenize"
    req = await read_body(state, request, DetokenizeRequest)
    state.response_model(req.model)
    text = await run_blocking(state, detokenize_text, state, req.tokens)
    return JSONResponse({"prompt": text})
