"""Request outputs (vLLM-shaped) and the per-step deltas the engine core emits."""

from __future__ import annotations

from dataclasses import dataclass, field

# Per position: {token_id: Logprob} holding the chosen token plus the top-k (vLLM layout).
LogprobsDict = dict[int, "Logprob"]


@dataclass
class Logprob:
    logprob: float
    rank: int | None  # 1 + number of vocabulary tokens with a strictly larger logprob
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[LogprobsDict] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # matched stop string or stop token id; None for EOS / length

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[LogprobsDict | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


@dataclass
class RequestDelta:
    """What the engine core emits for one sequence (index) of one request after a step."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[LogprobsDict] | None = None  # one dict per new token when logprobs were requested
    prompt_logprobs: list[LogprobsDict | None] | None = None  # only on the first delta; [0] is None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # the sequence failed (finish_reason "error"); this says why


@dataclass
class _SeqAccum:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobsDict] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutputAccumulator:
    """Folds the deltas of one request (all n sequences) into a cumulative RequestOutput."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], n: int = 1) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.n = n
        self.prompt_logprobs: list[LogprobsDict | None] | None = None
        self.num_cached_tokens = 0
        self._seqs = [_SeqAccum() for _ in range(n)]

    def add(self, delta: RequestDelta) -> None:
        if delta.request_id != self.request_id:
            raise ValueError(f"delta for {delta.request_id!r} given to accumulator of {self.request_id!r}")
        if not 0 <= delta.index < self.n:
            raise ValueError(f"delta index {delta.index} out of range for n={self.n}")
        seq = self._seqs[delta.index]
        if seq.finish_reason is not None:
            raise ValueError(f"sequence {delta.index} of {self.request_id!r} already finished")
        if delta.new_logprobs is not None and len(delta.new_logprobs) != len(delta.new_token_ids):
            raise ValueError("new_logprobs must have one entry per new token")
        if delta.finished and delta.finish_reason is None:
            raise ValueError("a finished delta must carry a finish_reason")
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        seq.text.append(delta.new_text)
        seq.token_ids.extend(delta.new_token_ids)
        if delta.new_logprobs is not None:
            if seq.logprobs is None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            for tok, lp in zip(delta.new_token_ids, delta.new_logprobs):
                seq.cumulative_logprob += lp[tok].logprob
            seq.logprobs.extend(delta.new_logprobs)
        if delta.finished:
            seq.finish_reason = delta.finish_reason
            seq.stop_reason = delta.stop_reason

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self._seqs)

    def get_output(self) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=i,
                text="".join(s.text),
                token_ids=list(s.token_ids),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(self._seqs)
        ]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            prompt_logprobs=self.prompt_logprobs,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
        )
