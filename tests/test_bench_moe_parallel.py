"""bench.moe_parallel on the CPU with the tiny checkpoint at TP2: every routed pair lands on exactly one
expert-parallel rank (asserted inside the bench), and the report names both layouts' shapes."""
from __future__ import annotations

import json

import pytest

from bench import moe_parallel
from model.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("mp") / "c", fmt="fp8-channel")


def test_cpu_run_reports_both_layouts(tiny_fp8, tmp_path, capsys):
    out = tmp_path / "mp.json"
    assert moe_parallel.main(["--model-dir", str(tiny_fp8), "--tp", "2", "--tokens", "1,9", "--routings", "3",
                              "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["tokens"], r["routings"]) for r in rows] == [(1, 3), (9, 3)]
    for r in rows:
        assert r["tp_us"] > 0 and r["ep_slowest_rank_us"] >= r["ep_mean_rank_us"] > 0
        assert 0 <= r["ep_slowest_rank_pairs"] <= r["tokens"] * 2  # tiny model: top-2
    text = capsys.readouterr().out
    assert "TP2 (width 16)" in text and "EP2 (4 experts x 32)" in text  # tiny: 8 experts of width 32


def test_a_pair_lost_between_ranks_is_caught(tiny_fp8, monkeypatch):
    real = moe_parallel.kernels.moe_local_ids
    monkeypatch.setattr(moe_parallel.kernels, "moe_local_ids", lambda ids, s, c, *a: real(ids, s, c - 1, *a))
    with pytest.raises(AssertionError):
        moe_parallel.main(["--model-dir", str(tiny_fp8), "--tp", "2", "--tokens", "16", "--device", "cpu"])
