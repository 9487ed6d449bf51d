"""--base-gpu-id: which CUDA device an instance's ranks run on, without hiding GPUs (CUDA_VISIBLE_DEVICES) from the
other instances on the host (issue 20: a prefill and a decode instance on two GPUs move KV through CUDA IPC)."""
from __future__ import annotations

import pytest
import torch

from engine import EngineConfig
from engine.distributed import cuda_index
from server.cli import engine_kwargs, parse_args


def test_rank_devices_start_at_the_base(monkeypatch):
    assert [cuda_index(r, 4, 2) for r in range(4)] == [2, 3, 4, 5]
    assert cuda_index(0, 1, 1) == 1
    assert [cuda_index(r, 2, None) for r in range(2)] == [0, 1]  # no base: the local rank under TP
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert cuda_index(0, 1, None) == 3  # TP 1 without a base: whatever the caller made current


def test_checked_against_the_visible_devices(tiny_bf16, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = EngineConfig.create(str(tiny_bf16), device="cuda", base_gpu_id=1)
    assert cfg.parallel.base_gpu_id == 1
    with pytest.raises(ValueError, match=r"needs CUDA devices 1\.\.2, but this process sees 2"):
        EngineConfig.create(str(tiny_bf16), device="cuda", base_gpu_id=1, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="must be >= 0"):
        EngineConfig.create(str(tiny_bf16), device="cuda", base_gpu_id=-1)
    with pytest.raises(ValueError, match="selects a CUDA device; the engine runs on 'cpu'"):
        EngineConfig.create(str(tiny_bf16), device="cpu", base_gpu_id=0)
    assert EngineConfig.create(str(tiny_bf16), device="cpu").parallel.base_gpu_id is None


def test_server_flag():
    assert engine_kwargs(parse_args(["--model", "/ckpt", "--base-gpu-id", "1"]))["base_gpu_id"] == 1
