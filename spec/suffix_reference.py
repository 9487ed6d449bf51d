"""The suffix index's semantics in plain Python, written for obviousness, not speed (O(max_depth) dict updates
per token, one walk per match length): the oracle spec/suffix_index.py is tested against. Same API.

A tree is a multiset of sequences; for every string x with 1 <= len(x) <= max_depth it knows the times its
occurrences end (a local tree's time is the position in the request's sequence; a global tree's is a clock
that advances by one per response token kept). count(x) = number of occurrences. Children with equal counts:
a local tree prefers the earliest first occurrence, a global tree the latest last occurrence. A local tree
drafts with the matched string's count less one (the query's own occurrence at the end of the sequence).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from spec.suffix_index import SuffixDraft, check_index_params, check_spec_params


@dataclass
class _Tree:
    depth: int
    local: bool  # a request's own tree (prompt + output), else a tenant's global tree
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # x -> end times of its occurrences
    kids: dict[tuple[int, ...], set[int]] = field(default_factory=dict)  # x -> {t : x + (t,) occurs}

    def add(self, seq: Sequence[int], pos: int, time: int) -> None:
        """Count the occurrences that end at seq[pos] (every length up to depth)."""
        for k in range(1, min(self.depth, pos + 1) + 1):
            x = tuple(seq[pos - k + 1 : pos + 1])
            self.ends.setdefault(x, []).append(time)
            if k > 1:
                self.kids.setdefault(x[:-1], set()).add(x[-1])

    def remove(self, seq: Sequence[int], pos: int, time: int) -> None:
        for k in range(1, min(self.depth, pos + 1) + 1):
            x = tuple(seq[pos - k + 1 : pos + 1])
            ends = self.ends[x]
            ends.remove(time)
            if not ends:
                del self.ends[x]
                if k > 1:
                    self.kids[x[:-1]].discard(x[-1])

    def count(self, x: tuple[int, ...]) -> int:
        return len(self.ends.get(x, ()))

    def tie_key(self, x: tuple[int, ...]) -> int:
        return -min(self.ends[x]) if self.local else max(self.ends[x])

    def draft(self, context: Sequence[int], max_tokens: int, factor: float, min_prob: float
              ) -> tuple[float, int, list[int], list[float]]:
        """Arctic's loop: every match length, increasing; a later one wins ties."""
        best: tuple[float, int, list[int], list[float]] = (0.0, 0, [], [])
        for m in range(1, min(len(context), self.depth) + 1):
            x = tuple(context[len(context) - m :])
            if self.count(x) == 0:
                break
            budget = max(0, min(max_tokens, int(m * factor + 1e-6)))
            toks: list[int] = []
            probs: list[float] = []
            score, prob, cur = 0.0, 1.0, x
            while len(toks) < budget and len(cur) < self.depth:
                options = [(self.count(cur + (t,)), self.tie_key(cur + (t,)), t) for t in self.kids.get(cur, ())]
                if not options:
                    break
                c, _, t = max(options)
                own = 1 if self.local and cur == x else 0  # the query's own occurrence, for the first token
                prob *= c / (self.count(cur) - own)
                if prob < min_prob:
                    break
                toks.append(t)
                probs.append(prob)
                score += prob
                cur = cur + (t,)
            if score >= best[0]:
                best = (score, m, toks, probs)
        return best


@dataclass
class _Request:
    seq: list[int]
    prompt_len: int
    tenant: str
    tree: _Tree


class ReferenceSuffixIndex:
    def __init__(self, max_depth: int = 64, max_global_tokens: int = 1 << 24) -> None:
        check_index_params(max_depth, max_global_tokens)
        self.max_depth = max_depth
        self.max_global_tokens = max_global_tokens
        self._reqs: dict[int, _Request] = {}
        self._globals: dict[str, _Tree] = {}
        self._kept: list[tuple[str, list[int], int]] = []  # (tenant, response, start time), oldest first
        self._clock = 0

    def _req(self, seq_id: int) -> _Request:
        if seq_id not in self._reqs:
            raise ValueError(f"unknown seq_id {seq_id}")
        return self._reqs[seq_id]

    def start(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None:
        if seq_id in self._reqs:
            raise ValueError(f"seq_id {seq_id} is already active")
        self._reqs[seq_id] = _Request([], len(prompt), tenant, _Tree(self.max_depth, local=True))
        self.extend(seq_id, prompt)

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        r = self._req(seq_id)
        for t in tokens:
            r.seq.append(int(t))
            r.tree.add(r.seq, len(r.seq) - 1, len(r.seq) - 1)

    def stop(self, seq_id: int, keep_response: bool = True) -> None:
        r = self._reqs.pop(seq_id)
        resp = r.seq[r.prompt_len :]
        if not keep_response or not resp or len(resp) > self.max_global_tokens:
            return
        while self.num_global_tokens() + len(resp) > self.max_global_tokens:
            tenant, old, t0 = self._kept.pop(0)
            for i in range(len(old)):
                self._globals[tenant].remove(old, i, t0 + i)
        tree = self._globals.setdefault(r.tenant, _Tree(self.max_depth, local=False))
        for i in range(len(resp)):
            tree.add(resp, i, self._clock + i)
        self._kept.append((r.tenant, resp, self._clock))
        self._clock += len(resp)

    def speculate(self, seq_id: int, max_tokens: int, max_spec_factor: float = 1.0,
                  min_token_prob: float = 0.1) -> SuffixDraft:
        check_spec_params(max_spec_factor, min_token_prob)
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        r = self._req(seq_id)
        context = r.seq[-self.max_depth :]
        best = r.tree.draft(context, max_tokens, max_spec_factor, min_token_prob)
        if r.tenant in self._globals:
            other = self._globals[r.tenant].draft(context, max_tokens, max_spec_factor, min_token_prob)
            if other[0] > best[0]:
                best = other
        score, m, toks, probs = best
        return SuffixDraft(toks, score, m, probs) if toks else SuffixDraft([], 0.0, 0, [])

    def speculate_batch(self, seq_ids: Sequence[int], max_tokens: Sequence[int], max_spec_factor: float,
                        min_token_prob: float) -> list[SuffixDraft]:
        return [self.speculate(s, k, max_spec_factor, min_token_prob) for s, k in zip(seq_ids, max_tokens)]

    def num_global_tokens(self, tenant: str | None = None) -> int:
        return sum(len(resp) for t, resp, _ in self._kept if tenant is None or t == tenant)
