"""Hybrid MTP / suffix drafting, per request and per step: take the suffix draft when its score (the expected
accepted length under the suffix trees' frequencies) beats the request's running MTP acceptance (accepted MTP
tokens per MTP verify, an exponential moving average starting at the MTP chain's length), else the MTP
draft. Both kinds of request verify in the same batch; the NextN layer keeps running for every request so
its drafts are ready whenever suffix matching runs dry."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spec.config import SpeculativeConfig
from spec.drafter import DraftSlot, Drafter, StepView
from spec.mtp import MtpDrafter
from spec.suffix import SuffixDrafter

EMA = 0.3  # weight of the newest MTP verify in the running acceptance


@dataclass
class _Pending:
    source: str  # "mtp" | "suffix"
    draft: list[int]


class HybridDrafter(Drafter):
    needs_target_hidden = True

    def __init__(self, config: SpeculativeConfig, suffix: SuffixDrafter, mtp: MtpDrafter) -> None:
        self.config = config
        self.suffix, self.mtp = suffix, mtp
        self._mtp_accept: dict[int, float] = {}
        self._pending: dict[int, _Pending] = {}
        self.proposed = {"mtp": 0, "suffix": 0}  # drafts proposed by each source (observability, tests)

    def add(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None:
        self.suffix.add(seq_id, prompt, tenant)
        self.mtp.add(seq_id, prompt, tenant)
        self._mtp_accept[seq_id] = float(self.config.num_speculative_tokens)

    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None:
        self.suffix.accepted(seq_id, tokens)
        self.mtp.accepted(seq_id, tokens)
        pending = self._pending.pop(seq_id, None)
        if pending is not None and pending.source == "mtp" and pending.draft:
            n = 0
            while n < len(pending.draft) and n < len(tokens) and pending.draft[n] == tokens[n]:
                n += 1
            self._mtp_accept[seq_id] = (1 - EMA) * self._mtp_accept.get(seq_id, 0.0) + EMA * n

    def finish(self, seq_id: int, completed: bool) -> None:
        self.suffix.finish(seq_id, completed)
        self.mtp.finish(seq_id, completed)
        self._mtp_accept.pop(seq_id, None)
        self._pending.pop(seq_id, None)

    def after_step(self, views: Sequence[StepView]) -> None:
        self.mtp.after_step(views)

    def propose(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        suffix = self.suffix.drafts(slots)
        mtp = self.mtp.propose(slots)
        out = []
        for slot, s, m in zip(slots, suffix, mtp):
            use_suffix = s.tokens and s.score > self._mtp_accept.get(slot.seq_id, 0.0)
            source, draft = ("suffix", s.tokens) if use_suffix else ("mtp", m)
            self._pending[slot.seq_id] = _Pending(source, list(draft))
            self.proposed[source] += bool(draft)
            out.append(list(draft))
        return out
