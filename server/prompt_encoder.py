"""Prompt text -> token ids for the chat routes: message-sized pieces tokenized once, off the GIL.

Agentic clients (Claude Code, Codex) send the whole conversation again every turn: ~150K characters, ~36K tokens
at the end of a long task, of which only the last message or two are new. Tokenizing that prompt took 80-110 ms of
host time per request on the CI machine (bench/prompt_encode.py: a 50K-vocab byte-level BPE with GLM-4's split
pattern), part of every turn's TTFT however much of it the prefix cache serves. And the fast tokenizer's `encode`
holds the GIL for all of it: the event loop, which streams every other request's tokens, stood still that long.

Two fixes, both exact:
- GLM-4.7's tokenizer cuts its input at added tokens before the BPE model sees it, so a prompt's ids are its pieces'
  ids in order, cut just before each role marker (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|observation|>`):
  special added tokens that strip no whitespace and are matched on the raw text. Pieces are kept tokenized in an LRU
  keyed by their text (no hashing shortcut: a hit is an equal string) up to `max_chars` characters, so a new turn
  tokenizes its new messages only. A probe at start-up checks the cut on the tokenizer at hand and falls back to
  whole prompts where it does not hold (or where a marker is missing or strips whitespace).
- The pieces not in the cache go to `encode_batch`, which releases the GIL (and runs them on the tokenizer's own
  threads); `encode` does not.
"""
from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from typing import Any

ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
MARKER_LEAD = "<|"  # how every role marker starts

# The start-up probe: text around every marker (words, spaces, newlines, digits, punctuation and the other added
# tokens of the template next to the cut), whole vs in pieces.
_PROBE_PARTS = ("[gMASK]<sop>", "<|system|>\nYou are\n a bot. ", "<|user|> hi 123\n\n", "<|assistant|><think>x</think>",
                "  y <tool_call>f<arg_key>k</arg_key><arg_value>1</arg_value></tool_call>", "<|observation|>",
                "<tool_response>\n{\"a\": [1, 2]}\n</tool_response>", "<|user|>\t\u00e9\u4e2d'll", "<|assistant|>")


def backend_of(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (None for a slow one)."""
    return getattr(tokenizer, "backend_tokenizer", None)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """One text's ids. Through the fast tokenizer's backend without touching the tokenizer's mutable settings (so
    worker threads can share it: the tokenizer's own __call__ re-applies truncation/padding settings on every
    call), and through `encode_batch`, which releases the GIL."""
    backend = backend_of(tokenizer)
    if backend is not None:
        return list(backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def cut_markers(tokenizer: Any) -> tuple[str, ...]:
    """The role markers a prompt can be cut before: special added tokens of the tokenizer that strip no
    whitespace, match anywhere and are matched unnormalized. All four or none (a partial set would still be exact,
    but a tokenizer without GLM's markers is not one this cache was made for)."""
    added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    ok = [m for m in ROLE_MARKERS if m in added and added[m].special and not added[m].lstrip
          and not added[m].rstrip and not added[m].normalized and not added[m].single_word]
    return tuple(ok) if len(ok) == len(ROLE_MARKERS) else ()


class PromptEncoder:
    """Chat prompts -> ids (no special tokens added: the template writes them), pieces cached (see module doc)."""

    def __init__(self, tokenizer: Any, max_chars: int) -> None:
        self.tokenizer = tokenizer
        self.backend = backend_of(tokenizer)
        self.max_chars = max_chars if self.backend is not None else 0
        self._markers = cut_markers(tokenizer) if self.max_chars > 0 else ()
        if self._markers and not self._cut_is_exact():
            self._markers = ()
        self._pieces: OrderedDict[str, array] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self.hit_chars = 0  # characters served from the cache, and tokenized, since start-up
        self.miss_chars = 0

    @property
    def cuts(self) -> bool:
        """Whether prompts are cut at role markers (else a prompt is one piece)."""
        return bool(self._markers)

    def _cut_is_exact(self) -> bool:
        text = "".join(_PROBE_PARTS) * 2
        whole = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        parts = self.backend.encode_batch(self.pieces(text), add_special_tokens=False)
        return [i for p in parts for i in p.ids] == whole

    def pieces(self, text: str) -> list[str]:
        """`text` cut before each role marker (one piece without the cut)."""
        if not self._markers:
            return [text]
        starts, i = [0], text.find(MARKER_LEAD)  # str.find: C speed, about one call per message
        while i >= 0:
            if i and text.startswith(self._markers, i):
                starts.append(i)
            i = text.find(MARKER_LEAD, i + 1)
        return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)]) if b > a]

    def encode(self, text: str) -> list[int]:
        if self.max_chars <= 0:
            return encode_text(self.tokenizer, text, add_special_tokens=False)
        pieces = self.pieces(text)
        with self._lock:
            found = [self._pieces.get(p) for p in pieces]
            for p, ids in zip(pieces, found):
                if ids is not None:
                    self._pieces.move_to_end(p)
        missing = list(dict.fromkeys(p for p, ids in zip(pieces, found) if ids is None))
        fresh: dict[str, array] = {}
        if missing:  # outside the lock: two threads may tokenize one new piece at once, to the same ids
            encoded = self.backend.encode_batch(missing, add_special_tokens=False)
            fresh = {p: array("i", e.ids) for p, e in zip(missing, encoded)}
            found = [ids if ids is not None else fresh[p] for p, ids in zip(pieces, found)]
        self._store(fresh, len(text), sum(map(len, missing)))
        out: list[int] = []
        for ids in found:
            out.extend(ids)
        return out

    def _store(self, fresh: dict[str, array], chars: int, missed: int) -> None:
        with self._lock:
            self.hit_chars += chars - missed
            self.miss_chars += missed
            for p, ids in fresh.items():
                if len(p) > self.max_chars or p in self._pieces:
                    continue
                self._pieces[p] = ids
                self._chars += len(p)
            while self._chars > self.max_chars:
                old, _ = self._pieces.popitem(last=False)
                self._chars -= len(old)

    def cached_chars(self) -> int:
        with self._lock:
            return self._chars
