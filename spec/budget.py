"""Draft budget: how many draft tokens each request proposes this step (0 .. its cap), so that speculation gets
out of the way where drafts are rejected (vLLM's adaptive verification, SGLang's fallback to plain decoding).

Per request and draft source the budget keeps a running acceptance estimate, from the verifies it saw (each
older verify weighted by `acceptance_decay` per newer one):
  * "geometric" sources (MTP: no per-token confidence): a = P(a draft token is accepted | the ones before it
    were), from decayed counts of accepted tokens and of first rejections, with a prior of mean 0.8 and mass 1;
    draft position j (0-based) is accepted with probability a^(j+1);
  * "calibrated" sources (suffix trees: each draft token carries its cumulative probability p_j under the
    trees' counts): c = decayed accepted tokens / decayed sum of the proposed tokens' p_j (prior 1 over mass 1),
    so position j is accepted with probability min(1, c * p_j). On text that does not repeat, short matches in
    the trees claim p = 1 and c falls to the real rate.
Those probabilities are each extra draft's expected extra tokens (its marginal gain; non-increasing along a
draft). For a step of B decoding requests the budget takes the extra draft rows in order of gain, and keeps the
prefix that maximizes (B + expected accepted tokens) / step time, the step time being StepCost(B + rows) plus,
for MTP drafts, one chain step per draft position past the first. So a request proposes 0 drafts when its next
draft's gain is below what one more row costs, and the cap when drafts are reliably accepted.

A request held at 0 drafts (while its drafter has a draft for it) gets a 1-draft probe after `probe_interval`
steps; a rejected probe doubles the wait (up to `max_probe_interval`), an accepted one resets it, so a request
whose text turns repetitive drafts again within a few probes. Suffix drafts need no probe to come back sooner:
their gain follows the trees' probabilities, which rise with the repetition.

With `draft_budget=False` every request drafts up to its cap (fixed k) and nothing is tracked.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from spec.config import SpeculativeConfig

GEOMETRIC = "geometric"
CALIBRATED = "calibrated"
PRIOR_ACCEPT, PRIOR_REJECT = 0.8, 0.2  # geometric prior: mean 0.8 over mass 1 (new requests draft fully)
PRIOR_CALIBRATION = 1.0  # calibrated prior: trust the trees' probabilities, mass 1 token
MIN_GAIN = 1e-3  # drafts expected to add less than this are never worth a row


class StepCost:
    """Time of one target forward with n rows: piecewise linear through (rows, ms) points; flat below the first
    point, the last segment's slope beyond the last."""

    def __init__(self, rows: Sequence[int], ms: Sequence[float]) -> None:
        if len(rows) != len(ms) or not rows:
            raise ValueError("step cost: one time per row count, at least one point")
        self.rows, self.ms = [float(r) for r in rows], [float(t) for t in ms]

    def __call__(self, n: float) -> float:
        rows, ms = self.rows, self.ms
        if n <= rows[0] or len(rows) == 1:
            return ms[0]
        i = min(bisect.bisect_right(rows, n), len(rows) - 1)  # segment rows[i-1] .. rows[i]
        slope = (ms[i] - ms[i - 1]) / (rows[i] - rows[i - 1])
        return ms[i - 1] + slope * (n - rows[i - 1])


@dataclass
class _Estimate:
    accepted: float = 0.0  # decayed accepted draft tokens
    rejected: float = 0.0  # geometric: decayed first rejections
    predicted: float = 0.0  # calibrated: decayed sum of the proposed tokens' probabilities


@dataclass
class _RequestState:
    interval: int
    estimates: dict[str, _Estimate] = field(default_factory=dict)
    idle: int = 0  # steps held at 0 drafts (with a draft available) since it last drafted
    probing: bool = False  # its current proposal is a probe


@dataclass(frozen=True)
class _Proposal:
    source: str
    kind: str
    tokens: list[int]
    probs: list[float] | None


def matched_prefix(draft: Sequence[int], emitted: Sequence[int]) -> tuple[int, bool]:
    """(draft tokens the target agreed with, whether a rejection was seen). The engine emits the accepted
    drafts and then the target's own token, which differs from the next draft token exactly when that one was
    rejected; a shorter `emitted` (a stop cut it) shows no rejection past its end."""
    n = 0
    while n < len(draft) and n < len(emitted) and draft[n] == emitted[n]:
        n += 1
    return n, n < min(len(draft), len(emitted))


class DraftBudget:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.enabled = config.draft_budget
        self.cost = StepCost(config.step_cost_rows, config.step_cost_ms)
        self.chain_step_ms = config.mtp_step_cost_ms
        self.decay = config.acceptance_decay
        self.probe_interval, self.max_probe_interval = config.probe_interval, config.max_probe_interval
        self._requests: dict[int, _RequestState] = {}
        self._proposals: dict[int, _Proposal] = {}
        self.probes = 0  # probes proposed (observability, tests)

    def _state(self, seq_id: int) -> _RequestState:
        st = self._requests.get(seq_id)
        if st is None:
            st = self._requests[seq_id] = _RequestState(self.probe_interval)
        return st

    def forget(self, seq_id: int) -> None:
        self._requests.pop(seq_id, None)
        self._proposals.pop(seq_id, None)

    # -- estimates --------------------------------------------------------------------------------------
    def gains(self, seq_id: int, source: str, kind: str, cap: int, probs: Sequence[float] | None = None) -> list[float]:
        """Each draft position's probability of being accepted (non-increasing), for up to `cap` positions
        (calibrated sources: at most len(probs))."""
        if cap <= 0:
            return []
        st = self._requests.get(seq_id)
        est = (st.estimates.get(source) if st is not None else None) or _Estimate()
        if kind == GEOMETRIC:
            a = (est.accepted + PRIOR_ACCEPT) / (est.accepted + est.rejected + PRIOR_ACCEPT + PRIOR_REJECT)
            out, g = [], 1.0
            for _ in range(cap):
                g *= a
                out.append(g)
            return out
        if probs is None:
            raise ValueError(f"a {CALIBRATED} source needs each draft token's probability")
        c = (est.accepted + PRIOR_CALIBRATION) / (est.predicted + PRIOR_CALIBRATION)
        out, prev = [], 1.0
        for p in probs[:cap]:
            prev = min(prev, c * p)
            out.append(prev)
        return out

    def acceptance(self, seq_id: int, source: str, kind: str, cap: int) -> float:
        """Expected accepted tokens of a `cap`-token draft of this source (its running acceptance)."""
        return sum(self.gains(seq_id, source, kind, cap, [1.0] * cap if kind == CALIBRATED else None))

    def row_cost_tokens(self, num_seqs: int) -> float:
        """What one more row costs a step of num_seqs decoding requests, in tokens of that step's output."""
        base = self.cost(num_seqs)
        return num_seqs * (self.cost(num_seqs + 1) - base) / base

    # -- the choice -------------------------------------------------------------------------------------
    def plan(self, seq_ids: Sequence[int], gains: Sequence[Sequence[float]], chain: Sequence[bool] | None = None,
             num_seqs: int | None = None, has_draft: Sequence[bool] | None = None) -> list[int]:
        """Drafts per request for one step. gains[i]: request i's per-position gains (len = its cap);
        chain[i]: its drafts past the first cost MTP chain steps; num_seqs: decoding requests in the step
        (default len(seq_ids)); has_draft[i]: its drafter has something to probe with (default: gains[i])."""
        if not self.enabled:
            return [len(g) for g in gains]
        b = len(seq_ids) if num_seqs is None else num_seqs
        cands = sorted((-g, j, i) for i, gs in enumerate(gains) for j, g in enumerate(gs) if g >= MIN_GAIN)
        best_rate, best_m = b / self.cost(b), 0
        tokens, depth = float(b), 0
        for m, (neg_g, j, i) in enumerate(cands, 1):
            tokens -= neg_g
            if chain is not None and chain[i]:
                depth = max(depth, j + 1)
            rate = tokens / (self.cost(b + m) + self.chain_step_ms * max(0, depth - 1))
            if rate > best_rate:
                best_rate, best_m = rate, m
        ks = [0] * len(gains)
        for _, _, i in cands[:best_m]:
            ks[i] += 1
        for i, seq_id in enumerate(seq_ids):
            st = self._state(seq_id)
            st.probing = False
            if ks[i] > 0:
                st.idle = 0
            elif gains[i] if has_draft is None else has_draft[i]:
                st.idle += 1
                if st.idle >= st.interval:
                    ks[i], st.idle, st.probing = 1, 0, True
                    self.probes += 1
        return ks

    # -- what was proposed, and what came of it ---------------------------------------------------------
    def proposed(self, proposals: dict[int, tuple[str, str, list[int], list[float] | None]]) -> None:
        """This step's drafts, per seq_id: (source, kind, tokens, their probabilities or None). Replaces the
        last step's, so a draft whose step never ran (preemption) is never compared with later tokens."""
        if self.enabled:
            self._proposals = {s: _Proposal(*p) for s, p in proposals.items() if p[2]}

    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None:
        """The tokens the request emitted in the step that verified its proposal."""
        prop = self._proposals.pop(seq_id, None)
        if prop is None:
            return
        n, rejected = matched_prefix(prop.tokens, tokens)
        st = self._state(seq_id)
        est = st.estimates.setdefault(prop.source, _Estimate())
        d = self.decay
        est.accepted = d * est.accepted + n
        if prop.kind == GEOMETRIC:
            est.rejected = d * est.rejected + rejected
        else:
            est.predicted = d * est.predicted + sum(prop.probs or [])
        if st.probing:
            st.interval = self.probe_interval if n else min(2 * st.interval, self.max_probe_interval)
            st.probing = False
        elif n:
            st.interval = self.probe_interval
