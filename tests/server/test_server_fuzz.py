"""A bounded schemathesis fuzz run against the live server's own OpenAPI schema (GET /openapi.json, behind the
API key): every operation, valid and invalid data, deterministic generation; the bar is 0 5xx, as schemathesis
sees them and as the server's own request log records them. A short context (64 tokens) keeps each generation
small."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def server(launch_server):
    srv = launch_server("--api-key", KEY, "--max-model-len", "64", "--stats-interval", "0")
    yield srv
    srv.stop()


def test_schemathesis_fuzz_has_no_5xx(server, tmp_path):
    cli = Path(sys.executable).with_name("schemathesis")
    before = len(server.log_text().splitlines())
    t0 = time.monotonic()
    run = subprocess.run(
        [
            str(cli),
            "run",
            f"{server.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {KEY}",
            "--checks",
            "not_a_server_error",
            "--phases",
            "fuzzing",
            "--max-examples",
            "20",
            "--generation-deterministic",
            "--workers",
            "2",
            "--request-timeout",
            "60",
            "--suppress-health-check",
            "all",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
    )
    elapsed = time.monotonic() - t0
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", run.stdout), run.stdout[-2000:]
    lines = [ln for ln in server.log_text().splitlines()[before:] if "glint.requests" in ln]
    served = [re.search(r'" (\d{3}) ', ln) for ln in lines]
    codes = [int(m.group(1)) for m in served if m]
    assert len(codes) >= 50, f"the fuzz run reached the server {len(codes)} times"
    assert not [c for c in codes if c >= 500], [ln for ln in lines if re.search(r'" 5\d\d ', ln)][:5]
    assert 200 in codes and 400 in codes
    print(f"schemathesis: {len(codes)} requests in {elapsed:.1f}s")


def test_no_traceback_in_the_fuzzed_server_log(server):
    text = server.log_text()
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
