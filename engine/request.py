"""One sequence the engine is generating: its tokens, progress counters, KV pages and per-request state.

The scheduler is phase-agnostic: a request has num_tokens (prompt + generated) and num_computed_tokens
(tokens whose KV is in its pages). A step computes some of the rest; when a step brings
num_computed_tokens up to num_tokens, the last position's logits give the next token. Chunked prefill,
prefix hits, preemption (num_computed_tokens back to 0) and speculative verification all follow that rule.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.block_pool import chain_hash
from engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str  # the user's id; n > 1 fans out into sequences sharing it
    index: int  # choice index within the user's request
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never past the model length
    arrival_time: float = field(default_factory=time.monotonic)
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full pages (a cache)
    num_registered_blocks: int = 0  # full pages already published to the prefix cache
    num_cached_tokens: int = -1  # prefix-cache hit at first admission (-1 = not yet admitted)
    num_preemptions: int = 0
    prompt_logprobs_upto: int = 0  # prompt positions whose logprobs were already produced
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Per-request helpers owned by the engine core (sampling state, detokenizer, stop matcher).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seq_id(self) -> str:
        return f"{self.request_id}#{self.index}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token(self, pos: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < p else self.output_token_ids[pos - p]

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence (a decode step's hot path)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def full_block_hashes(self, block_size: int, upto_tokens: int) -> tuple[list[int], list[tuple[int, ...]]]:
        """Hashes and tokens of every full page among the first `upto_tokens` tokens (computed lazily)."""
        n_full = upto_tokens // block_size
        hashes = list(self.block_hashes[:n_full])
        blocks = [tuple(self.tokens(i * block_size, (i + 1) * block_size)) for i in range(n_full)]
        for i in range(len(hashes), n_full):
            hashes.append(chain_hash(hashes[i - 1] if i else None, blocks[i]))
        return hashes, blocks

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
