"""The drafter a SpeculativeConfig asks for."""
from __future__ import annotations

from spec.config import SpeculativeConfig
from spec.drafter import Drafter
from spec.suffix import SuffixDrafter


def build_drafter(config: SpeculativeConfig | None) -> Drafter | None:
    if config is None:
        return None
    if config.method == "suffix":
        return SuffixDrafter(config)
    raise ValueError(f"speculative method {config.method!r} needs the MTP drafter, which is not built yet; use 'suffix'")
