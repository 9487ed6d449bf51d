"""Per-choice streaming state over the GLM-4.7 reasoning and tool-call parsers (re-parse and diff).

`feed(new_text)` appends the text of one engine delta (any number of tokens) and returns the events that are
new since the last call, in order:

    ("reasoning", text)                      reasoning fragment
    ("content", text)                        visible text fragment
    ("tool_start", index, id, name)          first appearance of tool call `index` (arguments "")
    ("tool_args", index, fragment)           next fragment of that call's arguments JSON

`feed("", final=True)` releases everything still held back. The result always equals what the pure parsers
(`split_reasoning`, `parse_tool_calls`) give for the whole text; the tests replay outputs split at every
character boundary against them.

Re-parsing the whole text on every delta would cost O(length) per token (quadratic over a long answer), so
only the part that can still change is re-parsed: the held-back tail of reasoning or plain text (a tag can only
start there: anything that might begin a tag is never released), and, once tool calls appear, the text from
the start of the last `<tool_call>` (everything before it is final).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from server.reasoning_parser import THINK_END, THINK_START, partial_tag_suffix_len
from server.tool_parser import TOOL_CALL_START, ToolSchemas, parse_tool_calls

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
        self._released: dict[str, list[str]] = {"reasoning": [], "content": []}
        self.tool_calls: list[ToolCallOut] = []
        self.finished = False
        self.in_reasoning = self.starts_in_reasoning  # the text so far ends inside the reasoning block
        self._pieces: list[str] = []
        # phase: "start" (a leading <think> is still possible), "reasoning", "content"
        self._phase = "start" if parse_reasoning else "content"
        self._pending = ""  # text not yet released by the current phase (a possible tag start)
        self._calls_mode = False  # content phase: a <tool_call> was seen
        self._window = ""  # calls mode: text from the start of the last <tool_call>
        self._window_content = ""  # content released from the window
        self._call_base = 0  # global index of the window's first call

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def reasoning(self) -> str:
        """Reasoning released so far."""
        return "".join(self._released["reasoning"])

    @property
    def content(self) -> str:
        """Visible text released so far."""
        return "".join(self._released["content"])

    @property
    def has_tool_calls(self) -> bool:
        return bool(self.tool_calls)

    def feed(self, new_text: str, final: bool = False) -> list[tuple]:
        if self.finished:
            return []
        self.finished = final
        self._pieces.append(new_text)
        events: list[tuple] = []
        if self._phase == "start":
            buf = self._pending + new_text
            if buf.startswith(THINK_START):
                self._pending, new_text = "", buf[len(THINK_START) :]
                self._phase, self.in_reasoning = "reasoning", True
            elif not final and THINK_START.startswith(buf):  # "" too: nothing seen yet
                self._pending = buf
                return events
            else:
                self._pending, new_text = "", buf
                self._phase = "reasoning" if self.starts_in_reasoning else "content"
        if self._phase == "reasoning":
            new_text = self._feed_reasoning(new_text, final, events)
            if new_text is None:
                return events
        self._feed_content(new_text, final, events)
        return events

    def _feed_reasoning(self, new_text: str, final: bool, events: list[tuple]) -> str | None:
        """Release reasoning; returns the text after the reasoning block once it ended, else None."""
        buf = self._pending + new_text
        end, tool = buf.find(THINK_END), buf.find(TOOL_CALL_START)
        if end >= 0 and (tool < 0 or end < tool):
            cut, rest = end, buf[end + len(THINK_END) :]
        elif tool >= 0:
            cut, rest = tool, buf[tool:]
        else:
            hold = 0 if final else partial_tag_suffix_len(buf, THINK_END, TOOL_CALL_START)
            self._emit("reasoning", buf[: len(buf) - hold], events)
            self._pending = buf[len(buf) - hold :]
            return None
        self._emit("reasoning", buf[:cut], events)
        self._pending = ""
        self._phase, self.in_reasoning = "content", False
        return rest

    def _feed_content(self, new_text: str, final: bool, events: list[tuple]) -> None:
        if not self.parse_tools:
            self._emit("content", new_text, events)
            return
        if not self._calls_mode:
            buf = self._pending + new_text
            i = buf.find(TOOL_CALL_START)
            if i < 0:
                hold = 0 if final else partial_tag_suffix_len(buf, TOOL_CALL_START)
                self._emit("content", buf[: len(buf) - hold], events)
                self._pending = buf[len(buf) - hold :]
                return
            self._emit("content", buf[:i], events)
            self._pending, self._calls_mode, new_text = "", True, buf[i:]
        self._window += new_text
        parsed = parse_tool_calls(self._window, self.schemas, final)
        if parsed.content.startswith(self._window_content):
            self._emit("content", parsed.content[len(self._window_content) :], events)
            self._window_content = parsed.content
        else:  # cannot happen with the prefix-stable parser; never resend what was sent
            logger.warning("content diverged from what was streamed")
        for j, call in enumerate(parsed.calls):
            self._emit_call(self._call_base + j, call, events)
        if not final and parsed.last_call_start > 0:
            # everything before the last <tool_call> is final: re-parse from there next time
            self._window = self._window[parsed.last_call_start :]
            self._window_content = ""
            self._call_base += parsed.calls_before_last

    def _emit_call(self, index: int, call: Any, events: list[tuple]) -> None:
        if index > 0 and not self.parallel_tool_calls:
            return
        if index == len(self.tool_calls):
            out = ToolCallOut(index, new_tool_call_id(), call.name)
            self.tool_calls.append(out)
            events.append(("tool_start", index, out.id, out.name))
        out = self.tool_calls[index]
        if not call.arguments.startswith(out.arguments):
            logger.warning("tool-call arguments of call %d diverged from what was streamed", index)
            return
        frag = call.arguments[len(out.arguments) :]
        if frag:
            out.arguments += frag
            events.append(("tool_args", index, frag))

    def _emit(self, kind: str, frag: str, events: list[tuple]) -> None:
        if not frag:
            return
        self._released[kind].append(frag)
        if events and events[-1][0] == kind:
            events[-1] = (kind, events[-1][1] + frag)
        else:
            events.append((kind, frag))
