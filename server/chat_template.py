"""Turning OpenAI-style chat messages into a GLM-4.7 prompt.

- Messages are normalized before templating: content parts joined to text (non-text parts -> 400), the
  `developer` role treated as `system` and legacy `function` as `tool`, history tool-call `arguments` decoded
  from JSON strings to dicts (GLM templates iterate `arguments.items()`; invalid JSON -> 400 naming the
  message), `reasoning` accepted as an alias of `reasoning_content`.
- Template kwargs: server defaults (`--default-chat-template-kwargs`) < request `reasoning_effort` /
  Z.ai-style `thinking: {type, clear_thinking}` < request `chat_template_kwargs`, merged key by key.
  `reasoning_effort: "none"` or `"minimal"` means `enable_thinking: false` (as on /v1/responses); a `thinking`
  template kwarg is an alias too.
- The rendered prompt tells the reasoning parser where the output starts: GLM-4.7 ends the prompt with
  `<think>` when thinking is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.errors import APIError, bad_request, not_supported
from server.prompt_encoder import PromptEncoder

# GLM-4.7 thinks or does not: these reasoning efforts turn thinking off, every other one leaves it on
THINKING_OFF_EFFORTS = ("none", "minimal")
THINKING_TYPES = ("enabled", "disabled", "adaptive")  # Z.ai's / Anthropic's `thinking.type`
from server.reasoning_parser import prompt_starts_in_reasoning
from server.validation import check_tool_parameters, load_json

_TEXT_PART_TYPES = ("text", "input_text", "output_text")


def load_chat_template(value: str | None) -> str | None:
    """`--chat-template`: a path to a Jinja file, or the template text itself."""
    if not value:
        return None
    p = Path(value).expanduser()
    if len(value) < 4096 and "{" not in value:
        if not p.is_file():
            raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")
        return p.read_text()
    if p.is_file():
        return p.read_text()
    return value


def content_text(content: Any, where: str, allow_none: bool = True) -> str | None:
    """A message's content as text: a string, or the text parts of a list joined with newlines."""
    if content is None:
        if allow_none:
            return None
        raise bad_request(f"{where} must not be null", param=where)
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise bad_request(f"{where}[{j}] must be an object", param=f"{where}[{j}]")
        kind = part.get("type", "text")
        if kind in _TEXT_PART_TYPES:
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
            texts.append(text)
        elif kind in ("image_url", "input_image", "image", "input_audio", "audio", "file", "video_url"):
            raise not_supported(
                f"content part type {kind!r} (this model is text-only)", param=f"{where}[{j}]"
            )
        else:
            raise bad_request(
                f"{where}[{j}] has unknown content part type {kind!r}", param=f"{where}[{j}].type"
            )
    return "\n".join(texts)


def _decode_arguments(args: Any, where: str) -> dict[str, Any]:
    if args is None or args == "":
        return {}
    if isinstance(args, dict):
        return args
    if isinstance(args, str):
        value = load_json(args, where)  # bounded depth: the template's tojson recurses over it
        if isinstance(value, dict):
            return value
    raise bad_request(f"{where} must be a JSON object (as a string or an object)", param=where)


def normalize_messages(messages: list[Any]) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", param=where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        elif role == "function":
            role = "tool"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(
                f"{where}.role must be one of system, developer, user, assistant, tool; got {role!r}",
                param=f"{where}.role",
            )
        msg: dict[str, Any] = {"role": role}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        content = content_text(m.get("content"), f"{where}.content", allow_none=role == "assistant")
        if role == "assistant":
            msg["content"] = content if content is not None else ""
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if isinstance(reasoning, str):
                msg["reasoning_content"] = reasoning
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise bad_request(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
                norm_calls = []
                for j, tc in enumerate(calls):
                    cw = f"{where}.tool_calls[{j}]"
                    fn = tc.get("function") if isinstance(tc, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise bad_request(f"{cw}.function.name is required", param=f"{cw}.function.name")
                    norm_calls.append(
                        {
                            "id": tc.get("id"),
                            "type": "function",
                            "function": {
                                "name": fn["name"],
                                "arguments": _decode_arguments(
                                    fn.get("arguments"), f"{cw}.function.arguments"
                                ),
                            },
                        }
                    )
                msg["tool_calls"] = norm_calls
        else:
            msg["content"] = content
        if role == "tool":
            if m.get("tool_call_id") is not None:
                msg["tool_call_id"] = str(m["tool_call_id"])
        out.append(msg)
    return out


def normalize_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not tools:
        raise bad_request("tools must be a non-empty list (omit it for no tools)", param="tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad_request(
                f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", param=f"tools[{i}]"
            )
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}].function.name is required", param=f"tools[{i}].function.name")
        params = fn.get("parameters")
        if params is not None:
            check_tool_parameters(params, f"tools[{i}].function.parameters")
        out.append({"type": "function", "function": fn})
    return out


def template_kwargs(
    defaults: dict[str, Any],
    request_kwargs: dict[str, Any] | None,
    reasoning_effort: str | None = None,
    thinking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    kw = dict(defaults)
    if reasoning_effort is not None:
        kw["enable_thinking"] = reasoning_effort not in THINKING_OFF_EFFORTS
    if isinstance(thinking, dict):
        if thinking.get("type") in THINKING_TYPES:
            kw["enable_thinking"] = thinking["type"] != "disabled"
        if isinstance(thinking.get("clear_thinking"), bool):
            kw["clear_thinking"] = thinking["clear_thinking"]
    req = dict(request_kwargs or {})
    if "thinking" in req and "enable_thinking" not in req and isinstance(req["thinking"], bool):
        req["enable_thinking"] = req["thinking"]
    kw.update(req)
    return kw


class ChatTemplate:
    """Renders normalized messages with the tokenizer's (or an override) chat template."""

    def __init__(
        self, tokenizer: Any, template: str | None = None, default_kwargs: dict[str, Any] | None = None,
        cache_chars: int = 0,
    ):
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder(tokenizer, cache_chars)  # cache_chars: see ServerConfig.tokenizer_cache_chars
        self.template = template
        self.default_kwargs = dict(default_kwargs or {})
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass --chat-template")

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        if continue_final_message and (not messages or messages[-1]["role"] != "assistant"):
            raise bad_request(
                "continue_final_message needs the last message to be an assistant message",
                param="continue_final_message",
            )
        if continue_final_message and add_generation_prompt:
            add_generation_prompt = False
        extra = dict(kwargs or {})
        for reserved in (
            "messages",
            "tools",
            "add_generation_prompt",
            "continue_final_message",
            "tokenize",
            "chat_template",
            "conversation",
            "return_dict",
        ):
            extra.pop(reserved, None)
        try:
            prompt = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **extra,
            )
        except APIError:
            raise
        except Exception as e:  # a template error is caused by the request's content: 400, never a retry
            raise bad_request(
                f"the chat template failed on these messages: {type(e).__name__}: {e}"
            ) from None
        if not isinstance(prompt, str):
            raise APIError(500, "the chat template did not produce text")
        return prompt

    def encode(self, prompt: str) -> list[int]:
        """A rendered prompt's ids (no special tokens added: the template wrote them), message pieces cached."""
        return self.encoder.encode(prompt)


__all__ = [
    "ChatTemplate",
    "content_text",
    "load_chat_template",
    "normalize_messages",
    "normalize_tools",
    "prompt_starts_in_reasoning",
    "template_kwargs",
]
