"""The server side of prefill/decode disaggregation: the router's handover headers on every generation route
(400s when they are missing or malformed on a prefill/decode instance, ignored when colocated), DisaggParams
carried through the engine client's "add" message and the engine process to `core.add_request`, and
GET /disagg/info. The engine process runs tests/server/fake_disagg_core.py (no model)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx
import pytest

from engine.kv_connector import DisaggParams
from server.app import build_app
from server.config import ServerConfig
from server.errors import APIError
from server.serving import disagg_params

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the spawned engine process imports fake_disagg_core

KEY = {"Authorization": "Bearer k"}
BOOT = "tcp://10.0.0.1:8998"

# (path, body, where the generated text is) for every generation route
ROUTES = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                              "chat_template_kwargs": {"enable_thinking": False}}),
    ("/v1/messages", {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 1, "reasoning": {"effort": "none"}}),
]


def run_with_app(mode: str, tiny_bf16: Path, check) -> None:
    """Start the app (its engine process runs the fake core in `mode`), wait until ready, run `check(client)`."""
    cfg = ServerConfig(api_key=("k",), served_model_name=("tiny",), stats_interval=0)
    app = build_app(cfg, {"model": str(tiny_bf16)},
                    client_options={"core_factory": "fake_disagg_core:build", "extra": {"mode": mode}})
    state = app.state.glint

    async def main() -> None:
        async with app.router.lifespan_context(app):
            deadline = time.monotonic() + 120
            while not (state.ready and state.max_model_len):
                assert time.monotonic() < deadline, "the fake engine did not get ready"
                await asyncio.sleep(0.05)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=KEY) as c:
                await check(c)

    asyncio.run(main())


def handover(room: str | None, bootstrap: str | None = None) -> dict[str, str]:
    h = {}
    if room is not None:
        h["X-Glint-Disagg-Room"] = room
    if bootstrap is not None:
        h["X-Glint-Disagg-Bootstrap"] = bootstrap
    return h


def test_decode_instance_needs_the_router_headers(tiny_bf16):
    async def check(c: httpx.AsyncClient) -> None:
        for path, body in ROUTES:
            r = await c.post(path, json=body)  # straight to the instance, not through the router
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            if path == "/v1/messages":
                assert r.json()["type"] == "error" and err["type"] == "invalid_request_error"
            else:
                assert err["type"] == "invalid_request_error" and err["code"] == "disaggregation_router_required"
            assert "python -m disagg.router" in err["message"] and "decode" in err["message"]
            r = await c.post(path, json=body, headers=handover("7"))  # no bootstrap address
            assert r.status_code == 400 and "X-Glint-Disagg-Bootstrap" in r.text, (path, r.text)
            for bad in ("seven", "-1", "+7", "1_0", "7.0", str(1 << 63), ""):
                r = await c.post(path, json=body, headers=handover(bad, BOOT))
                assert r.status_code == 400 and "X-Glint-Disagg-Room" in r.text, (path, bad, r.text)
            r = await c.post(path, json=body, headers=handover("7", "10.0.0.1:8998"))
            assert r.status_code == 400 and "tcp://host:port" in r.text, (path, r.text)
            r = await c.post(path, json=body, headers=handover(" 7 ", BOOT))
            assert r.status_code == 200, (path, r.text)
            assert f"disagg=DisaggParams:7:{BOOT}" in r.text, (path, r.text)
        # n > 1 passes through unchanged: one request, every choice handed over under the same room
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "n": 2},
                         headers=handover(str((1 << 63) - 1), BOOT))
        texts = [ch["text"] for ch in r.json()["choices"]]
        assert texts == [f"disagg=DisaggParams:{(1 << 63) - 1}:{BOOT}"] * 2
        r = await c.get("/disagg/info")
        assert r.status_code == 200 and r.json() == {"mode": "decode", "bootstrap_addr": None, "models": ["tiny"]}
        assert (await c.get("/disagg/info", headers={"Authorization": "Bearer wrong"})).status_code == 401

    run_with_app("decode", tiny_bf16, check)


def test_prefill_instance_needs_a_room_only(tiny_bf16):
    async def check(c: httpx.AsyncClient) -> None:
        for path, body in ROUTES:
            r = await c.post(path, json=body)
            assert r.status_code == 400 and "python -m disagg.router" in r.text, (path, r.text)
            r = await c.post(path, json=body, headers=handover("5"))
            assert r.status_code == 200 and "disagg=DisaggParams:5:" in r.text, (path, r.text)
        r = await c.get("/disagg/info")
        assert r.json() == {"mode": "prefill", "bootstrap_addr": "tcp://127.0.0.1:8998", "models": ["tiny"]}

    run_with_app("prefill", tiny_bf16, check)


def test_colocated_instance_ignores_the_headers(tiny_bf16):
    async def check(c: httpx.AsyncClient) -> None:
        for path, body in ROUTES:
            for headers in ({}, handover("not-a-room"), handover("3", BOOT)):
                r = await c.post(path, json=body, headers=headers)
                assert r.status_code == 200 and "disagg=none" in r.text, (path, headers, r.text)
        r = await c.get("/disagg/info")
        assert r.json() == {"mode": "null", "bootstrap_addr": None, "models": ["tiny"]}

    run_with_app("null", tiny_bf16, check)


def test_disagg_params_rules():
    assert disagg_params("null", {"X-Glint-Disagg-Room": "x"}) is None
    assert disagg_params("prefill", {"X-Glint-Disagg-Room": "0"}) == DisaggParams(0, "")
    assert disagg_params("decode", {"X-Glint-Disagg-Room": "12", "X-Glint-Disagg-Bootstrap": "tcp://[::1]:9"}) == \
        DisaggParams(12, "tcp://[::1]:9")
    for headers in ({}, {"X-Glint-Disagg-Room": "٣"}, {"X-Glint-Disagg-Room": "1", "X-Glint-Disagg-Bootstrap": "tcp://h:0"},
                    {"X-Glint-Disagg-Room": "1", "X-Glint-Disagg-Bootstrap": "tcp://h:99999"},
                    {"X-Glint-Disagg-Room": "1", "X-Glint-Disagg-Bootstrap": "http://h:9"}):
        with pytest.raises(APIError) as e:
            disagg_params("decode", headers)
        assert e.value.status == 400, headers
