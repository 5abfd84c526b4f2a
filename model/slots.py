"""Step-level continuous batching: many images, each at its own point of its own sampler, share
every forward pass.

The engine holds a table of rows. Each occupied row is one image with its own sampler state: its
settings (any num_steps, solver, discretization, schedule, scaling, sigma range, rho, churn), its
place in its own schedule, its seed's random stream and its class label. Images are admitted in
cohorts: images admitted together with the same settings (of one group, a job, or of several)
share one sampler coroutine from model/samplers.py, the only copy of the math; a cancelled group's
rows leave the table and the forward passes at once. `step()` gathers the pending
evaluation of the chosen cohorts, each at its own sigma, into one network call, gives each its
D(x; sigma) and advances it. Images enter between any two passes and leave when finished or when
their group is cancelled.

Exactness: a row's numbers must not depend on what shares its pass. The sampler's own arithmetic is
elementwise (per-row float64), the noise comes from each seed's own generator, and the network sees
one sigma per row; `PassSizes` pads every pass to a row count from a small set so that the kernels
a row goes through do not change with the occupancy (on CPU, PyTorch picks other convolution and
matmul kernels for batches of one to three rows; on CUDA, cuDNN and cuBLAS choose kernels by batch
size). Which rows share a pass then changes no bit of any row.

Fairness: when more rows are occupied than one pass holds, each pass gives every group an equal
share of its rows (cohorts that waited longest first) and fills what is left with the cohorts that
waited longest, so a group that fits in its share is evaluated on every pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.images import to_pixels
from model.rng import SeedStreams
from model.samplers import Evaluation, SamplerSettings, SamplerSteps, sampler_steps


@dataclass(frozen=True)
class PassSizes:
    """The row counts a forward pass may have: the smallest size >= the rows it carries.

    `sizes`: an explicit set (CUDA: each one a shape that can be captured as a CUDA graph);
    empty = any count from `min_rows` up (CPU: PyTorch's CPU kernels agree for every batch of at
    least four rows of the networks we serve, and differ below that).
    """

    sizes: tuple[int, ...] = ()
    min_rows: int = 4

    def __post_init__(self) -> None:
        if any(size < 1 for size in self.sizes) or self.min_rows < 1:
            raise ValueError(f"pass sizes must be >= 1 (got {self.sizes}, min {self.min_rows})")
        object.__setattr__(self, "sizes", tuple(sorted(set(self.sizes))))

    @property
    def max_rows(self) -> int | None:
        return self.sizes[-1] if self.sizes else None

    def rows_for(self, used: int) -> int:
        if not self.sizes:
            return max(used, self.min_rows)
        for size in self.sizes:
            if size >= used:
                return size
        raise ValueError(f"{used} rows do not fit in a pass of at most {self.sizes[-1]}")

    @staticmethod
    def for_device(device: torch.device, max_pass_rows: int) -> PassSizes:
        """Defaults: CUDA, powers of two from 8 up to max_pass_rows; CPU, any count from 4."""
        if device.type != "cuda":
            return PassSizes()
        sizes = [size for size in (8, 16, 32, 64, 128, 256, 512) if size < max_pass_rows]
        return PassSizes(tuple(sizes) + (max_pass_rows,))

    def __str__(self) -> str:
        return ",".join(map(str, self.sizes)) if self.sizes else f"{self.min_rows}+"

    @staticmethod
    def parse(text: str) -> PassSizes:
        """'auto' is handled by the caller; '4+' = any count from 4; '8,16,32' = those sizes."""
        text = text.strip()
        if text.endswith("+"):
            return PassSizes(min_rows=int(text[:-1]))
        return PassSizes(tuple(int(part) for part in text.split(",") if part.strip()))


@dataclass(frozen=True)
class FinishedImage:
    group: Hashable
    key: Hashable           # the caller's handle of the image (e.g. its index in the job)
    seed: int
    class_label: int | None
    pixels: np.ndarray      # uint8 [H, W, C]


@dataclass(frozen=True)
class CohortEvaluation:
    """What one group's rows of a cohort got from a pass: where their sampler stands, their x0."""

    group: Hashable
    keys: tuple[Hashable, ...]
    step: int               # sampler step, 0-based
    num_steps: int
    sigma: float            # the noise level the network just saw
    nfe: int                # evaluations done per image, this one included
    nfe_total: int
    x0: Tensor              # float64 [len(keys), C, H, W]


@dataclass
class PassReport:
    rows_used: int = 0
    rows_padded: int = 0
    waiting_rows: int = 0   # occupied rows that this pass did not carry
    evaluated: list[CohortEvaluation] = field(default_factory=list)
    finished: list[FinishedImage] = field(default_factory=list)
    failed: dict[Hashable, BaseException] = field(default_factory=dict)  # group -> why it was dropped


@dataclass
class _Cohort:
    """Rows admitted together with the same settings: one sampler coroutine over all of them. Its rows
    may belong to several groups; a cancelled group's rows stay in the coroutine's arithmetic (a few
    elementwise operations) but leave the table and the network at once."""

    groups: list[Hashable]
    keys: list[Hashable]
    seeds: list[int]
    labels: list[int | None]
    one_hot: Tensor | None
    steps: SamplerSteps
    pending: Evaluation
    admitted_at: int                  # pass counter at admission
    live: list[int] = field(default_factory=list)  # indices of the rows still wanted
    last_pass: int = -1               # the last pass that carried it

    def __post_init__(self) -> None:
        self.live = list(range(len(self.keys)))

    @property
    def size(self) -> int:
        return len(self.live)

    @property
    def group(self) -> Hashable:
        """The group whose share of a pass this cohort counts against: its first live row's."""
        return self.groups[self.live[0]]

    def live_of(self, group: Hashable) -> list[int]:
        return [i for i in self.live if self.groups[i] == group]


class GroupFailed(Exception):
    """Raised inside the engine for one group only; the others go on."""


class SlotEngine:
    """A table of `capacity` rows of sampler state; each pass carries at most `max_pass_rows` rows."""

    def __init__(self, net: Any, *, capacity: int, max_pass_rows: int | None = None,
                 pass_sizes: PassSizes | None = None):
        self.net = net  # a model.precond.Precond
        self.device = next(net.parameters()).device
        self.capacity = capacity
        self.pass_sizes = pass_sizes or PassSizes.for_device(self.device, max_pass_rows or capacity)
        limit = self.pass_sizes.max_rows
        self.max_pass_rows = min(max_pass_rows or capacity, limit) if limit else (max_pass_rows or capacity)
        if capacity < 1 or self.max_pass_rows < 1:
            raise ValueError(f"capacity and max_pass_rows must be >= 1 (got {capacity}, {self.max_pass_rows})")
        self.cohorts: list[_Cohort] = []
        self.passes = 0

    # the table

    @property
    def occupied(self) -> int:
        return sum(cohort.size for cohort in self.cohorts)

    @property
    def free_rows(self) -> int:
        return self.capacity - self.occupied

    def rows_of(self, group: Hashable) -> int:
        return self.rows_by_group().get(group, 0)

    def rows_by_group(self) -> dict[Hashable, int]:
        """Occupied rows per group, in one walk of the table."""
        counts: dict[Hashable, int] = {}
        for cohort in self.cohorts:
            for i in cohort.live:
                counts[cohort.groups[i]] = counts.get(cohort.groups[i], 0) + 1
        return counts

    def groups(self) -> list[Hashable]:
        return list(dict.fromkeys(c.groups[i] for c in self.cohorts for i in c.live))

    def admit(self, group: Hashable, keys: Sequence[Hashable], seeds: Sequence[int],
              class_labels: Sequence[int | None], settings: SamplerSettings) -> None:
        """Occupy len(keys) rows with new images of one group (see admit_rows)."""
        self.admit_rows([group] * len(keys), keys, seeds, class_labels, settings)

    @torch.no_grad()
    def admit_rows(self, groups: Sequence[Hashable], keys: Sequence[Hashable], seeds: Sequence[int],
                   class_labels: Sequence[int | None], settings: SamplerSettings) -> None:
        """Occupy len(keys) rows with new images that share `settings`, each row of its own group (one
        sampler coroutine for all of them). Raises ValueError for bad settings or labels, or when the
        table lacks room. Latents and labels are drawn now, from each seed's stream."""
        if not len(groups) == len(keys) == len(seeds) == len(class_labels):
            raise ValueError(f"{len(groups)} groups, {len(keys)} keys, {len(seeds)} seeds, "
                             f"{len(class_labels)} class labels")
        if not keys:
            return
        if len(keys) > self.max_pass_rows:
            raise ValueError(f"a cohort of {len(keys)} images exceeds a pass of {self.max_pass_rows} rows")
        if len(keys) > self.free_rows:
            raise ValueError(f"{len(keys)} images do not fit in {self.free_rows} free rows")
        settings.validate()
        streams = SeedStreams(seeds, self.device)
        latents, one_hot, labels = draw_inputs(self.net, streams, class_labels)
        steps = sampler_steps(self.net, latents, streams.randn_like, settings)
        pending = next(steps)
        self.cohorts.append(_Cohort(list(groups), list(keys), list(streams.seeds), labels, one_hot, steps, pending,
                                    admitted_at=self.passes))

    def cancel(self, group: Hashable) -> int:
        """Free the rows of a group; returns how many."""
        freed = 0
        for cohort in self.cohorts:
            gone = set(cohort.live_of(group))
            freed += len(gone)
            cohort.live = [i for i in cohort.live if i not in gone]
        for cohort in [c for c in self.cohorts if not c.live]:
            cohort.steps.close()
        self.cohorts = [c for c in self.cohorts if c.live]
        return freed

    # one pass

    def choose(self) -> list[_Cohort]:
        """The cohorts of the next pass: an equal share of rows per group, longest-waiting first, then
        the longest-waiting cohorts of any group in what is left."""
        if self.occupied <= self.max_pass_rows:
            return list(self.cohorts)
        by_wait = sorted(self.cohorts, key=lambda c: (c.last_pass, c.admitted_at))
        groups = list(dict.fromkeys(c.group for c in by_wait))
        share = self.max_pass_rows // len(groups)
        chosen: list[_Cohort] = []
        used = 0
        for group in groups:
            taken = 0
            for cohort in (c for c in by_wait if c.group == group):
                if taken + cohort.size > max(share, cohort.size) or used + cohort.size > self.max_pass_rows:
                    break
                chosen.append(cohort)
                taken += cohort.size
                used += cohort.size
        for cohort in by_wait:
            if cohort not in chosen and used + cohort.size <= self.max_pass_rows:
                chosen.append(cohort)
                used += cohort.size
        return chosen

    @torch.no_grad()
    def step(self) -> PassReport:
        """One forward pass over the chosen cohorts; advance each. Nothing to do: an empty report."""
        report = PassReport()
        chosen = self.choose()
        if not chosen:
            return report
        try:
            denoised = self._forward([(c, c.live) for c in chosen], report)
        except Exception:
            # Find the groups that fail on their own; they drop out, the others try again next pass.
            culprits = self._isolate(chosen)
            if not culprits:
                raise
            report.failed.update(culprits)
            for group in report.failed:
                self.cancel(group)
            return report
        self.passes += 1
        for cohort, x0 in zip(chosen, denoised, strict=True):
            cohort.last_pass = self.passes
            ev = cohort.pending
            self._report_evaluation(cohort, ev, x0, report)
            try:
                cohort.pending = cohort.steps.send(x0)
            except StopIteration as done:
                self._finish(cohort, done.value, report)
            except Exception as error:  # the sampler itself failed for these settings
                for group in dict.fromkeys(cohort.groups[i] for i in cohort.live):
                    report.failed.setdefault(group, error)
        for group in report.failed:
            self.cancel(group)
        report.waiting_rows = self.occupied - report.rows_used if self.cohorts else 0
        return report

    @staticmethod
    def _report_evaluation(cohort: _Cohort, ev: Evaluation, x0: Tensor, report: PassReport) -> None:
        sigma = float(ev.sigma)
        if cohort.size == len(cohort.keys) and len(set(cohort.groups)) == 1:  # the common case: one whole group
            report.evaluated.append(CohortEvaluation(cohort.groups[0], tuple(cohort.keys), ev.step, ev.num_steps,
                                                     sigma, ev.nfe + 1, ev.nfe_total, x0))
            return
        for group in dict.fromkeys(cohort.groups[i] for i in cohort.live):
            rows = cohort.live_of(group)
            report.evaluated.append(CohortEvaluation(group, tuple(cohort.keys[i] for i in rows), ev.step,
                                                     ev.num_steps, sigma, ev.nfe + 1, ev.nfe_total, x0[rows]))

    def _forward(self, parts: list[tuple[_Cohort, list[int]]], report: PassReport | None = None) -> list[Tensor]:
        """D(x; sigma) of the given rows of each cohort in one network call of a fixed row count; a
        cohort's other rows (cancelled groups) get D(x) = x (they are never used)."""
        picks = [(c, None if len(rows) == len(c.keys) else rows) for c, rows in parts]  # None: every row
        xs = [c.pending.x if sel is None else c.pending.x[sel] for c, sel in picks]
        sizes = [len(rows) for _, rows in parts]
        sigmas = [c.pending.sigma.reshape(1).expand(n) for (c, _), n in zip(parts, sizes, strict=True)]
        used = sum(sizes)
        padded = self.pass_sizes.rows_for(used)
        x, sigma = torch.cat(xs), torch.cat(sigmas)
        labels = None
        if parts[0][0].one_hot is not None:
            labels = torch.cat([c.one_hot if sel is None else c.one_hot[sel] for c, sel in picks])  # type: ignore[index,misc]
        if padded > used:  # padding: copies of the last row; their outputs are dropped
            pad = padded - used
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
            sigma = torch.cat([sigma, sigma[-1:].expand(pad)])
            labels = None if labels is None else torch.cat([labels, labels[-1:].expand(pad, *labels.shape[1:])])
        out = self.net(x, sigma, labels)[:used].to(torch.float64)
        if report is not None:
            report.rows_used, report.rows_padded = used, padded - used
        denoised = []
        for (cohort, sel), part in zip(picks, out.split(sizes), strict=True):
            if sel is None:
                denoised.append(part)
            else:
                full = cohort.pending.x.clone()
                full[sel] = part
                denoised.append(full)
        return denoised

    def _isolate(self, chosen: list[_Cohort]) -> dict[Hashable, BaseException]:
        """The groups whose rows fail a pass on their own ({} when all do: the fault is not theirs)."""
        groups = list(dict.fromkeys(c.groups[i] for c in chosen for i in c.live))
        culprits: dict[Hashable, BaseException] = {}
        for group in groups:
            alone = [(c, c.live_of(group)) for c in chosen if c.live_of(group)]
            try:
                self._forward(alone)
            except Exception as error:
                culprits[group] = error
        return culprits if len(culprits) < len(groups) or len(groups) == 1 else {}

    def _finish(self, cohort: _Cohort, images: Tensor, report: PassReport) -> None:
        self.cohorts.remove(cohort)
        finite = torch.isfinite(images.flatten(1)).all(1).tolist()
        for group in dict.fromkeys(cohort.groups[i] for i in cohort.live):
            rows = cohort.live_of(group)
            bad = sum(not finite[i] for i in rows)
            if bad:
                report.failed.setdefault(group, GroupFailed(
                    f"the sampler produced non-finite values in {bad} of {len(rows)} images "
                    "(settings outside what float64 can compute)"))
        pixels = to_pixels(images[cohort.live])
        for k, i in enumerate(cohort.live):
            if cohort.groups[i] not in report.failed:
                report.finished.append(FinishedImage(cohort.groups[i], cohort.keys[i], cohort.seeds[i],
                                                     cohort.labels[i], pixels[k]))


def draw_inputs(net: Any, streams: SeedStreams,
                class_labels: Sequence[int | None]) -> tuple[Tensor, Tensor | None, list[int | None]]:
    """Latents, one-hot labels and the label per row, drawn in the reference's order."""
    device = torch.device(streams.generators[0].device)
    n = len(streams)
    latents = streams.randn([n, net.img_channels, net.img_resolution, net.img_resolution], device=device)
    if not net.label_dim:
        if any(label is not None for label in class_labels):
            raise ValueError("class_label: this model is unconditional")
        return latents, None, [None] * n
    # One draw per seed even when its class is given: it advances the seed's stream exactly as
    # the reference does, so the per-step noise that follows is the same.
    random_labels = streams.randint(net.label_dim, device=device)
    labels: list[int | None] = []
    for given, drawn in zip(class_labels, random_labels.tolist(), strict=True):
        if given is not None and not 0 <= given < net.label_dim:
            raise ValueError(f"class_label: {given} is outside 0..{net.label_dim - 1}")
        labels.append(drawn if given is None else int(given))
    one_hot = torch.eye(net.label_dim, device=device)[torch.tensor(labels, device=device)]
    return latents, one_hot, labels


def cohorts_of(count: int, size: int) -> list[range]:
    """Consecutive index ranges of at most `size` covering 0..count-1."""
    return [range(start, min(count, start + size)) for start in range(0, count, max(1, size))]


__all__ = ["CohortEvaluation", "FinishedImage", "GroupFailed", "PassReport", "PassSizes", "SlotEngine",
           "cohorts_of", "draw_inputs"]
