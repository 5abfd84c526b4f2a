"""The gateway's Prometheus metrics (scrape GET /metrics on the gateway port).

Queue gauges are read from Redis at scrape time, so every gateway replica reports the same
numbers; sum the counters across replicas, not the gauges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.ledger import Ledger

log = logging.getLogger("service.metrics")

# The methods of edm.v1.GenerationService (tests/grpc checks this against the proto).
GRPC_METHODS = tuple(f"edm.v1.GenerationService/{name}" for name in (
    "Generate", "GenerateStream", "WatchJob", "GetJob", "CancelJob", "ListModels"))

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class QueueCollector(Collector):
    """edm_queued_jobs{model}, edm_queued_nfe, edm_live_workers and edm_redis_up, read on scrape."""

    def __init__(self, ledger: Callable[[], Ledger | None], models: list[str]):
        self.ledger = ledger
        self.models = models

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("edm_redis_up", "1 if the gateway reached Redis on this scrape")
        ledger = self.ledger()
        try:
            if ledger is None:
                raise RuntimeError("not started")
            lengths = ledger.queue_lengths(self.models)
            queued_nfe = ledger.queued_nfe()
            workers = len(ledger.live_workers())
        except Exception as error:  # a scrape must not fail because Redis is down
            log.debug("queue metrics unavailable: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("edm_queued_jobs", "Jobs waiting in each model's queue", labels=["model"])
        for model, length in lengths.items():
            jobs.add_metric([model], length)
        yield jobs
        yield GaugeMetricFamily("edm_queued_nfe", "Network evaluations of all queued jobs", value=queued_nfe)
        yield GaugeMetricFamily("edm_live_workers", "Workers with a current heartbeat", value=workers)


class GatewayMetrics:
    def __init__(self, ledger: Callable[[], Ledger | None], models: list[str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("edm_http_requests", "HTTP requests by route and status",
                                     ["route", "method", "status"], registry=r)
        self.http_seconds = Histogram("edm_http_request_duration_seconds", "HTTP request duration by route",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.jobs_submitted = Counter("edm_jobs_submitted", "Jobs accepted by the gateway", ["model"], registry=r)
        self.jobs = Counter("edm_jobs", "Jobs by outcome (gateway: rejected, cancelled while queued)",
                            ["model", "outcome"], registry=r)
        self.generate_seconds = Histogram(
            "edm_generate_latency_seconds", "End-to-end latency of POST /v1/generate that finished",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.open_streams = Gauge("edm_gateway_open_streams", "Event streams (SSE, gRPC) this gateway holds open",
                                  registry=r)
        self.waiting_requests = Gauge("edm_gateway_waiting_requests", "Requests waiting for their job on this "
                                      "gateway (POST /v1/generate, gRPC Generate)", registry=r)
        self.watched_jobs = Gauge("edm_gateway_watched_jobs", "Jobs whose event streams this gateway reads for its "
                                  "waiting clients (one read per job and event loop, however many wait on it: REST "
                                  "and gRPC have a loop each)", registry=r)
        self.grpc_requests = Counter("edm_grpc_requests", "gRPC calls by method and status code",
                                     ["method", "code"], registry=r)
        for method in GRPC_METHODS:  # every method shows (at 0) before its first call
            self.grpc_requests.labels(method, "OK")
        r.register(QueueCollector(ledger, models))
