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


def _test_seed() -> int:
    """The torch seed of every kernel test: fixed, so CI runs the same inputs each time (an exact check, such as
    top-k ids on a near tie, may fail on a rare input); GLINT_TEST_SEED=<int> picks another, =random a fresh one
    per test for a soak run. A failing test's report names its seed."""
    value = os.environ.get("GLINT_TEST_SEED", "0")
    return int.from_bytes(os.urandom(4), "little") if value == "random" else int(value)


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest):
    seed = _test_seed()
    torch.manual_seed(seed)
    request.node.user_properties.append(("GLINT_TEST_SEED", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = (yield).get_result()
    seeds = [v for k, v in item.user_properties if k == "GLINT_TEST_SEED"]
    if report.failed and seeds:
        report.sections.append(("kernel test seed", f"rerun with GLINT_TEST_SEED={seeds[-1]}"))
