"""What a step really costs, measured while serving: the draft budget's wall-clock model.

The capture-time graph replays (spec/budget.py StepCosts) price the GPU work of a step. On a model whose steps
are short next to the host work around them (the small model trained here: a 0.11 ms decode graph, ~0.4 ms per
plain step, ~1.7 ms per MTP step on the H200) the host decides, and it differs by kind of step: a plain decode
step overlaps its host work with the device (overlap scheduling), a speculative step does not (the next step's
positions depend on what it accepts), and the MTP chain adds its own launches, copies and syncs. So the engine
times every decode-only step cycle (one step() call to the next) and this model keeps, per batch-size bucket,
running averages of

    plain_ms(b)          a plain overlapped step of b requests (prior: its GPU cost)
    spec_overhead_ms(b)  what a step with drafts costs beyond that, past its extra rows' GPU cost (prior 0)
    chain_ms(b)          what the MTP chain costs on top (prior: its draft graph's replay, else 0)

from W = plain_ms(b) + (gpu(rows) - gpu(b)) + spec_overhead_ms(b) [drafted] + chain_ms(b) [chain ran] (the
first observations of each kind and bucket are skipped: a new shape compiles; an outlier counts at most 4x). A step
kind never seen keeps its prior (a pure MTP engine never runs a plain step while every request drafts: its
plain steps are priced at their GPU cost, which favours plain decoding where the host dominates -- what
"speculation gets out of the way" asks for).
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

    def get(self, b: int, prior: float) -> float:
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
        self._plain, self._spec, self._chain = _Average(), _Average(), _Average()
        self.observed = 0

    def plain_ms(self, b: int) -> float:
        return self._plain.get(b, self.gpu(b))

    def spec_overhead_ms(self, b: int) -> float:
        return self._spec.get(b, 0.0)

    def chain_ms(self, b: int) -> float:
        return self._chain.get(b, self.chain_prior(b) if self.chain_prior is not None else 0.0)

    def snapshot(self) -> dict[str, dict[int, float]]:
        """What was learnt (ms by batch bucket), for logs and benchmarks."""
        return {"plain": dict(self._plain.value), "spec_overhead": dict(self._spec.value),
                "chain": dict(self._chain.value)}

    def observe(self, t: StepTiming) -> None:
        if not self.enabled or t.num_seqs <= 0 or not 0 < t.wall_ms < MAX_WALL_MS:
            return
        b = t.num_seqs
        if t.plain:
            learnt = self._plain.add(b, t.wall_ms)
        else:
            extra = t.wall_ms - self.plain_ms(b) - max(self.gpu(t.rows) - self.gpu(b), 0.0)
            if t.drafted and not t.chain:
                learnt = self._spec.add(b, max(extra, 0.0))
            elif t.chain:
                spec = self.spec_overhead_ms(b) if t.drafted else 0.0
                learnt = self._chain.add(b, max(extra - spec, 0.0))
            else:
                return  # a synchronous step without drafts (MTP's extend only): not a kind the budget prices
        self.observed += learnt
