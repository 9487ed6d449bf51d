"""What every generation route shares: server state, sampling parameters, the request lifecycle, logprobs.

`Generation` wraps one engine request: overload control, submission (engine refusals become 400s), iterating
delta batches (with `None` ticks for SSE keep-alives), per-request metrics and log fields, and an idempotent
`close()` that aborts the engine request unless it finished (client disconnects, errors, cancellation).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, TypeVar

from engine.kv_connector import DisaggParams
from engine.sampling_params import SamplingParams, StructuredOutput, ThinkingBudget
from server.chat_template import ChatTemplate
from server.config import ServerConfig
from server.engine_client import EngineClient, EngineDeadError, EngineRequestError, ServerShuttingDown
from server.errors import APIError, bad_request, unavailable
from server.metrics import Metrics
from server.middleware import RequestCounter
from server.protocol import parse_body

logger = logging.getLogger("glint.server")

MIN_LOGPROB = -9999.0  # JSON has no -inf

# Sent by the disaggregation router (disagg/router.py) with every request it forwards to a prefill or decode
# instance: the handover's room number, and (to the decode instance) the prefill instance's bootstrap address.
DISAGG_ROOM_HEADER = "X-Glint-Disagg-Room"
DISAGG_BOOTSTRAP_HEADER = "X-Glint-Disagg-Bootstrap"
MAX_ROOM = (1 << 63) - 1

T = TypeVar("T")


def new_executor() -> concurrent.futures.ThreadPoolExecutor:
    workers = max(2, min(8, os.cpu_count() or 2))
    return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="glint-worker")


def queued_estimate(stats: dict, num_unacked: int, max_running: int | None) -> int:
    """Requests that will sit in the engine's queue: those waiting now, plus the ones on their way to the engine
    (not acknowledged yet) that will not find a free running slot. Without the slot count every in-flight
    request counts as queued (two simultaneous requests to an idle server with --max-queued-requests 1 got a
    429 for the second)."""
    waiting = int(stats.get("num_waiting", 0))
    if max_running is None:
        return waiting + num_unacked
    free = max(0, int(max_running) - int(stats.get("num_running", 0)) - waiting)
    return waiting + max(0, num_unacked - free)


@dataclass
class ServerState:
    config: ServerConfig
    client: EngineClient
    tokenizer: Any
    chat_template: ChatTemplate
    metrics: Metrics
    served_model_names: tuple[str, ...]
    model_path: str
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    max_model_len: int = 0
    eos_token_ids: frozenset[int] = frozenset()
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    requests: RequestCounter = field(default_factory=RequestCounter)  # HTTP requests being served
    executor: concurrent.futures.ThreadPoolExecutor = field(default_factory=new_executor)
    _token_text: dict[int, str] = field(default_factory=dict)
    _token_bytes: dict[int, bytes] = field(default_factory=dict)
    _byte_decoder: dict[str, int] | None = None

    @property
    def ready(self) -> bool:
        return self.client.ready and self.client.alive and not self.draining

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    @property
    def disagg_info(self) -> dict[str, Any]:
        """This instance's disaggregation role, from the loaded engine: {"mode", "bootstrap_addr"}; mode
        "null" when colocated (the engine reports None or nothing) or while no engine is loaded."""
        info = self.client.info.get("disaggregation") or {}
        return {"mode": info.get("mode", "null"), "bootstrap_addr": info.get("bootstrap_addr")}

    def response_model(self, requested: str | None) -> str:
        """The model a request names: one of --served-model-name (none given: the first). Any other name is a
        404 model_not_found, as vLLM answers (clients such as Claude Code are pointed at a served name, or the
        name is added to --served-model-name)."""
        if not requested:
            return self.model_name
        if requested not in self.served_model_names:
            raise APIError(
                404,
                f"The model {requested!r} does not exist; this server serves {list(self.served_model_names)} "
                "(add names with --served-model-name)",
                param="model",
                code="model_not_found",
            )
        return requested

    def check_ready(self) -> None:
        if self.draining:
            raise unavailable("the server is shutting down")
        if not self.client.ready or not self.client.alive:
            if self.client.dead_reason:
                raise unavailable(f"the engine is not running ({self.client.dead_reason})", retry_after=30)
            if self.client.restarts:  # restart() cleared dead_reason; the new engine is still loading
                raise unavailable("the engine is restarting after a failure; the model is loading again")
            raise unavailable("the server is starting; the model is still loading")

    # ----------------------------------------------------------------------------------------- token text

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own UTF-8 bytes (byte-level BPE pieces may be part of a character)."""
        raw = self._token_bytes.get(token_id)
        if raw is None:
            raw = self._compute_token_bytes(token_id)
            self._token_bytes[token_id] = raw
        return raw

    def _compute_token_bytes(self, token_id: int) -> bytes:
        if self._byte_decoder is None:
            self._byte_decoder = _byte_level_decoder()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        special = getattr(self.tokenizer, "all_special_tokens", ()) or ()
        if isinstance(piece, str) and piece not in special and all(c in self._byte_decoder for c in piece):
            return bytes(self._byte_decoder[c] for c in piece)
        return self.token_text(token_id).encode("utf-8")


def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the byte-to-printable-character table of byte-level BPE (GPT-2 convention)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


# --------------------------------------------------------------------------------------------- origin


@dataclass(frozen=True)
class Origin:
    """Where a request comes from, as the engine needs to know: the tenant that scopes cross-request engine
    state (a digest of its API key, see server/middleware.py; "" without auth) and, on a prefill or decode
    instance, the router's handover (DisaggParams)."""

    tenant: str = ""
    disagg: DisaggParams | None = None


def request_origin(state: ServerState, request: Any) -> Origin:
    """The Origin of an HTTP request (every generation route calls this once)."""
    tenant = request.scope.get("state", {}).get("tenant", "")
    return Origin(tenant, disagg_params(state.disagg_info["mode"], request.headers))


def disagg_params(mode: str, headers: Any) -> DisaggParams | None:
    """The router's handover headers -> DisaggParams (None when colocated: the headers are ignored there).
    A prefill or decode instance serves only requests its router forwards; anything else is a 400."""
    if mode == "null":
        return None
    room_text = headers.get(DISAGG_ROOM_HEADER)
    if room_text is None:
        raise bad_request(
            f"this server is the {mode} instance of a disaggregated deployment and serves only requests forwarded "
            f"by its router (`python -m disagg.router`, which sends the {DISAGG_ROOM_HEADER} header); send "
            "requests to the router",
            code="disaggregation_router_required",
        )
    digits = room_text.strip()
    room = int(digits) if re.fullmatch(r"[0-9]{1,19}", digits) else -1
    if not 0 <= room <= MAX_ROOM:
        raise bad_request(
            f"{DISAGG_ROOM_HEADER} must be an integer in [0, 2^63 - 1], got {room_text[:64]!r}",
            code="invalid_disaggregation_header",
        )
    bootstrap = headers.get(DISAGG_BOOTSTRAP_HEADER, "").strip()
    if mode == "decode" and not bootstrap:
        raise bad_request(
            f"a decode instance needs the prefill instance's bootstrap address: the {DISAGG_BOOTSTRAP_HEADER} "
            "header (tcp://host:port), which the router (`python -m disagg.router`) sends",
            code="invalid_disaggregation_header",
        )
    if bootstrap and not _is_tcp_address(bootstrap):
        raise bad_request(
            f"{DISAGG_BOOTSTRAP_HEADER} must be tcp://host:port, got {bootstrap[:200]!r}",
            code="invalid_disaggregation_header",
        )
    return DisaggParams(room=room, bootstrap_addr=bootstrap)


def _is_tcp_address(addr: str) -> bool:
    if not addr.startswith("tcp://"):
        return False
    host, sep, port = addr[len("tcp://"):].rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536 and not any(c.isspace() for c in host))


# --------------------------------------------------------------------------------------------- sampling


def resolve_max_tokens(
    state: ServerState, requested: int | None, prompt_len: int, *, param: str, prompt_param: str
) -> int | None:
    """Clamp the output budget to the room left in the context; None = until the context is full."""
    room = state.max_model_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"This model's maximum context length is {state.max_model_len} tokens. However, your prompt has "
            f"{prompt_len} tokens, which leaves no room for output. Please shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
            # Claude Code compacts the conversation on this phrase and reads the two numbers from it
            anthropic_message=f"prompt is too long: {prompt_len} tokens > {state.max_model_len - 1} maximum",
        )
    if requested is None:
        return None
    if requested < 1:
        raise bad_request(f"{param} must be at least 1, got {requested}", param=param)
    return min(requested, room)


_FIELD_RE = re.compile(r"^([a-z_]+)")


def make_sampling_params(
    state: ServerState,
    *,
    req: Any,
    max_tokens: int | None,
    n: int,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    skip_special_tokens: bool = True,
    stop: Any = None,
    structured_output: StructuredOutput | None = None,
    thinking_budget: ThinkingBudget | None = None,
) -> SamplingParams:
    d = state.generation_defaults

    def pick(name: str, default: Any) -> Any:
        value = getattr(req, name, None)
        if value is not None:
            return value
        return d.get(name, default)

    min_tokens = getattr(req, "min_tokens", None) or 0
    if max_tokens is not None and min_tokens > max_tokens:
        min_tokens = max_tokens
    try:
        return SamplingParams(
            n=n,
            temperature=float(pick("temperature", 1.0)),
            top_p=float(pick("top_p", 1.0)),
            top_k=int(pick("top_k", 0)),
            min_p=float(pick("min_p", 0.0)),
            seed=getattr(req, "seed", None),
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop=stop if stop is not None else getattr(req, "stop", None),
            stop_token_ids=getattr(req, "stop_token_ids", None),
            ignore_eos=bool(getattr(req, "ignore_eos", False)),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            repetition_penalty=float(pick("repetition_penalty", 1.0)),
            presence_penalty=float(getattr(req, "presence_penalty", None) or 0.0),
            frequency_penalty=float(getattr(req, "frequency_penalty", None) or 0.0),
            skip_special_tokens=skip_special_tokens,
            include_stop_str_in_output=bool(getattr(req, "include_stop_str_in_output", False)),
            logit_bias=getattr(req, "logit_bias", None),
            structured_output=structured_output,
            thinking_budget=thinking_budget,
        )
    except (ValueError, TypeError) as e:
        m = _FIELD_RE.match(str(e))
        raise bad_request(str(e), param=m.group(1) if m else None) from None


def strip_stop_token_text(state: ServerState, delta: Any, params: SamplingParams) -> str:
    """The engine detokenizes a stop/EOS token into the text when special tokens are kept; drop it (unless
    include_stop_str_in_output) so `<|user|>` / `<|observation|>` never reach the client."""
    text = delta.new_text
    if not delta.finished or delta.finish_reason != "stop" or not delta.new_token_ids:
        return text
    if params.include_stop_str_in_output or isinstance(delta.stop_reason, str):
        return text
    last = delta.new_token_ids[-1]
    if last in state.eos_token_ids or last in params.stop_token_ids:
        piece = state.token_text(last)
        if piece and text.endswith(piece):
            return text[: len(text) - len(piece)]
    return text


# --------------------------------------------------------------------------------------------- lifecycle


class Generation:
    """One engine request (all n choices) seen from an HTTP handler."""

    def __init__(
        self,
        state: ServerState,
        request_id: str,
        *,
        n: int,
        prompt_len: int,
        log: dict[str, Any],
        arrival: float,
        origin: Origin = Origin(),
    ) -> None:
        self.state = state
        self.origin = origin
        self.request_id = request_id
        self.n = n
        self.prompt_len = prompt_len
        self.log = log
        self.arrival = arrival
        self.stream = None
        self.finished_indices: set[int] = set()
        self.finish_reasons: dict[int, str] = {}
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.closed = False

    @property
    def finished(self) -> bool:
        return len(self.finished_indices) >= self.n

    async def start(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None) -> None:
        st = self.state
        st.check_ready()
        limit = st.config.max_queued_requests
        if limit is not None:
            # this request counted too: refused when it would make the queue longer than the limit (with limit 0
            # a request that finds a free running slot is still served)
            waiting = queued_estimate(
                st.client.stats, st.client.num_unacked + 1, st.client.info.get("max_num_seqs")
            )
            if waiting > limit:
                st.metrics.num_rejected_requests.inc()
                raise APIError(
                    429,
                    f"the server is overloaded ({waiting} requests would be waiting, limit {limit}); retry later",
                    type="rate_limit_error",
                    code="server_overloaded",
                    headers={"Retry-After": "1"},
                )
        self.log["prompt_tokens"] = self.prompt_len
        try:
            self.stream = await st.client.add_request(
                self.request_id, prompt_token_ids, params, prompt, self.origin.tenant, self.origin.disagg
            )
        except EngineRequestError as e:
            if e.kind == "invalid":
                msg = str(e)
                code = "context_length_exceeded" if "context" in msg and "prompt" in msg else None
                raise bad_request(msg, code=code) from None
            raise APIError(500, f"the engine could not accept the request: {e}") from None
        except EngineDeadError as e:
            raise unavailable(f"the engine is not running ({e})", retry_after=30) from None
        st.metrics.num_requests_in_flight.inc()

    async def batches(self, keepalive: float | None = None) -> AsyncIterator[list[Any] | None]:
        """Delta batches until every choice finished; `None` after `keepalive` seconds of silence."""
        assert self.stream is not None
        while not self.finished:
            try:
                batch = await self.stream.next_batch(keepalive)
            except ServerShuttingDown:
                raise unavailable(
                    "the server is shutting down; this request was ended before it finished"
                ) from None
            except EngineDeadError as e:
                raise unavailable(
                    f"the engine stopped while serving this request ({e})", retry_after=30
                ) from None
            if batch is None:
                yield None
                continue
            self._account(batch)
            failed = next((d for d in batch if d.finish_reason == "error"), None)
            if failed is not None:  # the engine failed this request alone (engine/engine_core.py: _fail)
                raise APIError(500, f"the engine failed this request: {failed.error}", type="internal_error")
            yield batch

    def _account(self, batch: list[Any]) -> None:
        now = time.monotonic()
        m = self.state.metrics
        new_tokens = sum(len(d.new_token_ids) for d in batch)
        if new_tokens:
            if self.first_token_time is None:
                self.first_token_time = now
                m.time_to_first_token.observe(now - self.arrival)
            elif self.last_token_time is not None:
                gap = (now - self.last_token_time) / new_tokens
                for _ in range(min(new_tokens, 64)):
                    m.inter_token_latency.observe(gap)
            self.last_token_time = now
            self.num_output_tokens += new_tokens
            m.generation_tokens.inc(new_tokens)
        for d in batch:
            self.num_cached_tokens = max(self.num_cached_tokens, d.num_cached_tokens)
            if d.finished:
                self.finished_indices.add(d.index)
                self.finish_reasons[d.index] = d.finish_reason

    def close(self) -> None:
        """Idempotent. Aborts the engine request unless it finished; records metrics and log fields once."""
        if self.closed:
            return
        self.closed = True
        st, m = self.state, self.state.metrics
        if self.stream is None:
            return
        m.num_requests_in_flight.dec()
        aborted = not self.finished
        if aborted:
            st.client.abort(self.request_id)
            m.num_aborted_requests.inc()
        else:
            st.client.release(self.request_id)
            for reason in self.finish_reasons.values():
                m.success(reason)
        now = time.monotonic()
        m.e2e_request_latency.observe(now - self.arrival)
        m.prompt_tokens.inc(self.prompt_len)
        m.request_prompt_tokens.observe(self.prompt_len)
        m.request_generation_tokens.observe(self.num_output_tokens)
        self.log.update(
            cached_tokens=self.num_cached_tokens,
            output_tokens=self.num_output_tokens,
            ttft_s=None if self.first_token_time is None else round(self.first_token_time - self.arrival, 4),
            aborted=aborted,
        )
        if self.finish_reasons:
            reasons = [self.finish_reasons[i] for i in sorted(self.finish_reasons)]
            self.log.setdefault("finish_reason", reasons[0] if len(set(reasons)) == 1 else ",".join(reasons))


# --------------------------------------------------------------------------------------------- logprobs


def _clean(lp: float) -> float:
    return MIN_LOGPROB if math.isinf(lp) or math.isnan(lp) else max(float(lp), MIN_LOGPROB)


def _sorted_top(lpd: dict[int, Any], k: int) -> list[tuple[int, Any]]:
    return sorted(
        lpd.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob)
    )[:k]


def _lp_text(state: ServerState, tok: int, lp: Any) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else state.token_text(tok)


def chat_logprobs(
    state: ServerState, token_ids: list[int], lp_dicts: list[dict[int, Any]], top_n: int
) -> list[dict]:
    out = []
    for tok, lpd in zip(token_ids, lp_dicts):
        lp = lpd.get(tok)
        out.append(
            {
                "token": _lp_text(state, tok, lp),
                "logprob": _clean(lp.logprob) if lp is not None else MIN_LOGPROB,
                "bytes": list(state.token_bytes(tok)),
                "top_logprobs": [
                    {
                        "token": _lp_text(state, t, alt),
                        "logprob": _clean(alt.logprob),
                        "bytes": list(state.token_bytes(t)),
                    }
                    for t, alt in _sorted_top(lpd, top_n)
                ],
            }
        )
    return out


def prompt_logprobs_json(
    state: ServerState, prompt_ids: list[int], plp: list[dict[int, Any] | None] | None, top_n: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt token None (the first: nothing predicts it) or {token id (a
    string key): {logprob, rank, decoded_token}} holding the prompt token itself, then the top_n most likely
    tokens (the engine may hold more: its count also serves the completions echo)."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for pos, tok in enumerate(prompt_ids):
        lpd = plp[pos] if plp is not None and pos < len(plp) else None
        if lpd is None:
            out.append(None)
            continue
        keep = [(tok, lpd[tok])] if tok in lpd else []
        keep += [(t, lp) for t, lp in _sorted_top(lpd, top_n) if t != tok]
        out.append(
            {
                str(t): {
                    "logprob": _clean(lp.logprob), "rank": lp.rank, "decoded_token": _lp_text(state, t, lp)
                }
                for t, lp in keep
            }
        )
    return out


class CompletionLogprobs:
    """Accumulates the legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, state: ServerState, top_n: int, text_offset: int = 0) -> None:
        self.state = state
        self.top_n = top_n
        self.offset = text_offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, tok: int, lpd: dict[int, Any] | None) -> None:
        lp = lpd.get(tok) if lpd else None
        text = _lp_text(self.state, tok, lp)
        self.tokens.append(text)
        self.token_logprobs.append(
            None if lpd is None else (_clean(lp.logprob) if lp is not None else MIN_LOGPROB)
        )
        if lpd is None:
            self.top_logprobs.append(None)
        else:
            top = {}
            for t, alt in _sorted_top(lpd, self.top_n):
                top.setdefault(_lp_text(self.state, t, alt), _clean(alt.logprob))
            self.top_logprobs.append(top)
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def as_dict(self, start: int = 0) -> dict[str, Any]:
        return {
            "tokens": self.tokens[start:],
            "token_logprobs": self.token_logprobs[start:],
            "top_logprobs": self.top_logprobs[start:],
            "text_offset": self.text_offset[start:],
        }

    def __len__(self) -> int:
        return len(self.tokens)


OFFLOAD_BODY_BYTES = 256 << 10  # bodies larger than this are parsed and checked on the worker pool


async def run_blocking(state: ServerState, fn: Callable[..., T], *args: Any) -> T:
    """Tokenization, templating and big-body parsing on the server's worker pool, off the event loop (other
    requests keep streaming meanwhile)."""
    return await asyncio.get_running_loop().run_in_executor(state.executor, functools.partial(fn, *args))


async def read_body(state: ServerState, request: Any, model: type[T]) -> T:
    """The request's JSON body as `model` (400 on any problem; see server/protocol.py)."""
    raw = await request.body()
    if len(raw) > OFFLOAD_BODY_BYTES:
        return await run_blocking(state, parse_body, raw, model)
    return parse_body(raw, model)
