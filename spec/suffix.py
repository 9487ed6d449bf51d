"""Suffix decoding (SuffixDecoding, arXiv 2411.04975; Arctic Inference's semantics): drafts come from a
per-request suffix tree over prompt + output and a per-tenant global tree over finished responses, both kept
by `spec.suffix_index.SuffixIndex` (compiled); this class adapts it to the drafter interface."""
from __future__ import annotations

from collections.abc import Sequence

from spec.budget import DraftBudget
from spec.config import SpeculativeConfig
from spec.drafter import DraftSlot, Drafter
from spec.suffix_index import SuffixDraft, SuffixIndex
from spec.wall_clock import StepTiming

SOURCE = "suffix"
# The draft budget calibrates the trees' probabilities per request and per match length: a request's short
# matches (often chance on text that does not repeat) and its long ones (copying) are right at different rates.
MATCH_BUCKETS = (4, 16)


def budget_source(draft: SuffixDraft) -> str:
    """The draft budget's name for this draft's source: suffix drafts by length of the matched context."""
    return f"{SOURCE}/{sum(draft.match_len >= b for b in MATCH_BUCKETS)}"


class SuffixDrafter(Drafter):
    def __init__(self, config: SpeculativeConfig, budget: DraftBudget | None = None) -> None:
        """budget: cuts each step's drafts (None, or one turned off: every draft up to its cap; the hybrid
        drafter budgets for its parts itself)."""
        self.config = config
        self.index = SuffixIndex(max_depth=config.max_tree_depth, max_global_tokens=config.max_cached_tokens)
        self.budget = budget if budget is not None and budget.enabled else None
        self._live: set[int] = set()
        self._drafted = True  # the last propose drafted for someone (or none ran yet)
        self._quiet_steps = 0  # steps run without drafting (overlapped) since the last propose

    def add(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None:
        self.index.start(seq_id, prompt, tenant)
        self._live.add(seq_id)

    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None:
        if seq_id in self._live:
            self.index.extend(seq_id, tokens)
        if self.budget is not None:
            self.budget.accepted(seq_id, tokens)

    def finish(self, seq_id: int, completed: bool) -> None:
        if seq_id in self._live:
            self._live.discard(seq_id)
            self.index.stop(seq_id, keep_response=completed)
        if self.budget is not None:
            self.budget.forget(seq_id)

    def observe_step(self, timing: StepTiming) -> None:
        if self.budget is not None:
            self.budget.clock.observe(timing)

    def wants_sync(self) -> bool:
        """Overlap scheduling: while the budget holds every request at 0 drafts, let steps overlap and look for
        drafts again only every `overlap_sync_interval` steps (each look finishes the in-flight step first);
        without a budget every step may draft."""
        if self.budget is None or self._drafted or self._quiet_steps + 1 >= self.config.overlap_sync_interval:
            return True
        self._quiet_steps += 1
        return False

    def propose(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        self._quiet_steps = 0
        if self.budget is None:
            return [d.tokens for d in self.drafts(slots)]
        out = self.budgeted(slots, self.budget)
        self._drafted = any(out)
        return out

    def budgeted(self, slots: Sequence[DraftSlot], budget: DraftBudget) -> list[list[int]]:
        """The drafts cut to what `budget` plans for this step (it records them as this step's proposals); the
        hybrid drafter calls it with its own budget while its MTP part is idle."""
        drafts = self.drafts(slots)
        sources = [budget_source(d) for d in drafts]
        gains = [budget.gains(s.seq_id, src, len(d.tokens), d.probs) for s, d, src in zip(slots, drafts, sources)]
        ks = budget.plan([s.seq_id for s in slots], gains)
        budget.proposed({s.seq_id: (src, d.tokens[:k], d.probs[:k]) for s, d, src, k in zip(slots, drafts, sources, ks)})
        return [d.tokens[:k] for d, k in zip(drafts, ks)]

    def drafts(self, slots: Sequence[DraftSlot]) -> list[SuffixDraft]:
        """The drafts with their scores (expected accepted length under the trees' frequencies)."""
        if not slots:
            return []
        cap = self.config.num_speculative_tokens
        return self.index.speculate_batch(
            [s.seq_id for s in slots], [min(cap, s.max_drafts) for s in slots],
            self.config.max_spec_factor, self.config.min_token_prob,
        )
