"""The drafter a SpeculativeConfig asks for."""
from __future__ import annotations

from collections.abc import Callable

import torch

from spec.budget import DraftBudget
from spec.config import SpeculativeConfig
from spec.drafter import Drafter
from spec.hybrid import HybridDrafter
from spec.mtp import MtpBatch, MtpDrafter
from spec.suffix import SuffixDrafter


def build_drafter(
    config: SpeculativeConfig | None, block_size: int, run_mtp: Callable[[MtpBatch], torch.Tensor]
) -> Drafter | None:
    """run_mtp: runs one NextN-layer forward on every TP rank and returns rank 0's logits (the engine's)."""
    if config is None:
        return None
    budget = DraftBudget(config)  # turned off by config.draft_budget=False: fixed draft lengths
    if config.method == "suffix":
        return SuffixDrafter(config, budget)
    if config.method == "mtp":
        return MtpDrafter(config, block_size, run_mtp, budget)
    if config.method == "hybrid":
        return HybridDrafter(config, SuffixDrafter(config), MtpDrafter(config, block_size, run_mtp), budget)
    raise ValueError(f"speculative method {config.method!r} is not built yet; use 'suffix' or 'mtp'")
