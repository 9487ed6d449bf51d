"""Ctrl-C stops the server cleanly: exit code 0 and no traceback in its log, also when SIGINT arrives twice
(a wrapper like `timeout` forwarding it, or Ctrl-C pressed twice). uvicorn re-raises a captured SIGINT after its
shutdown, which used to log the lifespan task's cancellation as an ERROR traceback."""

from __future__ import annotations

import signal
import time

import httpx


def test_ctrl_c_twice_is_clean(launch_server):
    srv = launch_server("--stats-interval", "0")
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    srv.proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    srv.proc.send_signal(signal.SIGINT)
    code = srv.stop()  # waits for the exit (and checks that the engine process is gone)
    log = srv.log_text()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert "glint server stopped" in log
