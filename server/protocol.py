"""Request bodies of the OpenAI routes (pydantic). Unknown fields are accepted (and logged), never rejected.

Bodies are parsed by hand (`parse_body`) so that malformed JSON and invalid fields become OpenAI-shaped 400s
naming the field, never FastAPI's 422. The JSON itself is checked first (server/validation.py: depth, lone
surrogates, finite numbers); `seed` and `logit_bias` ranges are checked on every model built here, also when
the Anthropic route builds a chat request.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar, Union

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from server.errors import APIError, bad_request, not_supported
from server.validation import check_logit_bias, check_seed, load_json

logger = logging.getLogger("glint.server")

T = TypeVar("T", bound=BaseModel)


class LooseModel(BaseModel):
    """A request body that keeps fields it does not declare (clients send other vendors' extensions)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


class StreamOptions(LooseModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


# vLLM request fields that would change the output and that this server does not implement: a 400 naming the
# field instead of a silent ignore (a value that asks for nothing, such as vLLM's default, passes)
UNSUPPORTED_FIELDS = ("allowed_token_ids", "bad_words", "truncate_prompt_tokens", "logits_processors",
                      "use_beam_search", "return_tokens_as_token_ids")


class _SamplingFields(LooseModel):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = 1
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = False
    response_format: dict[str, Any] | None = None
    user: str | None = None
    request_id: str | None = None

    @model_validator(mode="after")
    def _check_ranges(self) -> "_SamplingFields":
        check_seed(self.seed)  # APIError(400) passes through pydantic unchanged
        check_logit_bias(self.logit_bias)
        extra = self.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            if extra.get(name) not in (None, False, [], {}):
                raise not_supported(name, param=name)
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = True
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None
    echo: bool | None = False
    prompt_logprobs: int | None = None  # vLLM's: top-k per prompt token, top-level in the response
    _route_template_defaults: dict[str, Any] = PrivateAttr(default_factory=dict)  # not a request field

    def set_route_template_defaults(self, kwargs: dict[str, Any]) -> None:
        """Chat-template kwargs a translating route (Anthropic, Responses) applies under the server's defaults."""
        self._route_template_defaults = dict(kwargs)

    @property
    def route_template_defaults(self) -> dict[str, Any]:
        return dict(self._route_template_defaults)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    prompt_logprobs: int | None = None  # vLLM's: top-k per prompt token, on every choice


class TokenizeRequest(LooseModel):
    """POST /tokenize (vLLM's shape): a text (`prompt`) or a chat (`messages`, with the chat route's `tools`,
    `chat_template_kwargs`, `add_generation_prompt` and `continue_final_message`), never both."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    # None: True for a text, False for a chat (its template writes the special tokens)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(LooseModel):
    """POST /detokenize (vLLM's shape): token ids back to text, special tokens included."""

    model: str | None = None
    tokens: list[int]


KNOWN_IGNORED = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "verbosity",
    "prediction",
    "modalities",
    "audio",
    "web_search_options",
    "priority",
    "functions",
    "function_call",
    "return_token_ids",
    "separate_reasoning",
    "stream_reasoning",
}


def parse_body(raw: bytes, model: type[T]) -> T:
    """JSON bytes -> model, or an APIError(400) naming the offending field."""
    if not raw:
        raise bad_request("the request body is empty; expected a JSON object")
    data = load_json(raw)
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        obj = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    extra = sorted(set(obj.model_extra or {}) - KNOWN_IGNORED)
    if extra:
        logger.debug("request fields present but ignored: %s", extra)
    return obj


def validation_error(e: ValidationError) -> APIError:
    errs = e.errors(include_url=False)
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if not _is_union_tag(x)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        msg = f"missing required field {param!r}"
    elif param:
        msg = f"invalid value for {param!r}: {msg}"
    if len(errs) > 1:
        msg += f" (and {len(errs) - 1} more error{'s' if len(errs) > 2 else ''})"
    return bad_request(msg, param=param)


def _is_union_tag(x: Any) -> bool:
    # pydantic puts the tried union member ("str", "list[int]") into the location; drop those.
    return isinstance(x, str) and (
        x in ("str", "int", "float", "bool", "dict", "list")
        or "[" in x
        or x.startswith("function-")
        or x.startswith("union[")
    )
