"""Token output processing: what happens to the tokens a step emitted for one sequence.

For each emitted token, in order: append it to the request, decode its text incrementally, check the stop
token ids (masked while min_tokens is not reached), stop strings (text that may still become a stop string is
held back) and max_tokens. A step may emit several tokens for one sequence (accepted draft tokens plus the
bonus token); the first token that finishes the sequence ends it, and the tokens after it are dropped, so
speculation never emits past a stop or max_tokens. Prompt logprobs are collected here too. Produces the
RequestDelta the engine core emits; finishing the request in the scheduler is the caller's job.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens
from engine.outputs import LogprobsDict, RequestDelta
from engine.request import Request
from engine.logprobs import LogprobScores, logprob_dicts
from engine.sampler import SamplingState
from engine.stop_strings import StopStringMatcher


@dataclass
class _SeqState:
    sampling: SamplingState
    detok: IncrementalDetokenizer
    stops: StopStringMatcher | None
    sent_prompt_logprobs: bool = False
    prompt_logprobs: list[LogprobsDict | None] | None = None


@dataclass(frozen=True)
class Emitted:
    delta: RequestDelta
    finish_reason: str | None  # None while the sequence goes on
    stop_reason: int | str | None
    num_tokens: int  # tokens kept (a stop among them drops the rest)


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self._seq: dict[Request, _SeqState] = {}
        self.num_generated_tokens_total = 0

    def add(self, req: Request) -> None:
        params = req.params
        sampling = SamplingState(
            params, req.prompt_token_ids, req.output_token_ids, self.eos_token_ids, seed_offset=req.index,
        )
        detok = IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens,
        )
        stops = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
        # position 0 has no logprobs: a one-token prompt's prompt logprobs are [None], with no row to collect
        prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        self._seq[req] = _SeqState(sampling, detok, stops, prompt_logprobs=prompt_logprobs)

    def remove(self, req: Request) -> None:
        self._seq.pop(req, None)

    def sampling_state(self, req: Request) -> SamplingState:
        return self._seq[req].sampling

    def append(self, req: Request, tokens: Sequence[int], logprobs: Sequence[LogprobsDict | None]) -> Emitted:
        st = self._seq[req]
        params = req.params
        text, kept, kept_lp = "", [], []
        reason: str | None = None
        stop_reason: int | str | None = None
        use_stops = False
        for token, lp in zip(tokens, logprobs):
            req.output_token_ids.append(token)
            kept.append(token)
            kept_lp.append(lp)
            self.num_generated_tokens_total += 1
            if lp is not None and params.detokenize:
                decode_logprob_tokens(self.tokenizer, [lp])
            piece = st.detok.add_tokens([token]) if params.detokenize else ""
            n_out = len(req.output_token_ids)
            past_min = n_out >= params.min_tokens
            if token in st.sampling.all_stop_token_ids and past_min:
                reason = "stop"
                # vLLM reports the token id only for stop_token_ids, not for the model's own EOS.
                stop_reason = token if token in params.stop_token_ids else None
                if not params.include_stop_str_in_output and piece:
                    # The stop token's own text (visible with skip_special_tokens=False) is not output.
                    tok_text = self.tokenizer.decode([token], skip_special_tokens=params.skip_special_tokens)
                    if tok_text and piece.endswith(tok_text):
                        piece = piece[: -len(tok_text)]
            use_stops = st.stops is not None and past_min
            if use_stops:
                piece, matched = st.stops.feed(piece)
                if matched is not None and reason is None:
                    reason, stop_reason = "stop", matched
            text += piece
            if reason is None and n_out >= req.max_tokens:
                reason = "length"
            if reason is not None:
                break
        if reason is not None and not isinstance(stop_reason, str) and params.detokenize:
            tail = st.detok.flush()
            if use_stops:
                emit, matched = st.stops.feed(tail)
                text += emit if matched is not None else emit + st.stops.flush()
            else:
                text += tail
        has_lp = any(lp is not None for lp in kept_lp)
        delta = self.delta(req, kept, text, kept_lp if has_lp else None, finished=reason is not None,
                           finish_reason=reason, stop_reason=stop_reason)
        return Emitted(delta, reason, stop_reason, len(kept))

    def collect_prompt_logprobs(self, req: Request, scores: LogprobScores, prompt_rows: tuple[int, int, int]) -> None:
        first_row, first_target, count = prompt_rows
        st = self._seq[req]
        targets = req.prompt_token_ids[first_target : first_target + count]
        dicts = logprob_dicts(scores, first_row, targets, req.params.prompt_logprobs)
        decode_logprob_tokens(self.tokenizer, dicts)
        st.prompt_logprobs.extend(dicts)
        req.prompt_logprobs_upto = first_target + count

    def delta(
        self, req: Request, tokens: list[int], text: str, logprobs: list[LogprobsDict | None] | None,
        finished: bool, finish_reason: str | None = None, stop_reason: int | str | None = None,
        error: str | None = None,
    ) -> RequestDelta:
        st = self._seq.get(req)
        prompt_lp = None
        if st is not None and not st.sent_prompt_logprobs and req.params.prompt_logprobs is not None:
            if st.prompt_logprobs is not None and req.prompt_logprobs_upto >= req.num_prompt_tokens - 1:
                prompt_lp, st.sent_prompt_logprobs = st.prompt_logprobs, True
        return RequestDelta(
            request_id=req.request_id,
            index=req.index,
            new_token_ids=tokens,
            new_text=text,
            new_logprobs=logprobs,
            prompt_logprobs=prompt_lp,
            finished=finished,
            finish_reason=finish_reason if finished else None,
            stop_reason=stop_reason if finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            error=error,
        )
