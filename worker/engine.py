"""The models a worker holds, their slot tables, and PNG encoding (the only worker module with torch).

Every PNG carries what reproduces it exactly: model name and weights sha256, every sampler
setting, seed, class label, network precision and the software version, as PNG text chunks
(keys `edm:*`, plus `Software`). Nothing that varies between runs (time, worker, batch) is
written, so a rerun produces the same bytes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from contract.jobs import JobSpec
from contract.version import software_version
from model.card import ModelCard
from model.checkpoint import load_model
from model.generate import EvalEvent, GeneratedImage, SamplerSettings, use_batch_invariant_kernels
from model.images import encode_png
from model.slots import PassSizes, SlotEngine, cohorts_of
from worker.batcher import Slice

log = logging.getLogger("worker.engine")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class ServedModel:
    name: str
    net: torch.nn.Module
    card: ModelCard
    dtype: str       # the precision the network runs in on this worker
    load_s: float
    device_type: str = "cpu"
    pass_sizes: PassSizes = PassSizes()  # the row counts of its forward passes (recorded in each PNG)


def png_text(model: ServedModel, settings: SamplerSettings, seed: int, class_label: int | None,
             version: str) -> dict[str, str]:
    def text(value: object) -> str:
        if value is None:
            return "none"
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return str(value)

    meta = {"Software": f"edm-serve {version}", "edm:model": model.name,
            "edm:weights_sha256": model.card.weights_sha256, "edm:seed": str(seed),
            "edm:class_label": text(class_label), "edm:dtype": model.dtype,
            "edm:device_type": model.device_type, "edm:pass_sizes": str(model.pass_sizes)}
    if class_label is not None and model.card.class_names:
        meta["edm:class_name"] = model.card.class_names[class_label]
    meta.update({f"edm:{name}": text(value) for name, value in settings.as_dict().items()})
    return meta


class Engine:
    """The models this worker serves, loaded once; a slot table per model for the step scheduler."""

    def __init__(self, device: str = "cpu", dtype: str = "auto", *, max_pass_rows: int = 64,
                 pass_sizes: str = "auto"):
        self.device = torch.device(device)
        # Kernels must not change with the batch: TF32 off on CUDA, and passes of fixed row counts.
        use_batch_invariant_kernels(self.device)
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.max_pass_rows = max_pass_rows
        self.pass_sizes = (PassSizes.for_device(self.device, max_pass_rows) if pass_sizes == "auto"
                           else PassSizes.parse(pass_sizes))
        if self.pass_sizes.max_rows is not None and self.pass_sizes.max_rows < max_pass_rows:
            raise ValueError(f"pass sizes {self.pass_sizes} cannot carry max_pass_rows={max_pass_rows}")
        self.models: dict[str, ServedModel] = {}
        self.version = software_version()

    def load(self, name: str, path: Path, max_parameters: int | None = None) -> ServedModel:
        started = time.perf_counter()
        loaded = (load_model(path, device=self.device) if max_parameters is None
                  else load_model(path, device=self.device, max_parameters=max_parameters))
        net = loaded.net
        if self.dtype != "auto":
            net.compute_dtype = DTYPES[self.dtype]
        dtype = DTYPE_NAMES.get(net.execution_dtype(self.device), str(net.execution_dtype(self.device)))
        served = ServedModel(name, net, loaded.card, dtype, time.perf_counter() - started,
                             self.device.type, self.pass_sizes)
        self.models[name] = served
        log.info("loaded model %s", name, extra={"model": name, "path": str(path), "device": str(self.device),
                                                 "dtype": dtype, "load_s": round(served.load_s, 3)})
        return served

    def table(self, model: str, capacity: int) -> SlotEngine:
        """A slot table of `capacity` images for one served model."""
        return SlotEngine(self.models[model].net, capacity=capacity, max_pass_rows=self.max_pass_rows,
                          pass_sizes=self.pass_sizes)

    def check(self, spec: JobSpec) -> str | None:
        """Why this job cannot run here (the gateway checks the same, schedule included), or None."""
        model = self.models.get(spec.model)
        if model is None:
            return f"model {spec.model!r} is not loaded on this worker"
        try:
            SamplerSettings(**spec.sampler.settings_kwargs()).validate()
            spec.sampler.schedule_on(model.card)  # SettingsError: what float64 or float32 could not compute
        except (TypeError, ValueError) as error:
            return str(error)
        for label in spec.class_labels:
            if label is not None and not 0 <= label < model.card.label_dim:
                return f"class_label: {label} is outside 0..{model.card.label_dim - 1}"
        return None

    def run(self, batch: Sequence[Slice],
            on_eval: Callable[[EvalEvent], Iterable[int] | None] | None = None) -> list[GeneratedImage | None]:
        """The request scheduler's batch (all slices share one batch key): every image in one slot table,
        advanced together. `on_eval` may return batch rows to drop: their slices leave the table."""
        spec = batch[0].job.spec
        settings = SamplerSettings(**spec.sampler.settings_kwargs())
        size = sum(piece.size for piece in batch)
        table = self.table(spec.model, size)
        slice_of: list[int] = []
        for k, piece in enumerate(batch):
            first = len(slice_of)
            slice_of += [k] * piece.size
            seeds = piece.job.spec.seeds[piece.start:piece.stop]
            labels = piece.job.spec.class_labels[piece.start:piece.stop]
            for rows in cohorts_of(piece.size, table.max_pass_rows):
                table.admit(k, [first + r for r in rows], [seeds[r] for r in rows], [labels[r] for r in rows],
                            settings)
        images: list[GeneratedImage | None] = [None] * size
        while table.occupied:
            report = table.step()
            for error in report.failed.values():
                raise error
            for image in report.finished:
                images[int(image.key)] = GeneratedImage(image.seed, image.class_label, image.pixels)  # type: ignore[call-overload]
            if on_eval is None or not report.evaluated:
                continue
            first_ev = report.evaluated[0]
            active = [int(key) for ev in report.evaluated for key in ev.keys]  # type: ignore[call-overload]
            x0 = torch.cat([ev.x0 for ev in report.evaluated])
            drop = on_eval(EvalEvent(first_ev.step, first_ev.num_steps, first_ev.sigma, first_ev.nfe,
                                     first_ev.nfe_total, x0, active))
            for k in {slice_of[row] for row in drop or ()}:
                table.cancel(k)
        return images

    def encode(self, spec: JobSpec, image: GeneratedImage) -> tuple[bytes, dict[str, str]]:
        model = self.models[spec.model]
        settings = SamplerSettings(**spec.sampler.settings_kwargs())
        text = png_text(model, settings, image.seed, image.class_label, self.version)
        return encode_png(image.pixels, text), text
