"""bench.spec_budget --repeat: the paired summary compares each round's method with none from the same round
and cell, so a slow round (the host, not the method) cancels out."""
from __future__ import annotations

from bench.spec_budget import paired_summary


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
