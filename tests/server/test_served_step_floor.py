"""A serving run against its floor, end to end on CPU: bench.serving reads the live server's step accounting
(/server_info) before and after the run, and bench.step_floor sets the run's decode and prefill steps against
their floors (bandwidth and peaks given, as a GPU run would measure them)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import serving
from bench.step_floor import decode_floor_s
from model.tiny import tiny_model_dir


@pytest.fixture(scope="module")
def server(launch_server):
    srv = launch_server("--stats-interval", "0")
    yield srv
    srv.stop()


def test_bench_serving_records_the_server_steps_and_step_floor_reads_them(server, tmp_path, capsys):
    out = tmp_path / "run.json"
    rc = serving.main(["--base-url", server.url, "--dataset", "random", "--num-prompts", "6", "--input-len", "40",
                       "--output-len", "12", "--request-rate", "inf", "--output-json", str(out), "--disable-tqdm",
                       "--tokenizer", "none", "--endpoint", "completions"])
    assert rc == 0
    assert "Decode steps / mean ms / seqs:" in capsys.readouterr().out
    res = json.loads(out.read_text())
    steps, summary = res["server_steps"], res["summary"]
    assert summary["completed"] == 6
    # every generated token but each request's first came from a decode row (no speculation here)
    decode_rows = steps["steps_decode_rows"] + steps["steps_prefill_decode_seqs"]
    assert decode_rows == summary["total_output_tokens"] - 6
    assert 0 < steps["steps_prefill_tokens"] <= summary["total_input_tokens"]
    assert steps["tensor_parallel_size"] == 1 and steps["model_kv_bytes_per_token"] > 0

    proc = subprocess.run([sys.executable, "-m", "bench.step_floor", str(out), "--model", str(tiny_model_dir()),
                           "--bandwidth-gbps", "10", "--linear-tflops", "0.1", "--attention-tflops", "0.1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    floors = json.loads(proc.stdout.strip().splitlines()[-1])
    d = floors["decode"]
    n = steps["steps_decode_steps"]
    expect = decode_floor_s(steps, steps["steps_decode_seqs"] / n, steps["steps_decode_context_tokens"] / n, 10e9)
    assert d["floor_ms"] == pytest.approx(1e3 * expect) and d["ratio"] == pytest.approx(d["ms"] / d["floor_ms"])
    assert floors["prefill"]["floor_s"] > 0 and floors["run"]["ratio"] > 0
