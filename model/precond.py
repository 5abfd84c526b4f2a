"""Preconditioners: the four network wrappers of Table 1 (VP, VE, iDDPM, EDM).

Each wraps a raw network F and exposes the denoiser

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

with the coefficients of the paper, the noise range the network supports and `round_sigma`
(identity except for iDDPM, which only knows its discrete table of noise levels). Constructor
keywords and state_dict layout are those of the official checkpoints, so a checkpoint's stored
init kwargs can be passed straight in.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from model.networks import NETWORKS


def _build_network(model_type: str, **kwargs: Any) -> torch.nn.Module:
    if model_type not in NETWORKS:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(NETWORKS)}")
    return NETWORKS[model_type](**kwargs)


class Precond(torch.nn.Module):
    """Shared forward pass; subclasses define the coefficients and the supported sigma range."""

    img_resolution: int
    img_channels: int
    label_dim: int
    use_fp16: bool
    sigma_min: float
    sigma_max: float
    model: torch.nn.Module

    def _setup(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool) -> None:
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        # None: the checkpoint's own choice (fp16 on CUDA when trained with use_fp16).
        self.compute_dtype: torch.dtype | None = None

    def coefficients(self, sigma: Tensor) -> tuple[Any, Tensor, Any, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [B, 1, 1, 1]."""
        raise NotImplementedError

    def round_sigma(self, sigma: Any) -> Tensor:
        return torch.as_tensor(sigma)

    def execution_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        if force_fp32:
            return torch.float32
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.float16 if (self.use_fp16 and device.type == "cuda") else torch.float32

    def output_channels(self, F_x: Tensor) -> Tensor:
        return F_x

    def forward(self, x: Tensor, sigma: Any, class_labels: Tensor | None = None,
                force_fp32: bool = False, **model_kwargs: Any) -> Tensor:
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:  # a conditional network asked for no class: the zero vector
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = self.execution_dtype(x.device, force_fp32)

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        F_x = self.output_channels(F_x)
        return c_skip * x + c_out * F_x.to(torch.float32)


class VPPrecond(Precond):
    """Variance preserving (Song et al. 2021): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs: Any):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))
        self.model = _build_network(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                    out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def sigma(self, t: Any) -> Tensor:
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Any) -> Tensor:
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: Tensor) -> tuple[Any, Tensor, Any, Tensor]:
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(Precond):
    """Variance exploding (Song et al. 2021): sigma(t) = sqrt(t), no input scaling."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet",
                 **model_kwargs: Any):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _build_network(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                    out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple[Any, Tensor, Any, Tensor]:
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


class iDDPMPrecond(Precond):  # noqa: N801 - the official class name, stored in checkpoints
    """Improved DDPM (Nichol & Dhariwal 2021): a discrete table u_0 > ... > u_M = 0 of noise levels.

    The network predicts 2x channels (mean and variance); only the first half is used.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 **model_kwargs: Any):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.model = _build_network(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                    out_channels=img_channels * 2, label_dim=label_dim, **model_kwargs)
        u = iddpm_noise_levels(M, C_1, C_2, dtype=torch.float32)
        self.register_buffer("u", u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def coefficients(self, sigma: Tensor) -> tuple[Any, Tensor, Any, Tensor]:
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise

    def output_channels(self, F_x: Tensor) -> Tensor:
        return F_x[:, : self.img_channels]

    def round_sigma(self, sigma: Any, return_index: bool = False) -> Tensor:
        """Snap each sigma to the nearest table entry (distances in float32, like the reference)."""
        sigma = torch.as_tensor(sigma)
        u: Tensor = self.u  # type: ignore[assignment]
        query = sigma.to(u.device).to(torch.float32).reshape(1, -1, 1)
        index = torch.cdist(query, u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


def iddpm_noise_levels(M: int, C_1: float, C_2: float, dtype: torch.dtype = torch.float64,
                       device: torch.device | str | None = None) -> Tensor:
    """The iDDPM table: u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1).

    alpha_bar_j = sin(pi/2 * j / (M (C_2 + 1)))^2. The reference evaluates alpha_bar in float32 in
    both places it builds the table (integer j times a Python float gives float32), and u itself in
    float32 (the preconditioner's buffer) or float64 (the sampler's discretization); so do we.
    """
    def alpha_bar(j: int) -> Tensor:
        jt = torch.tensor(j, dtype=torch.float32, device=device)
        return (0.5 * math.pi * jt / M / (C_2 + 1)).sin() ** 2

    u = torch.zeros(M + 1, dtype=dtype, device=device)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


class EDMPrecond(Precond):
    """EDM (Karras et al. 2022): unit-variance input and target at every sigma."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs: Any):
        super().__init__()
        self._setup(img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _build_network(model_type, img_resolution=img_resolution, in_channels=img_channels,
                                    out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma: Tensor) -> tuple[Any, Tensor, Any, Tensor]:
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


PRECONDITIONERS: dict[str, type[Precond]] = {
    "VPPrecond": VPPrecond,
    "VEPrecond": VEPrecond,
    "iDDPMPrecond": iDDPMPrecond,
    "EDMPrecond": EDMPrecond,
}
