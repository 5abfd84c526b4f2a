"""The batcher is pure: claimed jobs in, one batch plan out."""

from __future__ import annotations

import pytest

from contract.jobs import JobSpec, SamplerParams
from worker.batcher import Claimed, batch_rows, plan_batch


def job(job_id: str, images: int, steps: int = 18, model: str = "m", done: int = 0) -> Claimed:
    spec = JobSpec(model=model, seeds=list(range(images)), class_labels=[None] * images,
                   sampler=SamplerParams(num_steps=steps))
    return Claimed(job_id, spec, created_at=0.0, done=done)


def shape(plan) -> list[tuple[str, int, int]]:  # noqa: ANN001
    return [(piece.job.id, piece.start, piece.stop) for piece in plan.batch]


def test_compatible_jobs_share_a_batch_in_order() -> None:
    plan = plan_batch([job("a", 2), job("b", 3), job("c", 1)], max_batch=8)
    assert shape(plan) == [("a", 0, 2), ("b", 0, 3), ("c", 0, 1)]
    assert plan.deferred == []
    assert batch_rows(plan.batch) == [0, 0, 1, 1, 1, 2]


def test_incompatible_jobs_wait() -> None:
    a, b, c, d = job("a", 2), job("b", 2, steps=10), job("c", 2, model="other"), job("d", 1)
    plan = plan_batch([a, b, c, d], max_batch=8)
    assert shape(plan) == [("a", 0, 2), ("d", 0, 1)]
    assert [j.id for j in plan.deferred] == ["b", "c"]


def test_big_jobs_are_sliced_and_continue_where_they_stopped() -> None:
    big = job("big", 10)
    plan = plan_batch([big, job("x", 3)], max_batch=4)
    assert shape(plan) == [("big", 0, 4)]
    assert [j.id for j in plan.deferred] == ["x"]
    big.done = 8
    plan = plan_batch([big, job("x", 3)], max_batch=4)
    assert shape(plan) == [("big", 8, 10), ("x", 0, 2)]


def test_empty_and_bad_limits() -> None:
    assert plan_batch([], 4).batch == []
    with pytest.raises(ValueError):
        plan_batch([job("a", 1)], 0)
