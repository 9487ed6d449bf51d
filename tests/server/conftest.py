"""Live-server fixtures for the server tests: `python -m server` on the tiny checkpoint, on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now and not one handed out before in this test run: a server binds it seconds
    later, and the kernel may give a closed port 0 bind's port to the next one (two reserved ports colliding)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class LiveServer:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        # scripted outputs: the test-only entry point that gives the engine process the scripted core
        entry = [str(REPO / "tests/server/scripted_server.py")] if "GLINT_TEST_SCRIPTS" in env else ["-m", "server"]
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "--port", str(self.port), *args],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    @classmethod
    def started(cls, args: list[str], env: dict[str, str], log_path: Path, port: int | None = None) -> "LiveServer":
        """A ready server (stopped again if it does not come up)."""
        srv = cls(args, env, log_path, port)
        try:
            srv.wait_ready()
        except Exception:
            srv.stop()
            raise
        return srv

    def wait_for_log(self, *needles: str, timeout: float = 10.0) -> str:
        """The log once every needle is in it (request lines are written after the response is sent)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            if all(n in text for n in needles) or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_text()[-4000:]}")

    def engine_pid(self) -> int:
        for line in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = line.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.proc.pid:
                    cmd = (line.parent / "cmdline").read_bytes()
                    if b"spawn_main" in cmd:
                        return int(line.parent.name)
        raise RuntimeError("engine process not found")

    def stop(self) -> int:
        """Ctrl-C the server; both the front end and the engine process must be gone afterwards."""
        if self._log.closed:
            return self.proc.returncode
        engine = None
        if self.proc.poll() is None:
            with contextlib.suppress(RuntimeError):
                engine = self.engine_pid()
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        if engine is not None:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{engine}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            stat = Path(f"/proc/{engine}/stat")
            alive = stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
            assert not alive, f"engine process {engine} survived the server's shutdown"
        return self.proc.returncode


@pytest.fixture(scope="session")
def launch_server(tmp_path_factory):
    """launch_server(*args, env={}) -> a ready LiveServer, stopped at the end of the session (or earlier by
    the module fixture that asked for it)."""
    servers: list[LiveServer] = []

    def launch(*args: str, env: dict[str, str] | None = None) -> LiveServer:
        srv = LiveServer.started(list(args), env or {}, tmp_path_factory.mktemp("server") / "server.log")
        servers.append(srv)
        return srv

    yield launch
    for srv in servers:
        srv.stop()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text output."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head == name or head.startswith(name + "{"):
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                return float(value)
    return None
