"""Tensor parallelism on GPUs (NCCL): TP=2 agrees with TP=1 on real GLM-4.7 widths (dummy weights).

Each configuration runs in its own process (tests/scripts/tp_real_widths.py) under a hard timeout, so a stalled
rank fails the test with its log instead of hanging the session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "tp_real_widths.py"
TIMEOUT_S = int(os.environ.get("GLINT_TP_TEST_TIMEOUT_S", "150"))


def _run(path: Path, tp: int, mode: str, tmp: Path, kernels: str = "auto") -> tuple[torch.Tensor, list]:
    out = tmp / f"tp{tp}-{mode}-{kernels}.json"
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1", GLINT_KERNELS=kernels)
    try:
        proc = subprocess.run([sys.executable, str(SCRIPT), str(path), str(out), str(tp), mode], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"")[-3000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-3000:]
        err = (exc.stderr or b"")[-3000:] if isinstance(exc.stderr, bytes) else (exc.stderr or "")[-3000:]
        pytest.fail(f"tp={tp} {mode}: no result within {TIMEOUT_S}s\nstdout:\n{log}\nstderr:\n{err}")
    assert proc.returncode == 0, f"tp={tp} {mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    print(proc.stdout)
    res = json.loads(out.read_text())
    return torch.tensor(res["prompt_logprobs"]), res["tokens"]


def _compare(path: Path, tmp: Path, tag: str) -> tuple[float, float, list, list]:
    lp1, tok1 = _run(path, 1, "eager", tmp)
    lp2, tok2 = _run(path, 2, "eager", tmp)
    d = (lp1 - lp2).abs()
    print(json.dumps({f"{tag}_tp2_vs_tp1_mean": d.mean().item(), f"{tag}_tp2_vs_tp1_max": d.max().item(),
                      "tokens_equal": tok1 == tok2}))
    return d.mean().item(), d.max().item(), tok1, tok2


def test_tp2_matches_tp1_real_widths_bf16(tmp_path):
    """The strict check of the sharding: bf16 weights, where TP2 differs from TP1 only by rounding the two
    ranks' partial sums (a wrong shard or a missing all-reduce moves log-probs by whole nats). The noise floor
    is measured in the same run: TP1 through the torch reference ops instead of the Triton kernels (the same
    math, rounded differently). Random routers have near-ties, so bf16-sized differences flip experts."""
    from bench.real_shape import real_shape_model_dir

    path = real_shape_model_dir(num_layers=4, dense_layers=1, out_root=tmp_path,
                                overrides={"quantization_config": None})
    mean, worst, _, _ = _compare(path, tmp_path, "bf16")
    lp1 = torch.tensor(json.loads((tmp_path / "tp1-eager-auto.json").read_text())["prompt_logprobs"])
    lp_ref, _ = _run(path, 1, "eager", tmp_path, kernels="ref")
    floor = (lp1 - lp_ref).abs()
    print(json.dumps({"bf16_floor_mean": floor.mean().item(), "bf16_floor_max": floor.max().item()}))
    # 2026-11-22, 2x H200: TP2 vs TP1 mean 0.058 / max 0.88, floor 0.049 / 0.82. Greedy tokens are not
    # compared: a random model's top logits over 151k tokens are near-ties, and the floor run flips them too.
    assert mean < max(0.05, 2.0 * floor.mean().item()) and worst < 1.5


def test_tp2_matches_tp1_real_widths_fp8(tmp_path):
    """FP8 (the served format): TP2 also quantizes the row-parallel layers' inputs per shard (per-token scales
    over half the row), so it is noisier than bf16. Measured 2026-11-22 on 2x H200: mean 0.21, max 1.65 (4
    layers, random weights); the bound leaves room for that noise. The strict sharding check is the bf16 test
    (with bf16 the noise is small enough for a tight bound)."""
    from bench.real_shape import real_shape_model_dir

    path = real_shape_model_dir(num_layers=4, dense_layers=1, out_root=tmp_path)
    mean, worst, _, tok2 = _compare(path, tmp_path, "fp8")
    assert mean < 0.35 and worst < 3.0
    # CUDA graphs with the NCCL all-reduce inside, and a clean shutdown with them alive
    _, tok2g = _run(path, 2, "graphs", tmp_path)
    print(json.dumps({"graphs_equal_eager": tok2 == tok2g}))
    assert tok2g == tok2
