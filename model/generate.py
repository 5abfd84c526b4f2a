"""Seeds, class labels and sampler settings -> images: what the CLI and the worker run.

An image is a pure function of (network, settings, seed, class label): every random draw comes
from the seed's own stream, and rows that leave the batch early (cancelled) are not evaluated
any more without disturbing the others.

Batch invariance and the device: on the CPU, a row's network output does not depend on the batch
it is in (tested). On CUDA it does: cuDNN and cuBLAS pick kernels by batch size, so the same seed
can differ by a pixel value between batch sizes. `chunk` fixes that: the network then always sees
batches of exactly `chunk` rows (the last one padded), so each row is computed by the same
kernels whatever else is queued, provided TF32 convolutions are off (measured on an H200: with
TF32 on, 1 of 24 fp32 images still differed). The service does both on CUDA
(`use_batch_invariant_kernels`); the CLI uses the reference's whole-batch calls by default, so
that its PNGs are the reference's.
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


def use_batch_invariant_kernels(device: torch.device) -> None:
    """On CUDA, turn off TF32 convolutions (process-wide): with fixed-size chunks, a row's result
    then no longer depends on the other rows. Costs fp32 throughput; fp16/bf16 are unaffected."""
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def evaluate_in_chunks(net: Precond, x: Tensor, sigma: Tensor, labels: Tensor | None, chunk: int) -> Tensor:
    """net(x, sigma, labels) computed in forward passes of exactly `chunk` rows (last one padded)."""
    outputs = []
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk]
        ls = None if labels is None else labels[start:start + chunk]
        rows = xs.shape[0]
        if rows < chunk:  # pad with copies of the last row; their outputs are dropped
            xs = torch.cat([xs, xs[-1:].expand(chunk - rows, *xs.shape[1:])])
            ls = None if ls is None else torch.cat([ls, ls[-1:].expand(chunk - rows, *ls.shape[1:])])
        outputs.append(net(xs, sigma, ls)[:rows])
    return torch.cat(outputs)


@torch.no_grad()
def generate(net: Precond, seeds: Sequence[int], class_labels: Sequence[int | None] | None,
             settings: SamplerSettings, *, on_eval: OnEval | None = None,
             chunk: int | None = None) -> list[GeneratedImage | None]:
    """Sample one image per seed. `on_eval` may return rows to drop (they come back as None).

    `chunk`: run the network in fixed-size forward passes (batch invariance on CUDA, see above);
    None = one forward pass over the active rows, as the reference does.
    """
    settings.validate()
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk: must be >= 1 (got {chunk})")
    if class_labels is None:
        class_labels = [None] * len(seeds)
    if len(class_labels) != len(seeds):
        raise ValueError(f"class_labels: {len(class_labels)} labels for {len(seeds)} seeds")
    device = next(net.parameters()).device
    streams = SeedStreams(seeds, device)
    latents, one_hot, labels = draw_inputs(net, streams, class_labels)
    active = list(range(len(seeds)))

    def network(x: Tensor, sigma: Tensor, labels_in: Tensor | None) -> Tensor:
        if chunk is None:
            return net(x, sigma, labels_in).to(torch.float64)
        return evaluate_in_chunks(net, x, sigma, labels_in, chunk).to(torch.float64)

    def evaluate(ev: Evaluation) -> Tensor:
        if len(active) == len(seeds):  # the common case: exactly the reference's call
            denoised = network(ev.x, ev.sigma, one_hot)
        else:
            # Dropped rows are not evaluated; their state keeps moving with D(x) = x (a zero step).
            rows = torch.tensor(active, device=ev.x.device)
            denoised = ev.x.clone()
            denoised[rows] = network(ev.x[rows], ev.sigma, None if one_hot is None else one_hot[rows])
        if on_eval is not None:
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
    kept = set(active)
    return [GeneratedImage(seed, labels[k], pixels[k]) if k in kept else None for k, seed in enumerate(seeds)]
