"""The engine core: one loop of schedule -> forward -> sample -> update, emitting per-sequence deltas.

Used in process by the offline `LLM` and in its own process by the server. Detokenization and stop
strings are handled here (not in the HTTP front end) because a stop string must end the request — free
its pages — in the same step; the work is a few microseconds per token and overlaps the GPU under overlap
scheduling. See docs/design-notes.md.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from engine.block_pool import BlockPool
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens
from engine.distributed import (
    DistInfo,
    free_port,
    init_distributed,
    launched_by_torchrun,
    single_process,
)
from engine.device_copy import to_device
from engine.model_runner import PLACEHOLDER, StepLayout, prepare_step
from engine.model_worker import STOP, ModelWorker, leave_process_group, spawned_worker_main
from engine.outputs import LogprobsDict, RequestDelta
from engine.request import Request
from engine.sampler import DeferredSample, Sampler, SamplingState, compute_prompt_logprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, Scheduler
from engine.stop_strings import StopStringMatcher

log = logging.getLogger(__name__)


@dataclass
class _StepOutput:
    logits: torch.Tensor
    layout: StepLayout

    @property
    def sample_rows(self) -> list[int]:
        return self.layout.sample_rows

    @property
    def prompt_rows(self) -> list[tuple[int, int, int] | None]:
        return self.layout.prompt_rows


@dataclass
class _Launched:
    """A step whose forward (and sampling) has been enqueued on the device."""

    scheduled: list[ScheduledRequest]
    out: _StepOutput
    sample_idx: list[int]  # indices into `scheduled` of the requests that sample
    sampled: DeferredSample | None = None


@dataclass
class _SeqState:
    sampling: SamplingState
    detok: IncrementalDetokenizer
    stops: StopStringMatcher | None
    sent_prompt_logprobs: bool = False
    prompt_logprobs: list[LogprobsDict | None] | None = None


class EngineCore:
    def __init__(self, config: EngineConfig, dist_info: DistInfo | None = None) -> None:
        self.config = config
        self.model_config = config.model
        self.max_model_len = config.scheduler.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model.path)
        self._procs: list = []
        if dist_info is None:
            dist_info = self._start_ranks()
        self.dist = dist_info
        self.worker = ModelWorker(config, dist_info)
        self.device = self.worker.device
        self.block_size = config.cache.block_size
        self.pool = BlockPool(self.worker.num_blocks, self.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.pool)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self._requests: dict[str, list[Request]] = {}
        self._seq: dict[Request, _SeqState] = {}
        self._pending_deltas: list[RequestDelta] = []
        self._inflight: _Launched | None = None
        self.overlap = config.overlap_scheduling
        self.num_prompt_tokens_total = 0
        self.num_generated_tokens_total = 0
        log.info("KV cache: %d pages of %d tokens = %d tokens", self.pool.num_total, self.block_size,
                 self.kv_capacity_tokens)

    def _start_ranks(self) -> DistInfo:
        """TP > 1: join torchrun's group as rank 0, or spawn ranks 1..N-1 ourselves."""
        world = self.config.parallel.tensor_parallel_size
        if world == 1:
            return single_process()
        if launched_by_torchrun():
            info = init_distributed(world, self.config.device)
            if not info.is_driver:
                raise RuntimeError("EngineCore runs on rank 0 only; other ranks run ModelWorker.serve_forever()")
            return info
        if torch.distributed.is_initialized():
            raise RuntimeError(
                "a torch.distributed process group already exists in this process (an earlier tensor-parallel LLM "
                "that was not shut down, or the caller's own); call llm.shutdown() first, or launch with torchrun"
            )
        port = int(os.environ.get("GLINT_DIST_PORT") or free_port())  # default: a free port (many instances/host)
        init_method = f"tcp://127.0.0.1:{port}"
        ctx = mp.get_context("spawn")
        for rank in range(1, world):
            p = ctx.Process(target=spawned_worker_main, args=(rank, world, init_method, self.config), daemon=True)
            p.start()
            self._procs.append(p)
        return init_distributed(world, self.config.device, rank=0, init_method=init_method)

    def shutdown(self) -> None:
        """Stop the TP ranks this engine spawned and leave the process group. Under torchrun the other ranks
        are the user's processes: they serve only inside generate() calls, so there is nothing to stop."""
        if not self._procs:
            return
        procs, self._procs = self._procs, []
        all_alive = all(p.is_alive() for p in procs)
        left = False
        try:
            if all_alive:
                self.worker.send_control(STOP)
                # NCCL's group teardown waits for every rank: leave together with the ranks, then reap them
                # (leaving after the join cost the join's full 30 s timeout on 2x H200).
                left = True
                leave_process_group(self.worker)
        except RuntimeError:
            all_alive = False  # a rank went away meanwhile: the others cannot finish the collective either
        finally:
            for p in procs:
                p.join(timeout=30 if all_alive else 1)
                if p.is_alive():
                    p.kill()
                    p.join(5)
            if not left:
                leave_process_group(self.worker)  # also after a dead rank: a stale group would hang the next engine
            self.dist = single_process()

    def _check_ranks_alive(self) -> None:
        for rank, p in enumerate(self._procs, start=1):
            if p.exitcode is not None:
                raise RuntimeError(f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.pool.num_total * self.block_size

    # -- requests -----------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> None:
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one prompt token is required")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids contains ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        params.verify_token_ids(vocab)
        n_prompt = len(prompt_token_ids)
        room = self.max_model_len - n_prompt
        if room < 1:
            raise ValueError(
                f"prompt is too long: {n_prompt} tokens leave no room in the model's context of "
                f"{self.max_model_len} tokens (context_length_exceeded)"
            )
        if params.max_tokens is None:
            max_tokens = room
        elif params.max_tokens > room:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {n_prompt} tokens exceeds the model's context "
                f"of {self.max_model_len} tokens"
            )
        else:
            max_tokens = params.max_tokens
        if params.min_tokens > max_tokens:
            raise ValueError(f"min_tokens={params.min_tokens} exceeds the {max_tokens} tokens that fit")
        seqs = []
        for index in range(params.n):
            req = Request(request_id, index, prompt_token_ids, params, max_tokens, prompt=prompt)
            sampling = SamplingState(
                params, prompt_token_ids, req.output_token_ids, self.model_config.eos_token_ids, seed_offset=index,
            )
            detok = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens,
            )
            stops = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
            self._seq[req] = _SeqState(sampling, detok, stops)
            seqs.append(req)
            self.scheduler.add(req)
        self._requests[request_id] = seqs
        self.num_prompt_tokens_total += n_prompt

    def abort_request(self, request_id: str) -> None:
        for req in self._requests.get(request_id, []):
            if not req.is_finished:
                self.scheduler.finish(req, "abort")
                self._pending_deltas.append(self._delta(req, [], "", None, finished=True))
        self._forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    def _forget(self, request_id: str) -> None:
        for req in self._requests.pop(request_id, []):
            self._seq.pop(req, None)

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """One engine step. With overlap scheduling the step launched here is finished by the next call:
        this call plans and launches step N+1, then processes step N's tokens while the device runs N+1."""
        deltas, self._pending_deltas = self._pending_deltas, []
        sched = self.scheduler.schedule()
        launched = self._launch(sched.scheduled) if not sched.is_empty else None
        if self._inflight is not None:
            deltas += self._finish(self._inflight)
            self._inflight = None
        if launched is not None:
            self._sample(launched)
            if self.overlap:
                self._inflight = launched
                for k, i in enumerate(launched.sample_idx):  # let the scheduler plan past unknown tokens
                    req = launched.scheduled[i].request
                    if not req.is_finished:
                        req.output_token_ids.append(PLACEHOLDER)
                        req.extra["future_row"] = k
            else:
                deltas += self._finish(launched)
        for rid in {d.request_id for d in deltas if d.finished}:
            if all(r.is_finished for r in self._requests.get(rid, [])):
                self._forget(rid)
        return deltas

    def _launch(self, scheduled: list[ScheduledRequest]) -> _Launched:
        prev = self._inflight.sampled if self._inflight is not None and self._inflight.sampled else None
        inputs, layout = prepare_step(scheduled, self.block_size, prev.tokens.numel() if prev else 0)
        self._check_ranks_alive()
        try:
            logits = self.worker.execute(inputs, prev.tokens if prev else None)
        except RuntimeError as exc:
            if self.dist.world_size == 1:
                raise
            raise RuntimeError(f"tensor-parallel step failed (a rank died or a collective timed out): {exc}") from exc
        for s in scheduled:
            self.scheduler.advance(s)
        sample_idx = [i for i, r in enumerate(layout.sample_rows) if r >= 0]
        return _Launched(scheduled, _StepOutput(logits, layout), sample_idx)

    def _sample(self, step: _Launched) -> None:
        if not step.sample_idx:
            return
        out = step.out
        rows = to_device([out.sample_rows[i] for i in step.sample_idx], torch.long, out.logits.device)
        states = [self._seq[step.scheduled[i].request].sampling for i in step.sample_idx]
        step.sampled = self.sampler.sample_deferred(out.logits.index_select(0, rows), states)

    def _finish(self, step: _Launched) -> list[RequestDelta]:
        """Host side of a step: tokens, prompt logprobs, stop checks, prefix-cache pages, deltas."""
        deltas = []
        sampled = step.sampled.resolve() if step.sampled is not None else None
        by_sched = {i: k for k, i in enumerate(step.sample_idx)}
        for i, s in enumerate(step.scheduled):
            req = s.request
            if req.is_finished:  # aborted, or finished by the previous step while this one was in flight
                continue
            self._collect_prompt_logprobs(req, step.out, i)
            # publish before the new token can finish the request (a finished request's pages are released
            # unpublished, and a one-token request would never feed the prefix cache)
            self.scheduler.publish_blocks(req)
            if i in by_sched:
                k = by_sched[i]
                deltas.append(self._append_token(req, sampled.token_ids[k], sampled.logprobs[k]))
        return deltas

    def _collect_prompt_logprobs(self, req: Request, out, i: int) -> None:
        pr = out.prompt_rows[i]
        if pr is None:
            return
        first_row, first_target, count = pr
        st = self._seq[req]
        targets = req.prompt_token_ids[first_target : first_target + count]
        dicts = compute_prompt_logprobs(
            out.logits[first_row : first_row + count], targets, req.params.prompt_logprobs
        )
        decode_logprob_tokens(self.tokenizer, dicts)
        if st.prompt_logprobs is None:
            st.prompt_logprobs = [None]
        st.prompt_logprobs.extend(dicts)
        req.prompt_logprobs_upto = first_target + count

    def _append_token(self, req: Request, token: int, logprobs: LogprobsDict | None) -> RequestDelta:
        st = self._seq[req]
        if req.output_token_ids and req.output_token_ids[-1] == PLACEHOLDER:
            req.output_token_ids[-1] = token
        else:
            req.output_token_ids.append(token)
        self.num_generated_tokens_total += 1
        if logprobs is not None and req.params.detokenize:
            decode_logprob_tokens(self.tokenizer, [logprobs])
        text = st.detok.add_tokens([token]) if req.params.detokenize else ""
        n_out = len(req.output_token_ids)
        past_min = n_out >= req.params.min_tokens
        reason, stop_reason = None, None
        if token in st.sampling.all_stop_token_ids and past_min:
            reason = "stop"
            # vLLM reports the token id only for stop_token_ids, not for the model's own EOS.
            stop_reason = token if token in req.params.stop_token_ids else None
            if not req.params.include_stop_str_in_output and text:
                # The stop token's own text (visible with skip_special_tokens=False) is not output.
                tok_text = self.tokenizer.decode([token], skip_special_tokens=req.params.skip_special_tokens)
                if tok_text and text.endswith(tok_text):
                    text = text[: -len(tok_text)]
        use_stops = st.stops is not None and past_min
        if use_stops:
            text, matched = st.stops.feed(text)
            if matched is not None and reason is None:
                reason, stop_reason = "stop", matched
        if reason is None and n_out >= req.max_tokens:
            reason = "length"
        if reason is not None and not isinstance(stop_reason, str) and req.params.detokenize:
            tail = st.detok.flush()
            if use_stops:
                emit, matched = st.stops.feed(tail)
                text += emit if matched is not None else emit + st.stops.flush()
            else:
                text += tail
        if reason is not None:
            self.scheduler.finish(req, reason, stop_reason)
        return self._delta(req, [token], text, None if logprobs is None else [logprobs], finished=reason is not None)

    def _delta(
        self, req: Request, tokens: list[int], text: str, logprobs: list[LogprobsDict] | None, finished: bool
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
            finish_reason=req.finish_reason if finished else None,
            stop_reason=req.stop_reason if finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
        )

    # -- introspection ------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        s = self.scheduler.stats()
        s.update(
            prefix_cache_hit_tokens=self.pool.hit_tokens,
            prefix_cache_queried_tokens=self.pool.queried_tokens,
            free_kv_blocks=self.pool.num_free,
            cached_kv_blocks=self.pool.num_cached,
            used_kv_blocks=self.pool.num_used,
            total_kv_blocks=self.pool.num_total,
            kv_capacity_tokens=self.kv_capacity_tokens,
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generated_tokens_total=self.num_generated_tokens_total,
        )
        return s

    def check_invariants(self) -> None:
        """Page accounting: pool invariants, waiting requests hold nothing, every used page is held."""
        self.pool.check_invariants()
        assert all(not r.block_ids for r in self.scheduler.waiting), "a waiting request holds pages"
        refs: dict[int, int] = {}
        for r in self.scheduler.running:
            for pid in r.block_ids:
                refs[pid] = refs.get(pid, 0) + 1
        for page in self.pool.pages:
            assert page.ref_count == refs.get(page.id, 0), f"page {page.id} ref_count {page.ref_count} != holders"
