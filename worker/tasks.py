"""The function RQ's job records name (`worker.tasks.generate`). Jobs are run by `edm-serve worker`,
which claims them itself and batches them; a stock `rq worker` must not run them."""

from __future__ import annotations

from typing import Any


def generate(spec: dict[str, Any]) -> None:
    raise RuntimeError("edm-serve jobs are run by `edm-serve worker` (it batches them on one device); "
                       "do not point a plain `rq worker` at the model queues")
