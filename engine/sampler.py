"""Batched token sampling: logit processors, greedy / temperature / top-k / top-p / min-p, logprobs.

Order per row: logit_bias -> min_tokens stop-id mask -> penalties -> grammar mask (structured output,
engine/grammar.py; a verify row gets the grammar state after its drafts) -> (greedy argmax | temperature ->
top-k -> top-p -> min-p -> sample). Logprobs come from the raw model distribution (log_softmax of the
logits as given), as vLLM does by default.

Sampling uses the exponential race: token = argmax(p_i / q_i) with q_i ~ Exp(1) i.i.d., which draws
from p (normalised or not). Unseeded rows draw q from one batched call; a seeded row draws its own q from a
generator seeded by (seed, sequence index, output position), so its token depends on nothing but the request
and the position: not on the rest of the batch, and not on how many draft tokens a verify step carried
(speculative and plain runs of a seeded request give the same tokens).

A row is a request's SamplingState, or a SampleRow: the state plus the draft tokens that precede the row in a
verify chain, which count as history for penalties and min_tokens exactly as if they had been emitted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.device_copy import to_device
from engine.grammar import apply_grammar_masks
from engine.logprobs import logprob_dicts, score_logprobs
from engine.outputs import LogprobsDict
from engine.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """Per-sequence sampling state. The caller appends each accepted token to output_token_ids."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: Iterable[int] = ()
    # For n > 1 pass the sequence index: a seeded request seeds sequence i with seed + i.
    seed_offset: int = 0
    generator: torch.Generator | None = None
    grammar: Any = None  # engine/grammar.py: SequenceGrammar, created on the first masked row
    # eos ids (unless ignore_eos) + stop_token_ids: the ids that finish the sequence, masked during min_tokens.
    all_stop_token_ids: frozenset[int] = field(init=False)
    _prompt_ids_dev: torch.Tensor | None = field(default=None, init=False, repr=False)
    # the thinking budget's end token: seen in output_token_ids[:_end_scanned]? (scanned incrementally)
    _end_seen: bool = field(default=False, init=False, repr=False)
    _end_scanned: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        stops = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stops.update(self.eos_token_ids)
        self.all_stop_token_ids = frozenset(stops)

    def generator_at(self, device: torch.device, position: int) -> torch.Generator | None:
        """The request's generator (created on first use, on the logits' device) seeded for output position
        `position`; None if unseeded."""
        if self.params.seed is None:
            return None
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
        self.generator.manual_seed(mix_seed(self.params.seed, self.seed_offset, position))
        return self.generator

    def reasoning_ended(self, end_token_id: int, drafts: Sequence[int] = ()) -> bool:
        """Whether end_token_id is in the output (or the drafts after it); only new output tokens are searched."""
        out = self.output_token_ids
        if len(out) < self._end_scanned:  # never expected (the output only grows): search it all again
            self._end_seen, self._end_scanned = False, 0
        if not self._end_seen and len(out) > self._end_scanned:
            self._end_seen = end_token_id in out[self._end_scanned:]
            self._end_scanned = len(out)
        return self._end_seen or end_token_id in drafts

    def prompt_ids_on(self, device: torch.device) -> torch.Tensor:
        """Prompt ids as a device tensor, cached (only used by the repetition penalty)."""
        if self._prompt_ids_dev is None or self._prompt_ids_dev.device != device:
            self._prompt_ids_dev = torch.tensor(list(self.prompt_token_ids), dtype=torch.long, device=device)
        return self._prompt_ids_dev


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, offset: int, position: int) -> int:
    """A 63-bit generator seed from any int seed (negative or past 2**64 included), the sequence index and the
    output position: torch's manual_seed takes nothing wider."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (offset & _MASK64))
    x = _splitmix64(x ^ (position & _MASK64))
    return x >> 1


@dataclass(frozen=True)
class SampleRow:
    """One logits row of a verify chain: the request's state plus the draft tokens before this row."""

    state: SamplingState
    drafts: tuple[int, ...] = ()

    @property
    def params(self) -> SamplingParams:
        return self.state.params

    @property
    def num_output(self) -> int:
        return len(self.state.output_token_ids) + len(self.drafts)

    def history(self) -> list[int]:
        return self.state.output_token_ids + list(self.drafts) if self.drafts else self.state.output_token_ids


Row = SamplingState | SampleRow


def _as_rows(rows: Sequence[Row]) -> list[SampleRow]:
    return [r if isinstance(r, SampleRow) else SampleRow(r) for r in rows]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[LogprobsDict | None]  # per row; None where the request asked for no logprobs
    token_ids_tensor: torch.Tensor  # [B] int64 on the logits' device (feed the next step without a sync)


def _rows_cols(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = to_device(pairs, torch.long, device).reshape(-1, 2)
    return t[:, 0], t[:, 1]


def _row_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(values, torch.float32, device)


def _force_reasoning_end(x: torch.Tensor, rows: Sequence[SampleRow]) -> None:
    """Rows past their thinking budget whose reasoning has not ended: only the end token is left (logit 0)."""
    forced = [
        (i, r.params.thinking_budget.end_token_id)
        for i, r in enumerate(rows)
        if r.params.thinking_budget is not None
        and r.num_output >= r.params.thinking_budget.max_tokens
        and not r.state.reasoning_ended(r.params.thinking_budget.end_token_id, r.drafts)
    ]
    if not forced:
        return
    rows_t, cols_t = _rows_cols(forced, x.device)
    x.index_fill_(0, rows_t, float("-inf"))
    x.index_put_((rows_t, cols_t), torch.zeros((), device=x.device))


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Generator for unseeded rows; None uses torch's default RNG of the logits' device.
        self.generator = generator

    # ---- logit processors -------------------------------------------------------------------------

    def apply_logits_processors(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        """logit_bias, min_tokens masking and penalties on a float32 copy of logits [B, V]."""
        states = _as_rows(rows)
        x = logits.to(torch.float32, copy=True)
        dev = x.device
        bias = [
            (i, t, b)
            for i, s in enumerate(states)
            if s.params.logit_bias
            for t, b in s.params.logit_bias.items()
        ]
        if bias:
            rows, cols = _rows_cols([(i, t) for i, t, _ in bias], dev)
            x.index_put_((rows, cols), _row_tensor([b for _, _, b in bias], dev), accumulate=True)
        masked = [
            (i, t)
            for i, s in enumerate(states)
            if s.num_output < s.params.min_tokens
            for t in s.state.all_stop_token_ids
        ]
        if masked:
            x.index_put_(_rows_cols(masked, dev), torch.full((), float("-inf"), device=dev))
        pen_rows = [i for i, s in enumerate(states) if s.params.has_penalties]
        if pen_rows:
            self._apply_penalties(x, pen_rows, states)
        _force_reasoning_end(x, states)
        apply_grammar_masks(x, states)  # last: nothing may re-enable a token the grammar forbids
        return x

    @staticmethod
    def _apply_penalties(x: torch.Tensor, rows: list[int], states: Sequence[SampleRow]) -> None:
        dev = x.device
        sts = [states[i] for i in rows]
        idx = to_device(rows, torch.long, dev)
        sub = x.index_select(0, idx)
        # counts[r, v] = occurrences of v in the output of row r
        counts = torch.zeros_like(sub)
        out_pairs = [(r, t) for r, s in enumerate(sts) for t in s.history()]
        if out_pairs:
            counts.index_put_(
                _rows_cols(out_pairs, dev), torch.ones(len(out_pairs), device=dev), accumulate=True
            )
        rep = [s.params.repetition_penalty for s in sts]
        if any(r != 1.0 for r in rep):
            seen = counts > 0
            for r, s in enumerate(sts):
                if rep[r] != 1.0 and len(s.state.prompt_token_ids):
                    seen[r].index_fill_(0, s.state.prompt_ids_on(dev), True)
            rp = _row_tensor(rep, dev)[:, None]
            # HF style: shrink positive logits, push negative ones further down.
            sub = torch.where(seen, torch.where(sub > 0, sub / rp, sub * rp), sub)
        freq = _row_tensor([s.params.frequency_penalty for s in sts], dev)[:, None]
        pres = _row_tensor([s.params.presence_penalty for s in sts], dev)[:, None]
        sub = sub - freq * counts - pres * (counts > 0).float()
        x.index_copy_(0, idx, sub)

    # ---- probabilities after temperature and the top-k / top-p / min-p filters ----------------------

    @staticmethod
    def filtered_probs(
        x: torch.Tensor, params: Sequence[SamplingParams], normalize: bool = True
    ) -> torch.Tensor:
        """Probabilities [B, V] for processed logits x: temperature, then exactly the allowed set of
        top-k (the k first in a stable descending sort: ties go to the lower token id), top-p (the
        smallest sorted prefix whose mass >= top_p, at least one token), min-p (p >= min_p * p_max).
        Greedy params are treated as temperature 1. With normalize=False the filtered rows are left
        unnormalised (sampling doesn't need it, and skipping it keeps a row's result independent of
        whether other rows in the batch needed filtering)."""
        dev, vocab = x.device, x.shape[1]
        temps = [1.0 if p.is_greedy else p.temperature for p in params]
        if any(t != 1.0 for t in temps):
            x = x / _row_tensor(temps, dev)[:, None]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        keep: torch.Tensor | None = None
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
            pos = torch.arange(vocab, device=dev)
            keep_sorted = pos[None, :] < to_device(top_k, torch.long, dev)[:, None]
            if any(p < 1.0 for p in top_p):
                sp = torch.softmax(sorted_x.masked_fill(~keep_sorted, float("-inf")), dim=-1)
                # mass strictly before each position; position 0 has 0 < top_p so is always kept
                before = torch.cumsum(sp, dim=-1)
                before = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1]], dim=-1)
                tp = _row_tensor(top_p, dev)[:, None]
                keep_sorted &= (before < tp) | (tp >= 1.0)
            keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
        probs = torch.softmax(x, dim=-1)
        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            # the most likely token always survives top-k/top-p, so p_max is the same before and after them
            pmax = probs.max(dim=-1, keepdim=True).values
            keep_m = probs >= _row_tensor(min_p, dev)[:, None] * pmax
            keep = keep_m if keep is None else keep & keep_m
        if keep is not None:
            probs = probs.masked_fill(~keep, 0.0)
            if normalize:
                probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs

    # ---- sampling ---------------------------------------------------------------------------------

    def sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> SamplerOutput:
        """logits [B, V] (one row per state) -> one token per row, plus the requested logprobs."""
        return self.sample_deferred(logits, rows).resolve()

    def sample_deferred(self, logits: torch.Tensor, rows: Sequence[Row]) -> "DeferredSample":
        """Enqueue sampling on the logits' device without waiting for it; `.resolve()` later gives the
        SamplerOutput (the only host sync). Lets the engine overlap CPU work with the GPU."""
        states = _as_rows(rows)
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [len(states), V], got {tuple(logits.shape)} for {len(states)} states"
            )
        dev = logits.device
        x = self.apply_logits_processors(logits, states)
        greedy = [s.params.is_greedy for s in states]
        tokens = x.argmax(dim=-1) if any(greedy) else None
        rand_rows = [i for i, g in enumerate(greedy) if not g]
        if rand_rows:
            all_random = len(rand_rows) == len(states)
            idx = to_device(rand_rows, torch.long, dev)
            xr = x if all_random else x.index_select(0, idx)
            rstates = [states[i] for i in rand_rows]
            probs = self.filtered_probs(xr, [s.params for s in rstates], normalize=False)
            q = torch.empty_like(probs).exponential_(generator=self.generator)
            for r, s in enumerate(rstates):
                gen = s.state.generator_at(dev, s.num_output)
                if gen is not None:
                    q[r].exponential_(generator=gen)
            # exponential_ may return exactly 0; keep p / q finite and 0 for masked tokens
            q.clamp_(min=torch.finfo(q.dtype).tiny)
            sampled = (probs / q).argmax(dim=-1)
            tokens = sampled if all_random else tokens.index_copy(0, idx, sampled)
        assert tokens is not None
        lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        raw = None
        if lp_rows:
            idx = to_device(lp_rows, torch.long, dev)
            raw = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
        return DeferredSample(tokens, raw, lp_rows, [states[i].params.logprobs for i in lp_rows], len(states))


class DeferredSample:
    """Sampled tokens still on the device, copied to pinned host memory asynchronously."""

    def __init__(self, tokens: torch.Tensor, raw: torch.Tensor | None, lp_rows: list[int], lp_k: list[int], n: int):
        self.tokens = tokens
        self._raw, self._lp_rows, self._lp_k, self._n = raw, lp_rows, lp_k, n
        if tokens.is_cuda:
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = tokens, None

    def resolve(self) -> SamplerOutput:
        if self._event is not None:
            self._event.synchronize()
        logprobs: list[LogprobsDict | None] = [None] * self._n
        if self._raw is not None:
            idx = torch.tensor(self._lp_rows, dtype=torch.long, device=self.tokens.device)
            chosen = self.tokens.index_select(0, idx)
            scores = score_logprobs(self._raw, chosen, max(self._lp_k, default=0))
            dicts = logprob_dicts(scores, 0, chosen.tolist(), self._lp_k)
            for i, d in zip(self._lp_rows, dicts):
                logprobs[i] = d
        return SamplerOutput(token_ids=self._host.tolist(), logprobs=logprobs, token_ids_tensor=self.tokens)

