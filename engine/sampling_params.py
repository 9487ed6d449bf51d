"""Per-request sampling parameters, with vLLM's field names and validation ranges."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Below this temperature a request is treated as greedy (vLLM uses the same epsilon).
_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20
# The most choices of one request: each is a sequence of its own (n = 10**12 would build that many before
# failing; the server allows 64).
MAX_N = 1024
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range, as the server checks: a larger bias overflows float32 logits


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_token_id(value: Any) -> bool:  # numpy ints too
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class StructuredOutput:
    """A grammar the output must follow (constrained decoding, engine/grammar.py).

    grammar: an llguidance grammar (the JSON text of llguidance.LLMatcher.grammar_from_json_schema /
    grammar_from_lark / grammar_from_regex); tokenizer: the tokenizer folder its token table is built from;
    after_token_ids: the grammar starts after the first of these tokens in the output (e.g. `</think>`, so
    that reasoning is free text), () = from the first token."""

    grammar: str
    tokenizer: str
    after_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class ThinkingBudget:
    """A cap on reasoning (Anthropic's `thinking.budget_tokens`, SGLang's thinking budget): if `end_token_id`
    (GLM-4.7's `</think>`) is not among the first `max_tokens` output tokens, it is forced as the next one; the
    answer follows. For an output that starts inside the reasoning (the prompt ends with `<think>`)."""

    max_tokens: int
    end_token_id: int


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    # None = generate until the context is full; the engine clamps it to max_model_len - prompt_len.
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: Any = None  # str | list[str] on input; always a tuple[str, ...] after __post_init__
    stop_token_ids: Any = None  # list[int] on input; always a tuple[int, ...] after __post_init__
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    detokenize: bool = True  # False: token ids only (text stays ""), e.g. for benchmarks
    structured_output: StructuredOutput | None = None  # constrained decoding (JSON schema, grammar, regex)
    thinking_budget: ThinkingBudget | None = None  # force the end of reasoning after this many output tokens

    def __post_init__(self) -> None:
        self._normalize()
        self._validate()

    def _normalize(self) -> None:
        if self.stop is None:
            self.stop = ()
        elif isinstance(self.stop, str):
            self.stop = (self.stop,)
        elif isinstance(self.stop, (list, tuple)):
            self.stop = tuple(self.stop)
        else:
            raise ValueError(f"stop must be a str or a list of str, got {self.stop!r}")
        if self.stop_token_ids is None:
            self.stop_token_ids = ()
        elif isinstance(self.stop_token_ids, (list, tuple)) and all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in self.stop_token_ids):
            self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)  # numpy ints too, as before
        else:
            raise ValueError(f"stop_token_ids must be a list of int, got {self.stop_token_ids!r}")
        if self.logit_bias is not None:
            # JSON bodies carry string keys ("1234": -100); accept them (but not 1.5 or True as an id).
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}")
            bias = {}
            for k, v in self.logit_bias.items():
                try:
                    key = int(k) if isinstance(k, str) or _is_token_id(k) else None
                except ValueError:
                    key = None
                if key is None or not _is_number(v):
                    raise ValueError(f"logit_bias must map token ids (int) to numbers, got {k!r}: {v!r}")
                bias[key] = float(v)
            self.logit_bias = bias
            if not self.logit_bias:
                self.logit_bias = None
        if self.top_k == -1:
            self.top_k = 0

    def _validate(self) -> None:
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an int in [1, {MAX_N}], got {self.n!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)):  # else a bare "'<' not supported between ..." below
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(
                f"best_of is not supported (must be None or equal to n={self.n}), got {self.best_of}"
            )
        if not self.temperature >= 0.0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not -(2**63) <= self.seed < 2**64
        ):
            raise ValueError(f"seed must be an int in [-2**63, 2**64 - 1] or None, got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1 or None, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        if not self.repetition_penalty > 0.0 or math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if any(not isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a str or a list of str, got {self.stop!r}")
        if any(s == "" for s in self.stop):
            raise ValueError("stop must not contain an empty string")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        if self.structured_output is not None and not (
            isinstance(self.structured_output, StructuredOutput) and self.structured_output.grammar
        ):
            raise ValueError("structured_output must be a StructuredOutput with a grammar")
        if self.structured_output is not None and any(
            not _is_token_id(t) or t < 0 for t in self.structured_output.after_token_ids
        ):
            raise ValueError(f"structured_output.after_token_ids must be token ids (ints >= 0), "
                             f"got {self.structured_output.after_token_ids!r}")
        tb = self.thinking_budget
        if tb is not None and not (isinstance(tb, ThinkingBudget) and _is_int(tb.max_tokens) and tb.max_tokens >= 0
                                   and _is_token_id(tb.end_token_id) and tb.end_token_id >= 0):
            raise ValueError(f"thinking_budget must be a ThinkingBudget(max_tokens >= 0, end_token_id >= 0), "
                             f"got {tb!r}")
        if tb is not None and self.structured_output is not None and (
                tb.end_token_id not in self.structured_output.after_token_ids):
            # the forced end token would be one the grammar forbids: a row with no token left
            raise ValueError("thinking_budget with structured_output needs the grammar to start after the budget's "
                             f"end token: structured_output.after_token_ids must hold {tb.end_token_id}")
        if self.logit_bias is not None:
            if any(t < 0 for t in self.logit_bias):
                raise ValueError("logit_bias token ids must be >= 0")
            # -inf bans a token (vLLM scripts use it); NaN and anything else outside the range are refused
            bad = {t: v for t, v in self.logit_bias.items()
                   if not (-LOGIT_BIAS_LIMIT <= v <= LOGIT_BIAS_LIMIT or v == -math.inf)}
            if bad:
                raise ValueError(f"logit_bias values must be in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}] or -inf "
                                 f"(a ban), got {dict(list(bad.items())[:5])}")

    def verify_token_ids(self, vocab_size: int) -> None:
        """Check token ids against the model's vocabulary (the params alone don't know it)."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids out of vocabulary (size {vocab_size}): {bad}")
        if self.logit_bias is not None:
            bad = [t for t in self.logit_bias if t >= vocab_size]
            if bad:
                raise ValueError(f"logit_bias token ids out of vocabulary (size {vocab_size}): {bad}")
        if self.structured_output is not None:
            bad = [t for t in self.structured_output.after_token_ids if t >= vocab_size]
            if bad:
                raise ValueError(f"structured_output.after_token_ids out of vocabulary (size {vocab_size}): {bad}")

        if self.thinking_budget is not None and self.thinking_budget.end_token_id >= vocab_size:
            raise ValueError(f"thinking_budget.end_token_id out of vocabulary (size {vocab_size}): "
                             f"{self.thinking_budget.end_token_id}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
