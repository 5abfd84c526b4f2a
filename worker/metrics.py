"""The worker's Prometheus metrics, served on its own port (EDM_METRICS_PORT, default 9101)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
IMAGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.jobs = Counter("edm_jobs", "Jobs by outcome (succeeded, failed, cancelled)", ["model", "outcome"],
                            registry=r)
        self.images = Counter("edm_images", "Images generated", ["model"], registry=r)
        self.nfe = Counter("edm_nfe", "Network evaluations (one per image per forward pass)", ["model"],
                           registry=r)
        self.skipped_writes = Counter("edm_skipped_writes", "Progress, preview and event writes skipped during "
                                      "sampling because Redis failed", ["write"], registry=r)
        self.reaped = Counter("edm_jobs_reaped", "Jobs taken back from dead workers, by outcome",
                              ["outcome"], registry=r)
        self.queue_wait = Histogram("edm_queue_wait_seconds", "Time from submission to first sampling step",
                                    ["model"], buckets=SECONDS, registry=r)
        self.sampling = Histogram("edm_sampling_seconds", "Time a job spent in the sampler (request scheduler: its "
                                  "batch; step scheduler: first image in the slot table to last image out)",
                                  ["model"], buckets=SECONDS, registry=r)
        self.latency = Histogram("edm_job_latency_seconds", "Time from submission to a terminal state",
                                 ["model"], buckets=SECONDS, registry=r)
        self.admission_wait = Histogram("edm_admission_wait_seconds", "Time from claiming a job to its first "
                                        "image entering the slot table", ["model"], buckets=SECONDS, registry=r)
        self.pass_rows = Histogram("edm_pass_rows", "Images carried by one forward pass (padding not counted)",
                                   ["model"], buckets=IMAGES, registry=r)
        self.padded_rows = Counter("edm_pass_padded_rows", "Padding rows added to forward passes to reach a fixed "
                                   "pass size", ["model"], registry=r)
        self.passes = Counter("edm_passes", "Forward passes", ["model"], registry=r)
        self.pass_seconds = Histogram("edm_pass_seconds", "Seconds per forward pass, the sampler's arithmetic "
                                      "included", ["model"], buckets=SECONDS, registry=r)
        self.loop_wait = Counter("edm_pass_loop_wait_seconds", "Seconds the pass loop waited on PNG encoding and "
                                 "Redis writes (a full write queue)", registry=r)
        self.slot_rows = Gauge("edm_slot_rows_used", "Images in the slot tables (or the batch being sampled)",
                               registry=r)
        self.busy = Gauge("edm_worker_busy", "1 while the worker holds images in the sampler", registry=r)
        self.hung = Gauge("edm_worker_hung", "1 once no forward pass completed for EDM_HANG_TIMEOUT_S while "
                          "holding work (the worker stops heartbeating and exits)", registry=r)
        self.load_seconds = Gauge("edm_model_load_seconds", "Time to load each model at start", ["model"],
                                  registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)
