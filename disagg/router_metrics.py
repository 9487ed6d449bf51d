"""The router's own Prometheus metrics, in a registry of their own (one per app).

The instances' /metrics are not merged here: scrape each prefill and decode instance directly.
In-flight requests and health per instance are read from the pool at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from disagg.router_pool import InstancePool


class _PoolCollector(Collector):
    def __init__(self, pool: InstancePool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "glint_router_in_flight", "Requests outstanding at an instance", labels=["role", "instance"]
        )
        healthy = GaugeMetricFamily(
            "glint_router_instance_healthy", "1 if the instance is routed to", labels=["role", "instance"]
        )
        for inst in self.pool.instances:
            in_flight.add_metric([inst.role, inst.url], inst.in_flight)
            healthy.add_metric([inst.role, inst.url], 1.0 if inst.healthy else 0.0)
        yield in_flight
        yield healthy


class RouterMetrics:
    def __init__(self, pool: InstancePool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "glint_router_requests", "Requests sent to an instance, per route",
            ["route", "role", "instance"], registry=self.registry,
        )
        self.responses = Counter(
            "glint_router_responses", "Responses the router started, per route and status",
            ["route", "status"], registry=self.registry,
        )
        self.upstream_errors = Counter(
            "glint_router_upstream_errors",
            "Failed upstream requests (kind: connect, timeout, transport, status)",
            ["role", "instance", "kind"], registry=self.registry,
        )
        self.client_disconnects = Counter(
            "glint_router_client_disconnects", "Clients that went away before their response ended",
            ["route"], registry=self.registry,
        )
        self.duration = Histogram(
            "glint_router_request_duration_seconds", "Time from request to the end of its response",
            ["route"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.registry.register(_PoolCollector(pool))

    def render(self) -> bytes:
        return generate_latest(self.registry)
