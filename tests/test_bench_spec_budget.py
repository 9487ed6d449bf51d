"""bench.spec_budget --repeat: the paired summary compares each round's method with none from the same round
and cell, so a slow round (the host, not the method) cancels out; with block interleaving also each request with
none's run of the same request in the same round, so a slow block cancels out."""
from __future__ import annotations

import random
import statistics
from collections.abc import Callable

import pytest

from bench.spec_budget import (
    STAT_KEYS,
    BlockRun,
    cell_metrics,
    median_ci,
    paired_summary,
    request_ratios,
    rotation,
)


def row(method: str, rep: int, tpot: float, dataset: str = "plain-code", conc: int = 1) -> dict:
    return {"method": method, "budget": "-" if method == "none" else "on", "dataset": dataset,
            "concurrency": conc, "rep": rep, "tpot_ms_mean": tpot}


def test_paired_ratios_cancel_a_slow_round():
    # round 1 ran on a slow host: every method 2x; mtp is 1% slower than none in every round
    rows = [row("none", 0, 1.00), row("mtp", 0, 1.01), row("none", 1, 2.00), row("mtp", 1, 2.02),
            row("none", 2, 1.00), row("mtp", 2, 1.01), row("none", 0, 5.0, conc=16), row("mtp", 0, 4.0, conc=16)]
    lines = paired_summary(rows)
    mtp_c1 = next(x for x in lines if " c1 " in x and "mtp" in x)
    assert "+1.0% vs none" in mtp_c1 and "median  1.010" in mtp_c1 and "over 3 rounds" in mtp_c1
    mtp_c16 = next(x for x in lines if "c16" in x and "mtp" in x)
    assert "-20.0% vs none" in mtp_c16
    assert all("vs none" not in x for x in lines if " none " in x)


# --- block interleaving: per-request pairing ---------------------------------------------------------------

def block_rows(method: str, tpot: Callable[[int, int, int], float], rounds: int = 4, blocks: int = 16,
               conc: int = 1) -> list[dict]:
    """A method's rows of one plain-code cell: request p{i} (block i // conc) has TPOT tpot(round, block, i)."""
    out = []
    for rep in range(rounds):
        bl = [{f"p{i}": tpot(rep, b, i) for i in range(b * conc, (b + 1) * conc)} for b in range(blocks)]
        out.append({**row(method, rep, statistics.fmean(t for d in bl for t in d.values()), conc=conc),
                    "blocks": bl})
    return out


def base_tpot(rep: int, block: int, i: int) -> float:
    return 0.40 + 0.01 * (i % 7)  # requests differ from one another, the same on every engine


def slow(rep: int, block: int) -> float:
    return 3.0 if (rep, block) in {(0, 2), (1, 5), (3, 0)} else 1.0  # the host's slow periods


def test_rotation_puts_every_engine_first_in_turn():
    assert rotation(3, 0) == [0, 1, 2] and rotation(3, 1) == [1, 2, 0] and rotation(3, 5) == [2, 0, 1]


def test_request_pairing_cancels_a_slow_block_of_every_engine():
    # a slow period hits the same blocks of both engines (they ran within seconds of each other); mtp is
    # otherwise exactly none: the per-request ratio must read 0.0% with a zero-width interval
    def f(rep: int, b: int, i: int) -> float:
        return base_tpot(rep, b, i) * slow(rep, b)
    rows = block_rows("none", f) + block_rows("mtp", f)
    (units,) = request_ratios(rows).values()
    assert len(units) == 4 * 16 and all(u == [1.0] for u in units)
    line = next(x for x in paired_summary(rows) if "per request" in x)
    assert "+0.0% vs none, 95% CI [+0.0%, +0.0%] over 64 request-rounds in 64 (round, block) units" in line


def test_request_pairing_reads_a_true_five_percent():
    # mtp 5% slower on every request, with independent noise of +-1% per run; three slow blocks hit none only
    # (3 of 32 units): the median shrugs them off
    rng = random.Random(1)
    def none(rep: int, b: int, i: int) -> float:
        return base_tpot(rep, b, i) * (1 + rng.uniform(-0.01, 0.01)) * slow(rep, b)

    def mtp(rep: int, b: int, i: int) -> float:
        return base_tpot(rep, b, i) * (1 + rng.uniform(-0.01, 0.01)) * 1.05
    rows = block_rows("none", none, conc=4, blocks=8) + block_rows("mtp", mtp, conc=4, blocks=8)
    (units,) = request_ratios(rows).values()
    med, lo, hi = median_ci(units)
    assert abs(med - 1.05) < 0.005 and lo < med < hi and 1.04 < lo and hi < 1.06
    assert sum(map(len, units)) == 4 * 8 * 4 and len(units) == 4 * 8


def test_aa_pair_is_the_noise_floor_and_pairs_by_request_not_position():
    # none#2 runs the same requests; its block dicts list them in another order: pairing must be by key
    rng = random.Random(2)
    def f(rep: int, b: int, i: int) -> float:
        return base_tpot(rep, b, i) * (1 + rng.uniform(-0.02, 0.02))
    aa = block_rows("none#2", f, conc=2, blocks=8)
    for r in aa:
        r["blocks"] = [dict(reversed(list(b.items()))) for b in r["blocks"]]
    rows = block_rows("none", f, conc=2, blocks=8) + aa
    lines = paired_summary(rows)
    assert len(lines) == 3 and " none " in lines[0] and "none#2" in lines[1]  # none itself: no paired line
    assert "per request" in lines[2] and lines[2].endswith("(A/A: the noise floor)")
    _, lo, hi = median_ci(next(iter(request_ratios(rows).values())))
    assert lo < 1.0 < hi and hi - lo < 0.03


def test_cell_metrics_add_up_over_blocks():
    stats = dict.fromkeys(STAT_KEYS, 0.0)
    runs = [BlockRun({"p0": [0.0, 0.001, 0.002], "p1": [0.0, 0.002]}, {**stats, "spec_draft_tokens": 4,
                                                                         "num_overlapped_steps": 2,
                                                                         "steps_decode_steps": 3,
                                                                         "steps_decode_seconds": 0.003,
                                                                         "hook_propose": 0.00006,
                                                                         "hook_accepted": 0.00004}, 0.5),
            BlockRun({"p2": [1.0, 1.004]}, {**stats, "spec_draft_tokens": 6, "gc_pause_seconds_total": 0.01,
                                            "steps_decode_steps": 1, "steps_decode_seconds": 0.005,
                                            "steps_prefill_steps": 1}, 0.5)]
    m = cell_metrics(runs)
    # step() wall per decode step over both blocks; drafter-hook time over every step, prefill ones included
    assert m["decode_steps"] == 4 and m["decode_step_ms"] == pytest.approx(2.0)
    assert m["drafter_us_per_step"] == pytest.approx(20.0)
    assert m["drafter_hooks_us_per_step"] == {"accepted": 8.0, "propose": 12.0}
    assert m["output_tokens"] == 7 and m["requests"] == 3 and m["output_tok_s"] == 7.0
    assert m["drafted_per_token"] == 10 / 7 and m["overlapped_steps"] == 2 and m["gc_pause_ms"] == 10.0
    assert m["blocks"] == [{"p0": 1.0, "p1": 2.0}, {"p2": pytest.approx(4.0)}]
    assert abs(m["tpot_ms_mean"] - 7 / 3) < 1e-9


def test_hybrid_and_suffix_are_also_paired_with_the_methods_the_issue_compares_them_with():
    none = block_rows("none", lambda rep, b, i: base_tpot(rep, b, i) * slow(rep, b))
    mtp = block_rows("mtp", lambda rep, b, i: 1.10 * base_tpot(rep, b, i) * slow(rep, b))
    suffix = block_rows("suffix", lambda rep, b, i: 0.50 * base_tpot(rep, b, i) * slow(rep, b))
    hybrid = block_rows("hybrid", lambda rep, b, i: 0.515 * base_tpot(rep, b, i) * slow(rep, b))
    lines = paired_summary(none + mtp + suffix + hybrid)
    text = "\n".join(lines)
    assert " +3.0% vs suffix, 95% CI [+3.0%, +3.0%]" in text  # hybrid 3% behind suffix, slow blocks cancelled
    assert " -53.2% vs mtp" in text  # hybrid vs MTP
    assert " -54.5% vs mtp" in text  # suffix vs MTP
    assert text.count("vs suffix") == 1 and text.count("vs mtp") == 2  # none and mtp compare with none only


def test_a_second_engine_of_any_method_is_paired_with_its_first():
    # suffix#2 is suffix run twice: against suffix it is the A/A line; against none and MTP it is paired as suffix
    none = block_rows("none", lambda rep, b, i: base_tpot(rep, b, i) * slow(rep, b))
    mtp = block_rows("mtp", lambda rep, b, i: 1.10 * base_tpot(rep, b, i) * slow(rep, b))
    suffix = block_rows("suffix", lambda rep, b, i: 0.50 * base_tpot(rep, b, i) * slow(rep, b))
    again = block_rows("suffix#2", lambda rep, b, i: 0.51 * base_tpot(rep, b, i) * slow(rep, b))
    lines = [x for x in paired_summary(none + mtp + suffix + again) if "per request" in x]
    aa = [x for x in lines if x.endswith("(A/A: the noise floor)")]
    assert len(aa) == 1 and " +2.0% vs suffix, 95% CI [+2.0%, +2.0%]" in aa[0]
    assert sum(" -53.6% vs mtp" in x for x in lines) == 1  # suffix#2 vs MTP (0.51 / 1.10)
    assert sum(" -49.0% vs none" in x for x in lines) == 1
