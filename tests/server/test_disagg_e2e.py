"""Prefill/decode disaggregation end to end: `python -m disagg.router` over a prefill and a decode `python -m
server` on the tiny checkpoint, against a colocated server: the same greedy completions (chat, completions,
streaming, n > 1, prompts of several chunks, prefix hits, TP=2 on each side); killed instances end requests
within the deadline and give their pages back; random client disconnects leak no page on either side."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import REPO, LiveServer, free_port, metric

TIMEOUT = 6.0  # --disaggregation-timeout of the failure tests
ENV = {"UCX_NET_DEVICES": "lo"}


class Router:
    def __init__(self, prefill: list[str], decode: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")
        args = [a for url in prefill for a in ("--prefill", url)] + [a for url in decode for a in ("--decode", url)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "disagg.router", *args, "--port", str(self.port), "--health-interval", "0.5",
             "--read-timeout", "60"],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("router not ready:\n" + log_path.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def start(tmp: Path, name: str, *args: str, port: int | None = None) -> LiveServer:
    return LiveServer.started(list(args), ENV, tmp / f"{name}.log", port)


def role_args(mode: str, *extra: str) -> list[str]:
    args = ["--disaggregation-mode", mode, "--disaggregation-transfer-backend", "auto", *extra]
    if mode == "prefill":
        args += ["--disaggregation-bootstrap-port", str(free_port())]
    return args


def engine_stats(url: str) -> dict:
    return httpx.get(url + "/server_info", timeout=10).json()["engine"]


def wait_pages_back(*urls: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stats = [engine_stats(u) for u in urls]
        if all(s["used_kv_blocks"] == 0 and s.get("disagg_rooms_active", 0) == 0 for s in stats):
            return
        assert time.monotonic() < deadline, f"pages still held: {stats}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disagg")
    procs = []
    try:
        colocated = start(tmp, "colocated", "--chunked-prefill-size", "64")
        procs.append(colocated)
        prefill = start(tmp, "prefill", *role_args("prefill", "--chunked-prefill-size", "64"))
        procs.append(prefill)
        decode = start(tmp, "decode", *role_args("decode"))
        procs.append(decode)
        router = Router([prefill.url], [decode.url], tmp / "router.log")
        procs.append(router)
        yield {"colocated": colocated, "prefill": prefill, "decode": decode, "router": router}
    finally:
        for p in reversed(procs):
            p.stop()


def long_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 1400) for _ in range(n)]


CASES = {
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "write a haiku about pages"}]}),
    "completions_ids": ("/v1/completions", {"prompt": long_prompt(300, 1)}),  # 5 chunks of 64 on the prefill side
    "completions_n2": ("/v1/completions", {"prompt": "def handover(kv):", "n": 2}),
}
COMMON = {"model": "glint-tiny", "temperature": 0, "max_tokens": 12, "ignore_eos": True}


def post(url: str, path: str, body: dict) -> dict:
    r = httpx.post(url + path, json={**COMMON, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def texts(resp: dict) -> list[str]:
    return [c["message"]["content"] + (c["message"].get("reasoning_content") or "") if "message" in c else c["text"]
            for c in sorted(resp["choices"], key=lambda c: c["index"])]


def stream_text(url: str, path: str, body: dict) -> str:
    out = []
    with httpx.stream("POST", url + path, json={**COMMON, **body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:]).get("choices", []):
                    delta = c.get("delta", {})
                    out.append(c.get("text") or delta.get("content") or delta.get("reasoning_content") or "")
    return "".join(out)


def test_router_gives_the_colocated_greedy_completions(cluster):
    col, router = cluster["colocated"].url, cluster["router"].url
    for name, (path, body) in CASES.items():
        assert texts(post(router, path, body)) == texts(post(col, path, body)), name
    # the same long prompt again: a prefix hit on the prefill side, still the same tokens
    hits = engine_stats(cluster["prefill"].url)["prefix_cache_hit_tokens"]
    path, body = CASES["completions_ids"]
    assert texts(post(router, path, body)) == texts(post(col, path, body))
    assert engine_stats(cluster["prefill"].url)["prefix_cache_hit_tokens"] >= hits + 256
    for name in ("chat", "completions_ids"):
        path, body = CASES[name]
        assert stream_text(router, path, body) == stream_text(col, path, body), name
    wait_pages_back(cluster["prefill"].url, cluster["decode"].url)
    prefill_metrics = httpx.get(cluster["prefill"].url + "/metrics").text
    decode_metrics = httpx.get(cluster["decode"].url + "/metrics").text
    assert metric(prefill_metrics, "glint:disagg_handovers_total") >= 6  # 3 cases + 1 hit + 2 streams
    assert metric(decode_metrics, "glint:disagg_received_total") >= 6
    assert metric(prefill_metrics, "glint:disagg_pages_sent_total") > 0


def test_serving_engine_processes_freeze_their_startup_heap(cluster):
    """Each server's engine process moved its start-up heap out of garbage collection (engine/gc_control.py) and
    reports the collector's pauses."""
    for name in ("colocated", "prefill", "decode"):
        stats = engine_stats(cluster[name].url)
        assert stats["gc_frozen_objects"] > 10000, (name, stats["gc_frozen_objects"])
        assert stats["gc_pause_seconds_total"] >= 0 and "gc_collections_gen2" in stats
        assert "glint:gc_pause_seconds_total" in httpx.get(cluster[name].url + "/metrics").text


def test_random_client_disconnects_leak_no_page(cluster):
    """200 streaming requests, about half of them dropped by the client at a random moment."""
    router = cluster["router"].url
    rng = random.Random(3)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {**COMMON, "prompt": long_prompt(rng.randint(4, 120), 100 + i), "max_tokens": rng.randint(1, 16),
                "stream": True}
        give_up = rng.random() < 0.5
        delay = rng.uniform(0.0, 1.5)
        with contextlib.suppress(httpx.HTTPError, asyncio.TimeoutError):
            async with asyncio.timeout(delay if give_up else 120):
                async with client.stream("POST", router + "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass

    async def main() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            await asyncio.gather(*(one(client, i) for i in range(200)))

    asyncio.run(main())
    wait_pages_back(cluster["prefill"].url, cluster["decode"].url, timeout=60)
    # and the pair still serves
    path, body = CASES["chat"]
    assert texts(post(router, path, body)) == texts(post(cluster["colocated"].url, path, body))


@pytest.fixture
def fragile(tmp_path):
    """A pair with a short handover deadline and slow prefills (16-token chunks), for killing one side."""
    procs = []
    try:
        prefill = start(tmp_path, "prefill", *role_args("prefill", "--chunked-prefill-size", "16",
                                                        "--disaggregation-timeout", str(TIMEOUT)))
        procs.append(prefill)
        decode = start(tmp_path, "decode", *role_args("decode", "--disaggregation-timeout", str(TIMEOUT)))
        procs.append(decode)
        router = Router([prefill.url], [decode.url], tmp_path / "router.log")
        procs.append(router)
        yield prefill, decode, router
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop()


def send_in_background(url: str, prompt: list[int]) -> dict:
    result: dict = {}

    async def run() -> None:
        t0 = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=120) as c:
                r = await c.post(url + "/v1/completions", json={**COMMON, "prompt": prompt, "max_tokens": 64})
                result["status"], result["body"] = r.status_code, r.text
        except httpx.HTTPError as exc:
            result["status"], result["body"] = None, repr(exc)
        result["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    th.start()
    result["thread"] = th
    return result


def kill(server: LiveServer) -> None:
    os.killpg(os.getpgid(server.engine_pid()), signal.SIGKILL)
    server.proc.kill()
    server.proc.wait(10)


def freeze_mid_handover(prefill: LiveServer, decode: LiveServer) -> int:
    """Wait until both sides hold the request's room, then SIGSTOP the prefill engine (so the handover cannot
    finish before the test kills an instance); returns the frozen pid."""
    deadline = time.monotonic() + 30
    while not (engine_stats(prefill.url)["disagg_rooms_active"] and engine_stats(decode.url)["disagg_rooms_active"]):
        assert time.monotonic() < deadline, "the request never reached both instances"
        time.sleep(0.05)
    pid = prefill.engine_pid()
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_killed_and_restarted_instances(fragile, tmp_path):
    """Kill the decode instance while a long prompt is prefilled: the client gets an error within the deadline
    and the prefill side's pages come back. Restart it on the same port: the router and the prefill instance
    take it back (a new Hello). Then kill the prefill instance mid-request: the decode side frees its
    reservation within the deadline."""
    prefill, decode, router = fragile
    res = send_in_background(router.url, long_prompt(4000, 7))  # 250 chunks of 16
    frozen = freeze_mid_handover(prefill, decode)
    kill(decode)
    os.kill(frozen, signal.SIGCONT)
    res["thread"].join(TIMEOUT + 30)
    assert res.get("status") != 200 and res["elapsed"] < TIMEOUT + 30, res
    wait_pages_back(prefill.url, timeout=TIMEOUT + 20)
    assert engine_stats(prefill.url)["disagg_failed_total"] >= 1

    decode = start(tmp_path, "decode2", *role_args("decode", "--disaggregation-timeout", str(TIMEOUT)),
                   port=decode.port)
    try:
        deadline = time.monotonic() + 30
        while httpx.get(router.url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the router did not take the restarted decode instance back"
            time.sleep(0.3)
        assert post(router.url, *CASES["chat"])["choices"][0]["finish_reason"] == "length"

        res = send_in_background(router.url, long_prompt(4000, 8))
        freeze_mid_handover(prefill, decode)
        kill(prefill)
        res["thread"].join(TIMEOUT + 30)
        assert res.get("status") != 200 and res["elapsed"] < TIMEOUT + 30, res
        wait_pages_back(decode.url, timeout=TIMEOUT + 20)
        stats = engine_stats(decode.url)
        assert stats["disagg_failed_total"] >= 1 and stats["disagg_quarantined_pages"] == 0
    finally:
        decode.stop()


def test_tensor_parallel_two_on_each_side(cluster, tmp_path):
    procs = []
    try:
        prefill = start(tmp_path, "prefill", "--tp-size", "2", *role_args("prefill", "--chunked-prefill-size", "64"))
        procs.append(prefill)
        decode = start(tmp_path, "decode", "--tp-size", "2", *role_args("decode"))
        procs.append(decode)
        router = Router([prefill.url], [decode.url], tmp_path / "router.log")
        procs.append(router)
        col = cluster["colocated"].url
        for name in ("completions_ids", "completions_n2"):
            path, body = CASES[name]
            assert texts(post(router.url, path, body)) == texts(post(col, path, body)), name
        wait_pages_back(prefill.url, decode.url)
    finally:
        for p in reversed(procs):
            with contextlib.suppress(Exception):
                p.stop()
