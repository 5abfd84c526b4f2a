"""Training with the losses of Table 1 (VP, VE, EDM), an EMA of the weights and optional
non-leaking augmentation (Karras et al. 2022, section 5 and appendix B.5-B.6).

Every loss is the same denoising objective

    E_{sigma, y, n} [ lambda(sigma) || D(y + n; sigma) - y ||^2 ],   n ~ N(0, sigma^2 I)

and differs only in how sigma is drawn and in the weight lambda(sigma):

| loss | noise distribution                        | lambda(sigma)                                 |
|------|-------------------------------------------|-----------------------------------------------|
| VP   | sigma = sigma_vp(t), t ~ U(eps_t, 1)       | 1 / sigma^2                                   |
| VE   | ln sigma ~ U(ln sigma_min, ln sigma_max)  | 1 / sigma^2                                   |
| EDM  | ln sigma ~ N(P_mean, P_std^2)             | (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 |

Each loss trains the preconditioner of the same name (model/precond.py).

Reproducibility: all randomness (initial weights, data order aside, sigma, noise, augmentation,
dropout) comes from torch's global generator, seeded once; a checkpoint stores that generator's
state with the weights, the EMA, the optimizer and the step, so a resumed run continues exactly as
if it had never stopped. The data order is a pure function of (seed, step).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from model.data import ImageDataset
from model.precond import EDMPrecond, Precond, VEPrecond, VPPrecond

__all__ = [
    "AUGMENTATIONS",
    "AugmentPipe",
    "EDMLoss",
    "LOSSES",
    "TrainConfig",
    "Trainer",
    "VELoss",
    "VPLoss",
    "validation_loss",
]


# ---------------------------------------------------------------------------------------------
# Losses


class DenoisingLoss:
    """Per-pixel weighted denoising loss; subclasses choose sigma's distribution and lambda(sigma)."""

    def sample_sigma(self, n: int, device: torch.device) -> Tensor:
        raise NotImplementedError

    def weight(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, net: Precond, images: Tensor, labels: Tensor | None = None,
                 augment_pipe: AugmentPipe | None = None) -> Tensor:
        """lambda(sigma) (D(y + n; sigma) - y)^2, shape [B, C, H, W]."""
        # Draw order (sigma, augmentation, noise) as in the reference trainer.
        sigma = self.sample_sigma(images.shape[0], images.device).reshape(-1, 1, 1, 1)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        n = torch.randn_like(y) * sigma
        kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
        D_yn = net(y + n, sigma, labels, **kwargs)
        return self.weight(sigma) * (D_yn - y) ** 2


@dataclass(frozen=True)
class VPLoss(DenoisingLoss):
    """Variance preserving: t ~ U(epsilon_t, 1), sigma = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    beta_d: float = 19.9
    beta_min: float = 0.1
    epsilon_t: float = 1e-5

    def sigma(self, t: Tensor) -> Tensor:
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def sample_sigma(self, n: int, device: torch.device) -> Tensor:
        return self.sigma(1 + torch.rand([n], device=device) * (self.epsilon_t - 1))

    def weight(self, sigma: Tensor) -> Tensor:
        return 1 / sigma ** 2

    def make_precond(self, **kwargs: Any) -> Precond:
        return VPPrecond(beta_d=self.beta_d, beta_min=self.beta_min, epsilon_t=self.epsilon_t, **kwargs)


@dataclass(frozen=True)
class VELoss(DenoisingLoss):
    """Variance exploding: sigma log-uniform in [sigma_min, sigma_max]."""

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def sample_sigma(self, n: int, device: torch.device) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.rand([n], device=device)

    def weight(self, sigma: Tensor) -> Tensor:
        return 1 / sigma ** 2

    def make_precond(self, **kwargs: Any) -> Precond:
        return VEPrecond(sigma_min=self.sigma_min, sigma_max=self.sigma_max, **kwargs)


@dataclass(frozen=True)
class EDMLoss(DenoisingLoss):
    """EDM: ln sigma ~ N(P_mean, P_std^2); lambda = 1 / c_out^2 makes the effective target unit-variance."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5

    def sample_sigma(self, n: int, device: torch.device) -> Tensor:
        return (torch.randn([n], device=device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def make_precond(self, **kwargs: Any) -> Precond:
        return EDMPrecond(sigma_data=self.sigma_data, **kwargs)


LOSSES: dict[str, type[VPLoss] | type[VELoss] | type[EDMLoss]] = {"vp": VPLoss, "ve": VELoss, "edm": EDMLoss}


# ---------------------------------------------------------------------------------------------
# Non-leaking augmentation


# name -> number of augmentation labels it adds (the network's augment_dim is their sum).
AUGMENTATIONS: dict[str, int] = {"xflip": 1, "yflip": 1, "translate": 2, "scale": 1, "rotate": 2}


class AugmentPipe:
    """Geometric augmentations, each applied to an image with probability p, that the network is
    told about: it receives the parameters as `augment_labels` (zero = not applied). At sampling
    time the labels are zero, so the network produces un-augmented images and nothing leaks.

    Opt-in per dataset, because what is harmless depends on the data: a mirrored digit is not
    a digit, for example. Kinds (labels):
      xflip, yflip (1 each: 1 if flipped); translate (2: integer shift / resolution, at most
      translate_max of the image); scale (1: log2 of an isotropic factor ~ 2^N(0, scale_std^2));
      rotate (2: cos(theta) - 1, sin(theta), theta ~ U(-rotate_max, rotate_max)).
    Pixels outside the image are reflected, as in the reference.
    """

    def __init__(self, kinds: Sequence[str], p: float = 0.12, *, translate_max: float = 0.125,
                 scale_std: float = 0.2, rotate_max: float = math.pi):
        unknown = [k for k in kinds if k not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; expected some of {list(AUGMENTATIONS)}")
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability must lie in [0, 1], got {p}")
        self.kinds = [k for k in AUGMENTATIONS if k in kinds]  # fixed order: the label layout
        self.p = p
        self.translate_max = translate_max
        self.scale_std = scale_std
        self.rotate_max = rotate_max

    @property
    def dim(self) -> int:
        return sum(AUGMENTATIONS[k] for k in self.kinds)

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        n, _, h, w = images.shape
        dev = images.device
        eye = torch.eye(3, device=dev).repeat(n, 1, 1)
        G = eye.clone()  # forward map, output coords = G @ input coords (normalized to [-1, 1])
        labels: list[Tensor] = []

        def applied() -> Tensor:
            return (torch.rand([n], device=dev) < self.p).to(torch.float32)

        for kind in self.kinds:
            on = applied()
            T = eye.clone()
            if kind in ("xflip", "yflip"):
                axis = 0 if kind == "xflip" else 1
                T[:, axis, axis] = 1 - 2 * on
                labels.append(on[:, None])
            elif kind == "translate":
                limit = max(round(self.translate_max * w), 0)
                shift = torch.randint(-limit, limit + 1, [n, 2], device=dev).to(torch.float32) * on[:, None]
                T[:, 0, 2] = 2 * shift[:, 0] / w  # whole pixels: no interpolation blur
                T[:, 1, 2] = 2 * shift[:, 1] / h
                labels.append(shift / torch.tensor([w, h], device=dev, dtype=torch.float32))
            elif kind == "scale":
                log2_s = torch.randn([n], device=dev) * self.scale_std * on
                T[:, 0, 0] = T[:, 1, 1] = 2 ** log2_s
                labels.append(log2_s[:, None])
            elif kind == "rotate":
                theta = (torch.rand([n], device=dev) * 2 - 1) * self.rotate_max * on
                c, s = theta.cos(), theta.sin()
                T[:, 0, 0], T[:, 0, 1], T[:, 1, 0], T[:, 1, 1] = c, -s, s, c
                labels.append(torch.stack([c - 1, s], dim=1))
            G = T @ G

        augment_labels = torch.cat(labels, dim=1) if labels else images.new_zeros([n, 0])
        changed = (augment_labels != 0).any(dim=1)
        if not changed.any():
            return images, augment_labels
        # grid_sample pulls: each output pixel reads the input at G^-1 (output position).
        theta = torch.linalg.inv(G[changed])[:, :2, :]
        grid = F.affine_grid(theta, [int(changed.sum()), images.shape[1], h, w], align_corners=False)
        warped = F.grid_sample(images[changed], grid, mode="bilinear", padding_mode="reflection",
                               align_corners=False)
        out = images.clone()
        out[changed] = warped  # untouched images stay bit-identical
        return out, augment_labels


# ---------------------------------------------------------------------------------------------
# Training loop


@dataclass
class TrainConfig:
    """Everything that determines a run (with the dataset). Defaults follow the paper where it
    applies (Adam, lr 1e-3, EDM loss constants) and are scaled down for 8x8 images on a CPU."""

    loss: str = "edm"                      # edm | vp | ve, and the preconditioner of that name
    network: dict[str, Any] = field(default_factory=lambda: {
        "model_channels": 24, "channel_mult": [1, 2], "num_blocks": 2, "attn_resolutions": [4],
        "channel_mult_emb": 2, "dropout": 0.1})  # SongUNet (DDPM++) keywords
    loss_kwargs: dict[str, float] = field(default_factory=dict)  # e.g. sigma_data, P_mean, P_std
    batch_size: int = 128
    total_steps: int = 3000
    lr: float = 1e-3
    lr_rampup_kimg: float = 10.0           # linear warm-up over this many thousand images
    ema_halflife_kimg: float = 25.0
    ema_rampup_ratio: float | None = 0.05  # EMA half-life at most this fraction of the images seen
    augment: list[str] = field(default_factory=list)
    augment_p: float = 0.12
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**data)


class Trainer:
    """One model being trained: network, EMA copy, optimizer, step counter."""

    def __init__(self, config: TrainConfig, dataset: ImageDataset, device: torch.device | str = "cpu"):
        if config.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {config.loss!r}")
        if config.batch_size < 1 or config.total_steps < 0:
            raise ValueError("batch_size must be >= 1 and total_steps >= 0")
        self.config = config
        self.device = torch.device(device)
        self.dataset = dataset
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels
        self.eye = None if dataset.labels is None else torch.eye(dataset.label_dim, device=self.device)

        torch.manual_seed(config.seed)  # initial weights are the first draws
        self.loss_fn = LOSSES[config.loss](**config.loss_kwargs)
        self.augment_pipe = AugmentPipe(config.augment, config.augment_p) if config.augment else None
        self.init_kwargs: dict[str, Any] = {
            "img_resolution": dataset.resolution, "img_channels": dataset.channels, "label_dim": dataset.label_dim,
            "model_type": "SongUNet", **config.network,
            "augment_dim": self.augment_pipe.dim if self.augment_pipe else 0,
        }
        self.net = self.loss_fn.make_precond(**self.init_kwargs).to(self.device).train()
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
        self.step = 0
        self.wall_seconds = 0.0  # training time over all sessions of this run (for the model card)
        self.history: list[dict[str, Any]] = []  # one entry per session (the CLI records its command)

    @property
    def precond_init_kwargs(self) -> dict[str, Any]:
        """The keywords that rebuild the trained preconditioner (for model.checkpoint.save_model)."""
        net = self.net
        extra = {"sigma_data": net.sigma_data} if isinstance(net, EDMPrecond) else (
            {"sigma_min": net.sigma_min, "sigma_max": net.sigma_max} if isinstance(net, VEPrecond) else
            {"beta_d": net.beta_d, "beta_min": net.beta_min, "epsilon_t": net.epsilon_t})
        return {**self.init_kwargs, **extra}

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    def batch_indices(self, step: int) -> Tensor:
        """Rows of the dataset for `step`: consecutive slices of per-epoch permutations, each
        permutation seeded by (seed, epoch), so the order depends on nothing but the step."""
        n, b = len(self.dataset), self.config.batch_size
        positions = torch.arange(step * b, (step + 1) * b)
        epochs, offsets = positions // n, positions % n
        rows = torch.empty(b, dtype=torch.int64)
        for epoch in epochs.unique().tolist():
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            in_epoch = epochs == epoch
            rows[in_epoch] = torch.randperm(n, generator=g)[offsets[in_epoch]]
        return rows

    def train_step(self) -> float:
        """One optimizer step on one batch; returns the batch's mean loss."""
        cfg = self.config
        index = self.batch_indices(self.step)
        images = self.images[index.to(self.device)]
        labels = None if self.eye is None or self.labels is None else self.eye[self.labels[index].to(self.device)]

        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.net, images, labels, self.augment_pipe).mean()
        loss.backward()

        nimg = (self.step + 1) * cfg.batch_size
        lr = cfg.lr * min(nimg / max(cfg.lr_rampup_kimg * 1000, 1e-8), 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for param in self.net.parameters():  # one bad batch must not poison the weights
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        self.optimizer.step()

        # EMA with a half-life in images; early on it is shortened so the average forgets the init.
        halflife = cfg.ema_halflife_kimg * 1000
        if cfg.ema_rampup_ratio is not None:
            halflife = min(halflife, nimg * cfg.ema_rampup_ratio)
        beta = 0.5 ** (cfg.batch_size / max(halflife, 1e-8))
        with torch.no_grad():
            for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        self.step += 1
        return float(loss.detach())

    def run(self, until_step: int | None = None, *, checkpoint_path: str | Path | None = None,
            checkpoint_every: int = 0, on_step: Callable[[int, float], None] | None = None) -> None:
        """Train up to `until_step` (default: the config's total), checkpointing every N steps and at the end."""
        until = self.config.total_steps if until_step is None else until_step
        while self.step < until:
            start = time.perf_counter()
            loss = self.train_step()
            self.wall_seconds += time.perf_counter() - start
            if on_step is not None:
                on_step(self.step, loss)
            if checkpoint_path is not None and (
                    self.step == until or (checkpoint_every and self.step % checkpoint_every == 0)):
                self.save_checkpoint(checkpoint_path)

    # -- resumable checkpoints (our own files: loaded with weights_only=True, no code) -------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "format": "edm-serve-training-state/1",
            "config": self.config.to_dict(),
            "step": self.step,
            "wall_seconds": self.wall_seconds,
            "history": self.history,
            "net": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != "edm-serve-training-state/1":
            raise ValueError("not an edm-serve training checkpoint")
        if state["config"] != self.config.to_dict():
            diff = {k: (v, self.config.to_dict().get(k)) for k, v in state["config"].items()
                    if self.config.to_dict().get(k) != v}
            if set(diff) - {"total_steps"}:  # extending a run is fine; changing its recipe is not
                raise ValueError(f"checkpoint was trained with different settings (checkpoint, now): {diff}")
        self.net.load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.wall_seconds = float(state.get("wall_seconds", 0.0))
        self.history = list(state.get("history", []))
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)

    def save_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))


@torch.no_grad()
def validation_loss(net: Precond, loss_fn: DenoisingLoss, dataset: ImageDataset, *, count: int = 256,
                    repeats: int = 4, seed: int = 12345) -> float:
    """Mean loss on fixed images, sigmas and noise (the global RNG is left as it was): comparable
    across checkpoints, unlike the noisy per-batch training loss."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        index = torch.randperm(len(dataset))[:count]
        images = dataset.images[index].to(device)
        labels = dataset.one_hot(index)
        labels = None if labels is None else labels.to(device)
        total = sum(float(loss_fn(net, images, labels).mean()) for _ in range(repeats))
    net.train(was_training)
    return total / repeats
