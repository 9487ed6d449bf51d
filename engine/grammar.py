"""Constrained decoding: per-sequence grammar matchers (llguidance) and the batched token mask of a step.

A request with `SamplingParams.structured_output` gets an llguidance matcher on its first sampled row. The
matcher follows the sequence's tokens lazily: before each step it is synced to the row's history (the output
so far plus, for a verify row, the draft tokens before it), feeding new tokens and rolling back drafts that are
no longer there. So every row of a verify chain is masked with the grammar state after the drafts before it;
a draft the grammar rejects is never fed (the row before it masks it out, so verification rejects it and the
rows after it are discarded: they are left unmasked).

`after_token_ids`: the grammar starts after the first of these tokens in the output (GLM-4.7's `</think>`:
the reasoning before it is free text), else at the first token. Once the grammar is complete, only the
sequence's stop tokens are allowed. A committed token the grammar does not accept (it can only come from a
row that was not masked) ends the constraint for that sequence, with a warning.

Special tokens: llguidance's mask can allow a special token whose text a grammar spells literally (a regex
"abc<tool_call>f": the text tokenizes to GLM's <tool_call> token) while its matcher then refuses that token, so
each allowed special token is checked against the matcher and cleared if refused. A state that then allows
nothing (the grammar can only go on through text the tokenizer writes as a special token) allows the stop tokens:
the output ends there, with a warning, instead of leaving its grammar.

Masks are computed on the host into one packed int32 tensor [rows, ceil(V / 32)] (llguidance's layout: bit j
of word w allows token 32 w + j), copied to the logits' device once and applied to all rows in one op.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoTokenizer

log = logging.getLogger(__name__)

try:  # the engine runs without it; requests that need it fail with a clear message
    import llguidance
    import llguidance.hf  # not llguidance.torch: it runs torch.compile at import, which breaks Triton's interpreter
except ImportError:  # a machine without it (e.g. a bare GPU box) still runs everything but grammars
    llguidance = None

_tokenizers: dict[tuple[str, int, tuple[int, ...]], tuple[Any, tuple[int, ...]]] = {}
_lock = threading.Lock()


def llg_tokenizer(
    path: str, vocab_size: int, eos_token_ids: tuple[int, ...], hf_tokenizer: Any = None
) -> tuple[Any, tuple[int, ...]]:
    """(the llguidance token table, the special token ids < vocab_size) of a tokenizer folder (~1 s to build for
    a 150K vocabulary: cached)."""
    if llguidance is None:
        raise RuntimeError("structured output needs the llguidance package (pip install llguidance)")
    key = (path, vocab_size, eos_token_ids)
    with _lock:
        entry = _tokenizers.get(key)
        if entry is None:
            if hf_tokenizer is None:
                hf_tokenizer = AutoTokenizer.from_pretrained(path)
            tok = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None)
            special = tuple(sorted(i for i, t in hf_tokenizer.added_tokens_decoder.items()
                                   if t.special and i < vocab_size))
            entry = _tokenizers[key] = (tok, special)
        return entry


def check_grammar(grammar: Any) -> None:
    """At submission: ValueError naming structured_output if llguidance cannot compile `grammar` (a few ms, no
    token table; SequenceGrammar compiles it against the tokenizer on the request's first sampled row)."""
    if llguidance is None:
        raise ValueError("structured_output needs the llguidance package (pip install llguidance)")
    if not isinstance(grammar, str):
        raise ValueError(f"structured_output.grammar must be a str (llguidance grammar JSON), got {type(grammar)}")
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"structured_output.grammar is invalid: {error}")


class SequenceGrammar:
    """One sequence's matcher and the tokens fed to it (see the module docstring)."""

    def __init__(self, spec: Any, vocab_size: int, stop_token_ids: frozenset[int], hf_tokenizer: Any = None):
        eos = tuple(sorted(stop_token_ids))
        self.tokenizer, special = llg_tokenizer(spec.tokenizer, vocab_size, eos, hf_tokenizer)
        self.special_ids = [t for t in special if t not in stop_token_ids]
        self._special_words = torch.tensor([t >> 5 for t in self.special_ids], dtype=torch.long)
        self._special_bits = torch.tensor([_bit(t & 31) for t in self.special_ids], dtype=torch.int32)
        self.matcher = llguidance.LLMatcher(self.tokenizer, spec.grammar)
        if self.matcher.is_error():
            raise ValueError(f"invalid grammar: {self.matcher.get_error()}")
        self.after = frozenset(spec.after_token_ids)
        self.stop_token_ids = stop_token_ids
        self.started = not self.after
        self.broken = False
        # per fed token: (started before it, consumed by the matcher)
        self._fed: list[int] = []
        self._marks: list[tuple[bool, bool]] = []
        self._synced = 0  # self._fed[:_synced] equals the committed output

    # -- following the history ----------------------------------------------------------------------
    def _feed(self, token: int) -> bool:
        """Feed one token; False (nothing fed) if the grammar rejects it."""
        started, consumed = self.started, False
        if not started:
            if token in self.after:
                self.started = True
        elif token in self.stop_token_ids and self.matcher.is_accepting():
            pass  # the end of a complete output
        elif self.matcher.validate_tokens([token]) == 1:
            consumed = self.matcher.consume_token(token)
        else:
            return False
        self._fed.append(token)
        self._marks.append((started, consumed))
        return True

    def _rollback(self, n: int) -> None:
        if n <= 0:
            return
        marks = self._marks[-n:]
        del self._fed[-n:], self._marks[-n:]
        consumed = sum(c for _, c in marks)
        if consumed:
            self.matcher.rollback(consumed)
        self.started = marks[0][0]

    def sync(self, output: Sequence[int], drafts: Sequence[int]) -> int:
        """Make the fed tokens equal output + drafts (as far as the grammar accepts them). Returns how many of
        the drafts were fed (len(drafts) when all)."""
        if self.broken:
            return len(drafts)
        i = self._synced
        fed, n_out = self._fed, len(output)
        target_len = n_out + len(drafts)

        def target(j: int) -> int:
            return output[j] if j < n_out else drafts[j - n_out]

        while i < len(fed) and i < target_len and fed[i] == target(i):
            i += 1
        self._rollback(len(fed) - i)
        while i < target_len:
            if not self._feed(target(i)):
                if i < n_out:  # a committed token the grammar rejects: stop constraining this sequence
                    log.warning("a sequence left its grammar at output position %d; no longer constrained", i)
                    self.broken = True
                    self._synced = len(self._fed)
                    return 0
                break
            i += 1
        self._synced = min(len(self._fed), n_out)
        return max(0, len(self._fed) - n_out)

    # -- masks --------------------------------------------------------------------------------------
    def fill_mask(self, words: torch.Tensor, row: int) -> bool:
        """Write this state's allowed tokens into words[row] (packed int32); False = leave the row unmasked."""
        if self.broken or not self.started:
            return False
        v = words[row]
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())
        allowed = (v.index_select(0, self._special_words) & self._special_bits) != 0
        for t, hit in zip(self.special_ids, allowed.tolist()):
            if hit and self.matcher.validate_tokens([t]) != 1:  # allowed by the mask, refused by the matcher
                v[t >> 5] &= ~_bit(t & 31)
        if self.matcher.is_accepting():
            for t in self.stop_token_ids:
                words[row, t >> 5] |= _bit(t & 31)
        elif not bool(v.any()):
            log.warning("a grammar allows no token here (it goes on only through a special token's text); "
                        "ending the output")
            for t in self.stop_token_ids:
                words[row, t >> 5] |= _bit(t & 31)
        return True


def _bit(j: int) -> int:
    """Bit j of an int32 word as a Python int in int32 range (bit 31 is the sign bit)."""
    return -(1 << 31) if j == 31 else 1 << j


def apply_grammar_masks(x: torch.Tensor, rows: Sequence[Any]) -> None:
    """Mask x [B, V] in place: -inf for every token the grammar of row i does not allow next. `rows` are
    SampleRows (state + drafts); rows without structured output are untouched."""
    todo = [(i, r) for i, r in enumerate(rows) if r.params.structured_output is not None]
    if not todo:
        return
    vocab = x.shape[1]
    words = torch.full((len(rows), (vocab + 31) // 32), -1, dtype=torch.int32)
    masked: list[int] = []
    for i, r in todo:
        st = r.state
        if st.grammar is None:
            st.grammar = SequenceGrammar(r.params.structured_output, vocab, st.all_stop_token_ids)
        g = st.grammar
        fed = g.sync(st.output_token_ids, r.drafts)
        if fed < len(r.drafts):
            continue  # after a draft the grammar rejects: the row is discarded by verification anyway
        if g.fill_mask(words, i):
            masked.append(i)
    if not masked:
        return
    idx = torch.tensor(masked, dtype=torch.long)
    packed = words.index_select(0, idx).to(x.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=x.device)
    allowed = ((packed[:, :, None] >> shifts) & 1).reshape(len(masked), -1)[:, :vocab].bool()
    dev_idx = idx.to(x.device)
    x.index_copy_(0, dev_idx, x.index_select(0, dev_idx).masked_fill(~allowed, float("-inf")))
