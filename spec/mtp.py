"""MTP (NextN) drafting: the checkpoint's NextN layer drafts a chain from the target's last hidden states.

The NextN layer at position p reads (token p+1, the target's final-normed hidden state at p) and predicts
token p+2; it has its own KV (layer id num_hidden_layers, pages shared with the target). After every target
step the engine hands over a StepView per request: the positions that step computed and kept, the token after
each, and where their hidden states are in that step's forward. `after_step` then runs

  1. an extend over those positions (the NextN layer's KV stays aligned with the accepted tokens, prompt chunks
     included), whose last row predicts the first draft (the token after the bonus token);
  2. chain steps: the NextN layer at the next position reads the previous draft and its own output hidden
     state (as SGLang's NEXTN chain does), writing scratch KV that the next extend overwrites.

Drafts are greedy (top-1): a point mass, verified losslessly like any other draft. With a draft budget
(spec/budget.py) the chain of each request is cut to the drafts worth verifying this step (0: the extend still
runs, so the layer's KV stays aligned; only the chain and the verify rows are saved). The model runs through a
callable the engine provides (every TP rank executes the same MtpBatch), so spec/ needs nothing from engine/.

With CUDA graphs the engine also offers the whole draft of a step (extend + chain) as one graph replay
(engine/mtp_graphs.py): when every request's kept positions fit a captured shape, `after_step` lays them out
as an MtpDraftBatch (q rows per request, padding rows first) and gets every request's drafts back at once.

Retirement: a request the budget gives no MTP drafts for `mtp_retire_steps` steps in a row (its drafts are not
worth the chain's cost, host work included; a probe's one draft does not count: while a request keeps hidden
states every step of the batch is synchronous, so one whose probes are accepted often enough to be repeated but
whose estimate never earns drafts of the budget's own choosing must not stay live on probes alone; and the chain
is priced against every request the next step decodes, retired ones included, since it is their step it
slows), or none in a step where the measured chain could not pay even if every draft were accepted, stops here
for good: no extend, no hidden states kept, so its steps decode plainly and
may overlap again (the engine asks `needs_hidden`). Its NextN KV is stale from then on, so it never drafts with
MTP again. A new request starts retired (not even its prompt's extend runs) where the chain could not pay even
if every draft were accepted, where the budget would not draft for a batch of requests accepting at the
engine-wide MTP rate so far, or where most recent requests retired rather than finish drafting with MTP (the
hybrid's case: its requests take suffix drafts where those are worth more, which the MTP rate does not show);
every `mtp_explore_every`-th such request drafts anyway, so that the rate and the outcomes stay current. An
explorer that retires unused doubles the wait for the next one (up to `mtp_explore_max_every`); one that finishes
still drafting with MTP brings the wait back to `mtp_explore_every`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from spec.budget import DraftBudget
from spec.config import SpeculativeConfig
from spec.drafter import DraftSlot, Drafter, StepView
from spec.wall_clock import StepTiming

SOURCE = "mtp"
OUTCOME_EMA = 0.2  # weight of the newest request's outcome (retired: 0, finished drafting with MTP: 1)
MIN_USEFUL = 0.5  # below this share of MTP-drafting outcomes, new requests start retired


@dataclass
class MtpBatch:
    """One NextN-layer forward over packed rows (plain lists, broadcast to TP ranks)."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    block_tables: list[Sequence[int]]  # per request: its pages
    seq_lens: list[int]
    query_start_loc: list[int]
    hidden_source: str  # "target": the last target forward's hidden states; "mtp": the last NextN output
    hidden_rows: list[int]  # per row: the row of that source holding the hidden state at its position
    logits_rows: list[int]


@dataclass
class MtpDraftBatch:
    """A step's whole NextN draft for the graph path: q rows per request, the padding rows first (slot -1),
    then the request's kept positions; the chain continues from each request's last row."""

    rows_per_request: int
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    hidden_rows: list[int]  # per row: the target forward's row holding the hidden state at its position
    block_tables: list[Sequence[int]]  # per request: its pages (the runner pads them to one width)
    seq_lens: list[int]  # per request: its last kept position + 1
    max_drafts: list[int]  # per request: drafts wanted (chain rows past it write nothing)


@dataclass(frozen=True)
class MtpCalls:
    """How the drafter runs the NextN layer on every TP rank (the engine provides these)."""

    forward: Callable[[MtpBatch], torch.Tensor]  # one eager forward; rank 0's logits of batch.logits_rows
    # (requests, most kept rows) -> rows per request of a captured draft graph that takes them; 0: none
    graph_rows: Callable[[int, int], int] | None = None
    draft: Callable[[MtpDraftBatch], list[list[int]]] | None = None  # extend + chain in one replay


class MtpDrafter(Drafter):
    needs_target_hidden = True
    follows_tokens = False  # a retired request's tokens teach it nothing (the NextN layer reads hidden states)

    def __init__(self, config: SpeculativeConfig, block_size: int, model: MtpCalls,
                 budget: DraftBudget | None = None) -> None:
        """budget: cuts each request's chain (None, or one turned off: the full chain; the hybrid drafter
        passes each view's chain length itself)."""
        self.config = config
        self.block_size = block_size
        self.run = model.forward
        self.model = model
        self.budget = budget if budget is not None and budget.enabled else None
        self._drafts: dict[int, list[int]] = {}
        self._idle: dict[int, int] = {}  # steps in a row without MTP drafts (retirement)
        self._retired: set[int] = set()
        self._live: set[int] = set()  # requests added and not retired or finished
        self._proposed = False  # the last propose returned a draft (a request may still hold it)
        self._chain_ran = False  # since the last observe_step
        self.num_retired = 0  # requests retired from MTP drafting (observability, tests)
        self._since_explore = 0  # requests admitted retired since the last explorer
        self._explore_every = config.mtp_explore_every  # doubles while explorers retire unused
        self._explorers: set[int] = set()  # live requests admitted to explore
        self._drafted: set[int] = set()  # live requests the budget gave MTP drafts at least once
        self.useful = 1.0  # running share of requests that finished drafting with MTP rather than retired
        self.last_batch = 0  # decoding requests of the last step the budget planned (0: none yet)

    def add(self, seq_id: int, prompt: Sequence[int], tenant: str = "") -> None:
        self._drafts.pop(seq_id, None)
        self._live.add(seq_id)
        if self.budget is not None:
            self.retire_at_admission(seq_id, self.budget)

    def retire_at_admission(self, seq_id: int, budget: DraftBudget) -> None:
        """A new request starts retired (it never runs the NextN layer, not even over its prompt) where, at the
        last planned batch size, the chain could not pay even if every draft were accepted; or where the budget
        would not draft for requests accepting at the engine-wide MTP rate, or most recent requests retired
        before they finished (but for every mtp_explore_every-th of these)."""
        b, cap = self.last_batch, self.config.mtp_chain_length
        if not self.config.mtp_retire_steps or not b:
            return
        if budget.chain_cannot_pay(b, cap):
            self.retire(seq_id)
        elif self.useful < MIN_USEFUL or not budget.chain_pays(b, budget.engine_gains(SOURCE, cap)):
            self._since_explore += 1
            if self._since_explore < self._explore_every:
                self.retire(seq_id)
            else:
                self._since_explore = 0
                self._explorers.add(seq_id)

    def retire(self, seq_id: int) -> None:
        if seq_id not in self._retired:
            self._retired.add(seq_id)
            self._live.discard(seq_id)
            self._idle.pop(seq_id, None)
            self._drafts.pop(seq_id, None)
            self._drafted.discard(seq_id)
            self.num_retired += 1

    def _outcome(self, seq_id: int, useful: bool) -> None:
        """A request finished drafting with MTP (useful) or retired unused: the running share, and for an
        explorer the wait for the next one."""
        self.useful = (1 - OUTCOME_EMA) * self.useful + OUTCOME_EMA * useful
        if seq_id in self._explorers:
            self._explorers.discard(seq_id)
            self._explore_every = self.config.mtp_explore_every if useful else \
                min(2 * self._explore_every, self.config.mtp_explore_max_every)

    def needs_hidden(self, seq_id: int) -> bool:
        return seq_id not in self._retired

    def wants_sync(self) -> bool:
        """Only retired requests' steps overlap (the others keep hidden states); drafts waiting here (handed
        over) need the step in flight finished first."""
        return bool(self._drafts)

    def count_idle(self, seq_id: int, drafting: bool, retire_after: int, hopeless: bool = False) -> None:
        """A step planned for the request: drafting with MTP or not; retire it after retire_after idle ones, or
        at once where the chain could not pay even if every draft were accepted (hopeless)."""
        if drafting:
            self._idle.pop(seq_id, None)
            self._drafted.add(seq_id)
            return
        n = self._idle[seq_id] = self._idle.get(seq_id, 0) + 1
        if retire_after and (n >= retire_after or hopeless):
            self.retire(seq_id)
            self._outcome(seq_id, False)

    def take_chain_ran(self) -> bool:
        ran, self._chain_ran = self._chain_ran, False
        return ran

    def any_needs_hidden(self, seq_ids: Iterable[int]) -> bool:
        # every request the engine schedules was added: with none live, none keeps hidden states (O(1))
        return bool(self._live) and any(s in self._live for s in seq_ids)

    def observe_step(self, timing: StepTiming) -> None:
        if self.budget is not None:
            self.budget.clock.observe(replace(timing, chain=True) if self.take_chain_ran() else timing)

    def accepted(self, seq_id: int, tokens: Sequence[int]) -> None:
        # the NextN layer catches up in after_step, from the target's hidden states
        if self.budget is not None:
            self.budget.accepted(seq_id, tokens)

    def finish(self, seq_id: int, completed: bool) -> None:
        if seq_id in self._drafted:  # it ended still drafting with MTP
            self._drafted.discard(seq_id)
            self._outcome(seq_id, True)
        self._explorers.discard(seq_id)
        self._drafts.pop(seq_id, None)
        self._idle.pop(seq_id, None)
        self._retired.discard(seq_id)
        self._live.discard(seq_id)
        if self.budget is not None:
            self.budget.forget(seq_id)

    def handed_over(self, seq_id: int, drafts: Sequence[int]) -> None:
        self._drafts[seq_id] = list(drafts)[: self.config.mtp_chain_length]

    @property
    def idle(self) -> bool:
        """Every request retired (none live, no handed-over drafts) and the last propose gave no draft that a
        request could still hold: the per-step hooks have nothing to do (a retired request's step costs what a
        plain engine's does)."""
        return not self._live and not self._drafts and not self._proposed

    def propose(self, slots: Sequence[DraftSlot]) -> list[list[int]]:
        out = [self._drafts.pop(s.seq_id, [])[: s.max_drafts] for s in slots]
        self._proposed = any(out)
        if self.budget is not None:
            self.budget.proposed({s.seq_id: (SOURCE, d, None) for s, d in zip(slots, out)})
        return out

    def _budgeted(self, views: Sequence[StepView], num_decoding: int | None) -> list[StepView]:
        """Each view's chain cut to what the budget will verify next step (the extend runs for all), priced
        against the whole batch that decodes next (retired requests included: the chain and the drafts' rows
        slow their step too)."""
        nxt = [k for k, v in enumerate(views) if v.max_drafts > 0]
        budget, chain = self.budget, self.config.mtp_chain_length
        b = max(len(nxt), num_decoding or 0)
        ids = [views[k].seq_id for k in nxt]
        gains = [budget.gains(views[k].seq_id, SOURCE, min(views[k].max_drafts, chain)) for k in nxt]
        ks = budget.plan(ids, gains, chain=[True] * len(nxt), num_seqs=b) if nxt else []
        self.last_batch = b or self.last_batch
        hopeless = budget.chain_cannot_pay(b, chain, len(nxt))
        out = list(views)
        for k, n in zip(nxt, ks):
            out[k] = replace(views[k], max_drafts=n)
            drafting = n > 0 and not budget.probing(views[k].seq_id)  # a probe is no reason to stay live
            self.count_idle(views[k].seq_id, drafting, self.config.mtp_retire_steps, hopeless)
        return out

    def _slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _graph_rows(self, views: Sequence[StepView]) -> int:
        """q of a captured draft graph that takes these views, else 0 (eager). Padding rows sit at the positions
        before a request's first kept one, so each request needs at least q positions."""
        if self.model.graph_rows is None or self.model.draft is None:
            return 0
        q = self.model.graph_rows(len(views), max(len(v.next_tokens) for v in views))
        return q if q and all(v.start + len(v.next_tokens) >= q for v in views) else 0

    def _draft_batch(self, views: Sequence[StepView], q: int) -> MtpDraftBatch:
        ids, positions, slots, rows = [], [], [], []
        for v in views:
            n = len(v.next_tokens)
            for r in range(n - q, n):  # r < 0: padding, at the positions just before the kept ones
                positions.append(v.start + r)
                ids.append(v.next_tokens[max(r, 0)])
                slots.append(self._slot(v.block_table, v.start + r) if r >= 0 else -1)
                rows.append(v.hidden_rows[max(r, 0)])
        return MtpDraftBatch(
            rows_per_request=q, input_ids=ids, positions=positions, slot_mapping=slots, hidden_rows=rows,
            block_tables=[v.block_table for v in views],
            seq_lens=[v.start + len(v.next_tokens) for v in views], max_drafts=[v.max_drafts for v in views],
        )

    def after_step(self, views: Sequence[StepView], num_decoding: int | None = None) -> None:
        views = [v for v in views if v.next_tokens and v.seq_id not in self._retired]
        if not views:
            return
        ids, positions, slots, qsl, lens, rows = [], [], [], [0], [], []
        for v in views:
            n = len(v.next_tokens)
            ids += v.next_tokens
            positions += range(v.start, v.start + n)
            slots += [self._slot(v.block_table, p) for p in range(v.start, v.start + n)]
            qsl.append(qsl[-1] + n)
            lens.append(v.start + n)
            rows += v.hidden_rows
        views = [replace(v, max_drafts=min(v.max_drafts, self.config.mtp_chain_length)) for v in views]
        if self.budget is not None:
            views = self._budgeted(views, num_decoding)
        for v in views:  # a chain cut to 0 must not leave an older step's draft behind
            self._drafts.pop(v.seq_id, None)
        self._chain_ran |= any(v.max_drafts > 0 for v in views)
        q = self._graph_rows(views)
        if q:
            out = self.model.draft(self._draft_batch(views, q))
            self._drafts.update({v.seq_id: d for v, d in zip(views, out) if v.max_drafts > 0})
            return
        drafting = [k for k, v in enumerate(views) if v.max_drafts > 0]
        last_rows = [qsl[k + 1] - 1 for k in drafting]
        logits = self.run(MtpBatch(ids, positions, slots, [v.block_table for v in views], lens, qsl, "target",
                                   rows, last_rows))
        if not drafting:
            return
        tokens = logits.argmax(dim=-1).tolist()
        active = [(views[k], [t]) for k, t in zip(drafting, tokens)]
        drafts = {v.seq_id: d for v, d in active}  # the lists grow in place below
        prev_rows = last_rows  # rows of the NextN output holding each active request's last hidden state
        for step in range(1, max(v.max_drafts for v, _ in active)):
            keep = [i for i, (v, _) in enumerate(active) if v.max_drafts > step]
            if not keep:
                break
            chain = [active[i] for i in keep]
            pos = [v.start + len(v.next_tokens) + step - 1 for v, _ in chain]
            batch = MtpBatch(
                input_ids=[d[-1] for _, d in chain], positions=pos,
                slot_mapping=[self._slot(v.block_table, p) for (v, _), p in zip(chain, pos)],
                block_tables=[v.block_table for v, _ in chain], seq_lens=[p + 1 for p in pos],
                query_start_loc=list(range(len(chain) + 1)), hidden_source="mtp",
                hidden_rows=[prev_rows[i] for i in keep], logits_rows=list(range(len(chain))),
            )
            for (_, d), t in zip(chain, self.run(batch).argmax(dim=-1).tolist()):
                d.append(t)
            active, prev_rows = chain, list(range(len(chain)))
        self._drafts.update(drafts)
