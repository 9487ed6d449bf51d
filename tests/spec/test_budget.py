"""The draft budget (spec/budget.py) on scripted acceptance: always-rejected drafts fall to 0 within a few steps
and are probed at the backed-off rate, always-accepted ones keep the cap, a request whose text turns
repetitive drafts again, the choice follows the step-cost model across batch sizes, and the switch turns it
all off."""
from __future__ import annotations

from collections.abc import Callable

import pytest

from spec.budget import DraftBudget, StepCost, StepCosts, matched_prefix

GEOMETRIC, CALIBRATED = "mtp-like", "suffix-like"  # drafts without / with per-token probabilities
from spec.config import SpeculativeConfig

WRONG = 7  # the target's token after a rejected draft: never a draft token below (those are >= 100)


def budget(**kw) -> DraftBudget:
    return DraftBudget(SpeculativeConfig.from_dict({"method": "suffix", **kw}))


def simulate(b: DraftBudget, kind: str, cap: int, steps: int, accepted: Callable[[int], bool],
             num_seqs: int = 1) -> list[list[int]]:
    """num_seqs requests, each step: plan, propose k drafts, emit (accepted drafts or a wrong token first).
    accepted(step): whether this step's drafts are all accepted (else the first is rejected)."""
    ids = list(range(num_seqs))
    history = []
    for t in range(steps):
        probs = [1.0] * cap if kind == CALIBRATED else None
        gains = [b.gains(s, "src", cap, probs) for s in ids]
        ks = b.plan(ids, gains, chain=[kind == GEOMETRIC] * num_seqs)
        drafts = {s: list(range(100, 100 + k)) for s, k in zip(ids, ks)}
        b.proposed({s: ("src", d, probs[: len(d)] if probs else None) for s, d in drafts.items()})
        for s, d in drafts.items():
            b.accepted(s, d + [WRONG] if accepted(t) else [WRONG])
        history.append(ks)
    return history


def probe_steps(ks: list[int], after: int) -> list[int]:
    return [t for t, k in enumerate(ks) if t > after and k > 0]


@pytest.mark.parametrize("kind,cap", [(GEOMETRIC, 3), (CALIBRATED, 16)])
def test_always_rejected_falls_to_zero_and_probes_with_backoff(kind, cap):
    ks = [h[0] for h in simulate(budget(), kind, cap, 200, lambda t: False)]
    assert ks[0] > 0  # a new request drafts (optimistic prior)
    first_zero = ks.index(0)
    assert first_zero <= 3, ks[:10]
    probes = probe_steps(ks, first_zero)
    assert all(ks[t] == 1 for t in probes)  # probes are single drafts
    # first probe after probe_interval (4) held steps, then the wait doubles per rejected probe up to 32
    assert probes[0] - first_zero == 3  # held steps first_zero .. first_zero + 2, probe on the 4th
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[:3] == [8, 16, 32] and set(gaps[3:]) == {32}, gaps
    drafted = sum(ks[first_zero:])
    assert drafted / len(ks[first_zero:]) < 0.05  # far below the cap


@pytest.mark.parametrize("kind,cap", [(GEOMETRIC, 3), (CALIBRATED, 16)])
def test_always_accepted_keeps_the_cap(kind, cap):
    for num_seqs in (1, 16):
        hist = simulate(budget(), kind, cap, 60, lambda t: True, num_seqs=num_seqs)
        # at B=1 a verify of 4 rows costs 2.2 decode steps (+ 2 chain steps for MTP): a new MTP request starts
        # with 1 draft and lengthens the chain as its acceptance proves near-certain
        first = next(t for t, ks in enumerate(hist) if ks == [cap] * num_seqs)
        assert first <= 10, hist[:12]
        assert all(k == cap for ks in hist[first:] for k in ks), hist


@pytest.mark.parametrize("kind,cap", [(GEOMETRIC, 3), (CALIBRATED, 8)])
def test_text_turning_repetitive_drafts_again(kind, cap):
    ks = [h[0] for h in simulate(budget(), kind, cap, 120, lambda t: t >= 60)]
    assert sum(ks[30:60]) <= 2  # held at 0 apart from probes
    back = next(t for t in range(60, 120) if ks[t] == cap)
    assert back <= 60 + 32 + 3, ks[60:]  # the next probe (at most max_probe_interval away), then the cap
    assert all(k == cap for k in ks[back:])


def test_rejected_request_does_not_hold_back_an_accepted_one():
    b = budget()
    ids = [0, 1]
    ks_hist = []
    for _ in range(40):
        gains = [b.gains(s, "mtp", 3) for s in ids]
        ks = b.plan(ids, gains, chain=[True, True])
        drafts = {s: list(range(100, 100 + k)) for s, k in zip(ids, ks)}
        b.proposed({s: ("mtp", d, None) for s, d in drafts.items()})
        b.accepted(0, drafts[0] + [WRONG])  # request 0: every draft accepted
        b.accepted(1, [WRONG])  # request 1: every draft rejected
        ks_hist.append(ks)
    assert all(ks[0] == 3 for ks in ks_hist)
    assert sum(ks[1] for ks in ks_hist[5:]) <= 4


def test_step_cost_interpolates_and_extrapolates():
    c = StepCost((1, 4, 16), (4.0, 8.0, 14.0))
    assert [c(1), c(4), c(16)] == [4.0, 8.0, 14.0]
    assert c(0) == 4.0 and c(2.5) == 6.0 and c(10) == 11.0
    assert c(32) == pytest.approx(22.0)  # the last slope (0.5 ms/row) beyond the table
    default = DraftBudget(SpeculativeConfig.from_dict({"method": "mtp"})).cost
    times = [default(n) for n in range(1, 2000)]
    assert all(a <= b for a, b in zip(times, times[1:]))


def test_measured_step_cost_takes_the_slowest_shape_per_row_count_and_never_falls():
    # (batch, rows per request) graphs: decode 4x1 and verify 1x4 are both 4 rows; a faster larger shape
    # (noise, or another kernel path) must not make rows look free
    c = StepCost.measured([(1, 0.50), (4, 0.52), (4, 0.61), (2, 0.55), (8, 0.58), (16, 0.90)])
    assert c.rows == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert c.ms == [0.50, 0.55, 0.61, 0.61, 0.90]
    with pytest.raises(ValueError, match="no measured points"):
        StepCost.measured([])


def test_a_measured_cost_replaces_the_configured_one():
    cfg = SpeculativeConfig.from_dict({"method": "mtp"})
    cheap = StepCost([1, 64], [0.5, 0.6])  # a small model: rows almost free
    b = DraftBudget(cfg, StepCosts(cheap, chain_step_ms=0.0))
    assert b.cost is cheap and b.chain_step_ms == 0.0 and b.chain_cost_tokens(4) == 0.0
    default = DraftBudget(cfg)
    assert default.cost(1) == cfg.step_cost_ms[0] and default.chain_step_ms == cfg.mtp_step_cost_ms
    # the same middling acceptance: the default (27-layer) costs hold a lone request back, the measured ones
    # let it draft its whole chain
    gains = [b.gains(0, "mtp", 3)]
    assert b.plan([0], gains, chain=[True]) == [3]
    assert default.plan([0], [[0.3, 0.09, 0.03]], chain=[True]) == [0]
    assert b.plan([0], [[0.3, 0.09, 0.03]], chain=[True]) == [3]


def test_a_whole_chain_cost_is_paid_once_and_only_when_some_request_drafts_with_mtp():
    cfg = SpeculativeConfig.from_dict({"method": "mtp"})
    step = StepCost([1, 64], [1.0, 1.1])
    gains = [[0.6, 0.36, 0.2]] * 4
    cheap = DraftBudget(cfg, StepCosts(step, 0.0, StepCost([1], [0.1])))
    dear = DraftBudget(cfg, StepCosts(step, 0.0, StepCost([1], [3.0])))
    assert cheap.plan(range(4), gains, chain=[True] * 4) == [3, 3, 3, 3]
    assert dear.plan(range(4), gains, chain=[True] * 4) == [0, 0, 0, 0]  # 4.8 tokens do not pay 3 ms more
    assert dear.plan(range(4), gains, chain=[False] * 4) == [3, 3, 3, 3]  # suffix drafts: no chain
    assert dear.chain_cost_tokens(4) == pytest.approx(4 * 3.0 / step(4))
    # held at 0 (gains too small to pay rows): a suffix-like request is probed now and then, an MTP one whose
    # 3 drafts could never pay the chain (12 tokens' worth at 4 requests) is not
    low = [[0.01, 0.001, 0.001]] * 4
    chained = [dear.plan(range(10, 14), low, chain=[True] * 4) for _ in range(20)]
    plain = [dear.plan(range(20, 24), low, chain=[False] * 4) for _ in range(20)]
    assert all(ks == [0, 0, 0, 0] for ks in chained) and any(any(ks) for ks in plain)


def _drafts_per_request(b: DraftBudget, num_seqs: int, accept: float, cap: int = 8) -> float:
    ids = list(range(num_seqs))
    probs = [accept ** (j + 1) for j in range(cap)]
    gains = [b.gains(s, "suffix", cap, probs) for s in ids]
    return sum(b.plan(ids, gains)) / num_seqs


def test_drafts_per_request_fall_as_a_linear_step_cost_grows_with_the_batch():
    # compute-bound: each row costs the same, so a bigger batch makes every draft row relatively dearer
    b = budget(step_cost_rows=[1, 2], step_cost_ms=[10.0, 10.5])
    per = [_drafts_per_request(b, n, 0.7) for n in (1, 4, 16, 64, 256)]
    assert all(x >= y for x, y in zip(per, per[1:])), per
    assert per[0] >= 4 and per[-1] <= 1, per


def test_default_cost_model_across_batches():
    # the H200 table: from B=1 to 64 the step gets relatively cheaper per row (more experts are touched by the
    # decode rows alone), past 64 it grows at the compute rate
    b = budget()
    assert b.row_cost_tokens(1) > b.row_cost_tokens(16) > b.row_cost_tokens(64) < b.row_cost_tokens(512)
    per = {n: _drafts_per_request(b, n, 0.6) for n in (1, 16, 64, 512)}
    assert per[16] > per[1] and per[64] > per[1] and per[512] < per[64], per
    for n in (1, 16, 64, 512):  # a draft expected to be accepted 1 time in 20 is never worth it
        assert _drafts_per_request(budget(), n, 0.05) == 0


def test_chain_steps_cost_mtp_drafts():
    # with expensive chain steps, MTP chains get shorter than suffix drafts of the same acceptance
    b = budget(mtp_step_cost_ms=4.0)
    g = [0.95, 0.9, 0.86]
    mtp = b.plan([0], [g], chain=[True])[0]
    suffix = b.plan([1], [g], chain=[False])[0]
    assert suffix == 3 and mtp < 3


def test_switch_off_drafts_to_the_cap_and_tracks_nothing():
    b = budget(draft_budget=False)
    hist = simulate(b, GEOMETRIC, 3, 30, lambda t: False)
    assert all(ks == [3] for ks in hist)
    assert b.probes == 0 and not b._requests


def test_forgotten_or_unverified_proposals_are_not_counted():
    b = budget()
    b.proposed({5: ("mtp", [100, 101], None)})
    b.proposed({6: ("mtp", [100], None)})  # the next step: 5's draft never ran (preempted)
    b.accepted(5, [WRONG])
    assert b.gains(5, "mtp", 1) == [pytest.approx(0.8)]  # the prior, untouched
    b.accepted(6, [WRONG])
    assert b.gains(6, "mtp", 1)[0] < 0.5
    b.forget(6)
    assert b.gains(6, "mtp", 1) == [pytest.approx(0.8)]


def test_matched_prefix():
    assert matched_prefix([1, 2, 3], [1, 2, 9]) == (2, True)
    assert matched_prefix([1, 2, 3], [1, 2, 3, 4]) == (3, False)
    assert matched_prefix([1, 2, 3], [1, 2]) == (2, False)  # cut by a stop: no rejection seen
    assert matched_prefix([], [4]) == (0, False)


@pytest.mark.parametrize("bad", [
    {"draft_budget": 1}, {"step_cost_rows": [4, 1], "step_cost_ms": [1.0, 2.0]},
    {"step_cost_ms": [1.0]}, {"step_cost_rows": [1, 2], "step_cost_ms": [2.0, 1.0]},
    {"acceptance_decay": 1.0}, {"probe_interval": 0}, {"probe_interval": 8, "max_probe_interval": 4},
    {"mtp_step_cost_ms": -1}, {"measure_step_cost": "yes"},
])
def test_config_errors_name_the_key(bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else "step_cost|probe_interval"):
        SpeculativeConfig.from_dict({"method": "suffix", **bad})


def test_suffix_calibration_is_per_match_length():
    # chance matches of a few tokens are rejected; that must not hold back the drafts of a long (copying) match
    from spec.suffix import budget_source
    from spec.suffix_index import SuffixDraft

    short = SuffixDraft([100, 101, 102], 3.0, 2, [1.0, 1.0, 1.0])
    long = SuffixDraft([100, 101, 102], 3.0, 24, [1.0, 1.0, 1.0])
    assert budget_source(short) != budget_source(long)
    b = budget()
    for _ in range(10):
        b.proposed({0: (budget_source(short), short.tokens, short.probs)})
        b.accepted(0, [WRONG])
    assert b.plan([0], [b.gains(0, budget_source(short), 3, short.probs)]) == [0]
    assert b.plan([0], [b.gains(0, budget_source(long), 3, long.probs)]) == [3]


def _reference_prefix(b: int, gains, chain, cost, chain_ms: float, chain_fixed=None) -> list[int]:
    """The plan's choice written plainly: candidates by gain (stable), the best prefix by tokens per ms."""
    cands = [(g, i, j) for i, gs in enumerate(gains) for j, g in enumerate(gs) if g >= 1e-3]
    order = sorted(range(len(cands)), key=lambda k: cands[k][0], reverse=True)
    best_rate, best_m = b / cost(b), 0
    for m in range(1, len(order) + 1):
        taken = [cands[k] for k in order[:m]]
        depth = max([j + 1 for _, i, j in taken if chain[i]], default=0)
        fixed = chain_fixed(b) if chain_fixed is not None and depth > 0 else 0.0
        rate = (b + sum(g for g, _, _ in taken)) / (cost(b + m) + chain_ms * max(0, depth - 1) + fixed)
        if rate > best_rate:
            best_rate, best_m = rate, m
    ks = [0] * len(gains)
    for k in order[:best_m]:
        ks[cands[k][1]] += 1
    return ks


def test_plan_equals_the_plain_reference_on_random_gains():
    import random

    rng = random.Random(0)
    b = budget(probe_interval=1000, max_probe_interval=1000)  # no probes: the optimizer's choice alone
    whole = DraftBudget(b_cfg := SpeculativeConfig.from_dict({"method": "mtp", "probe_interval": 1000,
                                                          "max_probe_interval": 1000}),
                    StepCosts(StepCost(b_cfg.step_cost_rows, b_cfg.step_cost_ms), 0.0, StepCost([1, 64], [1.0, 3.0])))
    for trial in range(200):
        num, cap = rng.choice([1, 2, 5, 16, 40]), rng.choice([1, 3, 8, 16])
        gains = []
        for _ in range(num):
            a, x, g = rng.random(), 1.0, []
            for _ in range(rng.randint(0, cap)):
                x *= min(1.0, a * (0.5 + rng.random()))
                g.append(round(x, 2))  # ties, within and across requests
            gains.append(g)
        chain = [rng.random() < 0.5 for _ in range(num)]
        want = _reference_prefix(num, gains, chain, b.cost, b.chain_step_ms)
        assert b.plan(list(range(1000 * trial, 1000 * trial + num)), gains, chain=chain) == want, (gains, chain)
        want = _reference_prefix(num, gains, chain, whole.cost, 0.0, whole.chain_fixed)
        assert whole.plan(list(range(1000 * trial, 1000 * trial + num)), gains, chain=chain) == want, (gains, chain)


def test_small_and_torch_prefix_paths_agree():
    """_best_prefix runs few candidates in Python and many in torch: the same arithmetic, the same choice."""
    import random

    rng = random.Random(1)
    cfg = SpeculativeConfig.from_dict({"method": "mtp", "probe_interval": 1000, "max_probe_interval": 1000})
    costs = [StepCosts(StepCost(cfg.step_cost_rows, cfg.step_cost_ms), 0.02, None),
             StepCosts(StepCost(cfg.step_cost_rows, cfg.step_cost_ms), 0.0, StepCost([1, 64], [1.0, 3.0]))]
    checked = 0
    for trial in range(300):
        b = DraftBudget(cfg, costs[trial % 2])
        num, cap = rng.choice([1, 2, 3, 5, 8]), rng.choice([1, 3, 4, 8])
        gains = [[round(rng.random() ** (j + 1), rng.choice([2, 6])) for j in range(rng.randint(0, cap))]
                 for _ in range(num)]
        chain = [rng.random() < 0.5 for _ in range(num)] if trial % 3 else None
        if not any(gains):
            continue
        cands = [(g, i, p) for i, gs in enumerate(gains) for p, g in enumerate(gs) if g >= 1e-3]
        small = b._best_prefix_small(num, num, cands, chain)
        assert small == b._best_prefix_torch(num, gains, chain), (gains, chain)
        checked += any(small)
    assert checked > 50  # the optimizer drafted in many of the cases, not only returned zeros
