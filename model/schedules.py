"""Time steps, noise schedules sigma(t) and scalings s(t): the sampler columns of Table 1, on tensors.

The formulas are written once, in model/numerics.py (no torch), and applied here to float64 tensors;
the gateway applies the same ones to floats to check a request before it is queued. Everything here
is float64 and follows the reference implementation's arithmetic closely enough that the resulting
time steps are bit-identical to it: a checkpoint, seed and settings must give the reference's PNG
bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.choices import DISCRETIZATIONS, SCALINGS, SCHEDULES, SOLVERS
from model.numerics import (
    VP_BETA_D,
    VP_BETA_MIN,
    NoiseSchedule,
    Ops,
    default_sigma_range,
    edm_levels,
    iddpm_positions,
    ve_levels_squared,
    vp_betas_for_range,
    vp_level_times,
    vp_sigma,
)
from model.numerics import noise_schedule as _noise_schedule
from model.precond import iddpm_noise_levels

__all__ = ["DISCRETIZATIONS", "SCALINGS", "SCHEDULES", "SOLVERS", "VP_BETA_D", "VP_BETA_MIN", "NoiseSchedule",
           "default_sigma_range", "edm_time_steps", "noise_schedule", "sigma_steps", "vp_betas_for_range",
           "vp_sigma"]

TORCH_OPS = Ops(torch.sqrt, torch.log)


def edm_time_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                   device: torch.device | None = None) -> Tensor:
    """Eq. 5 (model/numerics.py `edm_levels`) for i = 0..N-1."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    return edm_levels(i, num_steps, sigma_min, sigma_max, rho)


def noise_schedule(schedule: str, scaling: str, vp_beta_d: float, vp_beta_min: float) -> NoiseSchedule:
    """sigma(t), s(t) and their derivatives and inverse (model/numerics.py) for tensors."""
    return _noise_schedule(schedule, scaling, vp_beta_d, vp_beta_min, TORCH_OPS)


def sigma_steps(discretization: str, num_steps: int, sigma_min: float, sigma_max: float, *, rho: float,
                epsilon_s: float, C_1: float, C_2: float, M: int, vp_beta_d: float, vp_beta_min: float,
                device: torch.device | None = None) -> Tensor:
    """Noise levels sigma_0 > ... > sigma_{N-1} of a discretization (Table 1, "time steps")."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    if discretization == "vp":
        return vp_sigma(vp_beta_d, vp_beta_min)(vp_level_times(i, num_steps, epsilon_s))
    if discretization == "ve":
        return ve_levels_squared(i, num_steps, sigma_min, sigma_max).sqrt()
    if discretization == "iddpm":
        u = iddpm_noise_levels(M, C_1, C_2, dtype=torch.float64, device=device)
        in_range = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        if len(in_range) == 0:
            raise ValueError(f"no iDDPM noise level lies in [{sigma_min}, {sigma_max}]")
        return in_range[iddpm_positions(len(in_range), num_steps, i).round().to(torch.int64)]
    if discretization == "edm":
        return edm_time_steps(num_steps, sigma_min, sigma_max, rho, device)
    raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
