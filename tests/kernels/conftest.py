"""Kernel tests: on a machine without CUDA the Triton kernels run under the interpreter.

TRITON_INTERPRET is read when a @triton.jit function is decorated, i.e. when a kernels.triton_* module is
imported. This conftest is loaded before any test module of this folder is imported; it sets the variable
and re-imports any kernels.triton_* module that something else imported earlier without it, so the suite
also works as one `pytest` run over every folder.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    stale = [m for m in sys.modules if m == "kernels.triton_common" or m.startswith("kernels.triton_")]
    if stale:
        importlib.reload(sys.modules["kernels.triton_common"]) if "kernels.triton_common" in sys.modules else None
        for name in stale:
            if name != "kernels.triton_common":
                importlib.reload(sys.modules[name])


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    # fresh random inputs every run, reproducible within a run when a failure prints the seed
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed
