"""The interface every drafter implements, as the engine uses it.

Per request the engine calls `add` once (prompt known), `accepted` after every step with the tokens the
request emitted (accepted drafts + the bonus token, or the one token of a plain step), and `finish` when the
request ends. Before a step's forward it calls `propose` for the decoding requests with a per-request cap on
the draft length (max_tokens, context length and `num_speculative_tokens` already folded in); after the
forward and sampling it calls `verify` per request. Requests are named by an int `seq_id` the engine chooses,
so `spec/` needs nothing from `engine/`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spec.verify import accept_chain
from spec.wall_clock import StepTiming


@dataclass(frozen=True)
class DraftSlot:
    seq_id: int
    max_drafts: int  # >= 1


@dataclass(frozen=True)
class StepView:
    """What one target step did for one request, as the MTP drafter needs it."""

    seq_id: int
    start: int  # first position the step computed and kept
    next_tokens: list[int]  # tokens at positions start + 1 .. start + n: the NextN layer's inputs
    hidden_rows: list[int]  # rows of the step's forward holding positions start .. start + n - 1
    block_table: Sequence[int]  # the request's pages (already covering the next verify chain; an int32 array)
    max_drafts: int  # drafts wanted for the next step (0: it is not decoding next)


class Drafter(ABC):
    # True: the engine keeps each target forward's hidden states and calls after_step (the MTP drafter)
    needs_target_hidden = False
    # True: `accepted` must see every emitted token, idle or not (suffix decoding's trees); False: only while
    # the drafter is not idle, since an idle one has no request to learn about (MTP, every request retired)
    follows_tokens = True
    num_retired = 0  # requests retired from MTP drafting (spec/mtp.py)

    @abstractmethod
    def add(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None: ...

    @abstractmethod
    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None: ...

    @abstractmethod
    def finish(self, seq_id: int, completed: bool) -> None:
        """completed: the request finished normally (its response may feed cross-request state); False for
        aborts and failures."""

    @abstractmethod
    def propose(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        """One draft (possibly empty) per slot, each at most slot.max_drafts tokens."""

    def wants_sync(self) -> bool:
        """Asked before a step while the previous one is still in flight (overlap scheduling): True makes the
        engine finish it first, so that every request's tokens are on the host and `propose` runs; False lets
        this step run without drafts, overlapped. Only drafters that allow overlap at all are asked (the engine
        refuses overlap with one that reads each step's hidden states)."""
        return True

    @property
    def idle(self) -> bool:
        """True while no request can draft and nothing drafted is pending (MTP with every request retired): the
        engine then skips its per-step calls (wants_sync, propose, step timing) as if it had no drafter, and
        `accepted` unless the drafter follows every token (`follows_tokens`); `add` and `finish` still come."""
        return False

    def needs_hidden(self, seq_id: int) -> bool:
        """Whether a step must keep this request's target hidden states and call after_step for it (MTP: until
        the request is retired from MTP drafting)."""
        return self.needs_target_hidden

    def any_needs_hidden(self, seq_ids: Iterable[int]) -> bool:
        """Whether a step of these requests must keep its hidden states (needs_hidden for any of them)."""
        return any(self.needs_hidden(s) for s in seq_ids)

    def observe_step(self, timing: StepTiming) -> None:
        """A decode-only step cycle's wall time (the draft budget's wall-clock model learns from it)."""

    def handed_over(self, seq_id: int, drafts: Sequence[int]) -> None:
        """Disaggregated decode: drafts another instance made for this request's first step (MTP: from the
        prompt's last hidden state, which this instance never had)."""

    def after_step(self, views: Sequence[StepView], num_decoding: int | None = None) -> None:
        """After a target step was verified and its tokens emitted (drafters that read the target's hidden
        states: see spec/mtp.py). views: the requests whose hidden states the step kept; num_decoding: every
        request decoding next step, MTP or not (the batch whose step the drafts make slower; None: the views
        that decode next)."""

    def verify(self, drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
        return accept_chain(drafts, sampled)
