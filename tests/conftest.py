"""Shared fixtures: tiny GLM-4.7-format checkpoints (written once per session) and engine helpers."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter (kernel tests). TRITON_INTERPRET is read when a
# @triton.jit function is decorated, so set it before any test folder imports the engine (which imports
# kernels.triton_* modules): tests/disagg is collected before tests/kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from model.tiny import FORMATS, write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fmt: write_tiny_checkpoint(root / fmt, fmt=fmt, seed=0) for fmt in FORMATS}


@pytest.fixture(scope="session")
def tiny_bf16(tiny_dirs) -> Path:
    return tiny_dirs["bf16"]
