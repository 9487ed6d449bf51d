"""The one-shot all-reduce on real GPUs (2, 4 or 8 of them, NVLink peers): `bench.allreduce --check` under
torchrun -- ours against NCCL + the torch norm within bf16 rounding, the same bits on every rank -- at decode
sizes, then once more timed in CUDA graphs (the captured barriers must replay without a hang)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
WORLDS = [n for n in (2, 4, 8) if n <= _GPUS] or [2]
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_GPUS < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("mode", ["check", "timed"])
def test_one_shot_allreduce_on_gpus(world, mode):
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONPATH=str(ROOT))
    args = ["--check"] if mode == "check" else ["--calls", "20", "--replays", "5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "-m", "bench.allreduce",
           "--batches", "1,7,16,48,64", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("check batch") == 5 and "FAILED" not in proc.stdout
