"""`edm-serve worker`: one long-lived process per device. Loads its models once, then claims,
batches and samples jobs until SIGTERM. Settings come from EDM_* variables; options override."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
import time

log = logging.getLogger("worker.main")


def worker_id(name: str | None) -> str:
    """Unique per process; no ':' (RQ splits execution keys on it)."""
    base = (name or socket.gethostname()).replace(":", "-")
    return f"{base}-{os.getpid()}-{secrets.token_hex(3)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edm-serve worker", description=__doc__)
    parser.add_argument("--serve", help="comma-separated model names [EDM_SERVE; default: all configured]")
    parser.add_argument("--device", help="cpu, cuda or cuda:N [EDM_DEVICE, default cpu]")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="network precision [EDM_DTYPE]")
    parser.add_argument("--scheduler", choices=["step", "request"], help="step-level or request-level batching "
                        "[EDM_SCHEDULER, default step]")
    parser.add_argument("--max-pass-rows", type=int, help="images per forward pass, at most [EDM_MAX_PASS_ROWS, "
                        "default 64]")
    parser.add_argument("--slot-rows", type=int, help="images held in a slot table [EDM_SLOT_ROWS, default 256]")
    parser.add_argument("--cohort-rows", type=int, help="a job's images enter a slot table in groups of at most "
                        "this many [EDM_COHORT_ROWS, default 8]")
    parser.add_argument("--pass-sizes", help="row counts of forward passes [EDM_PASS_SIZES, default auto]")
    parser.add_argument("--max-wait", type=float, help="request scheduler: seconds to wait to fill a batch "
                        "[EDM_MAX_WAIT_S]")
    parser.add_argument("--metrics-port", type=int, help="Prometheus port, 0 = off [EDM_METRICS_PORT, 9101]")
    parser.add_argument("--redis-url", help="Redis URL [EDM_REDIS_URL]")
    parser.add_argument("--name", help="worker name prefix [EDM_NAME, default host name]")
    args = parser.parse_args(argv)

    from contract.settings import WorkerSettings

    overrides = {"serve": args.serve, "device": args.device, "dtype": args.dtype, "scheduler": args.scheduler,
                 "max_pass_rows": args.max_pass_rows, "slot_rows": args.slot_rows, "cohort_rows": args.cohort_rows,
                 "pass_sizes": args.pass_sizes,
                 "max_wait_s": args.max_wait, "metrics_port": args.metrics_port, "redis_url": args.redis_url,
                 "name": args.name}
    settings = WorkerSettings(**{k: v for k, v in overrides.items() if v is not None})
    from contract.logs import setup_logging

    setup_logging("worker", settings.log_level)
    os.environ.setdefault("OMP_NUM_THREADS", str(settings.torch_threads))
    try:
        return run(settings)
    except (ValueError, OSError) as error:
        log.error("worker cannot start: %s", error)
        print(f"edm-serve worker: {error}", file=sys.stderr)
        return 2


def run(settings) -> int:  # noqa: ANN001 - WorkerSettings, imported lazily above
    import torch

    from contract.ledger import connect
    from contract.models import LogProgress, catalog_card_json, configured_models
    from model.allocator import reuse_freed_memory
    from worker.engine import Engine
    from worker.metrics import WorkerMetrics
    from worker.queue import WorkerQueue
    from worker.runner import Worker
    from worker.stepper import StepWorker

    class DownloadReport(LogProgress):
        """Download progress in the log and, at most once a second, for the gateway's readiness."""

        def __init__(self, queue: WorkerQueue, name: str, url: str) -> None:
            super().__init__(name, url)
            self.queue, self.reported = queue, 0.0

        def __call__(self, done: int, total: int | None) -> None:
            super().__call__(done, total)
            now = time.monotonic()
            if now - self.reported >= 1.0 or done == total:
                self.reported = now
                self.queue.report_loading(self.name, {"phase": "downloading", "url": self.url, "bytes": done,
                                                      "total_bytes": total})

    torch.set_num_threads(settings.torch_threads)
    reuse_freed_memory()  # forward passes reuse their activations' memory (model/allocator.py)
    conn = connect(settings.redis_url, settings.redis_timeout_s)
    queue = WorkerQueue(conn, worker_id(settings.name), result_ttl_s=settings.result_ttl_s,
                        failure_ttl_s=settings.failure_ttl_s, heartbeat_ttl_s=settings.heartbeat_ttl_s,
                        max_reruns=settings.max_reruns, event_stream_bytes=settings.event_stream_bytes)
    models = configured_models(settings, progress=lambda name, source: DownloadReport(queue, name, source.url or ""))
    serve = settings.serve or list(models)
    unknown = [name for name in serve if name not in models]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; configured: {', '.join(models) or 'none'}")
    if not serve:
        raise ValueError("no models to serve: configure EDM_MODELS / EDM_MODELS_FILE or the bundled model")

    metrics = WorkerMetrics()
    engine = Engine(settings.device, settings.dtype, max_pass_rows=settings.max_pass_rows,
                    pass_sizes=settings.pass_sizes)
    for name in serve:
        queue.report_loading(name, {"phase": "loading"}, ttl_s=300)
        served = engine.load(name, models[name], max_parameters=settings.max_parameters)
        metrics.load_seconds.labels(name).set(served.load_s)
    for name, served in engine.models.items():
        queue.publish_card(name, catalog_card_json(served.card))
        queue.loaded(name)
    metrics.serve(settings.metrics_port)
    connect_again = lambda: connect(settings.redis_url, settings.redis_timeout_s)  # noqa: E731
    block_s = min(1.0, settings.redis_timeout_s / 2)
    worker: Worker
    if settings.scheduler == "step":
        worker = StepWorker(queue=queue, engine=engine, metrics=metrics, slot_rows=settings.slot_rows,
                            cohort_rows=settings.cohort_rows, heartbeat_interval_s=settings.heartbeat_interval_s,
                            hang_timeout_s=settings.hang_timeout_s, block_s=block_s, device=settings.device,
                            dtype=settings.dtype, connect=connect_again)
    else:
        worker = Worker(queue=queue, engine=engine, metrics=metrics, max_batch=settings.max_pass_rows,
                        max_wait_s=settings.max_wait_s, batch_gap_s=settings.batch_gap_s,
                        heartbeat_interval_s=settings.heartbeat_interval_s, block_s=block_s,
                        device=settings.device, dtype=settings.dtype, connect=connect_again)
    worker.install_signal_handlers()
    print(f"edm-serve worker {queue.id}: serving {', '.join(serve)} on {settings.device} "
          f"({settings.scheduler} scheduler, passes of {engine.pass_sizes} rows)"
          + (f"; metrics on :{settings.metrics_port}/metrics" if settings.metrics_port else ""), flush=True)
    return worker.run()
