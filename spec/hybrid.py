"""Hybrid MTP / suffix drafting, per request and per step. Both kinds of request verify in the same batch; the
NextN layer's extend runs for every request so its KV stays aligned and its drafts are ready whenever suffix
matching runs dry.

With the draft budget (spec/budget.py, the default) the choice is made right after a step is verified (the
suffix index already holds the step's tokens): per request, the source whose draft is worth more over what
its rows cost (each draft token's acceptance probability above the step's cost of one row, in tokens: the
suffix draft's calibrated tree probabilities against the request's running MTP acceptance), then the budget
cuts the chosen drafts for the whole batch, and the NextN chain runs only for the requests that draft from it.
With draft graphs the chain runs whole or not at all: where what MTP adds over the suffix drafts of the
requests that would take it does not pay for the chain, they take their suffix drafts and the step replays
the NextN extend alone. A request that takes no MTP drafts for `mtp_retire_steps` steps retires from MTP
(spec/mtp.py): suffix drafts only from then on, and its steps may overlap when nothing is drafted.

Without the budget: the suffix draft when its score (the expected accepted length under the suffix trees'
frequencies) beats the request's running MTP acceptance (accepted MTP tokens per MTP verify, an exponential
moving average starting at the cap), else the MTP draft, each at full length; the chain runs for everyone."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from spec.budget import DraftBudget
from spec.config import SpeculativeConfig
from spec.drafter import DraftSlot, Drafter, StepView
from spec.mtp import SOURCE as MTP
from spec.mtp import MtpDrafter
from spec.suffix import SOURCE as SUFFIX
from spec.suffix import SuffixDrafter, budget_source
from spec.wall_clock import StepTiming

EMA = 0.3  # without the budget: weight of the newest MTP verify in the running acceptance


@dataclass
class _Pending:
    source: str  # "mtp" | "suffix"
    draft: list[int]
    probs: list[float] | None = None  # suffix: each token's probability under the trees
    budget_source: str = MTP  # the budget's name for it (suffix: by match length)


class HybridDrafter(Drafter):
    needs_target_hidden = True

    def __init__(self, config: SpeculativeConfig, suffix: SuffixDrafter, mtp: MtpDrafter,
                 budget: DraftBudget | None = None) -> None:
        """suffix, mtp: drafters without a budget of their own (this one budgets for both)."""
        self.config = config
        self.suffix, self.mtp = suffix, mtp
        self.budget = budget if budget is not None and budget.enabled else None
        self._mtp_accept: dict[int, float] = {}
        self._pending: dict[int, _Pending] = {}
        self._planned: dict[int, _Pending] = {}  # budget: next step's choice, made in after_step
        self.proposed = {MTP: 0, SUFFIX: 0}  # drafts proposed by each source (observability, tests)
        self._drafted = True  # the last propose drafted for someone (or none ran yet)
        self._quiet_steps = 0  # steps run without drafting (overlapped) since the last propose

    def add(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None:
        self.suffix.add(seq_id, prompt, tenant)
        self.mtp.add(seq_id, prompt, tenant)
        if self.budget is not None:
            self.mtp.retire_at_admission(seq_id, self.budget)
        self._mtp_accept[seq_id] = float(self.config.num_speculative_tokens)

    def needs_hidden(self, seq_id: int) -> bool:
        return self.mtp.needs_hidden(seq_id)

    def any_needs_hidden(self, seq_ids: Iterable[int]) -> bool:
        return self.mtp.any_needs_hidden(seq_ids)

    @property
    def num_retired(self) -> int:
        return self.mtp.num_retired

    def wants_sync(self) -> bool:
        """As suffix decoding's: while nothing is drafted, steps of requests retired from MTP overlap and drafts
        are looked for every `overlap_sync_interval` steps."""
        if self.budget is None or self.mtp.wants_sync() or self._drafted \
                or self._quiet_steps + 1 >= self.config.overlap_sync_interval:
            return True
        self._quiet_steps += 1
        return False

    def observe_step(self, timing: StepTiming) -> None:
        if self.budget is not None:
            self.budget.clock.observe(replace(timing, chain=True) if self.mtp.take_chain_ran() else timing)

    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None:
        self.suffix.accepted(seq_id, tokens)  # (the MTP part, without a budget of its own, has nothing to record)
        if self.budget is not None:
            self.budget.accepted(seq_id, tokens)
            return
        pending = self._pending.pop(seq_id, None)
        if pending is not None and pending.source == MTP and pending.draft:
            n = 0
            while n < len(pending.draft) and n < len(tokens) and pending.draft[n] == tokens[n]:
                n += 1
            self._mtp_accept[seq_id] = (1 - EMA) * self._mtp_accept.get(seq_id, 0.0) + EMA * n

    def finish(self, seq_id: int, completed: bool) -> None:
        self.suffix.finish(seq_id, completed)
        self.mtp.finish(seq_id, completed)
        self._mtp_accept.pop(seq_id, None)
        self._pending.pop(seq_id, None)
        self._planned.pop(seq_id, None)
        if self.budget is not None:
            self.budget.forget(seq_id)

    def after_step(self, views: Sequence[StepView], num_decoding: int | None = None) -> None:
        if self.budget is None:
            self.mtp.after_step(views)
            return
        views = list(views)
        nxt = [k for k, v in enumerate(views) if v.max_drafts > 0 and v.next_tokens]
        slots = [DraftSlot(views[k].seq_id, views[k].max_drafts) for k in nxt]
        suffix = self.suffix.drafts(slots)
        budget, chain = self.budget, self.config.mtp_chain_length
        b = max(len(nxt), num_decoding or 0)  # the whole batch decoding next prices the chain and the rows
        row_cost = budget.row_cost_tokens(b)

        def worth(gains: list[float]) -> tuple[float, float]:  # (net value, first gain: which one to probe)
            return sum(max(0.0, g - row_cost) for g in gains), gains[0] if gains else 0.0

        by_source, use_mtp, edge = [], [], 0.0
        for slot, d in zip(slots, suffix):
            gs = budget.gains(slot.seq_id, budget_source(d), len(d.tokens), d.probs)
            live = self.mtp.needs_hidden(slot.seq_id)
            gm = budget.gains(slot.seq_id, MTP, min(slot.max_drafts, chain)) if live else []
            mtp = live and (not gs or worth(gm) > worth(gs))
            by_source.append((gs, gm))
            use_mtp.append(mtp)
            edge += worth(gm)[0] - worth(gs)[0] if mtp and gs else 0.0
        # the MTP chain is paid once per step (a draft graph runs it whole): where what MTP adds over those
        # requests' suffix drafts does not pay for it, they take their suffix drafts and the step skips it
        if 0 < edge < budget.chain_cost_tokens(b):
            use_mtp = [m and not gs for m, (gs, _) in zip(use_mtp, by_source)]
        gains = [gm if m else gs for m, (gs, gm) in zip(use_mtp, by_source)]
        ks = budget.plan([s.seq_id for s in slots], gains, chain=use_mtp, num_seqs=b,
                         has_draft=[True] * len(slots)) if slots else []
        planned, hopeless = {}, budget.chain_cannot_pay(b, chain, len(nxt))
        self.mtp.last_batch = b or self.mtp.last_batch
        for k, slot, d, mtp, n in zip(nxt, slots, suffix, use_mtp, ks):
            planned[slot.seq_id] = _Pending(MTP, []) if mtp else \
                _Pending(SUFFIX, d.tokens[:n], d.probs[:n], budget_source(d))
            views[k] = replace(views[k], max_drafts=n if mtp else 0)
            if self.mtp.needs_hidden(slot.seq_id):
                drafting = mtp and n > 0 and not budget.probing(slot.seq_id)  # as in MtpDrafter._budgeted
                self.mtp.count_idle(slot.seq_id, drafting, self.config.mtp_retire_steps, hopeless)
        self._planned = planned
        self.mtp.after_step(views)

    def propose(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        if self.budget is None:
            return self._propose_unbudgeted(slots)
        self._quiet_steps = 0
        planned, self._planned = self._planned, {}
        if self.mtp.idle and not planned:  # every request retired from MTP: suffix decoding, at its own cost
            return self._propose_suffix(slots)
        mtp = [[] for _ in slots] if self.mtp.idle else self.mtp.propose(slots)
        chosen: list[_Pending | None] = [planned.get(s.seq_id) for s in slots]
        rest = [i for i, p in enumerate(chosen) if p is None]  # not seen by after_step: suffix only
        if rest:
            rest_slots = [slots[i] for i in rest]
            drafts = self.suffix.drafts(rest_slots)
            gains = [self.budget.gains(s.seq_id, budget_source(d), len(d.tokens), d.probs)
                     for s, d in zip(rest_slots, drafts)]
            ks = self.budget.plan([s.seq_id for s in rest_slots], gains, num_seqs=len(slots))
            for i, d, n in zip(rest, drafts, ks):
                chosen[i] = _Pending(SUFFIX, d.tokens[:n], d.probs[:n], budget_source(d))
        out, proposals = [], {}
        for slot, p, m in zip(slots, chosen, mtp):
            draft = (m if p.source == MTP else p.draft)[: slot.max_drafts]
            probs = None if p.source == MTP else (p.probs or [])[: len(draft)]
            proposals[slot.seq_id] = (p.budget_source, draft, probs)
            self.proposed[p.source] += bool(draft)
            out.append(draft)
        self.budget.proposed(proposals)
        self._drafted = any(out)
        return out

    def _propose_suffix(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        """Suffix drafts for every slot, budgeted as SuffixDrafter.propose does, without the per-slot source
        bookkeeping of the mixed case: a hybrid engine whose MTP part is idle pays suffix decoding's host work."""
        out = self.suffix.budgeted(slots, self.budget)
        self.proposed[SUFFIX] += sum(1 for d in out if d)
        self._drafted = any(out)
        return out

    def _propose_unbudgeted(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        suffix = self.suffix.drafts(slots)
        mtp = self.mtp.propose(slots)
        out = []
        for slot, s, m in zip(slots, suffix, mtp):
            use_suffix = s.tokens and s.score > self._mtp_accept.get(slot.seq_id, 0.0)
            source, draft = (SUFFIX, s.tokens) if use_suffix else (MTP, m)
            self._pending[slot.seq_id] = _Pending(source, list(draft))
            self.proposed[source] += bool(draft)
            out.append(list(draft))
        return out
