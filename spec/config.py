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
    # Draft budget (spec/budget.py): per request and step, propose the number of drafts (0 .. the cap) that
    # maximizes expected tokens per unit of step time, from each request's running acceptance and the step-cost
    # model below; a request at 0 drafts gets a 1-draft probe now and then. False: always draft up to the cap.
    draft_budget: bool = True
    # Step time (ms) of a forward with N rows (decode rows + draft rows), piecewise linear through these points
    # (the last segment's slope beyond). Defaults: bench/RESULTS.md, H200, 27 layers at GLM-4.7's widths, 4K
    # context: decode B=1 4.0 ms; verify 1x4 / 4x4 / 16x4 rows 8.9 / 16.8 / 27.0 ms; past 64 rows every expert
    # is touched already, so the slope is the prefill rate (4096 tokens in 136 ms) -- those two points estimated.
    step_cost_rows: tuple[int, ...] = (1, 4, 16, 64, 256, 1024)
    step_cost_ms: tuple[float, ...] = (4.0, 8.9, 16.8, 27.0, 34.0, 60.0)
    # One MTP chain step (the NextN layer + LM head over the drafting requests, eager, one host sync), in the
    # same unit; drafts past the first cost one such step per position.
    mtp_step_cost_ms: float = 1.0
    # With CUDA graphs: time every captured decode/verify graph once at start-up and budget with those times
    # (rows = batch x rows per request) instead of step_cost_rows/ms, which were measured on another model; the
    # MTP chain then costs nothing at the margin (its draft graph replays the whole chain every step).
    measure_step_cost: bool = True
    # Learn what steps really take while serving (each decode step cycle's wall time, host work included: a plain
    # step overlaps it, a speculative one does not, the MTP chain adds its own; spec/wall_clock.py) and budget
    # with that (on CUDA; a CPU engine keeps the configured costs). False: the GPU costs above only.
    measure_wall_clock: bool = True
    # MTP (and hybrid): a request the budget gave no MTP drafts for this many steps in a row stops running the
    # NextN layer for good (no extend, no hidden states kept): its steps decode plainly (hybrid: suffix drafts
    # only) and may overlap. Its NextN KV is then stale, so it never drafts with MTP again. 0: never.
    mtp_retire_steps: int = 8
    # With retirement on: a new request starts retired where the chain would not pay for requests drafting at the
    # engine-wide MTP acceptance so far (at the last step's batch size), except every this-many-th such request,
    # which drafts (and keeps that acceptance current, so MTP comes back when the text turns predictable); 1: every
    # new request drafts (only the all-accepted bound retires it at admission).
    mtp_explore_every: int = 8
    # Each explorer that retires unused doubles the wait for the next one, up to this many such requests; one
    # that finishes still drafting with MTP brings it back to mtp_explore_every (an explorer's steps keep hidden
    # states and run the NextN layer: on text where MTP never pays they are the whole of its cost).
    mtp_explore_max_every: int = 64
    # Weight of older verifies in a request's running acceptance: each verify multiplies the past by this.
    acceptance_decay: float = 0.9
    # A request the budget holds at 0 drafts is probed with 1 draft after this many steps; each rejected probe
    # doubles the wait, up to max_probe_interval; an accepted one is followed by another probe the next step.
    probe_interval: int = 4
    max_probe_interval: int = 32
    # Suffix with the budget under overlap scheduling: while every request is held at 0 drafts, steps overlap
    # (like plain decoding) and drafts are looked for again every this many steps (each look waits for the
    # step in flight).
    overlap_sync_interval: int = 4

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
        for key in ("step_cost_rows", "step_cost_ms"):  # JSON gives lists; the dataclass is frozen and hashable
            if isinstance(options.get(key), list):
                options = {**options, key: tuple(options[key])}
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
        for key in ("draft_budget", "measure_step_cost", "measure_wall_clock"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")
        rows, ms = self.step_cost_rows, self.step_cost_ms
        if not isinstance(rows, tuple) or not rows or not all(_is_int(r) and r >= 1 for r in rows) or \
                any(a >= b for a, b in zip(rows, rows[1:])):
            raise bad("step_cost_rows", "a non-empty increasing list of ints >= 1")
        if not isinstance(ms, tuple) or len(ms) != len(rows) or not all(_is_number(t) and t > 0 for t in ms) or \
                any(a > b for a, b in zip(ms, ms[1:])):
            raise bad("step_cost_ms", f"a non-decreasing list of {len(rows)} numbers > 0 (one per step_cost_rows)")
        if not _is_number(self.mtp_step_cost_ms) or not 0 <= self.mtp_step_cost_ms < float("inf"):
            raise bad("mtp_step_cost_ms", "a number >= 0")
        if not _is_number(self.acceptance_decay) or not 0 <= self.acceptance_decay < 1:
            raise bad("acceptance_decay", "a number in [0, 1)")
        if not _is_int(self.probe_interval) or self.probe_interval < 1:
            raise bad("probe_interval", "an int >= 1")
        if not _is_int(self.max_probe_interval) or self.max_probe_interval < self.probe_interval:
            raise bad("max_probe_interval", f"an int >= probe_interval = {self.probe_interval}")
        if not _is_int(self.mtp_retire_steps) or self.mtp_retire_steps < 0:
            raise bad("mtp_retire_steps", "an int >= 0")
        if not _is_int(self.mtp_explore_every) or self.mtp_explore_every < 1:
            raise bad("mtp_explore_every", "an int >= 1")
        if not _is_int(self.mtp_explore_max_every) or self.mtp_explore_max_every < self.mtp_explore_every:
            raise bad("mtp_explore_max_every", "an int >= mtp_explore_every")
        if not _is_int(self.overlap_sync_interval) or self.overlap_sync_interval < 1:
            raise bad("overlap_sync_interval", "an int >= 1")

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
