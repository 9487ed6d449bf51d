"""Continuous-batching scheduler with one token budget per step.

Each step: running requests first (decodes and unfinished prompt chunks), then waiting requests in arrival
order, each getting min(tokens it still needs, budget left) — so long prompts are split across steps and
mixed with decodes (chunked prefill). When pages run out, the newest running request is preempted: its pages
are released (full ones stay in the prefix cache) and it is recomputed later. Nothing here touches tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_pool import BlockPool, chain_hash
from engine.config import SchedulerConfig
from engine.request import Request, Status


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # first position computed this step (== num_computed_tokens before the step)
    num_tokens: int  # tokens computed this step

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """This step reaches the end of the known tokens, so the last position yields the next token."""
        return self.end == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.block_size = pool.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # -- queue management ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish (or abort) a request wherever it is and release everything it holds."""
        if req.status == Status.RUNNING:
            self.running.remove(req)
        elif req.status == Status.WAITING:
            self.waiting.remove(req)
        else:
            return
        req.status = Status.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        self._release(req)

    def _release(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids = []

    # -- the step -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0 or len(req.output_token_ids) >= req.max_tokens:
                continue  # nothing to compute, or its last token is still in flight
            if not self._make_room(req, req.num_computed_tokens + n, out):
                continue  # req itself was preempted
            out.scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n))
            budget -= n
        if out.preempted:  # memory is short: let the running set drain before admitting more
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            scheduled = self._admit(req, budget)
            if scheduled is None:
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            out.scheduled.append(scheduled)
            budget -= scheduled.num_tokens
        return out

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _make_room(self, req: Request, upto: int, out: SchedulerOutput) -> bool:
        """Give `req` pages for `upto` tokens, preempting the newest running requests if needed."""
        need = self._pages_for(upto) - len(req.block_ids)
        while need > self.pool.num_allocatable:
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
        if need > 0:
            req.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)
        out.scheduled = [s for s in out.scheduled if s.request is not req]

    def _admit(self, req: Request, budget: int) -> ScheduledRequest | None:
        """Prefix lookup + page allocation for a waiting request; None if its first chunk doesn't fit."""
        hits: list[int] = []
        # Prompt logprobs need logits at every prompt position, so such requests skip the prefix cache.
        if req.params.prompt_logprobs is None or req.prompt_logprobs_upto >= req.num_prompt_tokens:
            # Leave at least one token to compute: its logits give the next token.
            hashes, blocks = req.full_block_hashes(self.block_size, req.num_tokens - 1)
            req.block_hashes = hashes
            hits = self.pool.lookup(hashes, blocks)
        computed = len(hits) * self.block_size
        n = min(req.num_tokens - computed, budget)
        need = self._pages_for(computed + n) - len(hits)
        hits_unreferenced = sum(1 for pid in hits if self.pool.pages[pid].ref_count == 0)
        if need > self.pool.num_allocatable - hits_unreferenced:
            if not self.running and not hits and self._pages_for(req.num_tokens) > self.pool.num_total:
                raise RuntimeError(
                    f"request {req.request_id} needs {self._pages_for(req.num_tokens)} KV pages, the pool has "
                    f"{self.pool.num_total}"
                )
            return None
        self.pool.touch(hits)
        req.block_ids = hits + self.pool.allocate(need)
        req.num_computed_tokens = computed
        req.num_registered_blocks = len(hits)
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = computed
            self.pool.record_query(req.num_prompt_tokens, computed)
        return ScheduledRequest(req, computed, n)

    # -- after the forward --------------------------------------------------------------------------
    def advance(self, scheduled: ScheduledRequest) -> None:
        """The step computed scheduled tokens: move the counter (at launch, so the next step can be planned
        while this one runs). Pages are published later, once the tokens in them are known."""
        scheduled.request.num_computed_tokens = scheduled.end

    def publish_blocks(self, req: Request) -> None:
        """Register the request's newly full, computed pages in the prefix cache."""
        if not self.pool.enable_prefix_caching or req.status != Status.RUNNING:
            return
        n_full = req.num_computed_tokens // self.block_size
        for i in range(req.num_registered_blocks, n_full):
            toks = tuple(req.tokens(i * self.block_size, (i + 1) * self.block_size))
            if i == len(req.block_hashes):
                req.block_hashes.append(chain_hash(req.block_hashes[i - 1] if i else None, toks))
            self.pool.register(req.block_ids[i], req.block_hashes[i], toks)
        req.num_registered_blocks = max(req.num_registered_blocks, n_full)

    def stats(self) -> dict[str, int]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting),
            "num_preemptions": self.num_preemptions,
        }
