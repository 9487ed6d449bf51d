"""Per-choice streaming state over the GLM-4.7 reasoning and tool-call parsers (re-parse and diff).

`feed(new_text)` appends the text of one engine delta (any number of tokens), re-parses the whole accumulated
text with the pure parsers and returns the events that are new since the last call, in order:

    ("reasoning", text)                      reasoning fragment
    ("content", text)                        visible text fragment
    ("tool_start", index, id, name)          first appearance of tool call `index` (arguments "")
    ("tool_args", index, fragment)           next fragment of that call's arguments JSON

`feed("", final=True)` releases everything still held back. After the final feed, `message()` gives the
one-shot result, which by construction equals the concatenation of all events.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from server.reasoning_parser import split_reasoning
from server.tool_parser import ToolSchemas, parse_tool_calls

logger = logging.getLogger(__name__)


def new_tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCallOut:
    index: int
    id: str
    name: str
    arguments: str = ""


class ChatOutputParser:
    def __init__(
        self,
        *,
        starts_in_reasoning: bool,
        parse_reasoning: bool = True,
        tools: list[dict[str, Any]] | None = None,
        parse_tools: bool = False,
        parallel_tool_calls: bool = True,
        schemas: ToolSchemas | None = None,
    ) -> None:
        self.starts_in_reasoning = starts_in_reasoning and parse_reasoning
        self.parse_reasoning = parse_reasoning
        self.parse_tools = parse_tools
        self.parallel_tool_calls = parallel_tool_calls
        self.schemas = schemas if schemas is not None else ToolSchemas(tools)
        self.text = ""
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[ToolCallOut] = []
        self.finished = False
        self.in_reasoning = self.starts_in_reasoning  # the text so far ends inside the reasoning block

    def feed(self, new_text: str, final: bool = False) -> list[tuple]:
        if self.finished:
            return []
        self.text += new_text
        self.finished = final
        events: list[tuple] = []
        if self.parse_reasoning:
            split = split_reasoning(self.text, self.starts_in_reasoning, final)
            reasoning, rest = split.reasoning, split.content
            self.in_reasoning = split.in_reasoning
        else:
            reasoning, rest = "", self.text
        self._diff("reasoning", reasoning, events)
        if self.parse_tools:
            parsed = parse_tool_calls(rest, self.schemas, final)
            self._diff("content", parsed.content, events)
            calls = parsed.calls if self.parallel_tool_calls else parsed.calls[:1]
            for i, call in enumerate(calls):
                if i == len(self.tool_calls):
                    out = ToolCallOut(i, new_tool_call_id(), call.name)
                    self.tool_calls.append(out)
                    events.append(("tool_start", i, out.id, out.name))
                out = self.tool_calls[i]
                if call.arguments.startswith(out.arguments):
                    frag = call.arguments[len(out.arguments) :]
                else:  # cannot happen with the prefix-stable parser; never resend what was sent
                    logger.warning("tool-call arguments of call %d diverged from what was streamed", i)
                    frag = ""
                if frag:
                    out.arguments += frag
                    events.append(("tool_args", i, frag))
        else:
            self._diff("content", rest, events)
        return events

    def _diff(self, kind: str, full: str, events: list[tuple]) -> None:
        sent = getattr(self, kind)
        if len(full) <= len(sent):
            return
        if not full.startswith(sent):
            logger.warning("%s text diverged from what was streamed", kind)
            return
        frag = full[len(sent) :]
        setattr(self, kind, full)
        events.append((kind, frag))

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.tool_calls)
