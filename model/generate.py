"""Seeds, class labels and sampler settings -> images: what the CLI and the worker run.

An image is a pure function of (network, settings, seed, class label): every random draw comes
from the seed's own stream, and rows that leave the batch early (cancelled) are not evaluated
any more without disturbing the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.images import to_pixels
from model.precond import Precond
from model.rng import SeedStreams
from model.samplers import Evaluation, SamplerSettings, drive, sampler_steps

__all__ = ["EvalEvent", "GeneratedImage", "SamplerSettings", "generate", "draw_inputs"]


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
    x0: Tensor               # denoised estimate of the active rows, float64 [len(rows), C, H, W]
    rows: list[int]          # indices into the request's seeds that are still active


class _EveryRowDropped(Exception):
    """Every row was cancelled: stop sampling at once."""


OnEval = Callable[[EvalEvent], Iterable[int] | None]


def draw_inputs(net: Precond, streams: SeedStreams,
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


@torch.no_grad()
def generate(net: Precond, seeds: Sequence[int], class_labels: Sequence[int | None] | None,
             settings: SamplerSettings, *, on_eval: OnEval | None = None) -> list[GeneratedImage | None]:
    """Sample one image per seed. `on_eval` may return rows to drop (they come back as None)."""
    settings.validate()
    if class_labels is None:
        class_labels = [None] * len(seeds)
    if len(class_labels) != len(seeds):
        raise ValueError(f"class_labels: {len(class_labels)} labels for {len(seeds)} seeds")
    device = next(net.parameters()).device
    streams = SeedStreams(seeds, device)
    latents, one_hot, labels = draw_inputs(net, streams, class_labels)
    active = list(range(len(seeds)))

    def evaluate(ev: Evaluation) -> Tensor:
        # Dropped rows are not evaluated; their state keeps moving with D(x) = x (a zero step).
        denoised = ev.x.clone()
        if active:
            rows = torch.tensor(active, device=ev.x.device)
            labels_in = None if one_hot is None else one_hot[rows]
            if len(active) == len(seeds):  # the common case: no gather, exactly the reference's call
                denoised = net(ev.x, ev.sigma, labels_in).to(torch.float64)
            else:
                denoised[rows] = net(ev.x[rows], ev.sigma, labels_in).to(torch.float64)
        if on_eval is not None and active:
            drop = on_eval(EvalEvent(ev.step, ev.num_steps, float(ev.sigma), ev.nfe + 1, ev.nfe_total,
                                     denoised[active], list(active)))
            if drop:
                dropped = set(drop)
                active[:] = [row for row in active if row not in dropped]
                if not active:
                    raise _EveryRowDropped
        return denoised

    try:
        images = drive(sampler_steps(net, latents, streams.randn_like, settings), evaluate)
    except _EveryRowDropped:
        return [None] * len(seeds)
    pixels = to_pixels(images)
    return [GeneratedImage(seed, labels[k], pixels[k]) if k in active else None
            for k, seed in enumerate(seeds)]
