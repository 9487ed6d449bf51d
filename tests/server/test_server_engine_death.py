"""Supervision of the engine process (issue #22): when it dies (kill -9) or stalls (SIGSTOP), the streams in flight
get an error and their proper end, /health turns 503 at once, and the server restarts the engine
(--engine-restart) or, with no restart left, exits non-zero within seconds; a dead tensor-parallel rank is
fatal the same way. Never a front end answering 503 forever, never a zombie or an "exit code None"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import metric

from model.tiny import tiny_model_dir

STALL_TIMEOUT = 2.0


def stream_lines(
    url: str, path: str, body: dict, lines: list[str], started: threading.Event
) -> threading.Thread:
    def run() -> None:
        with httpx.stream("POST", url + path, json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if '"content"' in line or "_delta" in line:
                    started.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def long_chat() -> dict:
    return {
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def health(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return -1


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


def gone(pid: int) -> bool:
    """No such process, not even a zombie."""
    return not Path(f"/proc/{pid}").exists()


def test_kill9_restarts_the_engine_then_a_stall_with_no_restart_left_exits_1(launch_server):
    srv = launch_server(
        "--engine-restart", "1", "--engine-stall-timeout", str(STALL_TIMEOUT), "--stats-interval", "0"
    )
    url = srv.url
    assert httpx.get(url + "/health_generate", timeout=30).status_code == 200

    # 1. kill -9 mid-stream: error event + [DONE], /health 503 at once, then a fresh engine serves again
    first = srv.engine_pid()
    lines: list[str] = []
    started = threading.Event()
    t = stream_lines(url, "/v1/chat/completions", long_chat(), lines, started)
    assert started.wait(30)
    os.kill(first, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: health(url) == 503, 2, "/health 503 after kill -9")
    t.join(30)
    assert not t.is_alive()
    data = [ln for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    err = json.loads(data[-2][6:])["error"]
    assert err["type"] == "server_error" and "killed by signal SIGKILL" in err["message"], err
    wait_for(lambda: health(url) == 200, 60, "/health 200 after the restart")
    assert time.monotonic() - t0 < 60
    second = srv.engine_pid()
    assert second != first and gone(first), "the killed engine was not reaped"
    r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert metric(httpx.get(url + "/metrics").text, "glint:engine_restarts_total") == 1
    log = srv.log_text()
    assert "killed by signal SIGKILL" in log and "restarting the engine (restart 1 of 1)" in log
    assert "exit code None" not in log and "exit status unknown" not in log

    # 2. SIGSTOP during an Anthropic stream: no heartbeat -> error + message_stop; no restart left -> exit 1
    lines, started = [], threading.Event()
    body = {"model": "glint-tiny", "max_tokens": 2000, "stream": True, "messages": [{"role": "user", "content": "go"}]}
    t = stream_lines(url, "/v1/messages", body, lines, started)
    assert started.wait(30)
    os.kill(second, signal.SIGSTOP)
    t0 = time.monotonic()
    t.join(30)
    assert not t.is_alive()
    events = [ln[7:] for ln in lines if ln.startswith("event: ")]
    assert events[-2:] == ["error", "message_stop"], events[-5:]
    error = json.loads([ln for ln in lines if ln.startswith("data: ")][-2][6:])
    assert error["type"] == "error" and "stalled" in error["error"]["message"], error
    assert time.monotonic() - t0 < STALL_TIMEOUT + 10
    code = srv.proc.wait(30)
    assert code == 1, srv.log_text()[-3000:]
    assert time.monotonic() - t0 < STALL_TIMEOUT + 30
    wait_for(lambda: gone(second), 10, "the stopped engine killed and reaped")
    log = srv.log_text()
    assert "no heartbeat" in log and "no restart is left (--engine-restart 1)" in log
    assert "Traceback" not in log


def test_dead_tensor_parallel_rank_is_fatal(launch_server):
    """--tp-size 2 (ranks spawned by the engine process): kill -9 of rank 1 fails the next request with a 503 and
    stops the server with exit code 1 (default --engine-restart 0); no rank is left behind."""
    srv = launch_server("--tp-size", "2", "--stats-interval", "0")
    engine = srv.engine_pid()
    ranks = children(engine)
    assert len(ranks) == 1
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    os.kill(ranks[0], signal.SIGKILL)
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 503, r.text
    assert "tensor-parallel" in r.json()["error"]["message"]  # "rank 1 exited", or its collective failed
    assert srv.proc.wait(30) == 1
    wait_for(lambda: gone(engine), 10, "engine process gone")
    wait_for(lambda: gone(ranks[0]), 10, "rank process gone")
    assert "ENGINE DIED" in srv.log_text()


def test_engine_start_failure_exits_nonzero(tmp_path):
    """A checkpoint whose weights are missing passes the option checks and fails in the engine process."""
    model = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir("bf16"), model, ignore=shutil.ignore_patterns("*.safetensors*"))
    r = subprocess.run(
        [sys.executable, "-m", "server", "--port", "0", "--model", str(model)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "the engine failed to start" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("flags,why", [
    (["--max-model-len", "999999"], "max_model_len"),
    (["--kv-cache-dtype", "fp8_e4m3", "--device", "cpu"], "needs device 'cuda'"),
    (["--attention-backend", "fa3", "--device", "cpu"], "fa3"),
])
def test_options_that_cannot_work_fail_before_the_port_is_bound(flags, why):
    r = subprocess.run(
        [sys.executable, "-m", "server", "--port", "0", *flags],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "cannot start" in r.stderr and why in r.stderr, r.stderr[-2000:]
    assert "Uvicorn running" not in r.stderr and "engine process started" not in r.stderr
