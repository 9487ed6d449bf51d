"""Log lines that a request cannot forge: control characters become \\uNNNN escapes.

`escape_controls` is for values that come from requests (everything, line feeds included, so a value stays on
its line); `SafeFormatter` is the safety net on every log record of both server processes (CR, ESC, C1
controls...; line feeds stay, tracebacks need them).
"""

from __future__ import annotations

import logging
import re

# C0 and C1 controls, DEL, line/paragraph separators and lone surrogates
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_BUT_LF_TAB = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape_controls(text: str) -> str:
    """Control characters as \\uNNNN escapes (valid inside JSON strings too): the text stays on one line and
    prints nothing special on a terminal."""
    return _UNSAFE.sub(_escape, text)


def has_controls(text: str) -> bool:
    return _UNSAFE.search(text) is not None


class SafeFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _UNSAFE_BUT_LF_TAB.sub(_escape, super().format(record))
