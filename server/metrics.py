"""Prometheus metrics with vLLM's names under a `glint:` prefix, all labelled with `model_name`.

Gauges mirror the engine's stats (pushed by the engine process after every step and once a second when idle);
counters and histograms are fed by the front end's per-request bookkeeping (TTFT is measured from the
request's arrival at the HTTP server, so tokenization and queueing count).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, L = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(f"glint:{name}", doc, L, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(f"glint:{name}", doc, L, registry=r).labels(model_name)

        def hist(name: str, doc: str, buckets: tuple) -> Any:
            return Histogram(f"glint:{name}", doc, L, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests (sequences) being generated.")
        self.num_requests_waiting = gauge(
            "num_requests_waiting", "Requests (sequences) waiting to be scheduled."
        )
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).")
        self.kv_cache_capacity_tokens = gauge("kv_cache_capacity_tokens", "KV cache capacity in tokens.")
        self.prefix_cache_hit_rate = gauge(
            "prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up."
        )
        self.num_requests_in_flight = gauge(
            "num_requests_in_flight", "HTTP requests the front end is serving."
        )
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Preemptions (a request recomputed later).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished and aborted requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self._success = Counter(
            "glint:request_success",
            "Finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        self.num_aborted_requests = counter(
            "num_aborted_requests", "Requests aborted (client disconnect...)."
        )
        self.num_rejected_requests = counter("num_rejected_requests", "Requests refused by overload control.")
        self.engine_restarts = counter(
            "engine_restarts", "Engine processes restarted after a death or stall (--engine-restart)."
        )
        self.time_to_first_token = hist("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.inter_token_latency = hist(
            "inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS
        )
        self.e2e_request_latency = hist(
            "e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS
        )
        self.request_prompt_tokens = hist(
            "request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = hist(
            "request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        self.spec_draft_tokens = counter("spec_draft_tokens", "Draft tokens proposed to verify steps.")
        self.spec_accepted_tokens = counter("spec_accepted_tokens", "Draft tokens accepted by verification.")
        self.spec_num_verifies = counter("spec_num_verifies", "Request verifications (one request, one step).")
        self.spec_mean_accepted_length = gauge(
            "spec_mean_accepted_length", "Tokens emitted per verification (accepted drafts + 1), since start."
        )
        self.spec_acceptance_rate = Gauge(
            "glint:spec_acceptance_rate_by_position",
            "Fraction of draft tokens at this draft position that were accepted, since start.",
            ["model_name", "position"],
            registry=r,
        )
        # prefill/decode disaggregation (engine stats disagg_*; zero on a colocated server)
        self.disagg_rooms_active = gauge("disagg_rooms_active", "Requests in a prefill/decode handover now.")
        self.disagg_handovers = counter("disagg_handovers", "Prefill side: requests handed over (KV landed, acked).")
        self.disagg_received = counter("disagg_received", "Decode side: requests whose KV and first token arrived.")
        self.disagg_failed = counter("disagg_failed", "Handovers that failed (deadline, peer gone, abort).")
        self.disagg_pages_sent = counter("disagg_pages_sent", "Prefill side: KV pages written to decode instances.")
        self.disagg_prefill_seconds = counter(
            "disagg_prefill_seconds", "Prefill side: seconds from scheduling to the first token, summed."
        )
        self.disagg_transfer_tail_seconds = counter(
            "disagg_transfer_tail_seconds",
            "Prefill side: seconds from the first token until the decode side acknowledged every KV page (its Ack "
            "is read at this instance's next step), summed.",
        )
        self.disagg_wait_seconds = counter(
            "disagg_wait_seconds", "Decode side: seconds from a request's arrival to its KV and first token, summed."
        )
        self.disagg_landing_seconds = counter(
            "disagg_landing_seconds",
            "Decode side: seconds from the prefill side's first token (every write posted) until every KV page "
            "landed here, summed (the transfer time a request waits for after its prefill).",
        )
        self.disagg_write_seconds = Counter(
            "glint:disagg_write_seconds",
            "Prefill side: where KV writes spent their time, summed over writes (stage: gpu_wait = queued until the "
            "GPU work that wrote the pages was done, async only; post_delay = until posted; flight = posted until "
            "seen done).",
            ["model_name", "stage"],
            registry=r,
        )
        self.gc_pause_seconds = counter(
            "gc_pause_seconds",
            "Engine process: seconds the garbage collector stopped it, summed (engine/gc_control.py).",
        )
        self.gc_collections_gen2 = counter(
            "gc_collections_gen2", "Engine process: collections of the garbage collector's oldest generation."
        )
        self.tokenizer_cache_hit_chars = counter(
            "tokenizer_cache_hit_chars", "Characters of chat prompts whose tokens came from the tokenizer cache."
        )
        self.tokenizer_cache_miss_chars = counter(
            "tokenizer_cache_miss_chars", "Characters of chat prompts tokenized (not in the tokenizer cache)."
        )
        self._last_stats: dict[str, Any] = {}
        self._last_tokenizer_chars = (0, 0)

    def success(self, finish_reason: str) -> None:
        self._success.labels(self.model_name, finish_reason).inc()

    def update_from_stats(self, stats: dict[str, Any]) -> None:
        if not stats:
            return
        self.num_requests_running.set(stats.get("num_running", 0))
        self.num_requests_waiting.set(stats.get("num_waiting", 0))
        self.kv_cache_usage_perc.set(kv_usage(stats))
        self.kv_cache_capacity_tokens.set(stats.get("kv_capacity_tokens", 0))
        queried = stats.get("prefix_cache_queried_tokens", 0)
        hits = stats.get("prefix_cache_hit_tokens", 0)
        self.prefix_cache_hit_rate.set(hits / queried if queried else 0.0)
        last = self._last_stats
        for key, ctr in (
            ("prefix_cache_queried_tokens", self.prefix_cache_queries),
            ("prefix_cache_hit_tokens", self.prefix_cache_hits),
            ("num_preemptions", self.num_preemptions),
            ("spec_draft_tokens", self.spec_draft_tokens),
            ("spec_accepted_tokens", self.spec_accepted_tokens),
            ("spec_num_verifies", self.spec_num_verifies),
            ("disagg_handovers_total", self.disagg_handovers),
            ("disagg_received_total", self.disagg_received),
            ("disagg_failed_total", self.disagg_failed),
            ("disagg_pages_sent_total", self.disagg_pages_sent),
            ("disagg_prefill_seconds_total", self.disagg_prefill_seconds),
            ("disagg_transfer_tail_seconds_total", self.disagg_transfer_tail_seconds),
            ("disagg_wait_seconds_total", self.disagg_wait_seconds),
            ("disagg_landing_seconds_total", self.disagg_landing_seconds),
            ("gc_pause_seconds_total", self.gc_pause_seconds),
            ("gc_collections_gen2", self.gc_collections_gen2),
            *((f"disagg_write_{stage}_seconds_total", self.disagg_write_seconds.labels(self.model_name, stage))
              for stage in ("gpu_wait", "post_delay", "flight")),
        ):
            inc = stats.get(key, 0) - last.get(key, 0)
            if inc > 0:
                ctr.inc(inc)
        self.disagg_rooms_active.set(stats.get("disagg_rooms_active", 0))
        if "spec_mean_accepted_length" in stats:
            self.spec_mean_accepted_length.set(stats["spec_mean_accepted_length"])
            for i, rate in enumerate(stats.get("spec_acceptance_rate_by_position", [])):
                self.spec_acceptance_rate.labels(self.model_name, str(i)).set(rate)
        self._last_stats = dict(stats)

    def update_tokenizer_cache(self, hit_chars: int, miss_chars: int) -> None:
        """The prompt encoder's running totals (server/prompt_encoder.py) into the counters."""
        last_hit, last_miss = self._last_tokenizer_chars
        self.tokenizer_cache_hit_chars.inc(max(0, hit_chars - last_hit))
        self.tokenizer_cache_miss_chars.inc(max(0, miss_chars - last_miss))
        self._last_tokenizer_chars = (hit_chars, miss_chars)

    def engine_down(self) -> None:
        """No engine process is serving (dead, restarting, not started): nothing runs, waits or holds pages."""
        for gauge in (self.num_requests_running, self.num_requests_waiting, self.kv_cache_usage_perc):
            gauge.set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def kv_usage(stats: dict[str, Any]) -> float:
    """Fraction of pages held by requests (cached-but-unreferenced pages count as free, like vLLM)."""
    total = stats.get("total_kv_blocks") or 0
    if not total:
        return 0.0
    free = stats.get("free_kv_blocks", 0) + stats.get("cached_kv_blocks", 0)
    return max(0.0, min(1.0, 1.0 - free / total))
