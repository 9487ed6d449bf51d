"""The FastAPI application: lifespan (engine process, its supervision, stats line, drain), middleware, utility
routes.

Routes: OpenAI (server/openai_api.py, server/responses_api.py), Anthropic (server/anthropic_api.py), all on the
shared serving layer (server/chat_serving.py); and here `GET /health` (503 until
the engine is ready, while it is dead or restarting, and while draining), `GET /health_generate` (a one-token
generation), `GET /v1/models`, `GET /metrics`, `GET|HEAD /`, `GET /version`, `GET /server_info` and
`GET /openapi.json` (the request schemas; behind the API key like every route but /health, /version, HEAD /).

Supervision: when the engine process dies or stalls (server/engine_client.py), the server restarts it up to
--engine-restart times; after that `on_fatal` stops the server with a non-zero exit code, so that systemd or
Kubernetes start a fresh one instead of a front end answering 503 forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response
from transformers import AutoTokenizer

from server.anthropic_api import router as anthropic_router
from server.chat_template import ChatTemplate, load_chat_template
from server.config import ServerConfig
from server.drain import Drainer
from server.engine_client import EngineClient, EngineStartupError, new_request_id
from server.errors import APIError, error_response
from server.metrics import CONTENT_TYPE, Metrics, kv_usage
from server.middleware import GlintMiddleware
from server.openapi import add_request_schemas
from server.openai_api import router as openai_router
from server.responses_api import router as responses_router
from server.tokenize_api import router as tokenize_router
from server.serving import Generation, ServerState, make_sampling_params

logger = logging.getLogger("glint.server")

VERSION = "0.1.0"


def load_generation_defaults(model_dir: str) -> dict[str, Any]:
    """Sampling defaults from generation_config.json (temperature, top_p, top_k), as SGLang's
    --sampling-defaults model does."""
    path = Path(model_dir) / "generation_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if isinstance(data.get(key), (int, float)) and not isinstance(data.get(key), bool):
            out[key] = data[key]
    return out


def build_app(
    config: ServerConfig,
    engine_kwargs: dict[str, Any],
    *,
    tokenizer: Any = None,
    on_ready: Callable[[ServerState], None] | None = None,
    on_fatal: Callable[[str], None] | None = None,
    on_drained: Callable[[], None] | None = None,
    client_options: dict[str, Any] | None = None,
) -> FastAPI:
    """`engine_kwargs` go to EngineConfig.create in the engine process (see cli.engine_kwargs).
    `on_fatal`: the engine is gone for good (stop the server, non-zero exit); `on_drained`: a drain
    (app.state.drainer, started from a signal handler) is over (stop the server)."""
    model_path = engine_kwargs["model"]
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(config.engine.get("tokenizer") or model_path)
    template = ChatTemplate(
        tokenizer, load_chat_template(config.chat_template), config.default_chat_template_kwargs_dict,
        cache_chars=config.tokenizer_cache_chars,
    )
    names = config.served_model_name or (Path(str(model_path)).name,)
    metrics = Metrics(names[0])
    client = EngineClient(
        engine_kwargs,
        log_level=config.log_level,
        stall_timeout=config.engine_stall_timeout,
        **(client_options or {}),
    )
    state = ServerState(
        config=config,
        client=client,
        tokenizer=tokenizer,
        chat_template=template,
        metrics=metrics,
        served_model_names=tuple(names),
        model_path=str(model_path),
        generation_defaults=load_generation_defaults(str(model_path))
        if config.sampling_defaults == "model"
        else {},
    )
    client.add_stats_listener(metrics.update_from_stats)
    drainer = Drainer(state, on_drained or (lambda: None))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        drainer.loop = asyncio.get_running_loop()
        await client.start()
        tasks = [asyncio.create_task(_supervise(state, on_ready, on_fatal), name="glint-supervisor")]
        if config.stats_interval > 0:
            tasks.append(asyncio.create_task(_stats_logger(state), name="glint-stats"))
        try:
            yield
        finally:
            state.draining = True
            drainer.loop = None
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            logger.info("shutting down the engine process")
            await client.shutdown()
            state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="glint",
        version=VERSION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.glint = state
    app.state.drainer = drainer
    add_request_schemas([openai_router, anthropic_router, responses_router, tokenize_router])
    app.include_router(openai_router)
    app.include_router(anthropic_router)
    app.include_router(responses_router)
    app.include_router(tokenize_router)
    _add_utility_routes(app, state)
    _add_error_handlers(app)
    app.add_middleware(
        GlintMiddleware,
        api_keys=config.api_key,
        metrics_public=config.metrics_public,
        cors=bool(config.allowed_origins),
        max_body=lambda: config.request_bytes_limit(state.max_model_len),
        counter=state.requests,
        log_requests=config.log_requests,
        log_format=config.log_format,
    )
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=list(config.allowed_methods),
            allow_headers=list(config.allowed_headers),
            allow_credentials=config.allow_credentials,
            expose_headers=["x-request-id"],
        )
    return app


async def _supervise(state: ServerState, on_ready, on_fatal) -> None:
    """Wait for the engine; then, each time it dies, restart it (--engine-restart) or give up (`on_fatal`)."""
    client, limit = state.client, state.config.engine_restart
    error = await _await_ready(state, on_ready)
    if error is not None:
        logger.error("the engine failed to start: %s", error)
        if on_fatal is not None:
            on_fatal(error)
        return
    while True:
        reason = await client.wait_dead()
        if state.draining:
            return
        if client.restarts >= limit:
            logger.error(
                "the engine is gone (%s) and no restart is left (--engine-restart %d): stopping the server",
                reason,
                limit,
            )
            if on_fatal is not None:
                on_fatal(reason)
            return
        logger.warning("restarting the engine (restart %d of %d)", client.restarts + 1, limit)
        await client.restart()
        state.metrics.engine_restarts.inc()
        error = await _await_ready(state, None)
        if error is not None:
            logger.error("the restarted engine failed to start: %s", error)
            client.kill(f"restart failed: {error}")
        else:
            logger.info("the engine is back (restart %d of %d)", client.restarts, limit)


async def _await_ready(state: ServerState, on_ready) -> str | None:
    """None once the engine is ready, else why it did not get there."""
    try:
        info = await state.client.wait_ready(state.config.engine_ready_timeout)
    except (EngineStartupError, asyncio.TimeoutError) as e:
        return str(e) or "timed out waiting for the engine to load"
    state.max_model_len = int(info["max_model_len"])
    state.eos_token_ids = frozenset(info.get("eos_token_ids") or ())
    stats = info.get("stats") or {}
    logger.info(
        "engine ready: max_model_len=%d, KV cache capacity %d tokens (%d pages of %d tokens)",
        state.max_model_len,
        stats.get("kv_capacity_tokens", 0),
        stats.get("total_kv_blocks", 0),
        (stats.get("kv_capacity_tokens", 0) // max(1, stats.get("total_kv_blocks", 1))),
    )
    if on_ready is not None:
        result = on_ready(state)
        if asyncio.iscoroutine(result):
            await result
    return None


async def _stats_logger(state: ServerState) -> None:
    interval = state.config.stats_interval
    last: dict[str, Any] = {}
    last_t = time.monotonic()
    was_idle = True
    while True:
        await asyncio.sleep(interval)
        s = state.client.stats
        if not s or not state.client.ready:
            continue
        now = time.monotonic()
        dt = max(now - last_t, 1e-6)
        if s.get("num_generated_tokens_total", 0) < last.get("num_generated_tokens_total", 0):
            last = {}  # a restarted engine counts from zero again
        d_prompt = s.get("num_prompt_tokens_total", 0) - last.get("num_prompt_tokens_total", 0)
        d_gen = s.get("num_generated_tokens_total", 0) - last.get("num_generated_tokens_total", 0)
        d_q = s.get("prefix_cache_queried_tokens", 0) - last.get("prefix_cache_queried_tokens", 0)
        d_h = s.get("prefix_cache_hit_tokens", 0) - last.get("prefix_cache_hit_tokens", 0)
        idle = d_prompt == 0 and d_gen == 0 and not s.get("num_running") and not s.get("num_waiting")
        if not (idle and was_idle):
            logger.info(
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, Running: %d reqs, "
                "Waiting: %d reqs, KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%%s",
                d_prompt / dt,
                d_gen / dt,
                s.get("num_running", 0),
                s.get("num_waiting", 0),
                100 * kv_usage(s),
                100 * (d_h / d_q if d_q else 0.0),
                spec_summary(s, last),
            )
        was_idle = idle
        last, last_t = dict(s), now


def spec_summary(stats: dict[str, Any], last: dict[str, Any]) -> str:
    """The stats line's speculative-decoding part over the interval ('' without speculation)."""
    if "spec_num_verifies" not in stats:
        return ""
    delta = {k: stats.get(k, 0) - last.get(k, 0) for k in ("spec_num_verifies", "spec_draft_tokens", "spec_accepted_tokens")}
    verifies, drafted, accepted = delta["spec_num_verifies"], delta["spec_draft_tokens"], delta["spec_accepted_tokens"]
    return (
        f", Spec: {drafted} draft / {accepted} accepted tokens ({100 * accepted / drafted if drafted else 0.0:.1f}%), "
        f"mean accepted length {(accepted + verifies) / verifies if verifies else 0.0:.2f}"
    )


def _add_utility_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.ready:
            return Response(status_code=200)
        if state.draining:
            reason = "shutting down"
        else:
            reason = state.client.dead_reason or ("restarting" if state.client.restarts else "starting")
        return JSONResponse(
            {"status": "unavailable", "reason": reason}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        if not state.ready or state.disagg_info["mode"] != "null":
            return await health()  # a prefill/decode instance generates only with its peer (via the router)
        ids = state.chat_template.encode("hi") or [0]
        params = make_sampling_params(state, req=None, max_tokens=1, n=1)
        gen = Generation(
            state, new_request_id("health"), n=1, prompt_len=len(ids), log={}, arrival=time.monotonic()
        )
        try:
            await gen.start(ids, params, None)
            async for _ in gen.batches():
                pass
        except APIError as e:
            return error_response(e)
        finally:
            gen.close()
        return Response(status_code=200)

    @app.get("/")
    async def root() -> Response:
        return JSONResponse({"name": "glint", "version": VERSION, "ready": state.ready})

    @app.head("/")
    async def root_head() -> Response:  # a liveness probe: no key needed (see server/middleware.py)
        return JSONResponse({"name": "glint", "version": VERSION, "ready": state.ready})

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": VERSION})

    @app.get("/v1/models")
    async def models() -> Response:
        created = int(state.started_at)
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "glint",
                "root": state.model_path,
                "parent": None,
                "max_model_len": state.max_model_len or None,
            }
            for name in state.served_model_names
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id not in state.served_model_names:
            raise APIError(
                404,
                f"The model {model_id!r} does not exist; this server serves {list(state.served_model_names)}",
                code="model_not_found",
            )
        return JSONResponse(
            {
                "id": model_id,
                "object": "model",
                "created": int(state.started_at),
                "owned_by": "glint",
                "root": state.model_path,
                "max_model_len": state.max_model_len or None,
            }
        )

    @app.get("/disagg/info")
    async def disagg_info() -> Response:
        """This instance's disaggregation role for the router (disagg/router.py): mode, the prefill side's
        bootstrap address, the served model names."""
        state.check_ready()
        info = state.disagg_info
        return JSONResponse(
            {"mode": info["mode"], "bootstrap_addr": info["bootstrap_addr"], "models": list(state.served_model_names)}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.client.ready and state.client.alive:
            state.metrics.update_from_stats(state.client.stats)
        else:  # client.stats are a dead engine's last ones until a new engine is ready
            state.metrics.engine_down()
        encoder = state.chat_template.encoder
        state.metrics.update_tokenizer_cache(encoder.hit_chars, encoder.miss_chars)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/server_info")
    async def server_info() -> Response:
        return JSONResponse(
            {
                "version": VERSION,
                "ready": state.ready,
                "model": state.model_path,
                "served_model_names": list(state.served_model_names),
                "max_model_len": state.max_model_len,
                "engine": state.client.stats,
                "engine_pid": state.client.info.get("pid"),
                "config": {
                    k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in state.config.non_default_args().items()
                },
            }
        )


def _add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, err: APIError) -> Response:
        """The error response; its message goes into the request's log line (every 4xx/5xx says why)."""
        request.scope.setdefault("state", {}).setdefault("glint_log", {}).setdefault("error", err.message)
        return error_response(err, request.url.path)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errs = exc.errors()
        loc = ".".join(str(x) for x in (errs[0].get("loc", ()) if errs else ()) if x != "body") or None
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return respond(request, APIError(400, f"invalid request: {msg}", param=loc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            err = APIError(404, f"no route for {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            err = APIError(
                405,
                f"method {request.method} is not allowed on {request.url.path}",
                code="method_not_allowed",
            )
        else:
            err = APIError(exc.status_code, str(exc.detail))
        headers = dict(getattr(exc, "headers", None) or {})
        err.headers.update(headers)
        return respond(request, err)

    @app.exception_handler(json.JSONDecodeError)
    async def json_error(request: Request, exc: json.JSONDecodeError) -> Response:
        return respond(request, APIError(400, f"the request body is not valid JSON: {exc}"))


__all__ = ["build_app", "PlainTextResponse"]
