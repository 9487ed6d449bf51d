"""`torchrun --nproc-per-node 2 -m server --tp-size 2`: rank 0 serves HTTP + the engine core, rank 1 runs the
model worker loop; a chat request is answered and Ctrl-C brings every rank down."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from conftest import REPO, free_port


def test_torchrun_two_ranks_answer_chat(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "server", "--tp-size", "2",
         "--port", str(port)],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "glint-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["finish_reason"] == "length"
        text = (tmp_path / "server.log").read_text()
        assert "tensor-parallel rank 1/2 serving model steps" in text
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, as in a terminal
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("torchrun ranks did not shut down within 60 s after Ctrl-C")
        log.close()
    assert "tensor-parallel rank 1 stopped" in (tmp_path / "server.log").read_text()
