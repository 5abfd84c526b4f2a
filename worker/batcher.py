"""Which claimed jobs share the next forward passes (pure: no Redis, no torch).

Request-level batching: jobs share a batch when their batch keys are equal (same model, same
sampler settings; seeds and classes may differ). The oldest claimed job picks the key; a job
with more images than fit is cut into consecutive slices of seeds, which changes no image, since
each image depends only on its own seed's stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from contract.jobs import ImageInfo, JobSpec


@dataclass
class Claimed:
    """A job this worker holds: its spec, when it was queued, how many images are done."""

    id: str
    spec: JobSpec
    created_at: float
    done: int = 0
    started: bool = False
    sampling_s: float = 0.0
    images: list[ImageInfo] = field(default_factory=list)  # in index order
    preview_every: int = 0  # k > 0: x0 previews with every k-th evaluation (read at the claim)
    stored: dict[int, ImageInfo] = field(default_factory=dict)  # stored by an earlier run, by index

    @property
    def remaining(self) -> int:
        return self.spec.num_images - self.done


@dataclass(frozen=True)
class Slice:
    """Images start..stop-1 of one job."""

    job: Claimed
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Plan:
    batch: list[Slice]      # run these now, in this order
    deferred: list[Claimed]  # claimed but not in this batch


def plan_batch(claimed: Sequence[Claimed], max_batch: int) -> Plan:
    """Fill up to max_batch images from the jobs compatible with the first, oldest first."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if not claimed:
        return Plan([], [])
    key = claimed[0].spec.batch_key()
    batch: list[Slice] = []
    deferred: list[Claimed] = []
    room = max_batch
    for job in claimed:
        if room == 0 or job.spec.batch_key() != key or job.remaining == 0:
            deferred.append(job)
            continue
        take = min(room, job.remaining)
        batch.append(Slice(job, job.done, job.done + take))
        room -= take
    return Plan(batch, deferred)


def batch_rows(batch: Sequence[Slice]) -> list[int]:
    """For each row of the batch, the index of its slice."""
    return [k for k, piece in enumerate(batch) for _ in range(piece.size)]
