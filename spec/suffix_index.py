"""The suffix-decoding index (SuffixDecoding, arXiv 2411.04975; Arctic Inference's SuffixDecodingCache
semantics), compiled: per-request trees over prompt + accepted output, per-tenant global trees over finished
responses, and the draft search. The core is spec/suffix_core.cpp (built on first use, spec/suffix_build.py);
spec/suffix_reference.py is the same semantics in plain Python, for tests.

Semantics. Every tree is a depth-limited suffix trie (max_depth) whose node count is the number of
occurrences of its string. `speculate` tries every match length m = 1..min(len(seq), max_depth) of the
request's sequence (prompt + output) against its own tree and its tenant's global tree; from the node of the
last m tokens it follows the child with the highest count, each token's probability being the running
product of child/parent counts, and stops at min(max_tokens, floor(max_spec_factor * m)) tokens, when the
probability falls below min_token_prob, or when the trie ends (m + draft <= max_depth). The score is the sum
of the probabilities (the expected number of accepted tokens if counts were probabilities); the highest score
wins, ties going to the longer match, then to the request's own tree.

Where this differs from Arctic, and why:
  * global trees hold finished responses only, one per tenant (a string key), so one tenant's text never
    shapes another's drafts; FIFO eviction of whole responses by total tokens across tenants (a response
    longer than the bound is not kept). Arctic: one tree, fed while requests run, FIFO by request count;
  * in the request's own tree, the matched string's count leaves out the query's own occurrence (the end of
    the sequence, which has no continuation yet), so the first token's probability is its frequency among
    the earlier occurrences. Arctic counts it, which halves a string seen once before in the prompt and lets
    any unique match in another request's response outscore the prompt; Arctic's global tree is diluted the
    same way only because it holds the request's own partial response. With finished-only global trees this
    rule is what keeps the two trees comparable (measured: ours >= Arctic's teacher-forced acceptance,
    tests/spec/test_suffix_index.py);
  * ties between children with equal counts: the request's own tree takes the continuation that occurred
    first (the prompt's text, which an edit re-emits in order, over the output's), a global tree the most
    recent one. Arctic: the order of its sibling lists;
  * the full context length is tried as a match too (Arctic stops one short).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from spec.suffix_build import load_core


@dataclass(frozen=True, slots=True)
class SuffixDraft:
    tokens: list[int]
    score: float  # expected accepted length under the tree's frequencies
    match_len: int  # 0 when there is no draft
    probs: list[float] = field(default_factory=list)  # cumulative probability of each draft token


def _load_core():
    core = load_core()
    try:
        core.set_draft_type(SuffixDraft)  # the core then builds SuffixDraft objects itself (fast path)
    except TypeError:  # a layout the core cannot fill in: it returns tuples, wrapped below
        pass
    return core


def check_spec_params(max_spec_factor: float, min_token_prob: float) -> None:
    if not (math.isfinite(max_spec_factor) and max_spec_factor >= 0):
        raise ValueError(f"max_spec_factor must be a finite number >= 0, got {max_spec_factor!r}")
    if not 0.0 <= min_token_prob <= 1.0:
        raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob!r}")


def check_index_params(max_depth: int, max_global_tokens: int) -> None:
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
        raise ValueError(f"max_depth must be an int >= 1, got {max_depth!r}")
    if isinstance(max_global_tokens, bool) or not isinstance(max_global_tokens, int) or max_global_tokens < 0:
        raise ValueError(f"max_global_tokens must be an int >= 0 (0 = no global trees), got {max_global_tokens!r}")


class SuffixIndex:
    """Not thread-safe: call it from one thread. seq_ids are ints chosen by the caller, unique among active
    requests; a stopped seq_id may be started again."""

    def __init__(self, max_depth: int = 64, max_global_tokens: int = 1 << 24, *, compact_min: int = 1 << 16,
                 compact_rate: int = 2, compact_step: int = 4096) -> None:
        """compact_*: a global tree that has dropped at least compact_min tokens, and more than it still holds,
        is rebuilt from its live responses in the background of later stop() calls, each copying
        compact_rate * (tokens it added or evicted) + compact_step tokens (tests turn these down)."""
        check_index_params(max_depth, max_global_tokens)
        self.max_depth = max_depth
        self.max_global_tokens = max_global_tokens
        self._core = _load_core().Core(max_depth, max_global_tokens, compact_min, compact_rate, compact_step)
        self._tenants: dict[str, int] = {}

    def start(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None:
        """Index a new request's prompt (its local tree). `tenant` scopes the global tree it drafts from and
        that its response joins."""
        if not isinstance(tenant, str):
            raise TypeError(f"tenant must be a str, got {type(tenant).__name__}")
        tid = self._tenants.setdefault(tenant, len(self._tenants))
        self._core.start(seq_id, prompt, tid)

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append accepted output tokens (never rejected drafts)."""
        self._core.extend(seq_id, tokens)

    def extend_batch(self, seq_ids: Sequence[int], tokens: Sequence[Sequence[int]]) -> None:
        """`extend` for many requests in one call (all checked before any is changed)."""
        self._core.extend_batch(seq_ids, tokens)

    def stop(self, seq_id: int, keep_response: bool = True) -> None:
        """Free the local tree; with keep_response the output tokens join the tenant's global tree (evicting
        the oldest responses, across tenants, beyond max_global_tokens)."""
        self._core.stop(seq_id, bool(keep_response))

    def speculate(self, seq_id: int, max_tokens: int, max_spec_factor: float = 1.0,
                  min_token_prob: float = 0.1) -> SuffixDraft:
        return self.speculate_batch([seq_id], [max_tokens], max_spec_factor, min_token_prob)[0]

    def speculate_batch(self, seq_ids: Sequence[int], max_tokens: Sequence[int] | int, max_spec_factor: float,
                        min_token_prob: float) -> list[SuffixDraft]:
        """One draft per request; max_tokens per request (or one int for all)."""
        check_spec_params(max_spec_factor, min_token_prob)
        if isinstance(max_tokens, int):
            max_tokens = [max_tokens] * len(seq_ids)
        raw = self._core.speculate_batch(seq_ids, max_tokens, float(max_spec_factor), float(min_token_prob))
        return [d if type(d) is SuffixDraft else SuffixDraft(*d) for d in raw]

    def num_global_tokens(self, tenant: str | None = None) -> int:
        """Tokens held by one tenant's global tree, or by all of them (tenant=None)."""
        if tenant is None:
            return self._core.num_global_tokens(-1)
        tid = self._tenants.get(tenant)
        return 0 if tid is None else self._core.num_global_tokens(tid)

    def num_tokens(self, seq_id: int) -> int:
        """Length of an active request's sequence (prompt + extended tokens)."""
        return self._core.num_tokens(seq_id)

    def __contains__(self, seq_id: int) -> bool:
        return self._core.has(seq_id)
