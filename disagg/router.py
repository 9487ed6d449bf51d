"""The prefill/decode disaggregation router: one OpenAI and Anthropic endpoint in front of prefill and decode
instances (`python -m server --disaggregation-mode prefill|decode`).

    python -m disagg.router --prefill http://127.0.0.1:30001 --decode http://127.0.0.1:30002 --port 8000

Each generation request (chat completions, completions, messages, responses) goes, with one random room id, to a
prefill instance (header X-Glint-Disagg-Room) and a decode instance (X-Glint-Disagg-Room and
X-Glint-Disagg-Bootstrap: the prefill instance's bootstrap address); the client gets the decode instance's
response, streamed through unbuffered (disagg/router_proxy.py). /v1/models, /v1/messages/count_tokens and the
token utilities (/tokenize, /detokenize) are answered by a decode instance. With `--colocated URL ...` instead
(plain glint servers), each request goes to one of them, by prompt-prefix affinity and load, and its response
passes through: the same router in front of colocated instances, e.g. as the same-GPU-count baseline of a
disaggregated setup. /health is 200 while at least one instance of each role is healthy; /metrics are the
router's own (scrape the instances for theirs). Instances are checked at startup (roles must match) and every
--health-interval seconds (disagg/router_pool.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import httpx
import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from disagg.router_metrics import RouterMetrics
from disagg.router_pool import InstancePool, RouterStartupError
from disagg.router_proxy import DisaggResponse, RouterState, error_response, simple_proxy

logger = logging.getLogger("glint.router")

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses")
TOKEN_ROUTES = ("/v1/messages/count_tokens", "/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize")


@dataclass
class RouterConfig:
    prefill: list[str]
    decode: list[str]
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # keys clients must send (Bearer or x-api-key); empty: no check
    upstream_api_key: str | None = None  # sent by the router's own checks (default: the first of api_keys)
    connect_timeout: float = 5.0
    read_timeout: float = 1800.0  # per read: the longest silence allowed from an upstream (non-streaming: whole run)
    write_timeout: float = 60.0
    health_interval: float = 5.0
    health_timeout: float = 5.0
    startup_timeout: float = 900.0
    prefill_affinity_chars: int = 2048  # 0: no prefix affinity
    prefill_affinity_slack: int = 2
    connect_retries: int = 1
    shutdown_timeout: float = 30.0  # seconds open streams get to finish on SIGINT/SIGTERM
    log_level: str = "info"
    colocated: list[str] = field(default_factory=list)  # instead of prefill + decode: plain servers
    # the router reads a body whole before it forwards it: the cap keeps one upload from filling its memory
    # (above the instances' own default, 8 MiB, which they still apply)
    max_request_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:  # else uvicorn fails to bind only after the wait for the instances
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("connect_timeout", "read_timeout", "write_timeout", "health_interval", "health_timeout",
                     "max_request_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("connect_retries", "prefill_affinity_chars", "prefill_affinity_slack", "startup_timeout",
                     "shutdown_timeout"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def upstream_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout, read=self.read_timeout, write=self.write_timeout, pool=self.connect_timeout
        )

    def probe_headers(self) -> dict[str, bytes]:
        key = self.upstream_api_key or (self.api_keys[0] if self.api_keys else None)
        return {"authorization": f"Bearer {key}".encode()} if key else {}  # UTF-8, as clients send a key


def _probe_client(config: RouterConfig) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=config.health_timeout, trust_env=False)


def _authorized(request: Request, keys: tuple[str, ...]) -> bool:
    if not keys:
        return True
    auth = request.headers.get("authorization", "")
    offered = [auth[7:].strip()] if auth.lower().startswith("bearer ") else []
    if "x-api-key" in request.headers:
        offered.append(request.headers["x-api-key"].strip())
    # o.encode("latin-1"): the bytes as sent (Starlette decodes header values as latin-1), so a UTF-8 key matches
    return any(hmac.compare_digest(o.encode("latin-1"), k.encode()) for o in offered for k in keys)


def _unauthorized(path: str) -> Response:
    return error_response(
        path, 401, "invalid or missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
        "invalid_api_key",
    )


async def _poll(state: RouterState, config: RouterConfig, client: httpx.AsyncClient) -> None:
    while True:
        await asyncio.sleep(config.health_interval)
        try:
            await state.pool.refresh(client, config.probe_headers())
        except Exception:
            logger.exception("health check round failed")


def build_app(config: RouterConfig, pool: InstancePool | None = None) -> FastAPI:
    """The router app; `pool` is normally one that `InstancePool.wait_ready` has checked."""
    pool = pool or _pool(config)
    client = httpx.AsyncClient(
        timeout=config.upstream_timeout(),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        trust_env=False,
    )
    state = RouterState(
        pool, RouterMetrics(pool), client, config.prefill_affinity_chars, config.connect_retries
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        probe_client = _probe_client(config)
        poller = asyncio.create_task(_poll(state, config, probe_client))
        try:
            yield
        finally:
            tasks = [poller, *state.background]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.aclose()
            await probe_client.aclose()

    app = FastAPI(title="glint disaggregation router", lifespan=lifespan, openapi_url=None, docs_url=None)
    app.state.router = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """Unknown routes and methods in the route's error shape, as the instances answer them (not {"detail"})."""
        method, path = request.method, request.url.path
        if exc.status_code == 404:
            message, code = f"no route for {method} {path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"method {method} is not allowed on {path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), "http_error"
        resp = error_response(path, exc.status_code, message, code)
        resp.headers.update(exc.headers or {})  # a 405's Allow
        return resp

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        """A bug in the router still answers in the route's error shape (Starlette logs the traceback)."""
        return error_response(request.url.path, 500, f"internal error in the router: {type(exc).__name__}",
                              "internal_error")

    def add_generation_route(path: str) -> None:
        async def generate(request: Request) -> Response:
            if not _authorized(request, config.api_keys):
                return _unauthorized(path)
            body = await _read_body(request, config.max_request_bytes)
            if body is None:
                return _too_large(path, config.max_request_bytes)
            return DisaggResponse(state, path, body, request.headers)

        app.add_api_route(path, generate, methods=["POST"], name=path)

    for path in GENERATION_ROUTES:
        add_generation_route(path)

    async def tokens_only(request: Request) -> Response:
        """A route that tokenizes and never generates: any instance answers it (a decode one)."""
        if not _authorized(request, config.api_keys):
            return _unauthorized(request.url.path)
        body = await _read_body(request, config.max_request_bytes)
        if body is None:
            return _too_large(request.url.path, config.max_request_bytes)
        return await simple_proxy(state, "POST", request.url.path, body, request.headers)

    for path in TOKEN_ROUTES:
        app.add_api_route(path, tokens_only, methods=["POST"], name=path)

    @app.get("/v1/models")
    @app.get("/v1/models/{model_id:path}")
    async def models(request: Request) -> Response:
        if not _authorized(request, config.api_keys):
            return _unauthorized(request.url.path)
        return await simple_proxy(state, "GET", request.url.path, b"", request.headers)

    @app.get("/health")
    async def health() -> Response:
        body = {role: [i.describe() for i in pool.of_role(role)] for role in pool.roles}
        if pool.ready():
            return JSONResponse({"status": "ok", **body})
        down = [f"{i.role} {i.url}: {i.reason}" for i in pool.instances if not i.healthy]
        return JSONResponse(
            {"status": "unavailable", "down": down, **body}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def _too_large(path: str, limit: int) -> Response:
    return error_response(path, 413, f"the request body is larger than this router accepts ({limit} bytes; see "
                          "--max-request-bytes)", "request_too_large")


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is larger than `limit` bytes (read no further than that)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        return None
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def check_instances(config: RouterConfig, pool: InstancePool) -> None:
    """Wait for the instances and check their roles (raises RouterStartupError)."""
    async with _probe_client(config) as client:
        await pool.wait_ready(client, config.probe_headers(), config.startup_timeout)


def _pool(config: RouterConfig) -> InstancePool:
    return InstancePool(config.prefill, config.decode, config.prefill_affinity_slack, config.colocated)


def _url(value: str) -> str:
    return value if "://" in value else f"http://{value}"


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    d = RouterConfig(prefill=[], decode=[])
    p = argparse.ArgumentParser(prog="python -m disagg.router", description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", action="append", default=[], type=_url, metavar="URL",
                   help="a prefill instance (repeat for several)")
    p.add_argument("--decode", action="append", default=[], type=_url, metavar="URL",
                   help="a decode instance (repeat for several)")
    p.add_argument("--colocated", action="append", default=[], type=_url, metavar="URL",
                   help="instead of --prefill/--decode: a plain (colocated) instance (repeat for several)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--api-key", action="append", default=[], help="a key clients must send (repeatable)")
    p.add_argument("--upstream-api-key", default=None,
                   help="key the router's own checks (/disagg/info) send to the instances; default: the first "
                        "--api-key (client requests carry their own)")
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    p.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help="seconds an upstream may stay silent (between chunks of a stream; before the whole body "
                        "of a non-streaming answer)")
    p.add_argument("--write-timeout", type=float, default=d.write_timeout)
    p.add_argument("--health-interval", type=float, default=d.health_interval)
    p.add_argument("--health-timeout", type=float, default=d.health_timeout)
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout,
                   help="seconds to wait for the instances at startup; then start if one of each role is up")
    p.add_argument("--prefill-affinity-chars", type=int, default=d.prefill_affinity_chars,
                   help="route prompts sharing their first N characters to the same prefill (or colocated) instance "
                        "(0: off)")
    p.add_argument("--prefill-affinity-slack", type=int, default=d.prefill_affinity_slack,
                   help="leave the preferred instance when it has more than this many requests more "
                        "outstanding than the least loaded one")
    p.add_argument("--connect-retries", type=int, default=d.connect_retries,
                   help="new pairs to try when an instance refuses the connection")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds open responses get to finish on SIGINT/SIGTERM before they are cut")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="refuse larger request bodies with 413 (the router holds a body whole before forwarding)")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    a = p.parse_args(argv)
    if a.colocated and (a.prefill or a.decode):
        p.error("--colocated instances cannot be mixed with --prefill/--decode instances")
    if not a.colocated and not (a.prefill and a.decode):
        p.error("give at least one --prefill and one --decode instance, or --colocated instances")
    try:
        return RouterConfig(
            prefill=a.prefill, decode=a.decode, host=a.host, port=a.port, api_keys=tuple(a.api_key),
            upstream_api_key=a.upstream_api_key, connect_timeout=a.connect_timeout, read_timeout=a.read_timeout,
            write_timeout=a.write_timeout, health_interval=a.health_interval, health_timeout=a.health_timeout,
            startup_timeout=a.startup_timeout, prefill_affinity_chars=a.prefill_affinity_chars,
            prefill_affinity_slack=a.prefill_affinity_slack, connect_retries=a.connect_retries,
            shutdown_timeout=a.shutdown_timeout, log_level=a.log_level, colocated=a.colocated,
            max_request_bytes=a.max_request_bytes,
        )
    except ValueError as e:
        p.error("--" + str(e).replace("_", "-", 2))  # "connect_retries must be ..." -> "--connect-retries ..."


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream request otherwise
    pool = _pool(config)
    try:
        asyncio.run(check_instances(config, pool))
    except RouterStartupError as e:
        print(f"glint router: cannot start: {e}", file=sys.stderr)
        return 2
    for inst in pool.instances:
        logger.info("%s instance %s: %s", inst.role, inst.url, "healthy" if inst.healthy else inst.reason)
    uvicorn.run(
        build_app(config, pool), host=config.host, port=config.port, log_level=config.log_level,
        timeout_graceful_shutdown=config.shutdown_timeout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
