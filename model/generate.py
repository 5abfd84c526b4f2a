"""Seeds, class labels and sampler settings -> images: what the CLI runs, on the worker's engine.

An image is a pure function of (network, settings, seed, class label): every random draw comes
from the seed's own stream, and the slot engine (model/slots.py) that the worker runs makes a row's
numbers independent of what shares its forward passes. `generate()` puts the seeds in one engine
and runs it to the end, so the CLI reproduces the service byte for byte.

Forward passes have fixed row counts (`PassSizes`): on CPU any count from four rows (PyTorch's CPU
kernels change below that), on CUDA a small set of sizes, with TF32 off (`use_batch_invariant_kernels`;
measured on an H200: with TF32 on, 1 of 24 fp32 images still differed between batch sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.precond import Precond
from model.samplers import SamplerSettings
from model.slots import PassSizes, SlotEngine, cohorts_of, draw_inputs

__all__ = ["EvalEvent", "GeneratedImage", "PassSizes", "SamplerSettings", "draw_inputs", "generate"]


@dataclass(frozen=True)
class GeneratedImage:
    seed: int
    class_label: int | None  # None for an unconditional network
    pixels: np.ndarray       # uint8 [H, W, C]


@dataclass(frozen=True)
class EvalEvent:
    """Reported after each network evaluation."""

    step: int                # sampler step, 0-based
    num_steps: int
    sigma: float             # noise level the network just saw
    nfe: int                 # evaluations done so far (this one included)
    nfe_total: int
    x0: Tensor               # denoised estimates, float64 [len(rows), C, H, W]
    rows: list[int]          # the indices (into the seeds) of the images x0 belongs to


OnEval = Callable[[EvalEvent], None]


def use_batch_invariant_kernels(device: torch.device) -> None:
    """On CUDA, turn off TF32 (process-wide): with fixed pass sizes, a row's result then no longer
    depends on the other rows. Costs fp32 throughput; fp16/bf16 are unaffected."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@torch.no_grad()
def generate(net: Precond, seeds: Sequence[int], class_labels: Sequence[int | None] | None,
             settings: SamplerSettings, *, on_eval: OnEval | None = None, pass_sizes: PassSizes | None = None,
             max_pass_rows: int = 64) -> list[GeneratedImage]:
    """Sample one image per seed on a slot engine that holds them all; `on_eval` sees every evaluation.

    `pass_sizes`: the engine's row counts (default: the worker's for this device); on CUDA a pass
    carries at most `max_pass_rows` images (the worker's EDM_MAX_PASS_ROWS).
    Raises ValueError for bad settings or labels, and when the result is not finite.
    """
    settings.validate()
    labels = list(class_labels) if class_labels is not None else [None] * len(seeds)
    if len(labels) != len(seeds):
        raise ValueError(f"class_labels: {len(labels)} labels for {len(seeds)} seeds")
    if not seeds:
        return []
    device = next(net.parameters()).device
    use_batch_invariant_kernels(device)
    pass_sizes = pass_sizes or PassSizes.for_device(device, max_pass_rows)
    cohort = pass_sizes.max_rows or len(seeds)
    engine = SlotEngine(net, capacity=len(seeds), max_pass_rows=cohort, pass_sizes=pass_sizes)
    for rows in cohorts_of(len(seeds), cohort):
        engine.admit(None, list(rows), [seeds[k] for k in rows], [labels[k] for k in rows], settings)
    images: dict[int, GeneratedImage] = {}
    while engine.occupied:
        report = engine.step()
        for error in report.failed.values():
            raise ValueError(str(error)) from error
        if on_eval is not None:
            for ev in report.evaluated:
                on_eval(EvalEvent(ev.step, ev.num_steps, ev.sigma, ev.nfe, ev.nfe_total, ev.x0,
                                  [int(k) for k in ev.keys]))  # type: ignore[call-overload]
        for image in report.finished:
            images[int(image.key)] = GeneratedImage(image.seed, image.class_label, image.pixels)  # type: ignore[call-overload]
    return [images[k] for k in range(len(seeds))]
