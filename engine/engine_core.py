"""The engine core: one loop of draft -> schedule -> forward -> sample -> verify -> output, emitting
per-sequence deltas.

Used in process by the offline `LLM` and in its own process by the server. A step returns, per scheduled
request, a variable number of logits rows (a prompt chunk yields none or its last; a decode one; a verify
step with k drafts k + 1), the sampler samples every row with the request's own parameters, `spec/` verifies
the drafts against them, and the emitted tokens (one, or the accepted drafts plus the bonus token) go through
one output path (engine/output_processor.py). Detokenization and stop strings are handled there, in the engine
(not the HTTP front end), because a stop string must end the request — free its pages — in the same step.

Fault isolation: an exception while serving one request (drafting, sampling, verifying, detokenizing, stop
checks) fails that request only — finish_reason "error", its pages freed — and every other request goes on.
An exception in the forward itself (a dead TP rank, a device error) is not per request and propagates.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoTokenizer

from engine.allocator_events import allocator_events, events_since
from engine.block_pool import BlockPool
from engine.block_tables import page_array
from engine.config import EngineConfig
from engine.device_copy import to_device
from engine.distributed import DistInfo, single_process
from engine.gc_control import GcPauses
from engine.kv_connector import DisaggParams, KVConnector, KVSend
from engine.model_runner import StepLayout, prepare_step
from engine.model_worker import STOP, ModelWorker, leave_process_group
from engine.output_processor import OutputProcessor
from engine.outputs import LogprobsDict, RequestDelta
from engine.logprobs import LogprobScores
from engine.rank_launcher import check_ranks_alive, start_ranks, stop_ranks
from engine.request import Request, Status
from engine.request_validation import check_request
from engine.sampler import DeferredSample, SampleRow, Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledRequest, Scheduler
from engine.step_accounting import ModelFootprint, StepAccounting
from spec import DraftSlot, Drafter, MtpCalls, SpecStats, StepTiming, StepView, build_drafter

log = logging.getLogger(__name__)

SLOW_STEP_S = 1.0  # a step() call this long is logged (a compile of a new kernel variant, a stalled peer)
IDLE_TIMING_EVERY = 8  # while the drafter is idle, one decode step in this many still goes to its wall clock


@dataclass
class _Launched:
    """A step whose forward has been enqueued on the device (and, once sampled, its sampling)."""

    scheduled: list[ScheduledRequest]
    logits: torch.Tensor
    layout: StepLayout
    prompt_scores: LogprobScores | None = None  # the forward's scores of its prompt-logprob rows
    first_row: dict[int, int] = field(default_factory=dict)  # scheduled index -> its first sampled row
    sampled: DeferredSample | None = None
    table_writes: list[tuple[int, int]] = field(default_factory=list)  # (slot, position) per sampled row
    kv_sends: list[KVSend] = field(default_factory=list)  # disaggregated prefill: pages this step completes
    keeps_hidden: bool = False  # the forward kept its hidden states for the drafter's after_step (MTP)
    overlapped: bool = False  # finished by the next step (overlap scheduling): its tokens are pending meanwhile


class EngineCore:
    def __init__(
        self, config: EngineConfig, dist_info: DistInfo | None = None, kv_connector: KVConnector | None = None
    ) -> None:
        self.config = config
        self.model_config = config.model
        self.max_model_len = config.scheduler.max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model.path)
        self._procs: list = []
        kv_worker_factory = kv_connector.worker_factory() if kv_connector is not None else None
        if dist_info is None:
            dist_info, self._procs = start_ranks(config, kv_worker_factory)
        self.dist = dist_info
        self.worker = ModelWorker(config, dist_info, kv_worker_factory)
        self.device = self.worker.device
        self.block_size = config.cache.block_size
        self.pool = BlockPool(self.worker.num_blocks, self.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.pool)
        self.sampler = Sampler(torch.Generator(device=self.device).manual_seed(config.seed))
        self.outputs = OutputProcessor(self.tokenizer, self.model_config.eos_token_ids)
        self.drafter: Drafter | None = build_drafter(
            config.speculative, self.block_size,
            MtpCalls(self.worker.execute_mtp, self.worker.mtp_graph_rows, self.worker.execute_mtp_draft),
            self.worker.measured_step_costs(),
            learn_wall_clock=self.device.type == "cuda")  # on CPU the configured costs: deterministic tests
        self.spec_stats = SpecStats()
        self.connector = kv_connector
        if kv_connector is not None:
            kv_connector.bind(self.scheduler, self.pool, self.worker)
        self._siblings: dict[str, list[Request]] = {}  # disaggregated decode, n > 1: started once choice 0 is
        self._requests: dict[str, list[Request]] = {}
        self._pending_deltas: list[RequestDelta] = []
        # disaggregated prefill with MTP: requests whose first token ended them, kept alive until the NextN
        # extend has written their last chunk's NextN KV (it ships with the pages)
        self._ending: list[tuple[Request, str, int | str | None]] = []
        self._inflight: _Launched | None = None
        self._seq_keys = itertools.count()
        self.overlap = config.overlap_scheduling
        self.num_overlapped_steps = 0
        self.num_slow_steps = 0  # step() calls longer than SLOW_STEP_S (logged)
        self._allocator_seen = allocator_events(self.device)  # the counters at start-up, then at the last slow step
        self._idle_untimed = 0  # decode steps since the last one timed while the drafter was idle
        self.num_prompt_tokens_total = 0
        self.num_failed_requests = 0
        log.info("KV cache: %d pages of %d tokens = %d tokens", self.pool.num_total, self.block_size,
                 self.kv_capacity_tokens)
        self.step_accounting = StepAccounting(ModelFootprint.of(
            self.worker.model, self.worker.runner.kv_caches, self.block_size, config.model))
        self.gc_pauses = GcPauses()  # the process that serves freezes its start-up heap (server/engine_process.py)

    def shutdown(self, stop_torchrun_ranks: bool = False) -> None:
        """Stop the TP ranks this engine spawned and leave the process group. Ranks started by torchrun are
        the user's processes: an offline script's ranks serve only inside generate() (nothing to stop); a
        server's ranks serve until told, so the server passes stop_torchrun_ranks=True."""
        self.gc_pauses.close()
        if self._procs:
            procs, self._procs = self._procs, []
            stop_ranks(self.worker, procs)
            self.dist = single_process()
        elif stop_torchrun_ranks and self.dist.world_size > 1:
            self.worker.send_control(STOP)
            leave_process_group(self.worker)  # the ranks leave now too; NCCL's teardown waits for every rank
            self.dist = single_process()

    def info(self) -> dict[str, Any]:
        """What a front end needs to know about the loaded engine."""
        return {
            "max_model_len": int(self.max_model_len),
            "max_num_seqs": int(self.config.scheduler.max_num_seqs),
            "vocab_size": int(self.model_config.vocab_size),
            "eos_token_ids": list(self.model_config.eos_token_ids),
            "speculative_method": self.config.speculative.method if self.config.speculative else None,
            "disaggregation": self.connector.info() if self.connector is not None else None,
            "stats": self.stats(),
        }

    def wake_sockets(self) -> list[Any]:
        """Sockets whose messages must wake an idle serving loop (disaggregation's handshake socket)."""
        return self.connector.wake_sockets() if self.connector is not None else []

    def check_health(self) -> None:
        """Raise RuntimeError if a tensor-parallel rank this engine spawned has exited (the server calls this
        while idle, so a dead rank is noticed before the next step needs it), or if the ranks are out of lock step
        (rank 0 failed inside a step that the others run)."""
        check_ranks_alive(self._procs)
        self.worker.check_lock_step()

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
        tenant: str = "",
        disagg: DisaggParams | None = None,
    ) -> None:
        """tenant scopes cross-request state (the suffix decoder's global tree): the API key, "" offline.
        disagg: the handover of a disaggregated instance (from the router); required there, refused elsewhere."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_token_ids = list(map(int, prompt_token_ids))  # a 37K-token prompt: ~2x a list comprehension
        max_tokens = check_request(prompt_token_ids, params, self.model_config.vocab_size, self.max_model_len)
        self._check_disagg(params, disagg)
        seqs = []
        for index in range(params.n):
            req = Request(request_id, index, prompt_token_ids, params, max_tokens, prompt=prompt,
                          seq_key=next(self._seq_keys), tenant=tenant)
            self.outputs.add(req)
            if self.drafter is not None:
                self.drafter.add(req.seq_key, prompt_token_ids, tenant)
            seqs.append(req)
        self._requests[request_id] = seqs
        if disagg is None:
            for req in seqs:
                self.scheduler.add(req)
        else:
            try:
                self._add_disaggregated(seqs, disagg)
            except Exception:  # the connector refused it (e.g. its room is in use): nothing of it stays
                self._discard(request_id)
                raise
        self.num_prompt_tokens_total += len(prompt_token_ids)

    def _check_disagg(self, params: SamplingParams, disagg: DisaggParams | None) -> None:
        if self.connector is None:
            if disagg is not None:
                raise ValueError("this engine is not a disaggregated instance (disaggregation_mode is 'null')")
            return
        if disagg is None:
            raise ValueError(f"a disaggregated {self.connector.mode} instance serves only requests routed to it "
                             "(python -m disagg.router), which carry a handover room")
        if params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported with prefill/decode disaggregation")

    def _add_disaggregated(self, seqs: list[Request], disagg: DisaggParams) -> None:
        """Choice 0 goes to the connector (handshake, then prefill here or KV from the prefill instance). The
        prefill side computes one first token, so choices 1.. end at once there; on the decode side they start
        once choice 0's KV has arrived (its full prompt pages are then prefix-cache hits)."""
        for req in seqs:
            req.status = Status.HANDSHAKE
        head, rest = seqs[0], seqs[1:]
        if self.connector.mode == "prefill":
            head.max_tokens = 1
        self.connector.add(head, disagg)  # first: it may refuse the request
        if self.connector.mode == "prefill":
            for req in rest:
                self._end(req, "length")
                self._pending_deltas.append(self.outputs.delta(req, [], "", None, True, "length"))
        elif rest:
            self._siblings[head.request_id] = rest

    def abort_request(self, request_id: str) -> None:
        for req in self._requests.get(request_id, []):
            if not req.is_finished:
                self._end(req, "abort")
                self._pending_deltas.append(self.outputs.delta(req, [], "", None, True, "abort"))
        self._forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or self._inflight is not None
                or (self.connector is not None and self.connector.has_work()))

    def _discard(self, request_id: str) -> None:
        """Undo add_request for a request that never started (nothing holds pages or a seat yet)."""
        for req in self._requests.get(request_id, []):
            if self.drafter is not None:
                self.drafter.finish(req.seq_key, completed=False)
        self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._siblings.pop(request_id, None)
        for req in self._requests.pop(request_id, []):
            self.outputs.remove(req)

    def _end(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if self.connector is not None and reason in ("abort", "error"):
            self.connector.abort(req)  # before the pages go: the connector keeps those a transfer may touch
        self.scheduler.finish(req, reason, stop_reason)
        if self.drafter is not None:
            self.drafter.finish(req.seq_key, completed=reason in ("stop", "length"))

    def _fail(self, req: Request, stage: str, exc: BaseException) -> RequestDelta:
        """One request failed: end it (pages freed) and tell its client; the engine goes on."""
        log.error("request %s failed while %s: %r", req.seq_id, stage, exc, exc_info=exc)
        self.num_failed_requests += 1
        if not req.is_finished:
            self._end(req, "error")
        return self.outputs.delta(req, [], "", None, True, "error", error=f"{stage} failed: {exc}")

    # -- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestDelta]:
        """One engine step. With overlap scheduling the step launched here is finished by the next call:
        this call plans and launches step N+1, then processes step N's tokens while the device runs N+1."""
        started = time.perf_counter()
        timed: _Launched | None = None  # a decode-only step launched here: this call's duration prices it
        deltas, self._pending_deltas = self._pending_deltas, []
        deltas += self._poll_connector()
        drafting = self.drafter is not None and not self.drafter.idle  # idle: no request can draft (MTP, retired)
        if drafting:
            if self._inflight is not None and self.drafter.wants_sync():
                deltas += self._finish(self._inflight)  # it may draft: every request's tokens on the host first
                self._post_sends(self._inflight)  # as the step's own finish below would (disaggregated prefill)
                self._inflight = None
            if self._inflight is None:
                deltas += self._propose_drafts()
        sched = self.scheduler.schedule()
        launched = self._launch(sched.scheduled) if not sched.is_empty else None
        if self._inflight is not None:
            deltas += self._finish(self._inflight)
            self._post_sends(self._inflight)
            self._inflight = None
        if launched is not None:
            # a verify step is never left in flight: the next step's positions depend on what it accepts; nor
            # one whose hidden states the drafter reads right after it (MTP), nor one whose KV writes must be
            # posted before the next step's kernels (disaggregation, async_last_chunk_sync)
            launched.overlapped = (self.overlap and not launched.keeps_hidden
                                   and not any(s.num_drafts for s in launched.scheduled)
                                   and not (launched.kv_sends and self.connector.posts_before_next_step(
                                       launched.kv_sends)))
            deltas += self._sample(launched)
            if self._prices_step(drafting) and all(s.num_tokens - s.num_drafts == 1 for s in launched.scheduled):
                timed = launched
            if launched.overlapped:
                self.num_overlapped_steps += 1
                self._inflight = launched
            else:
                deltas += self._finish(launched)
                deltas += self._after_step(launched)
                deltas += self._hand_over_ending()
                self._post_sends(launched)
        elif self._inflight is None and self.connector is not None and not deltas:
            self.connector.wait(0.002)  # only handovers in flight: wait for the peer, do not spin
        for rid in {d.request_id for d in deltas if d.finished}:
            if all(r.is_finished for r in self._requests.get(rid, [])):
                self._forget(rid)
        took = time.perf_counter() - started
        if launched is not None:
            self.step_accounting.record(launched.scheduled, took)
        if timed is not None:
            self._time_step(timed, 1000 * took)
        if took > SLOW_STEP_S:
            self.num_slow_steps += 1
            seen, self._allocator_seen = self._allocator_seen, allocator_events(self.device)
            moved = events_since(seen, self._allocator_seen)
            log.warning("slow step: %.2f s for %d tokens of %d requests%s", took,
                        sum(s.num_tokens for s in sched.scheduled), len(sched.scheduled),
                        f" (CUDA allocator since the last slow step: {moved})" if moved else "")
        return deltas

    def _prices_step(self, drafting: bool) -> bool:
        """Whether this step's duration goes to the drafter's wall clock: every step while it drafts; while it is
        idle (MTP, every request retired) one in IDLE_TIMING_EVERY, which keeps its price of a plain step (what
        admission weighs the chain against) fresh at a fraction of the per-step cost."""
        if self.drafter is None:
            return False
        self._idle_untimed = 0 if drafting else (self._idle_untimed + 1) % IDLE_TIMING_EVERY
        return drafting or self._idle_untimed == 0

    def _time_step(self, step: _Launched, call_ms: float) -> None:
        """A decode-only step to the drafter's wall-clock model, priced by the step() call that launched it: an
        overlapped step's call also finishes the step before it (in steady state, one step's cycle); a synchronous
        one's holds its whole verify and drafting. What the caller does between calls (a server's loop, a
        benchmark driver tokenizing its next turn) is not part of any kind of step, so it is not counted."""
        drafts = sum(s.num_drafts for s in step.scheduled)
        self.drafter.observe_step(StepTiming(
            num_seqs=len(step.scheduled), rows=len(step.scheduled) + drafts, drafted=drafts > 0, chain=False,
            plain=step.overlapped, wall_ms=call_ms))

    def _poll_connector(self) -> list[RequestDelta]:
        """Disaggregation: admit requests whose handshake is done (prefill), start those whose KV arrived
        (decode), fail those whose handover failed."""
        if self.connector is None:
            return []
        update = self.connector.poll()
        deltas = []
        for req in update.admit:
            req.status = Status.WAITING
            self.scheduler.add(req)
        for req, token, logprobs, drafts in update.arrived:
            try:
                deltas.append(self._start_decoding(req, token, logprobs, drafts))
            except Exception as exc:
                deltas += self._fail_with_siblings(req, "starting to decode", exc)
        for req, reason in update.failed:
            deltas += self._fail_with_siblings(req, "the prefill/decode handover", RuntimeError(reason))
        return deltas

    def _fail_with_siblings(self, req: Request, stage: str, exc: BaseException) -> list[RequestDelta]:
        """Decode side: choice 0's handover failed; choices 1.., which start only after it, fail with it."""
        return [self._fail(r, stage, exc) for r in [req] + self._siblings.pop(req.request_id, [])]

    def _start_decoding(
        self, req: Request, token: int, logprobs: LogprobsDict | None, drafts: tuple[int, ...] = ()
    ) -> RequestDelta:
        """Decode side: the prompt's KV and the first token (and MTP's first drafts) came from the prefill
        instance."""
        self.scheduler.start_after_transfer(req)
        out = self.outputs.append(req, [token], [logprobs])
        self.scheduler.publish_blocks(req)
        if self.drafter is not None:
            self.drafter.accepted(req.seq_key, [token][: out.num_tokens])
            if drafts:
                self.drafter.handed_over(req.seq_key, drafts)
        if out.finish_reason is not None:
            self._end(req, out.finish_reason, out.stop_reason)
        for sibling in self._siblings.pop(req.request_id, []):
            sibling.status = Status.WAITING
            self.scheduler.add(sibling)
        return out.delta

    def _propose_drafts(self) -> list[RequestDelta]:
        """Ask the drafter for draft tokens for every decoding request (capped by max_tokens and context)."""
        if self.drafter is None:
            return []
        items: list[tuple[Request, DraftSlot]] = []
        for req in self.scheduler.running:
            req.draft_token_ids = []
            if req.num_tokens - req.num_computed_tokens != 1:
                continue  # still prefilling
            room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens) - 1
            if room >= 1:
                items.append((req, DraftSlot(req.seq_key, room)))
        items, drafts, deltas = self._isolating(
            "drafting", items, lambda its: self.drafter.propose([slot for _, slot in its]), lambda it: it[0])
        vocab = self.model_config.vocab_size
        for (req, slot), draft in zip(items, drafts or []):
            req.draft_token_ids = [int(t) for t in draft[: slot.max_drafts] if 0 <= t < vocab]
        return deltas

    def _isolating(self, stage: str, items: list, fn: Callable[[list], Any], request_of: Callable[[Any], Request]):
        """fn(items) for the whole batch; if it raises, fail the requests whose own call raises and run fn on
        the rest. Returns (items kept, fn's result on them, the failures' deltas)."""
        try:
            return items, fn(items), []
        except Exception:
            kept, deltas = [], []
            for item in items:
                try:
                    fn([item])
                    kept.append(item)
                except Exception as exc:
                    deltas.append(self._fail(request_of(item), stage, exc))
            return kept, (fn(kept) if kept else None), deltas

    def _graph_rows(self, scheduled: list[ScheduledRequest]) -> int:
        """Rows per request to pad a verify step to for a captured CUDA graph (0: run as it is)."""
        if not any(s.num_drafts for s in scheduled):
            return 0
        if any(s.num_tokens - s.num_drafts != 1 or not s.samples for s in scheduled):
            return 0  # a prefill chunk in the step: eager
        q = self.worker.graph_rows_for(len(scheduled), 1 + max(s.num_drafts for s in scheduled))
        # a request's rows sit at positions start .. start + q - 1, fillers included: none may pass the context's
        # end (the RoPE table and the graph's block tables end there); such a step runs eagerly
        if any(s.start + q > self.max_model_len for s in scheduled):
            return 0
        return q

    def _launch(self, scheduled: list[ScheduledRequest]) -> _Launched:
        prev = self._inflight
        inputs, layout = prepare_step(scheduled, self.block_size, self._graph_rows(scheduled))
        inputs.keep_hidden = self.drafter is not None and not self.drafter.idle and self.drafter.any_needs_hidden(
            s.request.seq_key for s in scheduled)
        if prev is not None and prev.sampled is not None:
            inputs.table_writes = prev.table_writes
        kv_sends = self.connector.plan_sends(scheduled) if self.connector is not None else []
        if kv_sends and not inputs.keep_hidden:
            # async transfer: every rank sends its shard once the forward has run (a CUDA event recorded after
            # it); with MTP the NextN layer writes its KV of these pages later (the extend): they go after that
            rides = [self.connector.rides_on_step(s) for s in kv_sends]
            inputs.kv_sends = [s for s, r in zip(kv_sends, rides) if r]
            kv_sends = [s for s, r in zip(kv_sends, rides) if not r]
        check_ranks_alive(self._procs)
        try:
            out = self.worker.execute(inputs, prev.sampled.tokens if inputs.table_writes else None)
        except RuntimeError as exc:
            if self.dist.world_size == 1:
                raise
            raise RuntimeError(f"tensor-parallel step failed (a rank died or a collective timed out): {exc}") from exc
        for s in scheduled:
            self.scheduler.advance(s)
        return _Launched(scheduled, out.logits, layout, out.prompt_scores, kv_sends=kv_sends,
                         keeps_hidden=inputs.keep_hidden)

    def _sample(self, step: _Launched) -> list[RequestDelta]:
        """Enqueue sampling of every sampled row (k + 1 per verify) of the requests still running."""
        items = [(i, s) for i, s in enumerate(step.scheduled) if step.layout.sample_rows[i] and not s.request.is_finished]

        def sample(its: list[tuple[int, ScheduledRequest]]) -> DeferredSample:
            index, rows = [], []
            for i, s in its:
                state = self.outputs.sampling_state(s.request)
                index += step.layout.sample_rows[i]
                rows += [SampleRow(state, tuple(s.drafts[:j])) for j in range(s.num_drafts + 1)]
            index_t = to_device(index, torch.long, step.logits.device)
            return self.sampler.sample_deferred(step.logits.index_select(0, index_t), rows)

        items, step.sampled, deltas = self._isolating("sampling", items, sample, lambda it: it[1].request)
        row = 0
        for i, s in items:
            step.first_row[i] = row
            row += s.num_drafts + 1
            if step.overlapped:  # the token this step samples is the next step's input: counted as pending
                s.request.num_pending_tokens += 1
                step.table_writes.append((s.request.table_slot, s.end))
        return deltas

    def _finish(self, step: _Launched) -> list[RequestDelta]:
        """Host side of a step: verify, emit tokens, roll back rejected drafts, prefix-cache pages, deltas."""
        deltas = []
        sampled = step.sampled.resolve() if step.sampled is not None else None
        # an idle MTP drafter learns nothing from tokens: a plain engine's per-token host work while it is idle
        tell = self.drafter is not None and (self.drafter.follows_tokens or not self.drafter.idle)
        for i, s in enumerate(step.scheduled):
            req = s.request
            if req.is_finished:  # aborted or failed, or finished by the previous step while this one was in flight
                continue
            try:
                pr = step.layout.prompt_rows[i]
                if pr is not None:
                    self.outputs.collect_prompt_logprobs(req, step.prompt_scores, pr)
                if i not in step.first_row:
                    self.scheduler.publish_blocks(req)
                    continue
                deltas.append(self._emit(req, s, sampled.token_ids, sampled.logprobs, step.first_row[i],
                                         step.overlapped, tell))
            except Exception as exc:
                deltas.append(self._fail(req, "processing its output", exc))
        if not step.keeps_hidden:  # no NextN extend follows this step (MTP idle or every request retired), and
            deltas += self._hand_over_ending()  # an overlapped step is finished where none runs after: hand over now
        return deltas

    def _emit(
        self, req: Request, s: ScheduledRequest, tokens: list[int], logprobs: list[LogprobsDict | None], row: int,
        overlapped: bool, tell_drafter: bool,
    ) -> RequestDelta:
        if overlapped:
            req.num_pending_tokens -= 1
        chain = tokens[row : row + s.num_drafts + 1]
        emitted = self.drafter.verify(s.drafts, chain) if s.num_drafts else chain
        accepted = len(emitted) - 1
        self.spec_stats.record(s.num_drafts, accepted)
        out = self.outputs.append(req, emitted, logprobs[row : row + len(emitted)])
        if self.connector is not None and self.connector.mode == "prefill" and out.num_tokens:
            self.connector.first_token(req, emitted[0], logprobs[row])
        if s.num_drafts:  # keep the KV of the accepted drafts only (a length cut)
            self.scheduler.commit(req, s.end - s.num_drafts + accepted)
        self.scheduler.publish_blocks(req)  # pages full of accepted tokens, before finishing releases them
        if tell_drafter:
            self.drafter.accepted(req.seq_key, emitted[: out.num_tokens])
        if out.finish_reason is not None:
            if self._nextn_kv_ships:
                self._ending.append((req, out.finish_reason, out.stop_reason))
            else:
                self._end(req, out.finish_reason, out.stop_reason)
        return out.delta

    @property
    def _nextn_kv_ships(self) -> bool:
        return (self.connector is not None and self.connector.mode == "prefill" and self.drafter is not None
                and self.drafter.needs_target_hidden)

    def _hand_over_ending(self) -> list[RequestDelta]:
        """Disaggregated prefill with MTP: end the requests their first token ended, now that the NextN extend
        wrote their last chunk's KV; their drafts go to the decode side with the first token. A request whose
        drafting fails fails alone."""
        ending, self._ending = self._ending, []
        failed = []
        for req, reason, stop in ending:
            if req.is_finished:
                continue
            try:
                drafts = self.drafter.propose([DraftSlot(req.seq_key, self.config.speculative.num_speculative_tokens)])
                self.connector.first_drafts(req, tuple(drafts[0]))
            except Exception as exc:
                failed.append(self._fail(req, "drafting its first decode step", exc))
                continue
            self._end(req, reason, stop)
        return failed

    def _post_sends(self, step: _Launched) -> None:
        """Disaggregated prefill: the pages this step completed, once everything that writes them (the target
        forward, and the NextN extend with MTP) is enqueued; sends that rode on the step's inputs are gone."""
        if step.kv_sends:
            self.connector.after_step(step.kv_sends)

    def _after_step(self, step: _Launched) -> list[RequestDelta]:
        """Tell a drafter that reads the target's hidden states (MTP) what the step computed and kept, with
        pages reserved for the next verify chain; it drafts the next step's tokens now."""
        if self.drafter is None or not step.keeps_hidden:
            return []
        views, reqs = [], []
        handing_over = {id(r) for r, _, _ in self._ending}  # their drafts are for the decode side's first step
        for i, s in enumerate(step.scheduled):
            req = s.request
            kept_end = req.num_computed_tokens
            if (req.is_finished or kept_end <= s.start or req.num_known_tokens <= kept_end
                    or not self.drafter.needs_hidden(req.seq_key)):
                continue
            drafts = 0
            if req.num_tokens - kept_end == 1:  # decoding next: room for a chain, pages reserved for it
                room = min(req.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens) - 1
                if id(req) in handing_over:  # max_tokens is 1 here; the decode side cuts to its own room
                    room = self.max_model_len - req.num_tokens - 1
                drafts = self.scheduler.reserve(req, req.num_tokens + min(room, self.config.speculative.num_speculative_tokens)) - req.num_tokens
            offset = step.layout.row_offsets[i]
            views.append(StepView(
                seq_id=req.seq_key, start=s.start, next_tokens=req.tokens(s.start + 1, kept_end + 1),
                hidden_rows=list(range(offset, offset + kept_end - s.start)), block_table=page_array(req.block_ids),
                max_drafts=max(drafts, 0),
            ))
            reqs.append(req)
        # the batch the next step decodes, retired requests included: what MTP drafts and the chain slow down
        decoding = sum(1 for s in step.scheduled
                       if not s.request.is_finished and s.request.num_tokens - s.request.num_computed_tokens == 1)
        items, _, deltas = self._isolating(
            "drafting", list(zip(reqs, views)),
            lambda its: self.drafter.after_step([v for _, v in its], decoding), lambda it: it[0])
        return deltas

    # -- introspection ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = self.scheduler.stats()
        s.update(
            prefix_cache_hit_tokens=self.pool.hit_tokens,
            prefix_cache_queried_tokens=self.pool.queried_tokens,
            free_kv_blocks=self.pool.num_free,
            cached_kv_blocks=self.pool.num_cached,
            used_kv_blocks=self.pool.num_used,
            total_kv_blocks=self.pool.num_total,
            kv_capacity_tokens=self.kv_capacity_tokens,
            num_prompt_tokens_total=self.num_prompt_tokens_total,
            num_generated_tokens_total=self.outputs.num_generated_tokens_total,
            num_failed_requests=self.num_failed_requests,
            num_overlapped_steps=self.num_overlapped_steps,
            num_slow_steps=self.num_slow_steps,
        )
        s.update(self.gc_pauses.stats())
        s.update(self.step_accounting.stats())
        if self.drafter is not None:
            s.update(self.spec_stats.as_dict())
            s["spec_mtp_retired_requests"] = self.drafter.num_retired
        if self.connector is not None:
            s.update(self.connector.stats())
        return s

    def check_invariants(self) -> None:
        """Page accounting: pool invariants, waiting requests hold nothing, every used page is held."""
        self.pool.check_invariants()
        assert all(not r.block_ids for r in self.scheduler.waiting), "a waiting request holds pages"
        refs: dict[int, int] = {}
        for r in self.scheduler.running + self.scheduler.receiving:
            for pid in r.block_ids:
                refs[pid] = refs.get(pid, 0) + 1
        for pid in self.connector.held_pages() if self.connector is not None else []:
            refs[pid] = refs.get(pid, 0) + 1
        for page in self.pool.pages:
            assert page.ref_count == refs.get(page.id, 0), f"page {page.id} ref_count {page.ref_count} != holders"
