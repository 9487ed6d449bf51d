"""Incremental detokenization over a small window of token ids (prefix / read offsets).

Each step decodes two short windows: ids[prefix:read] (text already emitted) and ids[prefix:] (with the
new tokens); the new text is the difference. Starting the window a few tokens back keeps decoders that
depend on neighbours (leading-space handling, byte-level merges) consistent with a one-shot decode. When
the window text ends in U+FFFD the last token(s) may hold an incomplete UTF-8 sequence, so nothing is
emitted until a later token completes it (or flush() gives up at the end).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from engine.outputs import LogprobsDict

# How many prompt tokens seed the window, so the first output token decodes in context.
_INITIAL_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = list(prompt_token_ids[-_INITIAL_CONTEXT:])
        self._ids: list[int] = context  # context tail + all output ids
        self._num_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text_parts: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            # Cleanup rewrites text across token boundaries; it can't be done incrementally.
            clean_up_tokenization_spaces=False,
        )

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Append output token ids; return the text they finalize (may be '' while a character is split)."""
        self._ids.extend(int(t) for t in token_ids)
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""  # nothing new yet (skipped special tokens) or a possibly incomplete character
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._text_parts.append(new_text)
        return new_text

    def flush(self) -> str:
        """At the end of the sequence: emit whatever is held back (invalid bytes become U+FFFD)."""
        if len(self._ids) == self._read_offset:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        new_text = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if new_text:
            self._text_parts.append(new_text)
        return new_text

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    @property
    def output_text(self) -> str:
        """All text emitted so far (add_tokens + flush results, concatenated)."""
        return "".join(self._text_parts)


def decode_logprob_tokens(tokenizer: Any, logprobs: Iterable[LogprobsDict | None]) -> None:
    """Fill Logprob.decoded_token in place with each token's own text (special tokens verbatim)."""
    for position in logprobs:
        if position is None:
            continue
        for token_id, lp in position.items():
            if lp.decoded_token is None:
                lp.decoded_token = tokenizer.decode([token_id], skip_special_tokens=False)
