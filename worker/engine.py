"""The models a worker holds and one batch through the sampler (the only worker module with torch).

Every PNG carries what reproduces it exactly: model name and weights sha256, every sampler
setting, seed, class label, network precision and the software version, as PNG text chunks
(keys `edm:*`, plus `Software`). Nothing that varies between runs (time, worker, batch) is
written, so a rerun produces the same bytes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.card import ModelCard
from model.checkpoint import load_model
from model.generate import GeneratedImage, OnEval, SamplerSettings, generate, use_batch_invariant_kernels
from model.images import encode_png
from service.contract import JobSpec
from service.version import software_version
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
    chunk: int | None = None  # fixed forward-pass size (CUDA batch invariance), None = whole batch


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
            "edm:device_type": model.device_type, "edm:chunk": text(model.chunk)}
    if class_label is not None and model.card.class_names:
        meta["edm:class_name"] = model.card.class_names[class_label]
    meta.update({f"edm:{name}": text(value) for name, value in settings.as_dict().items()})
    return meta


class Engine:
    def __init__(self, device: str = "cpu", dtype: str = "auto", cuda_chunk: int | None = 16):
        self.device = torch.device(device)
        # CUDA kernels depend on the batch size, so on CUDA every forward pass has the same size
        # (model.generate explains); the CPU is batch-invariant without it.
        self.chunk = cuda_chunk if self.device.type == "cuda" else None
        use_batch_invariant_kernels(self.device)
        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.models: dict[str, ServedModel] = {}
        self.version = software_version()

    def load(self, name: str, path: Path) -> ServedModel:
        started = time.perf_counter()
        loaded = load_model(path, device=self.device)
        net = loaded.net
        if self.dtype != "auto":
            net.compute_dtype = DTYPES[self.dtype]
        dtype = DTYPE_NAMES.get(net.execution_dtype(self.device), str(net.execution_dtype(self.device)))
        served = ServedModel(name, net, loaded.card, dtype, time.perf_counter() - started,
                             self.device.type, self.chunk)
        self.models[name] = served
        log.info("loaded model %s", name, extra={"model": name, "path": str(path), "device": str(self.device),
                                                 "dtype": dtype, "load_s": round(served.load_s, 3)})
        return served

    def check(self, spec: JobSpec) -> str | None:
        """Why this job cannot run here (the gateway checks the same), or None."""
        model = self.models.get(spec.model)
        if model is None:
            return f"model {spec.model!r} is not loaded on this worker"
        try:
            SamplerSettings(**spec.sampler.settings_kwargs()).validate()
        except (TypeError, ValueError) as error:
            return str(error)
        for label in spec.class_labels:
            if label is not None and not 0 <= label < model.card.label_dim:
                return f"class_label: {label} is outside 0..{model.card.label_dim - 1}"
        return None

    def run(self, batch: Sequence[Slice], on_eval: OnEval | None = None) -> list[GeneratedImage | None]:
        """Sample every image of the batch (all slices share one batch key) in one go."""
        spec = batch[0].job.spec
        seeds = [seed for piece in batch for seed in piece.job.spec.seeds[piece.start:piece.stop]]
        labels = [label for piece in batch for label in piece.job.spec.class_labels[piece.start:piece.stop]]
        settings = SamplerSettings(**spec.sampler.settings_kwargs())
        net: Any = self.models[spec.model].net  # a model.precond.Precond
        return generate(net, seeds, labels, settings, on_eval=on_eval, chunk=self.chunk)

    def encode(self, spec: JobSpec, image: GeneratedImage) -> tuple[bytes, dict[str, str]]:
        model = self.models[spec.model]
        settings = SamplerSettings(**spec.sampler.settings_kwargs())
        text = png_text(model, settings, image.seed, image.class_label, self.version)
        return encode_png(image.pixels, text), text
