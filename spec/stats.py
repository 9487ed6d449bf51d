"""Speculative-decoding counters: what was drafted, what was accepted, per draft position."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    num_verifies: int = 0  # (request, step) pairs that verified at least one draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)  # [i]: verifies with a draft token at position i
    accepted_at: list[int] = field(default_factory=list)  # [i]: ... whose draft token i was accepted

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.num_verifies += 1
        self.draft_tokens += num_drafts
        self.accepted_tokens += num_accepted
        if len(self.drafted_at) < num_drafts:
            grow = num_drafts - len(self.drafted_at)
            self.drafted_at += [0] * grow
            self.accepted_at += [0] * grow
        for i in range(num_drafts):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < num_accepted

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify: accepted drafts + the bonus token."""
        return (self.accepted_tokens + self.num_verifies) / self.num_verifies if self.num_verifies else 0.0

    def as_dict(self) -> dict[str, float | int | list[float]]:
        return {
            "spec_num_verifies": self.num_verifies,
            "spec_draft_tokens": self.draft_tokens,
            "spec_accepted_tokens": self.accepted_tokens,
            "spec_mean_accepted_length": round(self.mean_accepted_length, 4),
            "spec_acceptance_rate_by_position": [
                round(a / d, 4) if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)
            ],
        }
