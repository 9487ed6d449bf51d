"""bench.allreduce's CPU smoke run: two gloo ranks, the one-shot kernel under the interpreter over /dev/shm
buffers; its correctness check must pass and every method must be timed (the GPU run is tests/gpu)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_run_checks_and_times_every_method(tmp_path):
    env = dict(os.environ, GLINT_ALLREDUCE_DEVICE="cpu", TRITON_INTERPRET="1", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    out = tmp_path / "ar.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m", "bench.allreduce",
           "--batches", "1,130", "--hidden", "2048", "--calls", "2", "--replays", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(": ok ") == 2 and "over the engine" in proc.stdout
    res = json.loads(out.read_text())
    assert set(res["us_per_call"]["1"]) == {"nccl+norm", "nccl", "one_shot", "fused", "fused+fp8"}
    assert all(c["same_on_every_rank"] and c["rel_err"]["plain"] == 0.0 for c in res["checks"])
