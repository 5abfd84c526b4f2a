"""EDM samplers (Algorithms 1 and 2 of Karras et al. 2022) as step-wise coroutines.

A sampler here never calls the network itself. It is a generator that yields an `Evaluation`
(the network input x and noise level sigma) each time it needs D(x; sigma), receives the
denoised estimate through `send()`, and returns the final images. That one form serves every
caller: `drive()` runs it to the end, the worker cancels rows between evaluations and streams
each x0 estimate, and several samplers can share one forward pass.

State is float64 throughout, as in the reference; the network runs in float32 (or lower).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor

from model.choices import DISCRETIZATIONS, SCALINGS, SCHEDULES, SOLVERS, nfe_per_image
from model.numerics import ALPHA, EDM_SIGMA_RANGE, EPSILON_S, IDDPM_C_1, IDDPM_C_2, IDDPM_M
from model.schedules import (
    default_sigma_range,
    edm_time_steps,
    noise_schedule,
    sigma_steps,
    vp_betas_for_range,
)


class Denoiser(Protocol):
    """D(x; sigma): the x0 estimate for noisy images x at noise level sigma ([] or [B])."""

    sigma_min: float
    sigma_max: float

    def __call__(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor: ...

    def round_sigma(self, sigma: Any) -> Tensor: ...


RandnLike = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler options, with the names and defaults of the reference's generate.py.

    num_steps: N, the number of noise levels (NFE = 2N - 1 for Heun, N for Euler).
    sigma_min, sigma_max: noise range; None = the discretization's default (0.002 / 80 for EDM),
        always clamped to what the network supports.
    rho: time step exponent of the EDM discretization (7).
    S_churn, S_min, S_max, S_noise: stochasticity (Algorithm 2); S_churn = 0 is deterministic.
    solver (euler|heun), discretization (vp|ve|iddpm|edm), schedule (vp|ve|linear), scaling
        (vp|none): Table 1 ablations. All None selects the EDM sampler, exactly as generate.py
        does; any of them set selects the generalised sampler with heun/edm/linear/none for the rest.
    epsilon_s, C_1, C_2, M: VP and iDDPM discretization constants; alpha: Heun's second-stage
        position (1 = plain Heun).
    """

    num_steps: int = 18
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0
    solver: str | None = None
    discretization: str | None = None
    schedule: str | None = None
    scaling: str | None = None
    epsilon_s: float = EPSILON_S
    C_1: float = IDDPM_C_1
    C_2: float = IDDPM_C_2
    M: int = IDDPM_M
    alpha: float = ALPHA

    @property
    def uses_ablation(self) -> bool:
        return any(v is not None for v in (self.solver, self.discretization, self.schedule, self.scaling))

    @property
    def nfe_total(self) -> int:
        """Network evaluations per image (model/choices.py)."""
        return nfe_per_image(self.num_steps, self.solver)

    def validate(self) -> SamplerSettings:
        """Raise ValueError naming the first bad field; return self for chaining."""
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        if not isinstance(self.num_steps, int) or self.num_steps < 2:
            raise bad("num_steps", "must be an integer >= 2")
        for name in ("sigma_min", "sigma_max"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise bad(name, "must be a positive finite number")
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_min >= self.sigma_max:
            raise bad("sigma_min", f"must be below sigma_max={self.sigma_max}")
        if not (self.rho > 0 and math.isfinite(self.rho)):
            raise bad("rho", "must be a positive finite number")
        for name in ("S_churn", "S_min", "S_noise"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise bad(name, "must be a finite number >= 0")
        if not self.S_max >= self.S_min:
            raise bad("S_max", f"must be >= S_min={self.S_min}")
        for name, allowed in (("solver", SOLVERS), ("discretization", DISCRETIZATIONS),
                              ("schedule", SCHEDULES), ("scaling", SCALINGS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise bad(name, f"must be one of {', '.join(allowed)}")
        if not 0 < self.epsilon_s < 1:
            raise bad("epsilon_s", "must lie in (0, 1)")
        if not (self.C_1 > 0 and self.C_2 > 0):
            raise bad("C_1" if not self.C_1 > 0 else "C_2", "must be positive")
        if not isinstance(self.M, int) or self.M < 1:
            raise bad("M", "must be an integer >= 1")
        if not 0 < self.alpha <= 1:
            raise bad("alpha", "must lie in (0, 1]")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Evaluation:
    """One pending network evaluation D(x; sigma) and where the sampler stands."""

    x: Tensor          # network input, float64 [B, C, H, W]
    sigma: Tensor      # noise level, float64 0-d tensor (one level for the whole batch)
    step: int          # sampler step i, 0-based
    num_steps: int
    nfe: int           # evaluations completed before this one
    nfe_total: int


SamplerSteps = Generator[Evaluation, Tensor, Tensor]


def edm_sampler(net: Denoiser, latents: Tensor, randn_like: RandnLike, *, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7, S_churn: float = 0,
                S_min: float = 0, S_max: float = math.inf, S_noise: float = 1) -> SamplerSteps:
    """Algorithm 2 (deterministic when S_churn = 0): Heun steps on the EDM time steps."""
    # Clamp to the noise levels the network supports, then snap to the ones it can represent.
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_time_steps(num_steps, sigma_min, sigma_max, rho, latents.device)
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])  # t_N = 0
    nfe, nfe_total = 0, nfe_per_image(num_steps, "heun")

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next

        # Raise the noise level to t_hat = (1 + gamma) t_i. The noise is drawn on every step, even
        # when gamma = 0, because the reference does: skipping it would shift every later draw.
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_{i+1}.
        denoised = yield Evaluation(x_hat, t_hat, i, num_steps, nfe, nfe_total)
        nfe += 1
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order correction, except on the last step (t_N = 0).
        if i < num_steps - 1:
            denoised = yield Evaluation(x_next, t_next, i, num_steps, nfe, nfe_total)
            nfe += 1
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def ablation_sampler(net: Denoiser, latents: Tensor, randn_like: RandnLike, *, num_steps: int = 18,
                     sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7,
                     solver: str = "heun", discretization: str = "edm", schedule: str = "linear",
                     scaling: str = "none", epsilon_s: float = 1e-3, C_1: float = 0.001, C_2: float = 0.008,
                     M: int = 1000, alpha: float = 1, S_churn: float = 0, S_min: float = 0,
                     S_max: float = math.inf, S_noise: float = 1) -> SamplerSteps:
    """Algorithm 1 generalised to every column of Table 1: the ODE

        dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma * D(x / s; sigma)

    with a choice of solver, time steps, schedule sigma(t) and scaling s(t)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    default_min, default_max = default_sigma_range(discretization, epsilon_s)
    sigma_min = max(default_min if sigma_min is None else sigma_min, net.sigma_min)
    sigma_max = min(default_max if sigma_max is None else sigma_max, net.sigma_max)
    # The VP schedule is refitted to the clamped range.
    vp_beta_d, vp_beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    sched = noise_schedule(schedule, scaling, vp_beta_d, vp_beta_min)
    sigma, sigma_deriv, sigma_inv, s, s_deriv = (
        sched.sigma, sched.sigma_deriv, sched.sigma_inv, sched.s, sched.s_deriv)

    levels = sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho=rho, epsilon_s=epsilon_s,
                         C_1=C_1, C_2=C_2, M=M, vp_beta_d=vp_beta_d, vp_beta_min=vp_beta_min,
                         device=latents.device)
    t_steps = sigma_inv(net.round_sigma(levels))
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])  # t_N = 0
    nfe, nfe_total = 0, nfe_per_image(num_steps, solver)

    def ode_slope(x: Tensor, t: Tensor, denoised: Tensor) -> Tensor:
        return (sigma_deriv(t) / sigma(t) + s_deriv(t) / s(t)) * x - sigma_deriv(t) * s(t) / sigma(t) * denoised

    t_next = t_steps[0]
    x_next = latents.to(torch.float64) * (sigma(t_next) * s(t_next))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next

        # Churn: raise the noise level temporarily (noise drawn on every step, as in the reference).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(net.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = (s(t_hat) / s(t_cur) * x_cur
                 + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise
                 * randn_like(x_cur))

        # Euler step.
        h = t_next - t_hat
        denoised = yield Evaluation(x_hat / s(t_hat), sigma(t_hat), i, num_steps, nfe, nfe_total)
        nfe += 1
        d_cur = ode_slope(x_hat, t_hat, denoised)
        x_prime = x_hat + alpha * h * d_cur
        t_prime = t_hat + alpha * h

        # Second stage at t_i + alpha h, unless Euler or the last step.
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            denoised = yield Evaluation(x_prime / s(t_prime), sigma(t_prime), i, num_steps, nfe, nfe_total)
            nfe += 1
            d_prime = ode_slope(x_prime, t_prime, denoised)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


def sampler_steps(net: Denoiser, latents: Tensor, randn_like: RandnLike,
                  settings: SamplerSettings) -> SamplerSteps:
    """The sampler that generate.py would pick for these settings, as a coroutine."""
    st = settings.validate()
    churn = dict(S_churn=st.S_churn, S_min=st.S_min, S_max=st.S_max, S_noise=st.S_noise)
    if not st.uses_ablation:
        return edm_sampler(net, latents, randn_like, num_steps=st.num_steps,
                           sigma_min=EDM_SIGMA_RANGE[0] if st.sigma_min is None else st.sigma_min,
                           sigma_max=EDM_SIGMA_RANGE[1] if st.sigma_max is None else st.sigma_max, rho=st.rho,
                           **churn)
    return ablation_sampler(
        net, latents, randn_like, num_steps=st.num_steps, sigma_min=st.sigma_min, sigma_max=st.sigma_max,
        rho=st.rho, solver=st.solver or "heun", discretization=st.discretization or "edm",
        schedule=st.schedule or "linear", scaling=st.scaling or "none", epsilon_s=st.epsilon_s,
        C_1=st.C_1, C_2=st.C_2, M=st.M, alpha=st.alpha, **churn)


def drive(steps: SamplerSteps, evaluate: Callable[[Evaluation], Tensor]) -> Tensor:
    """Run a sampler coroutine to the end, answering each evaluation with `evaluate`."""
    try:
        evaluation = next(steps)
        while True:
            evaluation = steps.send(evaluate(evaluation))
    except StopIteration as done:
        return done.value


def sample(net: Denoiser, latents: Tensor, class_labels: Tensor | None = None,
           randn_like: RandnLike = torch.randn_like, settings: SamplerSettings | None = None) -> Tensor:
    """Images (float64, about [-1, 1]) from latents ~ N(0, I): the whole run in one call."""
    steps = sampler_steps(net, latents, randn_like, settings or SamplerSettings())
    return drive(steps, lambda ev: net(ev.x, ev.sigma, class_labels).to(torch.float64))
