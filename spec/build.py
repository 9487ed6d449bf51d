"""The drafter a SpeculativeConfig asks for."""
from __future__ import annotations

from spec.budget import DraftBudget, StepCosts
from spec.config import SpeculativeConfig
from spec.drafter import Drafter
from spec.hybrid import HybridDrafter
from spec.mtp import MtpCalls, MtpDrafter
from spec.suffix import SuffixDrafter


def build_drafter(config: SpeculativeConfig | None, block_size: int, mtp: MtpCalls,
                  measured: StepCosts | None = None, learn_wall_clock: bool = False) -> Drafter | None:
    """mtp: how the NextN layer runs on every TP rank (eager forwards; the draft graphs where captured).
    measured: this engine's step costs for the draft budget (None: the config's defaults). learn_wall_clock:
    the budget learns step times while serving (where config.measure_wall_clock allows it)."""
    if config is None:
        return None
    # turned off by config.draft_budget=False: fixed draft lengths
    budget = DraftBudget(config, measured, learn_wall_clock=learn_wall_clock)
    if config.method == "suffix":
        return SuffixDrafter(config, budget)
    if config.method == "mtp":
        return MtpDrafter(config, block_size, mtp, budget)
    if config.method == "hybrid":
        return HybridDrafter(config, SuffixDrafter(config), MtpDrafter(config, block_size, mtp), budget)
    raise ValueError(f"speculative method {config.method!r} is not built yet; use 'suffix' or 'mtp'")
