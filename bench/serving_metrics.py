"""Per-request records, arrival times and summary statistics of the serving benchmark.

Definitions follow sglang.bench_serving (see shared/reference/performance.md §5.1):

* TTFT  = first content-bearing chunk time - send time.
* ITL   = gaps between successive content-bearing chunks of one request; pooled over all requests.
* E2E   = last content-bearing chunk time - send time.
* TPOT  = (E2E - TTFT) / (output_tokens - 1), per request, only when output_tokens > 1.
* duration = first send to last completion; request throughput = completed / duration; input/output/
  total token throughput = tokens of completed requests / duration; concurrency = sum(E2E) / duration.

Percentiles use linear interpolation between order statistics (the numpy default), so results match
numpy.percentile without importing numpy.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from collections.abc import Iterable, Sequence

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    """One request's outcome. Times are seconds; ``send_time``/``chunk_times`` are perf_counter values
    relative to the benchmark start (0 = first request may be sent)."""

    index: int
    session: int | None = None  # agentic: session id; random: None
    turn: int | None = None  # agentic: 0-based turn within the session
    prompt_len: int = 0  # dataset's token count of the prompt (estimated without a tokenizer)
    expected_output_len: int = 0  # max_tokens sent
    success: bool = False
    skipped: bool = False  # agentic: not sent because an earlier turn of the session failed
    status: int | None = None  # HTTP status (None: transport failure before a status line)
    error: str = ""
    arrival_time: float = 0.0  # when the arrival process released it (before the concurrency cap)
    send_time: float = 0.0  # when the HTTP request was sent (after acquiring the concurrency slot)
    end_time: float = 0.0  # when its response ended, as a success or a failure
    chunk_times: list[float] = field(default_factory=list)  # arrival of content-bearing chunks
    ttft: float = 0.0
    e2e_latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_len: int = 0  # tokens used for the metrics (usage.completion_tokens, else chunk count)
    output_len_source: str = ""  # "usage" | "chunks"
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if reported
    retokenized_output_len: int | None = None
    num_chunks: int = 0
    finish_reason: str | None = None
    generated_text: str = ""
    reasoning_text: str = ""

    @property
    def input_len(self) -> int:
        """Input tokens counted for throughput: the server's count when reported, else the dataset's."""
        return self.usage_prompt_tokens if self.usage_prompt_tokens is not None else self.prompt_len

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_len <= 1:
            return None
        return (self.e2e_latency - self.ttft) / (self.output_len - 1)

    def finalize_timing(self) -> None:
        """Fill ttft / e2e_latency / itl from send_time and chunk_times."""
        if self.chunk_times:
            self.ttft = self.chunk_times[0] - self.send_time
            self.e2e_latency = self.chunk_times[-1] - self.send_time
            self.itl = [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]
        else:
            self.ttft = 0.0
            self.e2e_latency = 0.0
            self.itl = []

    def to_json(self, include_text: bool = False) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        d["input_len"] = self.input_len
        if not include_text:
            d.pop("generated_text")
            d.pop("reasoning_text")
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation, like numpy.percentile's default."""
    if not values:
        return float("nan")
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * (q / 100.0)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return float(xs[lo] + (xs[hi] - xs[lo]) * frac)


def describe(values: Sequence[float], scale: float = 1.0) -> dict:
    """mean / median / std (population, like numpy.std) / min / max / p50..p99, multiplied by scale."""
    vals = [v * scale for v in values]
    n = len(vals)
    if n == 0:
        nan = float("nan")
        out = {"count": 0, "mean": nan, "median": nan, "std": nan, "min": nan, "max": nan}
        out.update({f"p{p}": nan for p in PERCENTILES})
        return out
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n)
    out = {"count": n, "mean": mean, "median": percentile(vals, 50), "std": std,
           "min": min(vals), "max": max(vals)}
    out.update({f"p{p}": percentile(vals, p) for p in PERCENTILES})
    return out


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (seconds from start) of n requests: the first at 0, then exponential gaps with
    mean 1/rate (a Poisson process), drawn from random.Random(seed). rate = inf → all at 0."""
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    if rate <= 0:
        raise ValueError("request rate must be > 0 (or inf)")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def parse_goodput(specs: Iterable[str] | None) -> dict[str, float]:
    """'ttft:200 tpot:50 e2el:5000' (milliseconds) → {'ttft': 0.2, ...} in seconds."""
    out: dict[str, float] = {}
    for spec in specs or ():
        key, sep, val = spec.partition(":")
        key = key.strip().lower()
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"bad --goodput item {spec!r}; use ttft:MS, tpot:MS, e2el:MS")
        out[key] = float(val) / 1000.0
    return out


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    if not rec.success:
        return False
    if "ttft" in slo and rec.ttft > slo["ttft"]:
        return False
    if "e2el" in slo and rec.e2e_latency > slo["e2el"]:
        return False
    if "tpot" in slo:
        tpot = rec.tpot
        if tpot is not None and tpot > slo["tpot"]:
            return False
    return True


def summarize(records: Sequence[RequestRecord], duration: float,
              slo: dict[str, float] | None = None) -> dict:
    """Aggregate metrics over the given records. Latencies are reported in milliseconds."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success and not r.skipped]
    skipped = [r for r in records if r.skipped]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    dur = duration if duration > 0 else float("nan")
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    itls = [g for r in ok for g in r.itl]
    cached = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    out = {
        "completed": len(ok),
        "failed": len(failed),
        "skipped": len(skipped),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_input_tokens_dataset": sum(r.prompt_len for r in ok),
        "total_output_tokens": total_out,
        "total_output_tokens_retokenized": (
            sum(r.retokenized_output_len for r in ok)
            if ok and all(r.retokenized_output_len is not None for r in ok) else None),
        "output_len_from_usage": sum(1 for r in ok if r.output_len_source == "usage"),
        "total_cached_tokens": sum(cached) if cached else None,
        "cached_token_fraction": (sum(cached) / sum(r.input_len for r in ok if r.cached_tokens is not None)
                                  if cached and sum(r.input_len for r in ok if r.cached_tokens is not None)
                                  else None),
        "request_throughput": len(ok) / dur,
        "input_throughput": total_in / dur,
        "output_throughput": total_out / dur,
        "total_throughput": (total_in + total_out) / dur,
        "concurrency": sum(r.e2e_latency for r in ok) / dur,
        "ttft_ms": describe([r.ttft for r in ok], 1000.0),
        "tpot_ms": describe(tpots, 1000.0),
        "itl_ms": describe(itls, 1000.0),
        "e2e_latency_ms": describe([r.e2e_latency for r in ok], 1000.0),
        "input_len": describe([r.input_len for r in ok]),
        "output_len": describe([r.output_len for r in ok]),
    }
    if slo:
        good = [r for r in ok if meets_slo(r, slo)]
        out["goodput"] = {
            "slo_ms": {k: v * 1000.0 for k, v in slo.items()},
            "good_requests": len(good),
            "request_goodput": len(good) / dur,
            "slo_attainment": len(good) / len(records) if records else float("nan"),
        }
    errors: dict[str, int] = {}
    for r in failed:
        key = (f"HTTP {r.status}: " if r.status is not None else "") + r.error.strip()[:200]
        errors[key] = errors.get(key, 0) + 1
    out["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10])
    return out
