"""Speculative decoding: drafters (suffix trees; MTP next) behind one interface, and lossless verification."""
from spec.budget import DraftBudget, StepCost, StepCosts
from spec.build import build_drafter
from spec.config import SpeculativeConfig
from spec.drafter import DraftSlot, Drafter, StepView
from spec.mtp import MtpBatch, MtpCalls, MtpDraftBatch, MtpDrafter
from spec.stats import SpecStats
from spec.verify import accept_chain
from spec.wall_clock import StepTiming, WallClock

__all__ = ["DraftBudget", "DraftSlot", "Drafter", "MtpBatch", "MtpCalls", "MtpDraftBatch", "MtpDrafter", "StepView", "SpecStats", "SpeculativeConfig", "StepCost", "StepCosts", "StepTiming", "WallClock", "accept_chain", "build_drafter"]
