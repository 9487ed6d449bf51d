"""Stop-string matching on streamed text, never emitting part of a stop string.

Text that could still grow into a stop string (the longest suffix that is a prefix of some stop string)
is held back. Emitted text never needs revisiting: a match can only start inside the held-back part.
The first match is the one that ends earliest (ties: the longer one), which is what token-by-token
streaming would see first, so the result doesn't depend on how the text was chunked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopCheck:
    emit: str  # text that is final and may be sent now
    pending: str  # held back: could still become (part of) a stop string
    stop: str | None  # the matched stop string; once set the sequence is finished


def _held_back_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def check_stop_strings(
    pending: str, new_text: str, stops: Sequence[str], include_stop_str_in_output: bool = False
) -> StopCheck:
    """pending: text held back by the previous call ('' at first); new_text: text just decoded."""
    text = pending + new_text
    if not stops:
        return StopCheck(text, "", None)
    match: tuple[int, int, str] | None = None  # (end, -len, stop); smaller is earlier
    for s in stops:
        start = text.find(s)
        if start >= 0:
            cand = (start + len(s), -len(s), s)
            if match is None or cand < match:
                match = cand
    if match is not None:
        end, neg_len, s = match
        cut = end if include_stop_str_in_output else end + neg_len
        return StopCheck(text[:cut], "", s)
    hold = _held_back_len(text, stops)
    return StopCheck(text[: len(text) - hold], text[len(text) - hold :], None)


class StopStringMatcher:
    """Stateful wrapper: feed(new_text) -> (text to emit now, matched stop or None); flush() at the end."""

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self.stops = tuple(stops)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.pending = ""
        self.matched: str | None = None

    def feed(self, new_text: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        r = check_stop_strings(self.pending, new_text, self.stops, self.include_stop_str_in_output)
        self.pending, self.matched = r.pending, r.stop
        return r.emit, r.stop

    def flush(self) -> str:
        """Release held-back text when the sequence ends without a stop string (EOS, length, abort)."""
        out, self.pending = self.pending, ""
        return out
