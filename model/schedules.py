"""Time steps, noise schedules sigma(t) and scalings s(t): the sampler columns of Table 1.

Everything here is float64 and follows the reference implementation's arithmetic closely enough
that the resulting time steps are bit-identical to it: a checkpoint, seed and settings must give
the reference's PNG bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.choices import DISCRETIZATIONS, SCALINGS, SCHEDULES, SOLVERS
from model.precond import iddpm_noise_levels

__all__ = ["DISCRETIZATIONS", "SCALINGS", "SCHEDULES", "SOLVERS"]  # re-exported for the sampler

# Table 1 defaults.
VP_BETA_D, VP_BETA_MIN = 19.9, 0.1


def vp_sigma(beta_d: float, beta_min: float) -> Callable[[Any], Any]:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return lambda t: (math.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5


def edm_time_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                   device: torch.device | None = None) -> Tensor:
    """Eq. 5: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@dataclass(frozen=True)
class NoiseSchedule:
    """sigma(t), its derivative and inverse, and the signal scaling s(t) with its derivative."""

    sigma: Callable[[Any], Any]
    sigma_deriv: Callable[[Any], Any]
    sigma_inv: Callable[[Any], Any]
    s: Callable[[Any], Any]
    s_deriv: Callable[[Any], Any]


def noise_schedule(schedule: str, scaling: str, vp_beta_d: float, vp_beta_min: float) -> NoiseSchedule:
    if schedule == "vp":
        beta_d, beta_min = vp_beta_d, vp_beta_min
        sigma = vp_sigma(beta_d, beta_min)

        def sigma_deriv(t: Any) -> Any:
            return 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))

        def sigma_inv(s: Any) -> Any:
            return ((beta_min ** 2 + 2 * beta_d * (s ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    elif schedule == "ve":
        def sigma(t: Any) -> Any:
            return t.sqrt()

        def sigma_deriv(t: Any) -> Any:
            return 0.5 / t.sqrt()

        def sigma_inv(s: Any) -> Any:
            return s ** 2
    elif schedule == "linear":
        def sigma(t: Any) -> Any:
            return t

        def sigma_deriv(t: Any) -> Any:
            return 1

        def sigma_inv(s: Any) -> Any:
            return s
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")

    if scaling == "vp":
        def s(t: Any) -> Any:
            return 1 / (1 + sigma(t) ** 2).sqrt()

        def s_deriv(t: Any) -> Any:
            return -sigma(t) * sigma_deriv(t) * (s(t) ** 3)
    elif scaling == "none":
        def s(t: Any) -> Any:
            return 1

        def s_deriv(t: Any) -> Any:
            return 0
    else:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    return NoiseSchedule(sigma, sigma_deriv, sigma_inv, s, s_deriv)


def default_sigma_range(discretization: str, epsilon_s: float) -> tuple[float, float]:
    """The per-discretization defaults of Table 1 (before clamping to the network's range)."""
    vp = vp_sigma(VP_BETA_D, VP_BETA_MIN)
    lo = {"vp": vp(epsilon_s), "ve": 0.02, "iddpm": 0.002, "edm": 0.002}
    hi = {"vp": vp(1), "ve": 100, "iddpm": 81, "edm": 80}
    if discretization not in lo:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
    return lo[discretization], hi[discretization]


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float) -> tuple[float, float]:
    """beta_d, beta_min such that the VP schedule spans [sigma_min, sigma_max] over t in [eps_s, 1]."""
    # numpy's log, as the reference uses: it may differ from math.log in the last bit.
    beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
    beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return float(beta_d), float(beta_min)


def sigma_steps(discretization: str, num_steps: int, sigma_min: float, sigma_max: float, *, rho: float,
                epsilon_s: float, C_1: float, C_2: float, M: int, vp_beta_d: float, vp_beta_min: float,
                device: torch.device | None = None) -> Tensor:
    """Noise levels sigma_0 > ... > sigma_{N-1} of a discretization (Table 1, "time steps")."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    if discretization == "vp":
        t = 1 + i / (num_steps - 1) * (epsilon_s - 1)
        return vp_sigma(vp_beta_d, vp_beta_min)(t)
    if discretization == "ve":
        t = (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1)))
        return t.sqrt()
    if discretization == "iddpm":
        u = iddpm_noise_levels(M, C_1, C_2, dtype=torch.float64, device=device)
        in_range = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        if len(in_range) == 0:
            raise ValueError(f"no iDDPM noise level lies in [{sigma_min}, {sigma_max}]")
        return in_range[((len(in_range) - 1) / (num_steps - 1) * i).round().to(torch.int64)]
    if discretization == "edm":
        return edm_time_steps(num_steps, sigma_min, sigma_max, rho, device)
    raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
