"""Suffix decoding (SuffixDecoding, arXiv 2411.04975; Arctic Inference's semantics): drafts come from a
per-request suffix tree over prompt + output and a per-tenant global tree over finished responses, both kept
by `spec.suffix_index.SuffixIndex` (compiled); this class adapts it to the drafter interface."""
from __future__ import annotations

from collections.abc import Sequence

from spec.config import SpeculativeConfig
from spec.drafter import DraftSlot, Drafter
from spec.suffix_index import SuffixDraft, SuffixIndex


class SuffixDrafter(Drafter):
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.index = SuffixIndex(max_depth=config.max_tree_depth, max_global_tokens=config.max_cached_tokens)
        self._live: set[int] = set()

    def add(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None:
        self.index.start(seq_id, prompt, tenant)
        self._live.add(seq_id)

    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None:
        if seq_id in self._live:
            self.index.extend(seq_id, tokens)

    def finish(self, seq_id: int, completed: bool) -> None:
        if seq_id in self._live:
            self._live.discard(seq_id)
            self.index.stop(seq_id, keep_response=completed)

    def propose(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        return [d.tokens for d in self.drafts(slots)]

    def drafts(self, slots: Sequence[DraftSlot]) -> list[SuffixDraft]:
        """The drafts with their scores (expected accepted length under the trees' frequencies)."""
        if not slots:
            return []
        cap = self.config.num_speculative_tokens
        return self.index.speculate_batch(
            [s.seq_id for s in slots], [min(cap, s.max_drafts) for s in slots],
            self.config.max_spec_factor, self.config.min_token_prob,
        )
