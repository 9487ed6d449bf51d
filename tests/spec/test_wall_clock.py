"""The draft budget's wall-clock model (spec/wall_clock.py) and MTP retirement (spec/mtp.py): measured step
cycles replace the GPU priors, a measured expensive chain stops MTP drafting where a GPU-only price would draft,
and a request held at 0 MTP drafts retires (no more NextN work for it)."""
from __future__ import annotations

import pytest
import torch

from spec import DraftSlot, MtpCalls, MtpDrafter, StepView
from spec.hybrid import HybridDrafter
from spec.suffix import SuffixDrafter
from spec.budget import DraftBudget, StepCost, StepCosts
from spec.config import SpeculativeConfig
from spec.wall_clock import SKIP_FIRST, StepTiming, WallClock, bucket

GPU = StepCost([1, 4, 16, 64], [0.10, 0.12, 0.18, 0.40])


def timing(b: int, wall: float, *, rows: int | None = None, drafted=False, chain=False, plain=False) -> StepTiming:
    return StepTiming(num_seqs=b, rows=b if rows is None else rows, drafted=drafted, chain=chain, plain=plain,
                      wall_ms=wall)


def learn(clock: WallClock, t: StepTiming) -> None:
    """Observe t past the skipped first observations of its kind and bucket (then the average is t's)."""
    for _ in range(SKIP_FIRST + 1):
        clock.observe(t)


def test_priors_then_measured_kinds_by_batch_bucket():
    clock = WallClock(GPU, StepCost([1], [0.05]))
    assert clock.plain_ms(1) == GPU(1) and clock.spec_overhead_ms(1) == 0 and clock.chain_ms(3) == 0.05
    learn(clock, timing(1, 0.40, plain=True))
    assert clock.plain_ms(1) == 0.40 and clock.plain_ms(2) == GPU(2)  # another bucket keeps its prior
    # a suffix step: 4 rows, 0.70 ms = plain 0.40 + the rows' GPU (0.02) + 0.28 of host work
    learn(clock, timing(1, 0.70, rows=4, drafted=True))
    assert abs(clock.spec_overhead_ms(1) - 0.28) < 1e-9
    # an MTP step: the same plus the chain
    learn(clock, timing(1, 1.70, rows=4, drafted=True, chain=True))
    assert abs(clock.chain_ms(1) - 1.00) < 1e-9
    learnt = clock.snapshot()
    assert {k: {b: round(v, 9) for b, v in d.items()} for k, d in learnt.items()} == \
        {"plain": {1: 0.40}, "draft": {1: 0.68}, "chain": {1: 1.68}}  # walls less the 3 extra rows' 0.02 ms
    # averages move by EWMA, idle gaps and synchronous no-draft steps are not learnt from
    clock.observe(timing(1, 0.50, plain=True))
    assert 0.40 < clock.plain_ms(1) < 0.50
    before = clock.plain_ms(1)
    clock.observe(timing(1, 100.0, plain=True))  # a slow outlier counts as 4x the average at most
    assert clock.plain_ms(1) <= 0.9 * before + 0.1 * 4 * before + 1e-9
    fresh = WallClock(GPU)
    for _ in range(SKIP_FIRST):  # a new shape's first steps (compiles) are not learnt from
        fresh.observe(timing(4, 900.0, plain=True))
    assert fresh.plain_ms(4) == GPU(4) and fresh.observed == 0
    n = clock.observed
    clock.observe(timing(1, 60_000.0, plain=True))
    clock.observe(timing(1, 0.9))  # no drafts, no chain, not overlapped (MTP's extend alone)
    assert clock.observed == n
    assert [bucket(b) for b in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]


def test_the_order_in_which_kinds_are_first_seen_does_not_matter():
    """A pure MTP engine sees chain steps long before its first plain step (a retired request's): the chain's
    cost is re-derived when the plain step time is learnt, not frozen against the prior."""
    a, b = WallClock(GPU), WallClock(GPU)
    steps = [timing(1, 1.70, rows=4, drafted=True, chain=True), timing(1, 0.60, plain=True)]
    for t in steps:
        learn(a, t)
    for t in reversed(steps):
        learn(b, t)
    assert a.snapshot() == b.snapshot()
    assert abs(a.chain_ms(1) - (1.70 - (GPU(4) - GPU(1)) - 0.60)) < 1e-9 and a.chain_ms(1) == b.chain_ms(1)
    assert a.spec_overhead_ms(1) == 0.0  # no suffix-only drafting step seen: the chain carries it all


def test_disabled_clock_keeps_its_priors():
    clock = WallClock(GPU, None, enabled=False)
    learn(clock, timing(1, 5.0, plain=True))
    assert clock.plain_ms(1) == GPU(1) and clock.observed == 0


def mtp_budget(**kw) -> DraftBudget:
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, **kw})
    return DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))


def test_a_measured_expensive_chain_stops_mtp_drafts_that_the_gpu_price_allows():
    gains = [[0.8, 0.64, 0.51]]
    cheap = mtp_budget()
    assert cheap.plan([1], gains, chain=[True]) == [3]  # GPU prices only: drafting pays
    costly = mtp_budget()
    learn(costly.clock, timing(1, 0.40, plain=True))
    learn(costly.clock, timing(1, 1.70, rows=4, drafted=True, chain=True))  # the small model on the H200
    assert costly.chain_cost_tokens(1) > 3
    assert costly.plan([1], gains, chain=[True]) == [0]
    assert all(costly.plan([1], gains, chain=[True]) == [0] for _ in range(20))  # and no probes: cannot pay
    # a step that is GPU-bound (a large model): the same host work is small next to it, MTP drafts
    big = DraftBudget(SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3}),
                      StepCosts(StepCost([1, 4, 16], [25.0, 26.0, 30.0]), 0.0, StepCost([1, 16], [2.0, 2.5])))
    learn(big.clock, timing(1, 25.5, plain=True))
    learn(big.clock, timing(1, 30.0, rows=4, drafted=True, chain=True))
    assert big.plan([1], gains, chain=[True]) == [3]


class FakeNextN:
    """MtpCalls over a fake NextN layer: every eager forward returns logits whose argmax is token 5."""

    def __init__(self) -> None:
        self.rows: list[int] = []  # rows of every forward (extend and chain)

    def forward(self, batch) -> torch.Tensor:
        self.rows.append(len(batch.input_ids))
        logits = torch.zeros(len(batch.logits_rows), 16)
        logits[:, 5] = 1.0
        return logits


def view(seq_id: int, start: int, max_drafts: int = 3) -> StepView:
    return StepView(seq_id=seq_id, start=start, next_tokens=[1], hidden_rows=[seq_id], block_table=[0, 1],
                    max_drafts=max_drafts)


def test_mtp_request_held_at_zero_drafts_retires_and_its_nextn_work_stops():
    # (mtp_explore_every=1: no retirement at admission by the engine-wide rate, tested below)
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 3,
                                       "mtp_explore_every": 1})
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    learn(budget.clock, timing(2, 0.40, plain=True))
    # a ~0.96 ms chain next to a 0.40 ms step: drafting does not pay, but could if every draft were accepted
    learn(budget.clock, timing(2, 1.40, rows=8, drafted=True, chain=True))
    assert not budget.chain_cannot_pay(2, 3)
    fake = FakeNextN()
    drafter = MtpDrafter(cfg, 16, MtpCalls(fake.forward), budget)
    for seq_id in (0, 1):
        drafter.add(seq_id, [1, 2, 3])
    for step in range(3):
        assert drafter.needs_hidden(0) and drafter.needs_hidden(1)
        drafter.after_step([view(0, 10 + step), view(1, 10 + step)])
        assert drafter.propose([DraftSlot(0, 3), DraftSlot(1, 3)]) == [[], []]
    assert not drafter.needs_hidden(0) and not drafter.needs_hidden(1) and drafter.num_retired == 2
    calls = len(fake.rows)
    drafter.after_step([view(0, 13), view(1, 13)])
    assert len(fake.rows) == calls  # no extend for retired requests
    assert not drafter.wants_sync()  # their steps may overlap
    assert drafter.idle  # every request retired and the last propose drafted nothing: no per-step hooks
    drafter.finish(0, completed=True)
    drafter.add(0, [1, 2])  # a seq id is never reused by the engine, but finishing clears the state
    assert drafter.needs_hidden(0) and not drafter.idle


def test_retirement_off_and_accepted_mtp_keep_the_request_drafting():
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 0})
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    learn(budget.clock, timing(1, 0.40, plain=True))
    learn(budget.clock, timing(1, 3.0, rows=4, drafted=True, chain=True))
    drafter = MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward), budget)
    drafter.add(0, [1, 2, 3])
    for step in range(10):
        drafter.after_step([view(0, 10 + step)])
        drafter.propose([DraftSlot(0, 3)])
    assert drafter.needs_hidden(0) and drafter.num_retired == 0
    # with GPU prices only, the request drafts every step and never retires
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 2})
    drafter = MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward),
                         DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09]))))
    drafter.add(0, [1, 2, 3])
    for step in range(10):
        drafter.after_step([view(0, 10 + step)])
        drafts = drafter.propose([DraftSlot(0, 3)])
        assert drafts == [[5, 5, 5]]
        drafter.accepted(0, [5, 5, 5, 9])
    assert drafter.needs_hidden(0) and drafter.num_retired == 0 and not drafter.idle
    # retired right after a propose that drafted: the request may still hold those drafts, so the engine must
    # ask once more (an empty propose) before the drafter goes idle
    drafter.retire(0)
    assert not drafter.idle
    assert drafter.propose([DraftSlot(0, 3)]) == [[]] and drafter.idle


def test_accepted_probes_alone_do_not_keep_an_mtp_request_live():
    """A request whose 1-draft probes are accepted often enough to be repeated (interval 1 after each accepted
    one) but whose estimate never earns drafts of the budget's own choosing retires like one held at 0: while it
    keeps hidden states, every step of its batch is synchronous."""
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 4,
                                       "mtp_explore_every": 1, "probe_interval": 1})
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    learn(budget.clock, timing(1, 0.40, plain=True))
    learn(budget.clock, timing(1, 1.22, rows=4, drafted=True, chain=True))  # ~0.8 ms chain: probes allowed
    assert not budget.chain_cannot_pay(1, 3)
    drafter = MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward), budget)
    drafter.add(0, [1, 2, 3])
    sizes = []
    for step in range(40):
        if not drafter.needs_hidden(0):
            break
        drafter.after_step([view(0, 10 + step % 16)])
        sizes.append(len(drafter.propose([DraftSlot(0, 3)])[0]))
        drafter.accepted(0, [9] if step % 3 == 2 else [5, 9])  # two probes of three accepted
    assert not drafter.needs_hidden(0) and drafter.num_retired == 1
    assert sizes.count(1) >= 2 and len(sizes) < 12  # it was probed, and retired within a few steps


def test_a_chain_that_cannot_pay_retires_a_request_at_its_first_step():
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 16})
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    drafter = MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward), budget)
    drafter.add(0, [1, 2, 3])
    assert not budget.chain_cannot_pay(1, 3)  # GPU prices: the chain is cheap
    learn(budget.clock, timing(1, 0.40, plain=True))
    learn(budget.clock, timing(1, 1.70, rows=4, drafted=True, chain=True))  # 1.28 ms chain vs a 0.40 ms step
    assert budget.chain_cannot_pay(1, 3) and not budget.chain_cannot_pay(1, 4)
    drafter.after_step([view(0, 10)])
    assert not drafter.needs_hidden(0) and drafter.num_retired == 1


def test_a_request_added_where_the_chain_cannot_pay_starts_retired():
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 8})
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    fake = FakeNextN()
    drafter = MtpDrafter(cfg, 16, MtpCalls(fake.forward), budget)
    drafter.add(0, [1, 2, 3])
    assert drafter.needs_hidden(0)  # nothing planned yet: a new engine drafts
    drafter.after_step([view(0, 10)])
    assert drafter.last_batch == 1 and drafter.needs_hidden(0)  # GPU prices: the chain pays
    learn(budget.clock, timing(1, 0.40, plain=True))
    learn(budget.clock, timing(1, 1.70, rows=4, drafted=True, chain=True))
    drafter.add(1, [4, 5])
    assert not drafter.needs_hidden(1) and drafter.num_retired == 1
    calls = len(fake.rows)
    drafter.after_step([view(1, 2)])
    assert len(fake.rows) == calls  # not even its prompt's extend


def test_new_requests_start_retired_where_the_engine_wide_mtp_acceptance_would_not_pay():
    """The chain pays for a request that accepts most drafts, not for one that accepts none. Once the engine's
    verifies show MTP drafts rejected, new requests start retired -- but every mtp_explore_every-th, which
    drafts and so keeps the engine-wide rate current: accepted drafts bring MTP back for the next ones."""
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 8,
                                       "mtp_explore_every": 4})
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    drafter = MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward), budget)
    learn(budget.clock, timing(1, 0.40, plain=True))
    learn(budget.clock, timing(1, 0.92, rows=4, drafted=True, chain=True))  # a 0.5 ms chain
    assert not budget.chain_cannot_pay(1, 3)  # were every draft accepted, the chain would pay
    drafter.add(0, [1, 2, 3])
    drafter.after_step([view(0, 10)])
    assert drafter.last_batch == 1 and budget.chain_pays(1, budget.engine_gains("mtp", 3))  # the prior: 0.8
    drafter.add(1, [1, 2])
    assert drafter.needs_hidden(1)

    def verify(seq_id: int, emitted: list[int]) -> None:
        budget.proposed({seq_id: ("mtp", [5, 5, 5], None)})
        budget.accepted(seq_id, emitted)

    for i in range(40):  # the engine's MTP drafts are rejected at their first token
        verify(100 + i, [9])
    assert not budget.chain_pays(1, budget.engine_gains("mtp", 3))
    live = []
    for seq_id in range(2, 10):
        drafter.add(seq_id, [1, 2])
        live.append(drafter.needs_hidden(seq_id))
    assert live == [False, False, False, True] * 2  # every 4th explores
    for i in range(300):  # now they are accepted
        verify(200 + i, [5, 5, 5, 7])
    assert budget.chain_pays(1, budget.engine_gains("mtp", 3))
    drafter.add(10, [1, 2])
    assert drafter.needs_hidden(10)
    # the per-request estimates are the requests' own: a new request's gains start at the prior
    assert budget.gains(10, "mtp", 3) == budget.gains(11, "mtp", 3) == [0.8, 0.8 ** 2, 0.8 ** 3]


def test_new_requests_start_retired_where_recent_requests_retired_rather_than_drafted():
    """The hybrid's case: its requests take suffix drafts wherever those are worth more, so the engine-wide
    MTP rate stays at its prior while request after request retires from MTP unused. Once most recent requests
    retired, new ones start retired (every mtp_explore_every-th explores); requests that finish still drafting
    with MTP bring it back."""
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 2,
                                       "mtp_explore_every": 3})
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    drafter = MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward), budget)
    learn(budget.clock, timing(1, 0.40, plain=True))
    learn(budget.clock, timing(1, 0.92, rows=4, drafted=True, chain=True))
    drafter.last_batch = 1
    assert budget.chain_pays(1, budget.engine_gains("mtp", 3))  # the MTP rate alone would keep them live
    for seq_id in range(4):  # each held at 0 MTP drafts until it retires
        drafter.add(seq_id, [1, 2])
        assert drafter.needs_hidden(seq_id)
        for _ in range(2):
            drafter.count_idle(seq_id, drafting=False, retire_after=2)
        assert not drafter.needs_hidden(seq_id)
    assert drafter.useful < 0.5
    live = []
    for seq_id in range(4, 10):
        drafter.add(seq_id, [1, 2])
        live.append(drafter.needs_hidden(seq_id))
    assert live == [False, False, True] * 2
    for seq_id in (6, 9, 6, 9):  # the explorers draft with MTP and finish doing so
        drafter.count_idle(seq_id, drafting=True, retire_after=2)
    for seq_id in (6, 9):
        drafter.finish(seq_id, completed=True)
    drafter.add(20, [1])
    drafter.count_idle(20, drafting=True, retire_after=2)
    drafter.finish(20, completed=True)
    assert drafter.useful >= 0.5
    drafter.add(21, [1, 2])
    assert drafter.needs_hidden(21)


def test_explorers_that_retire_unused_double_the_wait_for_the_next_one():
    """On text where MTP never pays, every explorer retires unused: the wait between explorers doubles up to
    mtp_explore_max_every; an explorer that finishes still drafting with MTP brings it back."""
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 2,
                                       "mtp_explore_every": 2, "mtp_explore_max_every": 8})
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    drafter = MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward), budget)
    learn(budget.clock, timing(1, 0.40, plain=True))
    learn(budget.clock, timing(1, 0.92, rows=4, drafted=True, chain=True))
    drafter.last_batch = 1
    drafter.useful = 0.0  # recent requests retired: new ones start retired but for the explorers
    seq = iter(range(1000))

    def admit_until_explorer() -> tuple[int, int]:
        """(admissions it took, the explorer's seq_id)"""
        for n in range(1, 100):
            s = next(seq)
            drafter.add(s, [1, 2])
            if drafter.needs_hidden(s):
                return n, s
        raise AssertionError("no explorer")

    gaps = []
    for _ in range(5):  # each explorer is held at 0 MTP drafts until it retires
        n, s = admit_until_explorer()
        gaps.append(n)
        for _ in range(2):
            drafter.count_idle(s, drafting=False, retire_after=2)
        assert not drafter.needs_hidden(s)
    assert gaps == [2, 4, 8, 8, 8]
    n, s = admit_until_explorer()
    drafter.count_idle(s, drafting=True, retire_after=2)
    drafter.finish(s, completed=True)  # it finished drafting with MTP
    assert n == 8 and admit_until_explorer()[0] == 2
    # the largest wait below the first is refused with the option's name
    with pytest.raises(ValueError, match="mtp_explore_max_every"):
        SpeculativeConfig.from_dict({"method": "mtp", "mtp_explore_every": 8, "mtp_explore_max_every": 4})


def batch_priced_budget(cfg: SpeculativeConfig) -> DraftBudget:
    """A budget whose learnt clock makes the chain worth running at batch 1 (~0.58 ms next to a 0.40 ms plain
    step) and not at batch 16 (~1.28 ms next to 1.10 ms, paid by 16 requests)."""
    budget = DraftBudget(cfg, StepCosts(GPU, 0.0, StepCost([1, 16], [0.07, 0.09])))
    learn(budget.clock, timing(1, 0.40, plain=True))
    learn(budget.clock, timing(1, 1.00, rows=4, drafted=True, chain=True))
    learn(budget.clock, timing(16, 1.10, plain=True))
    learn(budget.clock, timing(16, 2.60, rows=64, drafted=True, chain=True))
    return budget


def check_priced_against_the_batch(make) -> MtpDrafter | HybridDrafter:
    """Request 0 alone drafts with MTP every step; the same request among 16 decoding ones drafts nothing and
    retires within mtp_retire_steps. Returns the second drafter."""
    alone = make()
    for step in range(6):
        alone.after_step([view(0, 10 + step)])
        assert alone.propose([DraftSlot(0, 3)]) == [[5, 5, 5]]  # priced at batch 1: the chain pays
    assert alone.needs_hidden(0)
    in_batch = make()
    for step in range(6):
        if not in_batch.needs_hidden(0):
            break
        in_batch.after_step([view(0, 10 + step)], num_decoding=16)
        assert in_batch.propose([DraftSlot(0, 3)]) == [[]]
    assert not in_batch.needs_hidden(0) and in_batch.num_retired == 1 and step <= 3
    return in_batch


def test_a_lone_mtp_request_is_priced_against_the_whole_batch_it_slows():
    """One request still drafting with MTP in a batch of 16 whose others retired: the chain and the synchronous
    verify slow all 16 requests' step, so the budget prices them at batch 16 (num_decoding), not at the one live
    request -- at batch 1 the same chain looks worth running and the request would keep the batch synchronous."""
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "num_speculative_tokens": 3, "mtp_retire_steps": 3,
                                       "mtp_explore_every": 1})

    def mtp() -> MtpDrafter:
        drafter = MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward), batch_priced_budget(cfg))
        drafter.add(0, [1, 2, 3])
        return drafter

    in_batch = check_priced_against_the_batch(mtp)
    assert in_batch.last_batch == 16  # what admission prices the next request at


def test_the_hybrid_prices_its_mtp_requests_against_the_whole_batch_too():
    cfg = SpeculativeConfig.from_dict({"method": "hybrid", "mtp_retire_steps": 3, "mtp_explore_every": 1})

    def hybrid() -> HybridDrafter:
        drafter = HybridDrafter(cfg, SuffixDrafter(cfg), MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward)),
                                batch_priced_budget(cfg))
        drafter.add(0, [1, 2, 3, 4])  # nothing repeats: no suffix draft, MTP is the only source
        return drafter

    check_priced_against_the_batch(hybrid)


def test_hybrid_with_every_request_retired_from_mtp_proposes_what_suffix_decoding_does():
    """Once its MTP part is idle the hybrid takes suffix decoding's own path (no per-slot source bookkeeping);
    its drafts and the budget's record of them are suffix decoding's, step after step."""
    cfg = SpeculativeConfig.from_dict({"method": "hybrid", "num_speculative_tokens": 8, "mtp_retire_steps": 3})
    hybrid = HybridDrafter(cfg, SuffixDrafter(cfg), MtpDrafter(cfg, 16, MtpCalls(FakeNextN().forward)),
                           batch_priced_budget(cfg))
    suffix = SuffixDrafter(cfg, batch_priced_budget(cfg))
    fast = []
    real = hybrid._propose_suffix
    hybrid._propose_suffix = lambda slots: fast.append(len(slots)) or real(slots)
    text = [3, 4, 5, 6, 7, 8] * 30
    for d in (hybrid, suffix):
        d.add(0, text[:12])
        d.add(1, [9, 10, 11, 12] * 3)
    for s in (0, 1):
        hybrid.mtp.retire(s)
    assert hybrid.mtp.idle
    pos, drafted = {0: 12, 1: 12}, 0
    for step in range(10):
        slots = [DraftSlot(0, 8), DraftSlot(1, 8)]
        got, want = hybrid.propose(slots), suffix.propose(slots)
        assert got == want
        drafted += sum(map(len, got))
        for s, draft in zip((0, 1), got):
            seq = text if s == 0 else [9, 10, 11, 12] * 50
            emitted = seq[pos[s]: pos[s] + len(draft) + 1]
            pos[s] += len(emitted)
            hybrid.accepted(s, emitted)
            suffix.accepted(s, emitted)
    assert len(fast) == 10 and drafted > 10  # the fast path ran every step, and drafted
