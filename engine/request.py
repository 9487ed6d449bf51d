"""One sequence the engine is generating: its tokens, progress counters, KV pages and per-request state.

The scheduler is phase-agnostic: a request has num_tokens (prompt + generated) and num_computed_tokens
(tokens whose KV is in its pages). A step computes some of the rest; when a step brings
num_computed_tokens up to num_tokens, the last position's logits give the next token. Chunked prefill,
prefix hits, preemption (num_computed_tokens back to 0) and speculative verification all follow that rule:
a decoding request with k draft tokens computes its last token plus the k drafts in one step, and after
verification num_computed_tokens is cut back to the tokens that were accepted (a length cut).

With overlap scheduling a step may be planned while the previous one is still running: the tokens that step
samples are counted in num_pending_tokens (their ids live only in the device-side token table until the
host has them), so num_tokens already includes them and the host token lists never hold placeholders.
"""
from __future__ import annotations

import enum
import time
from array import array
from dataclasses import dataclass, field

from engine.block_pool import chain_hash
from engine.block_tables import page_array
from engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    # disaggregation: held by the KV connector during the handshake (in no scheduler queue, no pages) ...
    HANDSHAKE = "handshake"
    # ... decode side: pages reserved, waiting for the prefill instance's KV (the scheduler skips it)
    RECEIVING = "receiving"


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
    num_pending_tokens: int = 0  # sampled by the in-flight step, not yet in output_token_ids
    draft_token_ids: list[int] = field(default_factory=list)  # proposed for the next step (speculation)
    seq_key: int = -1  # engine-wide int id of this sequence (drafters, logs)
    table_slot: int = -1  # row of the device token table while running
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    block_ids: array = field(default_factory=page_array)  # int32 page ids (engine/block_tables.py)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full pages (a cache)
    num_registered_blocks: int = 0  # full pages already published to the prefix cache
    num_cached_tokens: int = -1  # prefix-cache hit at first admission (-1 = not yet admitted)
    num_preemptions: int = 0
    prompt_logprobs_upto: int = 0  # prompt positions whose logprobs were already produced
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    tenant: str = ""  # scope of cross-request state (the API key; "" offline)

    @property
    def seq_id(self) -> str:
        return f"{self.request_id}#{self.index}"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs asked for and not all produced: each prompt row of its chunks needs its logits."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs_upto < self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens, including those sampled by an in-flight step."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host has (all but the in-flight step's)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) + self.num_pending_tokens

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
