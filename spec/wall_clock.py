"""What a step really costs, measured while serving: the draft budget's wall-clock model.

The capture-time graph replays (spec/budget.py StepCosts) price the GPU work of a step. On a model whose steps
are short next to the host work around them (the small model trained here: a 0.11 ms decode graph, ~0.4 ms per
plain step, ~1.7 ms per MTP step on the H200) the host decides, and it differs by kind of step: a plain decode
step overlaps its host work with the device (overlap scheduling), a speculative step does not (the next step's
positions depend on what it accepts), and the MTP chain adds its own launches, copies and syncs. So the engine
times every decode-only step by the step() call that launched it (an overlapped step's call also waits for the
step before it: in steady state, one step cycle; what the caller does between calls -- a server loop, a
benchmark driver preparing its next turn -- is no kind of step and is not counted) and this model keeps, per
batch-size bucket, running averages of the wall time (less the GPU time of the rows past one per request) of
three kinds of step:

    plain   an overlapped step without drafts or drafter work
    draft   a step that verified drafts, no MTP chain in its cycle (suffix drafts)
    chain   a step whose cycle ran the MTP chain (drafting the next step)

and answers, from whichever kinds it has seen (differences taken when asked, so the order in which the kinds
were first seen does not matter):

    plain_ms(b)          plain, else the prior: a plain step's GPU cost
    spec_overhead_ms(b)  draft - plain_ms, else 0
    chain_ms(b)          chain - (draft, else plain_ms), else the prior: the draft graph's replay (or 0)

The first observations of each kind and bucket are skipped (a new shape compiles) and an outlier counts at most
4x the running average. A pure MTP engine never runs a plain step while every request drafts: its plain steps
are priced at their GPU cost, which favours plain decoding where the host dominates -- what "speculation gets
out of the way" asks for; once requests retire, their overlapped steps are measured.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Cost = Callable[[float], float]  # ms by rows (spec.budget.StepCost)

EWMA = 0.1  # weight of the newest observation
MAX_WALL_MS = 10_000.0  # a cycle this long was an idle engine, not a step
SKIP_FIRST = 2  # observations per kind and bucket not learnt from: a new shape's first steps compile (Triton)
MAX_JUMP = 4.0  # an observation counts as at most this many times the running average (one slow outlier)


@dataclass(frozen=True)
class StepTiming:
    """One decode-only step cycle as the engine saw it."""

    num_seqs: int  # decoding requests in the step
    rows: int  # target rows: num_seqs + draft tokens verified
    drafted: bool  # the step verified drafts
    chain: bool  # the MTP chain ran during the cycle (drafting the next step)
    plain: bool  # an overlapped step without drafts or drafter work: plain decoding
    wall_ms: float


def bucket(num_seqs: int) -> int:
    """Power-of-two bucket of a batch size (1, 2, 4, ...)."""
    return 1 << max(int(num_seqs) - 1, 0).bit_length()


class _Average:
    def __init__(self) -> None:
        self.value: dict[int, float] = {}
        self.seen: dict[int, int] = {}

    def get(self, b: int, prior: float | None) -> float | None:
        return self.value.get(bucket(b), prior)

    def add(self, b: int, x: float) -> bool:
        """Learn x for b's bucket; False if skipped (one of the bucket's first observations)."""
        k = bucket(b)
        seen = self.seen[k] = self.seen.get(k, 0) + 1
        if seen <= SKIP_FIRST:
            return False
        old = self.value.get(k)
        self.value[k] = x if old is None else (1 - EWMA) * old + EWMA * min(x, MAX_JUMP * max(old, 1e-3))
        return True


class WallClock:
    def __init__(self, gpu: Cost, chain_prior: Cost | None = None, enabled: bool = True) -> None:
        """gpu: a target forward's GPU time by rows; chain_prior: the MTP chain's by batch (None: 0).
        enabled=False: never learns (every estimate stays at its prior)."""
        self.gpu, self.chain_prior, self.enabled = gpu, chain_prior, enabled
        self._plain, self._draft, self._chain = _Average(), _Average(), _Average()
        self.observed = 0

    def plain_ms(self, b: int) -> float:
        return self._plain.get(b, self.gpu(b))

    def spec_overhead_ms(self, b: int) -> float:
        draft = self._draft.get(b, None)
        return 0.0 if draft is None else max(draft - self.plain_ms(b), 0.0)

    def chain_ms(self, b: int) -> float:
        chain = self._chain.get(b, None)
        if chain is None:
            return self.chain_prior(b) if self.chain_prior is not None else 0.0
        base = self._draft.get(b, None)
        return max(chain - (self.plain_ms(b) if base is None else base), 0.0)

    def snapshot(self) -> dict[str, dict[int, float]]:
        """The running averages (ms by batch bucket), for logs and benchmarks."""
        return {"plain": dict(self._plain.value), "draft": dict(self._draft.value), "chain": dict(self._chain.value)}

    def observe(self, t: StepTiming) -> None:
        if not self.enabled or t.num_seqs <= 0 or not 0 < t.wall_ms < MAX_WALL_MS:
            return
        b = t.num_seqs
        wall = t.wall_ms - max(self.gpu(t.rows) - self.gpu(b), 0.0)  # as if the step had one row per request
        if t.plain:
            kind = self._plain
        elif t.chain:
            kind = self._chain
        elif t.drafted:
            kind = self._draft
        else:
            return  # a synchronous step without drafts (MTP's extend alone): not a kind the budget prices
        self.observed += kind.add(b, wall)
