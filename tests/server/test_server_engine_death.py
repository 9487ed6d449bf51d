"""When the engine process dies the front end says so: 503s (OpenAI-shaped, with Retry-After), an SSE error on
streams in flight, /health 503, and one clear log line."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest


@pytest.fixture(scope="module")
def server(launch_server):
    srv = launch_server("--stats-interval", "0")
    yield srv
    srv.stop()


def test_health_generate_then_engine_death(server):
    url = server.url
    assert httpx.get(url + "/health_generate", timeout=30).status_code == 200
    lines: list[str] = []
    started = threading.Event()

    def stream():
        body = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 2000,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: {") and '"content"' in line:
                    started.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(30)
    os.kill(server.engine_pid(), signal.SIGKILL)
    t.join(30)
    assert not t.is_alive()
    data = [ln for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    err = json.loads(data[-2][6:])["error"]
    assert err["type"] == "server_error" and "engine" in err["message"]

    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").status_code != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(url + "/health").status_code == 503
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and r.headers.get("retry-after")
    body = r.json()["error"]
    assert body["type"] == "server_error" and "engine" in body["message"]
    assert "ENGINE DIED" in server.log_text()
    assert server.proc.poll() is None  # the front end stays up and keeps answering


def test_engine_start_failure_exits_nonzero(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run(
        [sys.executable, "-m", "server", "--port", "0", "--max-model-len", "999999"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "max_model_len" in r.stderr and "the engine failed to start" in r.stderr
