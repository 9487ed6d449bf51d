"""Continuous-batching scheduler with one token budget per step.

Each step: running requests first (decodes and unfinished prompt chunks), then waiting requests in arrival
order, each getting min(tokens it still needs, budget left) — so long prompts are split across steps and
mixed with decodes (chunked prefill). A decoding request with draft tokens (speculation) gets its last token
plus its drafts in one go, from the same budget (drafts are trimmed to the budget left, never split from their
token). When pages run out, the newest running request is preempted: its pages are released (full ones stay
in the prefix cache) and it is recomputed later. After a verify step `commit` cuts num_computed_tokens back to
the accepted tokens and returns the pages past them. Requests that want prompt logprobs skip the prefix cache
(every prompt position is scored; the forward scores them a slice at a time, so their chunks are ordinary chunks).
Nothing here touches tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_pool import BlockPool, chain_hash
from engine.block_tables import page_array
from engine.config import SchedulerConfig
from engine.request import Request, Status


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # first position computed this step (== num_computed_tokens before the step)
    num_tokens: int  # tokens computed this step, draft tokens included
    num_drafts: int = 0  # the last num_drafts of them are request.draft_token_ids[:num_drafts]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """This step reaches the end of the request's tokens, so its last position (and every draft position)
        yields a token."""
        return self.end - self.num_drafts == self.request.num_tokens

    @property
    def drafts(self) -> list[int]:
        return self.request.draft_token_ids[: self.num_drafts]


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
        self.receiving: list[Request] = []  # disaggregated decode: pages reserved, KV on its way
        self.num_preemptions = 0
        # rows of the device token table, one per running request
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))

    # -- queue management ---------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.receiving)

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish (or abort) a request wherever it is and release everything it holds."""
        if req.status == Status.RUNNING:
            self.running.remove(req)
            self._free_slot(req)
        elif req.status == Status.WAITING:
            self.waiting.remove(req)
        elif req.status == Status.RECEIVING:
            self.receiving.remove(req)
        elif req.status != Status.HANDSHAKE:
            return
        req.status = Status.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        self._release(req)

    def _free_slot(self, req: Request) -> None:
        self._free_slots.append(req.table_slot)
        req.table_slot = -1

    def _release(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids = page_array()

    # -- disaggregation (decode side) ------------------------------------------------------------------
    def reserve_for_transfer(self, req: Request) -> int | None:
        """Pages for the whole prompt of a request whose KV another instance computes, and a seat among the
        running requests; None (nothing taken) if either is short now. Full prompt pages found in this
        instance's prefix cache are reused; returns how many leading pages hold their KV already (the other
        instance need not send those). The request then waits in `receiving` (never scheduled) until
        `start_after_transfer`."""
        if len(self.running) + len(self.receiving) >= self.config.max_num_seqs:
            return None
        hits: list[int] = []
        if self.pool.enable_prefix_caching:
            hashes, blocks = req.full_block_hashes(self.block_size, req.num_prompt_tokens)
            req.block_hashes = hashes
            hits = self.pool.lookup(hashes, blocks)
        need = self._pages_for(req.num_prompt_tokens) - len(hits)
        hits_unreferenced = sum(1 for pid in hits if self.pool.pages[pid].ref_count == 0)
        if need > self.pool.num_allocatable - hits_unreferenced:
            return None
        self.pool.touch(hits)
        req.block_ids = page_array(hits + self.pool.allocate(need))
        req.num_registered_blocks = len(hits)
        req.num_cached_tokens = len(hits) * self.block_size
        self.pool.record_query(req.num_prompt_tokens, req.num_cached_tokens)
        req.status = Status.RECEIVING
        self.receiving.append(req)
        return len(hits)

    def cancel_reservation(self, req: Request) -> None:
        """Give a receiving request's pages and seat back (it goes back to the connector's handshake)."""
        self.receiving.remove(req)
        self._release(req)
        req.status = Status.HANDSHAKE

    def start_after_transfer(self, req: Request) -> None:
        """The prompt's KV is in the request's pages: it runs on as an ordinary decoding request."""
        self.receiving.remove(req)
        req.status = Status.RUNNING
        req.table_slot = self._free_slots.pop()
        req.num_computed_tokens = req.num_prompt_tokens
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = 0
        self.running.append(req)

    # -- the step -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        prefill_budget = self._prefill_budget(budget)
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            rest = req.num_tokens - req.num_computed_tokens
            n = min(rest, budget) if rest == 1 else min(rest, budget, prefill_budget)
            if n <= 0 or req.num_output_tokens >= req.max_tokens:
                continue  # nothing to compute (or no prefill budget left), or its last token is still in flight
            drafts = min(len(req.draft_token_ids), budget - n) if n == rest else 0
            if not self._make_room(req, req.num_computed_tokens + n + drafts, out):
                continue  # req itself was preempted
            out.scheduled.append(ScheduledRequest(req, req.num_computed_tokens, n + drafts, drafts))
            budget -= n + drafts
            if rest > 1:
                prefill_budget -= n
        if out.preempted:  # memory is short: let the running set drain before admitting more
            return out
        while (self.waiting and min(budget, prefill_budget) > 0
               and len(self.running) + len(self.receiving) < self.config.max_num_seqs):
            req = self.waiting[0]
            scheduled = self._admit(req, min(budget, prefill_budget))
            if scheduled is None:
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            req.table_slot = self._free_slots.pop()
            self.running.append(req)
            out.scheduled.append(scheduled)
            budget -= scheduled.num_tokens
            prefill_budget -= scheduled.num_tokens
        return out

    def _prefill_budget(self, budget: int) -> int:
        """Prompt tokens this step may compute: the whole budget, or the cap for steps that also decode (a
        decode waits for the whole step, so a long chunk next to it is its inter-token latency)."""
        cap = self.config.max_prefill_tokens_while_decoding
        if cap is None or not any(r.num_computed_tokens >= r.num_prompt_tokens for r in self.running):
            return budget
        return min(cap, budget)

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
        self._free_slot(req)
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
        if not req.needs_prompt_logits:
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
        req.block_ids = page_array(hits + self.pool.allocate(need))
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

    def reserve(self, req: Request, upto: int) -> int:
        """Give a running request pages for `upto` tokens if the pool has them without preempting anyone;
        returns the tokens its pages cover (a drafter then drafts no further)."""
        need = self._pages_for(upto) - len(req.block_ids)
        if need > 0:
            req.block_ids.extend(self.pool.allocate(min(need, self.pool.num_allocatable)))
        return min(upto, len(req.block_ids) * self.block_size)

    def commit(self, req: Request, computed_upto: int) -> None:
        """After a verify step's emitted tokens were appended: keep the KV of the first `computed_upto` tokens
        only (the step computed k drafts, fewer may have been accepted: a length cut) and return the pages past
        what the request's tokens need."""
        if req.num_computed_tokens > computed_upto:
            req.num_computed_tokens = computed_upto
            pages = self._pages_for(req.num_tokens)
            if len(req.block_ids) > pages:
                self.pool.free(req.block_ids[pages:])
                del req.block_ids[pages:]

    def publish_blocks(self, req: Request) -> None:
        """Register the request's newly full, computed pages in the prefix cache."""
        if not self.pool.enable_prefix_caching or req.status != Status.RUNNING:
            return
        # pages full of computed tokens whose ids the host has (an in-flight step's token is not known yet)
        n_full = min(req.num_computed_tokens, req.num_known_tokens) // self.block_size
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
