"""Comparison helpers for kernel tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def fp32_dot_tol(device: torch.device) -> float:
    """Relative error allowed where a kernel's tl.dot takes fp32 operands: exact fp32 in the interpreter; TF32
    tensor cores on a GPU (Triton's default input precision: 10-bit mantissas, ~1e-3 relative error after one
    or two GEMMs against an fp32 reference, H100 session 31), so an fp32 model on CUDA is not bit-exact."""
    return 5e-3 if device.type == "cuda" else 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf."""
    o = out.double()
    r = ref.double()
    if torch.isnan(o).any():
        return float("inf")
    return ((o - r).norm() / r.norm().clamp_min(1e-30)).item()


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (float) or an out-of-range pattern so unwritten elements show."""
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn
    elif t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-12345)
    return t


def empty_poisoned(*shape, dtype, device) -> torch.Tensor:
    return poison(torch.empty(*shape, dtype=dtype, device=device))


def fp8_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of FP8 elements that differ (bitwise)."""
    return (a.view(torch.uint8) != b.view(torch.uint8)).float().mean().item()


class poisoned_empty:
    """Within the block, torch.empty / empty_like / new_empty return poisoned memory, so every output (and
    workspace) a wrapper allocates starts as NaN and any element a kernel fails to write shows up."""

    def __enter__(self):
        self._saved = (torch.empty, torch.empty_like, torch.Tensor.new_empty)
        e, el, ne = self._saved

        def empty(*a, **k):
            return poison(e(*a, **k))

        def empty_like(*a, **k):
            return poison(el(*a, **k))

        def new_empty(self_, *a, **k):
            return poison(ne(self_, *a, **k))

        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
        return self

    def __exit__(self, *exc):
        torch.empty, torch.empty_like, torch.Tensor.new_empty = self._saved
        return False


def compile_sm90(group: str) -> subprocess.CompletedProcess:
    """Run one group of tests/kernels/compile_sm90.py (kernels compiled for sm_90 with its stub driver, no GPU)
    in a subprocess, so that its stub stays out of this one; without the interpreter flag."""
    here = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(here / "compile_sm90.py"), group], capture_output=True, text=True,
                          timeout=600, env=env, cwd=here.parent.parent)
