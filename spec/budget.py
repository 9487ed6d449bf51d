"""Draft budget: how many draft tokens each request proposes this step (0 .. its cap), so that speculation gets
out of the way where drafts are rejected (vLLM's adaptive verification, SGLang's fallback to plain decoding).

Per request and draft source the budget keeps a running acceptance estimate from the verifies it saw (each
older verify weighted by `acceptance_decay` per newer one), and one per source over all requests (older verifies
weighted by ENGINE_DECAY each), which prices a new request's drafts before it has verified any (spec/mtp.py
retires a new request at admission where even that would not pay for the MTP chain). A source may give each
draft token a probability (suffix trees: the cumulative p_j under the trees' counts, so the conditional
q_j = p_j / p_(j-1)); one without (MTP) counts as q_j = 1. The request's calibration c = decayed accepted tokens / decayed sum of q over the
positions its verifies tested (each accepted one and the first rejected one), and draft position j (0-based)
is accepted with probability prod_(i<=j) min(1, c * q_i): for MTP that is the geometric estimate c^(j+1) (prior
c = 0.8 over mass 1, so a new request drafts); for suffix drafts the trees' own probabilities scaled by how
well they predicted this request so far (prior 1: trust the trees). On text that does not repeat, short
matches in the trees claim p = 1 and c falls to the real rate.
Those probabilities are each extra draft's expected extra tokens (its marginal gain; non-increasing along a
draft). For a step of B decoding requests the budget takes the extra draft rows in order of gain, and keeps the
prefix that maximizes (B + expected accepted tokens) / step time, against B / (a plain step's time). The step
time is wall time (spec/wall_clock.py): a plain step's, plus the extra rows' GPU time (StepCost(B + rows) -
StepCost(B)), plus the host work of a step that verifies drafts, plus for MTP drafts one chain step per draft
position past the first (eager) and the whole chain once (its draft graph and host work; a step whose requests
all draft 0 with MTP replays the NextN extend alone). The GPU costs are this engine's graph replays, timed at
start-up (StepCosts); the rest is learnt from the step cycles the engine times while serving. So a request
proposes 0 drafts when its next draft's gain is below what one more row costs, and the cap when drafts are
reliably accepted; and where the host work of speculating outweighs what drafts add (a small, fast model),
nothing is drafted and MTP requests retire from drafting (spec/mtp.py) so that steps overlap again.

A request held at 0 drafts (while its drafter has a draft for it) gets a 1-draft probe after `probe_interval`
steps (an MTP probe only where the whole chain costs less than its drafts could add); a rejected probe
doubles the wait (up to `max_probe_interval`), an accepted one is followed by another probe the next step
(each accepted probe paid for its row), so a request whose text turns repetitive drafts again a few steps
after its next probe. Suffix drafts need no probe to come back sooner: their gain follows the trees'
probabilities, which rise with the repetition.

With `draft_budget=False` every request drafts up to its cap (fixed k) and nothing is tracked.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from spec.config import SpeculativeConfig
from spec.wall_clock import WallClock

PRIOR_WEIGHT = 1.0  # the prior counts as one tested position
PRIOR_PLAIN = 0.8  # prior acceptance of a source without per-token probabilities (a new request drafts)
PRIOR_SCALED = 1.0  # prior calibration of a source with them: trust its probabilities
MIN_GAIN = 1e-3  # drafts expected to add less than this are never worth a row
SMALL_PLAN = 32  # candidate draft rows up to which _best_prefix runs in Python rather than torch
ENGINE_DECAY = 0.99  # the engine-wide acceptance per source: weight of older verifies (~100 verifies remembered)


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

    @classmethod
    def measured(cls, points: Iterable[tuple[int, float]]) -> "StepCost":
        """From measured (rows, ms) points (several shapes may share a row count: the slowest counts), made
        non-decreasing in rows: a step with more rows never costs less (timing noise, or a faster kernel path
        at a larger shape, must not make the budget add rows for free)."""
        slowest: dict[int, float] = {}
        for rows, ms in points:
            slowest[rows] = max(ms, slowest.get(rows, 0.0))
        if not slowest:
            raise ValueError("step cost: no measured points")
        rows = sorted(slowest)
        ms = list(itertools.accumulate((slowest[r] for r in rows), max))
        return cls(rows, ms)

    def many(self, n: torch.Tensor) -> torch.Tensor:
        """__call__ for a float64 tensor of row counts."""
        rows = torch.tensor(self.rows, dtype=torch.float64)
        ms = torch.tensor(self.ms, dtype=torch.float64)
        if len(self.rows) == 1:
            return torch.full_like(n, self.ms[0])
        i = torch.bucketize(n, rows, right=True).clamp(1, len(self.rows) - 1)
        slope = (ms[i] - ms[i - 1]) / (rows[i] - rows[i - 1])
        return torch.where(n <= rows[0], ms[0], ms[i - 1] + slope * (n - rows[i - 1]))


@dataclass
class _Estimate:
    accepted: float = 0.0  # decayed accepted draft tokens
    tested: float = 0.0  # decayed sum of the conditional probabilities q of the positions verifies tested


@dataclass
class _RequestState:
    interval: int
    estimates: dict[str, _Estimate] = field(default_factory=dict)
    idle: int = 0  # steps held at 0 drafts (with a draft available) since it last drafted
    probing: bool = False  # its current proposal is a probe


@dataclass(frozen=True)
class _Proposal:
    source: str
    tokens: list[int]
    probs: list[float] | None


def conditionals(probs: Sequence[float] | None, n: int) -> list[float]:
    """q_j for the first n draft positions: cumulative probabilities -> each one's given the ones before."""
    if probs is None:
        return [1.0] * n
    out, prev = [], 1.0
    for p in probs[:n]:
        out.append(p / prev if prev > 0 else 0.0)
        prev = p
    return out


def matched_prefix(draft: Sequence[int], emitted: Sequence[int]) -> tuple[int, bool]:
    """(draft tokens the target agreed with, whether a rejection was seen). The engine emits the accepted
    drafts and then the target's own token, which differs from the next draft token exactly when that one was
    rejected; a shorter `emitted` (a stop cut it) shows no rejection past its end."""
    n = 0
    while n < len(draft) and n < len(emitted) and draft[n] == emitted[n]:
        n += 1
    return n, n < min(len(draft), len(emitted))


@dataclass(frozen=True)
class StepCosts:
    """Step costs measured on this engine (its CUDA graphs, timed at capture). step: a target forward by rows;
    chain_step_ms: each MTP draft past the first (an eager chain step); chain_fixed: the MTP chain as a whole,
    by the step's number of requests, paid once any request drafts with MTP (a draft graph replays the whole
    chain; a step without MTP drafts replays the extend alone)."""

    step: StepCost
    chain_step_ms: float = 0.0
    chain_fixed: StepCost | None = None


class DraftBudget:
    def __init__(self, config: SpeculativeConfig, measured: StepCosts | None = None,
                 learn_wall_clock: bool = True) -> None:
        """measured: this engine's costs (None: the config's step_cost_* and mtp_step_cost_ms).
        learn_wall_clock: learn step times while serving (and config.measure_wall_clock); else the GPU costs."""
        self.enabled = config.draft_budget
        if measured is None:
            measured = StepCosts(StepCost(config.step_cost_rows, config.step_cost_ms), config.mtp_step_cost_ms)
        self.cost, self.chain_step_ms, self.chain_fixed = measured.step, measured.chain_step_ms, measured.chain_fixed
        # what steps really take, learnt while serving (host work included); priors: the GPU costs above
        self.clock = WallClock(self.cost, self.chain_fixed, enabled=config.measure_wall_clock and learn_wall_clock)
        self.decay = config.acceptance_decay
        self.probe_interval, self.max_probe_interval = config.probe_interval, config.max_probe_interval
        self._requests: dict[int, _RequestState] = {}
        self._proposals: dict[int, _Proposal] = {}
        self._engine: dict[str, _Estimate] = {}  # per source, over every request's verifies (admission)
        self.probes = 0  # probes proposed (observability, tests)

    def _state(self, seq_id: int) -> _RequestState:
        st = self._requests.get(seq_id)
        if st is None:
            st = self._requests[seq_id] = _RequestState(self.probe_interval)
        return st

    def probing(self, seq_id: int) -> bool:
        """Whether the request's drafts of the last plan are a probe (the budget's own choice was 0)."""
        st = self._requests.get(seq_id)
        return st is not None and st.probing

    def forget(self, seq_id: int) -> None:
        self._requests.pop(seq_id, None)
        self._proposals.pop(seq_id, None)

    # -- estimates --------------------------------------------------------------------------------------
    def gains(self, seq_id: int, source: str, cap: int, probs: Sequence[float] | None = None) -> list[float]:
        """Each draft position's probability of being accepted (non-increasing), for up to `cap` positions
        (and at most len(probs) when the source gives per-token probabilities)."""
        if cap <= 0:
            return []
        st = self._requests.get(seq_id)
        est = (st.estimates.get(source) if st is not None else None) or _Estimate()
        return self._gains(est, cap, probs)

    def engine_gains(self, source: str, cap: int) -> list[float]:
        """gains() for a request that drafts as every request of this engine did so far (the prior before any
        verify): what a new request's drafts are expected to be worth."""
        return self._gains(self._engine.get(source) or _Estimate(), cap, None) if cap > 0 else []

    @staticmethod
    def _gains(est: _Estimate, cap: int, probs: Sequence[float] | None) -> list[float]:
        prior = PRIOR_PLAIN if probs is None else PRIOR_SCALED
        c = (est.accepted + prior * PRIOR_WEIGHT) / (est.tested + PRIOR_WEIGHT)
        out, g = [], 1.0
        for q in conditionals(probs, cap):
            g *= min(1.0, c * q)
            out.append(g)
        return out

    def row_cost_tokens(self, num_seqs: int) -> float:
        """What one more row costs a step of num_seqs decoding requests, in tokens of that step's output."""
        return num_seqs * (self.cost(num_seqs + 1) - self.cost(num_seqs)) / self.clock.plain_ms(num_seqs)

    def chain_cost_tokens(self, num_seqs: int) -> float:
        """What running the MTP chain costs a step of num_seqs decoding requests as a whole (a draft graph's
        replay, and the host work the wall clock measured around it), in tokens of that step's output; per
        draft position an eager chain also pays chain_step_ms (in _best_prefix)."""
        if num_seqs <= 0:
            return 0.0
        return num_seqs * self.clock.chain_ms(num_seqs) / self.clock.plain_ms(num_seqs)

    def chain_cannot_pay(self, num_seqs: int, cap: int, num_drafting: int | None = None) -> bool:
        """Whether the MTP chain (and the host work of a speculative step) costs a step of num_seqs requests
        more than it could add even if every one of `cap` drafts of each of the num_drafting requests that can
        draft with MTP (default: all of them) were accepted."""
        if num_seqs <= 0:
            return False
        drafting = num_seqs if num_drafting is None else min(num_drafting, num_seqs)
        spec = num_seqs * self.clock.spec_overhead_ms(num_seqs) / self.clock.plain_ms(num_seqs)
        return self.chain_cost_tokens(num_seqs) + spec >= drafting * cap

    def chain_pays(self, num_seqs: int, gains: Sequence[float]) -> bool:
        """Whether a step of num_seqs requests that each draft with these per-position gains on the MTP chain
        would draft at all (the budget's choice, nothing recorded)."""
        if not self.enabled or num_seqs <= 0:
            return True
        if not gains:
            return False
        return any(self._best_prefix(num_seqs, [list(gains)] * num_seqs, [True] * num_seqs))

    # -- the choice -------------------------------------------------------------------------------------
    def plan(self, seq_ids: Sequence[int], gains: Sequence[Sequence[float]], chain: Sequence[bool] | None = None,
             num_seqs: int | None = None, has_draft: Sequence[bool] | None = None) -> list[int]:
        """Drafts per request for one step. gains[i]: request i's per-position gains (len = its cap);
        chain[i]: its drafts past the first cost MTP chain steps; num_seqs: decoding requests in the step
        (default len(seq_ids)); has_draft[i]: its drafter has something to probe with (default: gains[i])."""
        if not self.enabled:
            return [len(g) for g in gains]
        b = len(seq_ids) if num_seqs is None else num_seqs
        ks = self._best_prefix(b, gains, chain) if any(gains) else [0] * len(gains)
        # a probe that needs the whole MTP chain is not worth it where the chain costs more than the request's
        # drafts could add even if all were accepted
        chain_tokens = self.chain_cost_tokens(b)
        for i, seq_id in enumerate(seq_ids):
            st = self._state(seq_id)
            st.probing = False
            if ks[i] > 0:
                st.idle = 0
            elif (self.chain_fixed is not None or chain_tokens > 0) and chain is not None and chain[i] \
                    and chain_tokens >= len(gains[i]):
                continue
            elif gains[i] if has_draft is None else has_draft[i]:
                st.idle += 1
                if st.idle >= st.interval:
                    ks[i], st.idle, st.probing = 1, 0, True
                    self.probes += 1
        return ks

    def _best_prefix(self, b: int, gains: Sequence[Sequence[float]], chain: Sequence[bool] | None) -> list[int]:
        """Take the extra rows in order of gain (a request's own in position order: its gains do not increase,
        and the sort is stable) and keep the prefix with the most tokens per ms. In torch: ~1000 candidates
        at batch 64 x 16 drafts cost ~0.1 ms this way, ~2 ms in a Python loop; a few candidates (a small batch,
        or drafts the trees barely back) cost ~0.1 ms of torch's per-op overhead and a few us in Python, and a
        step of the small model is ~0.4 ms: the same arithmetic in the same order, in Python, below
        SMALL_PLAN candidates."""
        cands = [(g, i, p) for i, gs in enumerate(gains) for p, g in enumerate(gs) if g >= MIN_GAIN]
        if len(cands) > SMALL_PLAN:
            return self._best_prefix_torch(b, gains, chain)
        return self._best_prefix_small(b, len(gains), cands, chain)

    def _best_prefix_small(self, b: int, n: int, cands: list[tuple[float, int, int]],
                           chain: Sequence[bool] | None) -> list[int]:
        """_best_prefix_torch for few candidates: (gain, request, position), in flattened order."""
        cands.sort(key=lambda c: -c[0])  # stable: ties keep the flattened order, as torch's stable sort
        clock, plain = self.clock, self.clock.plain_ms(b)
        cost_b, overhead = self.cost(b), clock.spec_overhead_ms(b)
        chained = chain is not None and any(chain)
        chain_ms = clock.chain_ms(b) if chained else 0.0
        cum, depth, best, best_rate = 0.0, 0, -1, float("-inf")
        for k, (g, i, p) in enumerate(cands):
            cum += g
            time = plain + (self.cost(float(b + k + 1)) - cost_b) + overhead
            if chained:
                depth = max(depth, p + 1 if chain[i] else 0)
                time = time + self.chain_step_ms * max(depth - 1, 0)
                time = time + (chain_ms if depth > 0 else 0.0)
            rate = (b + cum) / time
            if rate > best_rate:  # the first maximum, as torch.argmax
                best, best_rate = k, rate
        if best < 0 or best_rate <= b / plain:
            return [0] * n
        ks = [0] * n
        for _, i, _ in cands[: best + 1]:
            ks[i] += 1
        return ks

    def _best_prefix_torch(self, b: int, gains: Sequence[Sequence[float]],
                           chain: Sequence[bool] | None) -> list[int]:
        width = max(len(g) for g in gains)
        g = torch.tensor([list(x) + [0.0] * (width - len(x)) for x in gains], dtype=torch.float64)
        flat = g.flatten()
        order = torch.sort(flat, descending=True, stable=True).indices
        order = order[flat[order] >= MIN_GAIN]
        if order.numel() == 0:
            return [0] * len(gains)
        req, pos = order // width, order % width
        tokens = b + torch.cumsum(flat[order], 0)
        rows = b + torch.arange(1, order.numel() + 1, dtype=torch.float64)
        # wall time: a plain step, the extra rows' GPU time, the host work of a step that verifies drafts
        clock, plain = self.clock, self.clock.plain_ms(b)
        time = plain + (self.cost.many(rows) - self.cost(b)) + clock.spec_overhead_ms(b)
        if chain is not None and any(chain):
            on_chain = torch.tensor(list(chain), dtype=torch.bool)[req]
            depth = torch.cummax(torch.where(on_chain, pos + 1, 0), 0).values.to(torch.float64)  # all in float64
            time = time + self.chain_step_ms * (depth - 1).clamp(min=0)
            time = time + (depth > 0).to(torch.float64) * clock.chain_ms(b)
        rate = tokens / time
        best = int(torch.argmax(rate))
        if float(rate[best]) <= b / plain:
            return [0] * len(gains)
        return torch.bincount(req[: best + 1], minlength=len(gains)).tolist()

    # -- what was proposed, and what came of it ---------------------------------------------------------
    def proposed(self, proposals: dict[int, tuple[str, list[int], list[float] | None]]) -> None:
        """This step's drafts, per seq_id: (source, tokens, their probabilities or None). Replaces the
        last step's, so a draft whose step never ran (preemption) is never compared with later tokens."""
        if self.enabled:
            self._proposals = {s: _Proposal(*p) for s, p in proposals.items() if p[1]}

    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None:
        """The tokens the request emitted in the step that verified its proposal."""
        prop = self._proposals.pop(seq_id, None)
        if prop is None:
            return
        n, rejected = matched_prefix(prop.tokens, tokens)
        st = self._state(seq_id)
        tested = sum(conditionals(prop.probs, n + rejected))
        for est, d in ((st.estimates.setdefault(prop.source, _Estimate()), self.decay),
                       (self._engine.setdefault(prop.source, _Estimate()), ENGINE_DECAY)):
            est.accepted = d * est.accepted + n
            est.tested = d * est.tested + tested
        if st.probing:  # accepted: probe again next step until the estimate carries it; rejected: back off
            st.interval = 1 if n else min(max(2 * st.interval, self.probe_interval), self.max_probe_interval)
            st.probing = False
        elif n:
            st.interval = self.probe_interval
