"""Serving benchmark: load an OpenAI-compatible server and measure TTFT, TPOT, ITL, E2E and throughput.

    python -m bench.serving --base-url http://127.0.0.1:8000 --dataset random --num-prompts 200 \\
        --request-rate 8 --max-concurrency 64 --input-len 4096 --output-len 1000 --seed 0

Metric definitions are sglang.bench_serving's (shared/reference/performance.md §5.1, and
bench/serving_metrics.py). Requests stream with ``stream_options.include_usage`` and ``ignore_eos`` so the
output length is ``max_tokens``; output token counts come from the usage chunk (else the number of
content-bearing chunks). A "content-bearing chunk" is one that carries text: ``content``, reasoning
(``reasoning_content`` / ``reasoning``) or tool-call name/arguments on the chat endpoint, ``text`` on the
completions endpoint — so a thinking model's TTFT is the first reasoning token, not the first answer token.

Only the standard library, tqdm and (for exact prompt lengths) transformers are used.

Result JSON (``--output-json``; schema "glint.bench.serving/1"):

    schema, started_at (UTC ISO time), t0_unix (the run start, which record times count from, as Unix time)
    config            every CLI option (api key and header values left out) + resolved model, tokenizer,
                      num_sessions (agentic, agentic-edit); request_rate "inf" for inf
    server_model_info the /v1/models entry of the model
    summary           completed, failed, skipped, duration_s, total_input_tokens (server usage count, else
                      the dataset's), total_input_tokens_dataset, total_output_tokens,
                      total_output_tokens_retokenized (with a tokenizer), output_len_from_usage (requests),
                      total_cached_tokens / cached_token_fraction (if the server reports cached_tokens),
                      request_throughput, input_throughput, output_throughput, total_throughput (per s),
                      concurrency, ttft_ms / tpot_ms / itl_ms / e2e_latency_ms / input_len / output_len as
                      {count, mean, median, std, min, max, p50, p90, p95, p99}, goodput (with --goodput),
                      errors {message: count}
    per_turn          agentic/agentic-edit only: per turn index, completed/failed/skipped, mean input/output/
                      cached tokens, cached_token_fraction and the four latency distributions
    requests          one record per request: index, session, turn, prompt_len, expected_output_len,
                      success, skipped, status, error, arrival_time, send_time, end_time (s since the
                      run start; end_time: the response ended, as a success or a failure),
                      ttft, e2e_latency, tpot (s), itl (list, s), output_len, output_len_source
                      ("usage"|"chunks"), usage_prompt_tokens, usage_completion_tokens, cached_tokens,
                      retokenized_output_len, num_chunks, finish_reason, input_len (+ text with
                      --include-text)

NaN (e.g. TPOT of a run where every output is one token) is written as null.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from datetime import datetime, timezone
from collections.abc import Sequence
from typing import Any

from bench import serving_http as http
from bench.datasets import (AgenticSession, EditSession, RequestSpec, make_agentic_sessions,
                            make_edit_sessions, make_plain_code_dataset, make_random_dataset, random_prompt)
from bench.serving_metrics import RequestRecord, parse_goodput, poisson_arrivals, summarize

SCHEMA = "glint.bench.serving/1"
MAX_ERROR_CHARS = 4000  # of an error body kept per request record
API_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
DATASETS = ("random", "agentic", "agentic-edit", "plain-code")
SINGLE_TURN = ("random", "plain-code")


# --------------------------------------------------------------------------------------------------------
# one streamed request


def build_payload(spec: RequestSpec, model: str, endpoint: str, temperature: float,
                  ignore_eos: bool, extra_body: dict | None) -> dict:
    payload: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        payload["messages"] = spec.messages
        if spec.tools:
            payload["tools"] = spec.tools
    else:
        payload["prompt"] = spec.prompt
    payload.update({
        "max_tokens": spec.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    if ignore_eos:
        payload["ignore_eos"] = True
    if extra_body:
        payload.update(extra_body)
    return payload


def request_headers(api_key: str | None, extra: Sequence[str] = ()) -> dict[str, str]:
    h = {"Accept": "text/event-stream"}
    if api_key:
        h["Authorization"] = f"Bearer {api_key}"
    for item in extra:
        k, sep, v = item.partition(":")
        if not sep:
            raise ValueError(f"bad --header {item!r}; use 'Name: value'")
        h[k.strip()] = v.strip()
    return h


async def _stream_into(ep: http.Endpoint, path: str, body: bytes, headers: dict[str, str],
                       rec: RequestRecord, t0: float, chat: bool) -> None:
    rec.send_time = time.perf_counter() - t0
    resp = await http.request(ep, "POST", path, body, headers)
    try:
        rec.status = resp.status
        if resp.status != 200:
            try:
                raw = await resp.read(limit=http.MAX_ERROR_BODY)
            except http.HTTPError as e:
                raw = f"<body unreadable: {e}>".encode()
            rec.error = raw.decode("utf-8", "replace")[:MAX_ERROR_CHARS] or resp.reason
            return
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" not in ctype:
            raw = await resp.read(limit=http.MAX_ERROR_BODY)
            rec.error = f"expected text/event-stream, got {ctype!r}: {raw[:500].decode('utf-8', 'replace')}"
            return
        text: list[str] = []
        reasoning: list[str] = []
        done = False
        async for t, data in http.iter_sse(resp):
            if data.strip() == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except ValueError:
                rec.error = f"invalid JSON in stream: {data[:200]!r}"
                return
            if not isinstance(obj, dict):
                continue
            if obj.get("error"):
                err = obj["error"]
                rec.error = "stream error: " + (err if isinstance(err, str) else json.dumps(err))[:2000]
                return
            usage = obj.get("usage")
            if isinstance(usage, dict):
                if usage.get("prompt_tokens") is not None:
                    rec.usage_prompt_tokens = int(usage["prompt_tokens"])
                if usage.get("completion_tokens") is not None:
                    rec.usage_completion_tokens = int(usage["completion_tokens"])
                details = usage.get("prompt_tokens_details")
                if isinstance(details, dict) and details.get("cached_tokens") is not None:
                    rec.cached_tokens = int(details["cached_tokens"])
            for ch in obj.get("choices") or ():
                if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                    continue
                got = False
                if chat:
                    delta = ch.get("delta") or {}
                    piece = delta.get("content")
                    if piece:
                        text.append(piece)
                        got = True
                    piece = delta.get("reasoning_content") or delta.get("reasoning")
                    if piece:
                        reasoning.append(piece)
                        got = True
                    for tc in delta.get("tool_calls") or ():
                        fn = (tc or {}).get("function") or {}
                        if fn.get("arguments") or fn.get("name"):
                            got = True
                else:
                    piece = ch.get("text")
                    if piece:
                        text.append(piece)
                        got = True
                if got:
                    rec.chunk_times.append(t - t0)
                if ch.get("finish_reason"):
                    rec.finish_reason = ch["finish_reason"]
        rec.generated_text = "".join(text)
        rec.reasoning_text = "".join(reasoning)
        rec.num_chunks = len(rec.chunk_times)
        if not done and rec.finish_reason is None:
            rec.error = f"stream ended without [DONE] or finish_reason after {rec.num_chunks} chunks"
            return
        if not rec.chunk_times:
            rec.error = "stream carried no content"
            return
        if rec.usage_completion_tokens is not None:
            rec.output_len, rec.output_len_source = rec.usage_completion_tokens, "usage"
        else:
            rec.output_len, rec.output_len_source = rec.num_chunks, "chunks"
        rec.success = True
    finally:
        await resp.close()


async def send_request(ep: http.Endpoint, endpoint: str, payload: dict, headers: dict[str, str],
                       rec: RequestRecord, t0: float, timeout: float | None,
                       tokenizer: Any = None) -> RequestRecord:
    """Send one streamed request and fill ``rec``. Never raises for server/network failures."""
    body = json.dumps(payload).encode()
    try:
        await asyncio.wait_for(_stream_into(ep, API_PATHS[endpoint], body, headers, rec, t0,
                                            endpoint == "chat"), timeout)
    except asyncio.TimeoutError:
        rec.success = False
        rec.error = f"timeout after {timeout}s ({len(rec.chunk_times)} chunks received)"
    except http.IncompleteBody as e:
        rec.success = False
        rec.error = f"connection closed mid-response after {len(rec.chunk_times)} chunks: {e}"
    except http.HTTPError as e:
        rec.success = False
        rec.error = str(e)
    except Exception as e:  # noqa: BLE001 - a malformed response must not kill the run
        rec.success = False
        rec.error = f"{type(e).__name__}: {e}"
    rec.end_time = time.perf_counter() - t0
    rec.finalize_timing()
    if rec.success and tokenizer is not None:
        rec.retokenized_output_len = len(tokenizer.encode(rec.reasoning_text + rec.generated_text,
                                                          add_special_tokens=False))
    return rec


# --------------------------------------------------------------------------------------------------------
# load generation


class Runner:
    def __init__(self, args: argparse.Namespace, ep: http.Endpoint, model: str, tokenizer: Any):
        self.args = args
        self.ep = ep
        self.model = model
        self.tokenizer = tokenizer
        self.headers = request_headers(args.api_key, args.header or ())
        self.extra_body = json.loads(args.extra_body) if args.extra_body else None
        self.sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        self.t0 = 0.0
        self.t0_unix = 0.0  # time.time() when t0 was taken
        self.pbar = None

    def payload(self, spec: RequestSpec) -> dict:
        return build_payload(spec, self.model, self.args.endpoint, self.args.temperature,
                             not self.args.disable_ignore_eos, self.extra_body)

    async def send(self, spec: RequestSpec, rec: RequestRecord) -> RequestRecord:
        rec.prompt_len, rec.expected_output_len = spec.prompt_len, spec.output_len
        if self.sem is None:
            await send_request(self.ep, self.args.endpoint, self.payload(spec), self.headers, rec, self.t0,
                               self.args.timeout, self.tokenizer)
        else:
            async with self.sem:
                await send_request(self.ep, self.args.endpoint, self.payload(spec), self.headers, rec,
                                   self.t0, self.args.timeout, self.tokenizer)
        if self.pbar is not None:
            self.pbar.update(1)
        return rec

    async def sleep_until(self, offset: float) -> float:
        delay = self.t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        return time.perf_counter() - self.t0

    async def warmup(self) -> None:
        n = self.args.warmup_requests
        if n <= 0:
            return
        rng = random.Random(self.args.seed + 7919)
        out_len = max(1, min(16, self.args.output_len))
        specs = []
        for _ in range(n):
            text, got = random_prompt(rng, min(32, self.args.input_len), None, None)
            if self.args.endpoint == "chat":
                specs.append(RequestSpec(got, out_len, messages=[{"role": "user", "content": text}]))
            else:
                specs.append(RequestSpec(got, out_len, prompt=text))
        self.t0 = time.perf_counter()
        recs = await asyncio.gather(*(send_request(self.ep, self.args.endpoint, self.payload(s), self.headers,
                                                   RequestRecord(index=-1), self.t0, self.args.timeout)
                                      for s in specs))
        bad = [r for r in recs if not r.success]
        if bad:
            r = bad[0]
            why = f"HTTP {r.status}" if r.status else "no response"
            raise SystemExit(f"warm-up request failed ({why}): {r.error[:1000]}")

    async def run_random(self, specs: list[RequestSpec]) -> tuple[list[RequestRecord], float]:
        arrivals = poisson_arrivals(len(specs), self.args.request_rate, self.args.seed)
        records = [RequestRecord(index=i) for i in range(len(specs))]

        async def one(i: int) -> None:
            records[i].arrival_time = await self.sleep_until(arrivals[i])
            await self.send(specs[i], records[i])

        self.t0, self.t0_unix = time.perf_counter(), time.time()
        await asyncio.gather(*(one(i) for i in range(len(specs))))
        return records, time.perf_counter() - self.t0

    async def run_agentic(
        self, sessions: Sequence[AgenticSession | EditSession]
    ) -> tuple[list[RequestRecord], float]:
        arrivals = poisson_arrivals(len(sessions), self.args.request_rate, self.args.seed)
        records: list[RequestRecord] = []
        per_session: dict[int, list[RequestRecord]] = {}
        for s in sessions:
            for k in range(s.num_turns):
                rec = RequestRecord(index=len(records), session=s.session_id, turn=k)
                records.append(rec)
                per_session.setdefault(s.session_id, []).append(rec)

        async def one(s: AgenticSession | EditSession, arrival: float) -> None:
            t = await self.sleep_until(arrival)
            recs = per_session[s.session_id]
            for k, rec in enumerate(recs):
                rec.arrival_time = t
                await self.send(s.next_request(), rec)
                if not rec.success:
                    for later in recs[k + 1:]:
                        later.skipped = True
                        later.error = f"skipped: turn {k} of session {s.session_id} failed"
                        if self.pbar is not None:
                            self.pbar.update(1)
                    return
                s.record_output(rec.generated_text, rec.reasoning_text)
                if self.args.tool_latency > 0 and k + 1 < len(recs):
                    await asyncio.sleep(self.args.tool_latency)
                t = time.perf_counter() - self.t0

        self.t0, self.t0_unix = time.perf_counter(), time.time()
        await asyncio.gather(*(one(s, a) for s, a in zip(sessions, arrivals)))
        return records, time.perf_counter() - self.t0


def per_turn_summary(records: list[RequestRecord], duration: float) -> list[dict]:
    turns = sorted({r.turn for r in records if r.turn is not None})
    out = []
    for k in turns:
        recs = [r for r in records if r.turn == k]
        s = summarize(recs, duration)
        out.append({
            "turn": k,
            "completed": s["completed"], "failed": s["failed"], "skipped": s["skipped"],
            "mean_input_len": s["input_len"]["mean"],
            "mean_output_len": s["output_len"]["mean"],
            "mean_cached_tokens": (s["total_cached_tokens"] / s["completed"]
                                   if s["total_cached_tokens"] is not None and s["completed"] else None),
            "cached_token_fraction": s["cached_token_fraction"],
            "ttft_ms": s["ttft_ms"], "tpot_ms": s["tpot_ms"], "itl_ms": s["itl_ms"],
            "e2e_latency_ms": s["e2e_latency_ms"],
        })
    return out


# --------------------------------------------------------------------------------------------------------
# reporting


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf"
        return f"{v:.{digits}f}"
    return str(v)


def _get(d: dict | None, key: str) -> Any:
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def format_report(result: dict, baseline: dict | None = None) -> str:
    s, cfg = result["summary"], result["config"]
    base = (baseline or {}).get("summary") if baseline else None
    width = 62 if base else 50
    lines = [" Serving Benchmark Result ".center(width, "=")]

    def row(label: str, key: str | None, value: Any = None, digits: int = 2) -> None:
        v = _get(s, key) if key else value
        line = f"{label:<38}{_fmt(v, digits):>12}"
        if base is not None and key:
            b = _get(base, key)
            if isinstance(v, (int, float)) and isinstance(b, (int, float)) and b and not math.isnan(b):
                line += f"{'x' + format(v / b, '.3f'):>12}"
        lines.append(line)

    if base is not None:
        lines.append(f"{'':<38}{'this run':>12}{'/ baseline':>12}")
    row("Dataset / endpoint:", None, f"{cfg['dataset']} / {cfg['endpoint']}")
    row("Traffic request rate:", None, cfg["request_rate"])
    row("Max request concurrency:", None, cfg["max_concurrency"] or "none")
    row("Successful requests:", "completed")
    row("Failed requests:", "failed")
    if s.get("skipped"):
        row("Skipped turns (after a failure):", "skipped")
    row("Benchmark duration (s):", "duration_s")
    row("Total input tokens:", "total_input_tokens")
    row("Total generated tokens:", "total_output_tokens")
    if s.get("total_output_tokens_retokenized") is not None:
        row("Total generated tokens (retokenized):", "total_output_tokens_retokenized")
    if s.get("total_cached_tokens") is not None:
        row("Cached prompt tokens (server):", "total_cached_tokens")
    row("Request throughput (req/s):", "request_throughput")
    row("Input token throughput (tok/s):", "input_throughput")
    row("Output token throughput (tok/s):", "output_throughput")
    row("Total token throughput (tok/s):", "total_throughput")
    row("Concurrency:", "concurrency")
    if "goodput" in s:
        row("Request goodput (req/s):", "goodput.request_goodput")
        row("SLO attainment:", "goodput.slo_attainment", digits=3)
    for title, key, short in (("Time to First Token", "ttft_ms", "TTFT"),
                              ("Time per Output Token (excl. 1st token)", "tpot_ms", "TPOT"),
                              ("Inter-Token Latency", "itl_ms", "ITL"),
                              ("End-to-End Latency", "e2e_latency_ms", "E2E Latency")):
        lines.append(f" {title} ".center(width, "-"))
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {short} (ms):",
                f"{key}.{stat}")
    steps = result.get("server_steps")
    if steps:
        lines.append(" Server steps (engine/step_accounting.py) ".center(width, "-"))
        for kind, extra in (("decode", "seqs"), ("prefill", "tokens")):
            n = steps[f"steps_{kind}_steps"]
            if n:
                per = steps[f"steps_{kind}_{extra}"] / n
                row(f"{kind.capitalize()} steps / mean ms / {extra}:", None,
                    f"{n} / {1e3 * steps[f'steps_{kind}_seconds'] / n:.2f} / {per:.1f}")
    turns = result.get("per_turn")
    if turns:
        lines.append(" Per turn (agentic) ".center(width, "-"))
        lines.append(f"{'turn':>4}{'ok':>6}{'in_len':>9}{'cached':>8}{'TTFT ms':>10}{'p99':>9}"
                     f"{'TPOT ms':>9}{'E2E ms':>10}")
        for t in turns:
            cached = t["cached_token_fraction"]
            lines.append(f"{t['turn']:>4}{t['completed']:>6}{_fmt(t['mean_input_len'], 0):>9}"
                         f"{(_fmt(100 * cached, 0) + '%') if cached is not None else 'n/a':>8}"
                         f"{_fmt(t['ttft_ms']['mean'], 1):>10}{_fmt(t['ttft_ms']['p99'], 1):>9}"
                         f"{_fmt(t['tpot_ms']['mean'], 2):>9}{_fmt(t['e2e_latency_ms']['mean'], 0):>10}")
    if s.get("errors"):
        lines.append(" Errors (most frequent) ".center(width, "-"))
        for msg, n in s["errors"].items():
            lines.append(f"{n:>5} x {msg[:width + 40]}")
    lines.append("=" * width)
    return "\n".join(lines)


def _round_floats(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if (math.isnan(obj) or math.isinf(obj)) else round(obj, 6)
    if isinstance(obj, list):
        return [_round_floats(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _round_floats(v) for k, v in obj.items()}
    return obj


def _json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: write them as null / the string 'inf'."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, list):
        return [_json_safe(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, e.g. http://host:8000")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                   help="/v1/chat/completions or /v1/completions")
    p.add_argument("--model", default=None, help="model name to send (default: first id of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    p.add_argument("--header", action="append", help="extra request header 'Name: value' (repeatable)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer path/name for exact prompt lengths (default: the model if it is a local "
                        "dir, or /v1/models 'root' if local); 'none' disables")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--dataset", choices=DATASETS, default="random",
                   help="agentic-edit: multi-turn sessions asking for held-out stdlib files back with small "
                        "edits (--input-len: file tokens per turn; max_tokens: the expected answer, at most "
                        "--output-len); plain-code: continue held-out stdlib files (no answer in the prompt)")
    p.add_argument("--num-prompts", type=int, default=100,
                   help="requests (random); agentic: total turns when --num-sessions is not given")
    p.add_argument("--input-len", type=int, default=1024,
                   help="random: prompt tokens; agentic: first user turn tokens")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request (ignore_eos is set)")
    p.add_argument("--random-range-ratio", type=float, default=1.0,
                   help="lengths uniform in [max(L*ratio,1), L] like sglang; 1.0 = fixed lengths. NOTE: "
                        "sglang's default is 0.0 (mean L/2); pass 0.0 to reproduce its default runs")
    p.add_argument("--tokenize-prompt", action="store_true",
                   help="completions endpoint: send token ids instead of text (exact lengths)")
    p.add_argument("--num-sessions", type=int, default=None,
                   help="agentic: sessions (default ceil(num_prompts / num_turns))")
    p.add_argument("--num-turns", type=int, default=5, help="agentic: turns per session")
    p.add_argument("--tool-result-len", type=int, default=300,
                   help="agentic: tool result tokens (uniform in [L/2, 3L/2])")
    p.add_argument("--system-prompt-len", type=int, default=256,
                   help="agentic: tokens of the system prompt shared by all sessions (0 = none)")
    p.add_argument("--tool-format", choices=("tool", "user"), default="tool",
                   help="agentic: tool results as assistant tool_calls + role 'tool', or as user messages")
    p.add_argument("--tool-latency", type=float, default=0.0,
                   help="agentic: seconds a session waits between turns (simulated tool run time)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="Poisson arrival rate (req/s; agentic: sessions/s); inf = all at t=0")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--disable-ignore-eos", action="store_true", help="do not send ignore_eos")
    p.add_argument("--extra-body", default=None,
                   help="JSON merged into every request body, e.g. '{\"chat_template_kwargs\": "
                        "{\"enable_thinking\": false}}'")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="per-request timeout in seconds (send to last byte)")
    p.add_argument("--warmup-requests", type=int, default=1, help="short requests sent before timing")
    p.add_argument("--flush-cache", action="store_true", help="POST /flush_cache before the run (if served)")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:2000 tpot:50 e2el:60000")
    p.add_argument("--output-json", default=None,
                   help="result file (default bench_serving_<dataset>_<time>.json; 'none' to skip)")
    p.add_argument("--include-text", action="store_true", help="store generated text in the JSON records")
    p.add_argument("--baseline-json", default=None,
                   help="an earlier result JSON of this tool: print this run / baseline ratios")
    p.add_argument("--disable-tqdm", action="store_true")
    args = p.parse_args(argv)
    if args.num_prompts <= 0 or args.input_len <= 0 or args.output_len <= 0 or args.num_turns <= 0:
        p.error("--num-prompts, --input-len, --output-len and --num-turns must be positive")
    if args.max_concurrency is not None and args.max_concurrency <= 0:
        p.error("--max-concurrency must be positive")
    if not (args.request_rate > 0):
        p.error("--request-rate must be > 0 (or inf)")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        p.error("--random-range-ratio must be in [0, 1]")
    if args.extra_body:
        try:
            if not isinstance(json.loads(args.extra_body), dict):
                raise ValueError
        except ValueError:
            p.error("--extra-body must be a JSON object")
    return args


async def resolve_model(ep: http.Endpoint, args: argparse.Namespace) -> tuple[str, dict]:
    headers = request_headers(args.api_key, args.header or ())
    headers.pop("Accept", None)
    try:
        status, body = await http.get_json(ep, "/v1/models", headers, timeout=30.0)
    except (http.HTTPError, asyncio.TimeoutError) as e:
        if args.model:
            return args.model, {}
        raise SystemExit(f"GET /v1/models failed: {e}") from e
    entries = body.get("data") if isinstance(body, dict) else None
    if status != 200 or not entries:
        if args.model:
            return args.model, {}
        raise SystemExit(f"GET /v1/models -> {status}: {str(body)[:500]}; pass --model")
    if args.model:
        info = next((e for e in entries if e.get("id") == args.model), {})
        return args.model, info
    return entries[0]["id"], entries[0]


def load_tokenizer(args: argparse.Namespace, model: str, info: dict) -> tuple[Any, str | None]:
    if args.tokenizer and args.tokenizer.lower() == "none":
        return None, None
    path = args.tokenizer
    if path is None:
        for cand in (model, info.get("root")):
            if isinstance(cand, str) and os.path.isdir(cand):
                path = cand
                break
    if path is None:
        return None, None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code), path


async def server_steps(ep: http.Endpoint, args: argparse.Namespace) -> dict | None:
    """The server's step accounting (glint's /server_info, engine/step_accounting.py); None from a server
    without it."""
    headers = request_headers(args.api_key, args.header or ())
    headers.pop("Accept", None)
    try:
        status, body = await http.get_json(ep, "/server_info", headers, timeout=30.0)
    except (http.HTTPError, asyncio.TimeoutError, OSError):
        return None
    engine = body.get("engine") if status == 200 and isinstance(body, dict) else None
    if not isinstance(engine, dict) or "steps_decode_steps" not in engine:
        return None
    keep = {k: v for k, v in engine.items() if k.startswith(("steps_", "model_"))}
    keep["tensor_parallel_size"] = (body.get("config") or {}).get("tensor_parallel_size", 1)
    return keep


def steps_delta(before: dict, after: dict) -> dict:
    """The run's share of the server's step counters (the model_* facts and the TP size as they are)."""
    return {k: (v - before.get(k, 0) if k.startswith("steps_") else v) for k, v in after.items()}


def parse_base_url(base_url: str) -> http.Endpoint:
    """The server root; an OpenAI-SDK-style base URL ending in /v1 is accepted too."""
    ep = http.Endpoint.parse(base_url)
    if ep.base_path.endswith("/v1"):
        ep.base_path = ep.base_path[:-3]
    return ep


def raise_open_file_limit() -> None:
    """One connection per request: with rate inf and no concurrency cap, N sockets are open at once."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 1 << 16
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


async def run(args: argparse.Namespace) -> dict:
    raise_open_file_limit()
    ep = parse_base_url(args.base_url)
    model, info = await resolve_model(ep, args)
    tokenizer, tok_path = load_tokenizer(args, model, info)
    if tokenizer is None:
        print("note: no tokenizer; prompt lengths are approximate (pass --tokenizer for exact lengths)",
              file=sys.stderr)
    if args.flush_cache:
        try:
            resp = await http.request(ep, "POST", "/flush_cache", b"", request_headers(args.api_key))
            await resp.close()
        except http.HTTPError as e:
            print(f"note: /flush_cache failed: {e}", file=sys.stderr)

    runner = Runner(args, ep, model, tokenizer)
    sessions: list[AgenticSession] | list[EditSession] = []
    if args.dataset == "random":
        specs = make_random_dataset(args.num_prompts, args.input_len, args.output_len,
                                    args.random_range_ratio, args.seed, tokenizer, args.endpoint,
                                    args.tokenize_prompt)
        total = len(specs)
    elif args.dataset == "plain-code":
        specs = make_plain_code_dataset(args.num_prompts, args.input_len, args.output_len,
                                        args.random_range_ratio, args.seed, tokenizer, args.endpoint)
        total = len(specs)
    elif args.dataset == "agentic-edit":
        n_sessions = args.num_sessions or max(1, math.ceil(args.num_prompts / args.num_turns))
        sessions = make_edit_sessions(n_sessions, args.num_turns, args.input_len, args.output_len,
                                      args.system_prompt_len, args.random_range_ratio, args.seed, tokenizer,
                                      args.endpoint)
        total = n_sessions * args.num_turns
    else:
        n_sessions = args.num_sessions or max(1, math.ceil(args.num_prompts / args.num_turns))
        sessions = make_agentic_sessions(n_sessions, args.num_turns, args.input_len, args.output_len,
                                         args.tool_result_len, args.system_prompt_len,
                                         args.random_range_ratio, args.seed, tokenizer, args.endpoint,
                                         args.tool_format)
        total = n_sessions * args.num_turns

    await runner.warmup()
    from tqdm import tqdm

    runner.pbar = tqdm(total=total, disable=args.disable_tqdm, desc="requests", dynamic_ncols=True)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    steps_before = await server_steps(ep, args)
    try:
        if args.dataset in SINGLE_TURN:
            records, duration = await runner.run_random(specs)
        else:
            records, duration = await runner.run_agentic(sessions)
    finally:
        runner.pbar.close()
    steps_after = await server_steps(ep, args)

    slo = parse_goodput(args.goodput)
    config = {k: v for k, v in vars(args).items() if k not in ("api_key", "header")}
    config.update({"model": model, "tokenizer": tok_path, "api_key_set": bool(args.api_key),
                   "extra_headers": [h.partition(":")[0].strip() for h in args.header or ()],  # names only
                   "request_rate": args.request_rate if not math.isinf(args.request_rate) else "inf"})
    if args.dataset not in SINGLE_TURN:
        config["num_sessions"] = len(sessions)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "started_at": started_at,
        "t0_unix": runner.t0_unix,
        "config": config,
        "server_model_info": info,
        "summary": summarize(records, duration, slo or None),
    }
    if args.dataset not in SINGLE_TURN:
        result["per_turn"] = per_turn_summary(records, duration)
    if steps_before is not None and steps_after is not None:
        result["server_steps"] = steps_delta(steps_before, steps_after)
    result["requests"] = [r.to_json(include_text=args.include_text) for r in records]
    for r in result["requests"]:
        r.pop("chunk_times")  # = send_time + ttft + cumsum(itl); keeps the file half the size
    return _json_safe(_round_floats(result))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    baseline = None
    if args.baseline_json:
        with open(args.baseline_json) as f:
            baseline = json.load(f)
    result = asyncio.run(run(args))
    print(format_report(result, baseline))
    out = args.output_json
    if out is None:
        out = f"bench_serving_{args.dataset}_{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    if out.lower() != "none":
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    return 0 if result["summary"]["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
