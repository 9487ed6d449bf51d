"""GLM-4.7 reasoning parser: split generated text into reasoning and visible content.

GLM-4.7's chat template ends the prompt with `<think>` when thinking is on, so the output starts *inside* the
reasoning block: `{reasoning}</think>{content}`. The model may also go straight to a tool call without writing
`</think>`; `<tool_call>` ends reasoning too and stays in the content for the tool parser. When thinking is off
the prompt ends with `</think>` and the whole output is content (unless the model opens a `<think>` itself).

The parser is a pure function of the accumulated text (re-parse and diff): `split_reasoning(text, ...)` returns
only the parts that can no longer change, so a streaming caller emits `new_split.reasoning[len(sent):]`. With
`final=True` everything is released (a truncated reasoning block is flushed as reasoning, never dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALL_START = "<tool_call>"


def partial_tag_suffix_len(text: str, *tags: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags` (so it may still grow
    into the tag and must be held back while streaming)."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str  # reasoning text released so far (no tags)
    content: str  # text after the reasoning block released so far (may hold tool-call markup)
    in_reasoning: bool  # the text ends inside the reasoning block
    reasoning_ended: bool  # a `</think>` or `<tool_call>` closed the reasoning block


def split_reasoning(text: str, starts_in_reasoning: bool, final: bool = False) -> ReasoningSplit:
    pos = 0
    in_reasoning = starts_in_reasoning
    if text.startswith(THINK_START):
        in_reasoning, pos = True, len(THINK_START)
    elif not final and text and THINK_START.startswith(text):
        # The text may still become "<think>": nothing is stable yet.
        return ReasoningSplit("", "", in_reasoning, False)
    if not in_reasoning:
        return ReasoningSplit("", text[pos:], False, False)
    end = text.find(THINK_END, pos)
    tool = text.find(TOOL_CALL_START, pos)
    if end >= 0 and (tool < 0 or end < tool):
        return ReasoningSplit(text[pos:end], text[end + len(THINK_END) :], False, True)
    if tool >= 0:
        return ReasoningSplit(text[pos:tool], text[tool:], False, True)
    reasoning = text[pos:]
    if not final:
        hold = partial_tag_suffix_len(reasoning, THINK_END, TOOL_CALL_START)
        if hold:
            reasoning = reasoning[:-hold]
    return ReasoningSplit(reasoning, "", True, False)


def prompt_starts_in_reasoning(prompt: str) -> bool:
    """True when a rendered GLM prompt leaves the model inside a `<think>` block (thinking enabled)."""
    return prompt.rstrip().endswith(THINK_START)
