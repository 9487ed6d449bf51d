"""Speculative decoding options: one frozen dataclass, built from the offline `speculative_config` dict or
the server's `--speculative-*` flags (both go through `SpeculativeConfig.from_dict`)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

METHODS = ("suffix", "mtp", "hybrid")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "suffix" | "mtp" | "hybrid"
    # Hard cap on draft tokens per request and step (suffix drafts are also capped by the tree depth).
    num_speculative_tokens: int = 16
    # MTP chain length when it differs from the cap (hybrid: long suffix drafts, short MTP chains); None: the cap
    num_mtp_tokens: int | None = None
    # Suffix decoding (Arctic Inference / SuffixDecoding names and defaults).
    max_tree_depth: int = 64
    max_spec_factor: float = 1.0
    min_token_prob: float = 0.1
    # Global tree over finished responses, per tenant; 0 turns cross-request drafting off.
    max_cached_tokens: int = 1 << 24

    @staticmethod
    def from_dict(options: dict[str, Any]) -> "SpeculativeConfig":
        """Validate a `speculative_config` dict; errors name the key (and the server flag maps 1:1 onto it)."""
        if not isinstance(options, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(options).__name__}")
        known = {f.name for f in fields(SpeculativeConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {sorted(known)}")
        method = options.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config['method'] must be one of {METHODS}, got {method!r}")
        if method == "suffix" and "num_speculative_tokens" not in options:
            options = {**options, "num_speculative_tokens": 16}
        if method == "mtp" and "num_speculative_tokens" not in options:
            options = {**options, "num_speculative_tokens": 3}
        if method == "hybrid":
            options = {"num_speculative_tokens": 16, "num_mtp_tokens": 3, **options}
        cfg = SpeculativeConfig(**options)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"speculative_config['{key}'] must be {rule}, got {getattr(self, key)!r}")

        if not _is_int(self.num_speculative_tokens) or not 1 <= self.num_speculative_tokens <= 64:
            raise bad("num_speculative_tokens", "an int in [1, 64]")
        if self.num_mtp_tokens is not None and (
            not _is_int(self.num_mtp_tokens) or not 1 <= self.num_mtp_tokens <= self.num_speculative_tokens
        ):
            raise bad("num_mtp_tokens", f"an int in [1, num_speculative_tokens = {self.num_speculative_tokens}]")
        if not _is_int(self.max_tree_depth) or not 2 <= self.max_tree_depth <= 1024:
            raise bad("max_tree_depth", "an int in [2, 1024]")
        if not _is_number(self.max_spec_factor) or not 0 < self.max_spec_factor <= 64:
            raise bad("max_spec_factor", "a number in (0, 64]")
        if not _is_number(self.min_token_prob) or not 0 <= self.min_token_prob <= 1:
            raise bad("min_token_prob", "a number in [0, 1]")
        if not _is_int(self.max_cached_tokens) or self.max_cached_tokens < 0:
            raise bad("max_cached_tokens", "an int >= 0")

    @property
    def mtp_chain_length(self) -> int:
        return self.num_mtp_tokens or self.num_speculative_tokens

    @property
    def uses_suffix(self) -> bool:
        return self.method in ("suffix", "hybrid")

    @property
    def uses_mtp(self) -> bool:
        return self.method in ("mtp", "hybrid")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
