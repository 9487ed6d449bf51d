"""Ctrl-C stops the server cleanly: exit code 0 and no traceback in its log, also when SIGINT arrives twice
(a wrapper like `timeout` forwarding it, or Ctrl-C pressed twice). uvicorn re-raises a captured SIGINT after its
shutdown, which used to log the lifespan task's cancellation as an ERROR traceback. SIGTERM drains the requests
in flight (issue #22)."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from conftest import metric


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


def test_sigterm_drains_in_flight_requests_then_exits_0(launch_server, tmp_path):
    """SIGTERM mid-stream: new requests and /health get 503 at once; a request that finishes within
    --shutdown-timeout finishes normally; the rest end cleanly when it runs out (OpenAI stream: error event then
    [DONE]; Anthropic stream: error then message_stop; non-streaming: a 503); exit code 0, no traceback."""
    scripts = tmp_path / "scripts.json"
    scripts.write_text(json.dumps({"slow": [{"text": " tick", "sleep": 0.1}] * 300}))
    srv = launch_server(
        "--stats-interval", "0", "--shutdown-timeout", "4", env={"GLINT_TEST_SCRIPTS": str(scripts)}
    )
    url = srv.url
    slow = [{"role": "user", "content": "<<script:slow>>"}]
    results: dict[str, list[str]] = {}
    started = {k: threading.Event() for k in ("chat", "messages", "short")}

    def stream(key: str, path: str, body: dict) -> threading.Thread:
        def run() -> None:
            lines = results.setdefault(key, [])
            with httpx.stream("POST", url + path, json=body, timeout=60) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    if "tick" in line or '"content":"' in line or "_delta" in line:
                        started[key].set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def plain() -> None:
        body = {"messages": slow, "max_tokens": 200}
        results["plain"] = [httpx.post(url + "/v1/chat/completions", json=body, timeout=60).text]

    threads = [
        stream("chat", "/v1/chat/completions", {"messages": slow, "max_tokens": 200, "stream": True}),
        stream(
            "messages", "/v1/messages", {"model": "glint-tiny", "max_tokens": 200, "stream": True, "messages": slow}
        ),
        threading.Thread(target=plain, daemon=True),
    ]
    threads[-1].start()
    assert started["chat"].wait(30) and started["messages"].wait(30)
    deadline = time.monotonic() + 30
    while metric(httpx.get(url + "/metrics").text, "glint:num_requests_running") < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    threads.append(stream("short", "/v1/chat/completions", short))
    assert started["short"].wait(30)

    srv.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    time.sleep(0.2)
    assert httpx.get(url + "/health", timeout=5).status_code == 503
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
    assert (
        r.status_code == 503 and r.headers["retry-after"] and "shutting down" in r.json()["error"]["message"]
    )
    for t in threads:
        t.join(30)
    ended_after = time.monotonic() - t0
    code = srv.proc.wait(30)
    log = srv.log_text()
    assert code == 0, log[-3000:]
    assert 3.5 < ended_after < 15, ended_after  # the slow ones ran until --shutdown-timeout, not longer

    short_data = [ln for ln in results["short"] if ln.startswith("data: ")]
    assert short_data[-1] == "data: [DONE]" and not any('"error"' in ln for ln in short_data)
    assert json.loads(short_data[-2][6:])["choices"][0]["finish_reason"] == "length"
    chat_data = [ln for ln in results["chat"] if ln.startswith("data: ")]
    assert chat_data[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(chat_data[-2][6:])["error"]["message"]
    events = [ln[7:] for ln in results["messages"] if ln.startswith("event: ")]
    assert events[-2:] == ["error", "message_stop"], events[-4:]
    plain_err = json.loads(results["plain"][0])["error"]
    assert plain_err["code"] == "service_unavailable" and "shutting down" in plain_err["message"]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert "ended 3 request(s) still running at shutdown" in log and "glint server stopped" in log
