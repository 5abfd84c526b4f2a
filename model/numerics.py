"""The sampler's schedule on floats, without torch: what the gateway and the worker check a request
against before any network runs.

Three things live here. Table 1's time steps, sigma(t) and s(t), written once as formulas that work
on Python floats and on torch tensors alike (model/schedules.py applies them to float64 tensors for
the sampler). The bounds a request's settings must keep (the job contract publishes them in its
schema). And `check_schedule`, which walks the sampler's loop (model/samplers.py) on float64 scalars
and names the setting that would make a time step, a noise level, a scaling s(t), an ODE
coefficient or the churn noise non-finite, or the steps not strictly decreasing, or a noise level
that the network cannot take in float32.

Why a walk and not per-field bounds: settings that are fine one by one can fail together.
rho = 0.001 makes sigma_max^(1/rho) overflow; a sigma_min alone above the discretization's default
sigma_max reverses the steps; sigma_max = 1e30 is finite in float64 but its square is not in
float32, where the network runs (the preconditioners compute sigma^2 + sigma_data^2).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.card import ModelCard
from model.choices import DISCRETIZATIONS, SCALINGS, SCHEDULES

# -- published bounds of a request's settings (contract/jobs.py puts them in the schema) --------------
# sigma_min and sigma_max: far outside every published schedule (0.002..80 EDM, 0.02..100 VE), and
# well inside float32, where sigma^2 and 1/sigma must stay finite and nonzero.
SIGMA_LOWEST, SIGMA_HIGHEST = 1e-5, 1e5
# rho: the paper uses 7 and sweeps a few units around it; outside this, the steps pile up at one end.
RHO_LOWEST, RHO_HIGHEST = 0.1, 100.0
# S_noise: the paper uses 1.003 to 1.007; above 1 it inflates the noise added by churn on every step.
S_NOISE_HIGHEST = 10.0
# The noise levels a network evaluation may see: sigma^2 and 1/sigma^2 finite in float32 (a backstop;
# the bounds above keep every schedule far inside it).
NETWORK_SIGMA_RANGE = (1e-18, 1e18)

# -- the fixed constants of Table 1 (sampler settings a request cannot change) ------------------------
EDM_SIGMA_RANGE = (0.002, 80.0)       # Algorithm 2's defaults (generate.py)
EPSILON_S = 1e-3                      # VP: the last time step
IDDPM_C_1, IDDPM_C_2, IDDPM_M = 0.001, 0.008, 1000
ALPHA = 1.0                           # Heun's second stage at t_i + alpha h
VP_BETA_D, VP_BETA_MIN = 19.9, 0.1


# -- Table 1's formulas, for floats and tensors ------------------------------------------------------

@dataclass(frozen=True)
class Ops:
    """The elementwise functions the formulas need: math's for floats, torch's for tensors."""

    sqrt: Callable[[Any], Any]
    log: Callable[[Any], Any]


FLOAT_OPS = Ops(math.sqrt, math.log)


def vp_sigma(beta_d: float, beta_min: float) -> Callable[[Any], Any]:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return lambda t: (math.e ** (0.5 * beta_d * (t ** 2) + beta_min * t) - 1) ** 0.5


def edm_levels(i: Any, num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> Any:
    """Eq. 5: t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def ve_levels_squared(i: Any, num_steps: int, sigma_min: float, sigma_max: float) -> Any:
    """VE time steps t_i = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)); the levels are sqrt(t_i)."""
    return (sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1)))


def vp_level_times(i: Any, num_steps: int, epsilon_s: float) -> Any:
    """VP time steps t_i = 1 + i/(N-1) (epsilon_s - 1); the levels are sigma(t_i)."""
    return 1 + i / (num_steps - 1) * (epsilon_s - 1)


def iddpm_positions(count: int, num_steps: int, i: Any) -> Any:
    """iDDPM: step i takes the table entry (of the `count` in range) nearest to this position."""
    return (count - 1) / (num_steps - 1) * i


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
    with np.errstate(all="ignore"):
        beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
        beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    return float(beta_d), float(beta_min)


@dataclass(frozen=True)
class NoiseSchedule:
    """sigma(t), its derivative and inverse, and the signal scaling s(t) with its derivative."""

    sigma: Callable[[Any], Any]
    sigma_deriv: Callable[[Any], Any]
    sigma_inv: Callable[[Any], Any]
    s: Callable[[Any], Any]
    s_deriv: Callable[[Any], Any]


def noise_schedule(schedule: str, scaling: str, vp_beta_d: float, vp_beta_min: float,
                   ops: Ops = FLOAT_OPS) -> NoiseSchedule:
    """Table 1's sigma(t) (vp, ve, linear) and s(t) (vp, none), with `ops` for sqrt and log."""
    sqrt, log = ops.sqrt, ops.log
    if schedule == "vp":
        beta_d, beta_min = vp_beta_d, vp_beta_min
        sigma = vp_sigma(beta_d, beta_min)

        def sigma_deriv(t: Any) -> Any:
            return 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t))

        def sigma_inv(s: Any) -> Any:
            return (sqrt(beta_min ** 2 + 2 * beta_d * log(s ** 2 + 1)) - beta_min) / beta_d
    elif schedule == "ve":
        def sigma(t: Any) -> Any:
            return sqrt(t)

        def sigma_deriv(t: Any) -> Any:
            return 0.5 / sqrt(t)

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
            return 1 / sqrt(1 + sigma(t) ** 2)

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


@functools.lru_cache(maxsize=8)
def iddpm_table(M: int, C_1: float, C_2: float, float32: bool = False) -> tuple[float, ...]:
    """The iDDPM table u_0 > ... > u_M = 0 (model/precond.py's `iddpm_noise_levels` on floats): alpha_bar
    in float32 as the reference computes it, u in float64 (the sampler's discretization) or float32 (the
    preconditioner's buffer, which `round_sigma` snaps to)."""
    f32 = np.float32
    dtype = np.float32 if float32 else np.float64

    def alpha_bar(j: int) -> np.float32:
        return f32(np.sin(f32(0.5 * math.pi) * f32(j) / f32(M) / f32(C_2 + 1)) ** 2)

    u = [dtype(0)] * (M + 1)
    with np.errstate(all="ignore"):
        for j in range(M, 0, -1):
            ratio = max(f32(alpha_bar(j - 1) / alpha_bar(j)), f32(C_1))
            u[j - 1] = np.sqrt((u[j] ** 2 + dtype(1)) / dtype(ratio) - dtype(1))
    return tuple(float(v) for v in u)


# -- the check ---------------------------------------------------------------------------------------

class SettingsError(ValueError):
    """Settings the sampler cannot compute on this network; `field` names the setting to change."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class NetworkRange:
    """The noise levels a network supports and, for iDDPM, the table its round_sigma snaps to."""

    sigma_min: float
    sigma_max: float
    table: tuple[float, ...] = ()   # ascending; empty: round_sigma is the identity

    @staticmethod
    def of(card: ModelCard) -> NetworkRange:
        if card.preconditioner != "iDDPMPrecond":
            return NetworkRange(card.sigma_min, card.sigma_max)
        kw = card.precond_kwargs
        u = iddpm_table(int(kw.get("M", IDDPM_M)), float(kw.get("C_1", IDDPM_C_1)), float(kw.get("C_2", IDDPM_C_2)),
                        float32=True)
        return NetworkRange(card.sigma_min, card.sigma_max, tuple(sorted(u)))

    def round(self, sigma: float) -> float:
        """round_sigma: the nearest table entry (the first of two equally near, as argmin picks)."""
        if not self.table:
            return sigma
        k = bisect.bisect_left(self.table, sigma)
        near = [j for j in (k - 1, k) if 0 <= j < len(self.table)]
        return self.table[min(near, key=lambda j: (abs(self.table[j] - sigma), -j))]


@dataclass(frozen=True)
class EffectiveSchedule:
    """What the sampler will do with some settings on some network."""

    sigma_min: float                      # the noise range after the defaults and the network's clamp
    sigma_max: float
    t_steps: tuple[float, ...]            # t_0 > ... > t_{N-1} > t_N = 0
    network_sigmas: tuple[float, ...]     # the noise level of each network evaluation, in order


def _real(value: Any) -> float | None:
    """A finite float, or None (NaN, infinity, or the complex number a negative float's root gives)."""
    return float(value) if type(value) in (float, int) and math.isfinite(value) else None


def _eval(formula: Callable[..., Any], *args: Any) -> float | None:
    """formula(*args) as a finite float, or None where float64 cannot compute it."""
    try:
        return _real(formula(*args))
    except (ArithmeticError, ValueError, TypeError):   # overflow, log or sqrt of a negative, 1/0
        return None


def _point(ns: NoiseSchedule, t: float) -> tuple[float, float, float, float] | None:
    """sigma(t), s(t) and the ODE's coefficients (sigma'/sigma + s'/s, sigma' s / sigma), or None."""
    try:
        sigma, s, deriv = ns.sigma(t), ns.s(t), ns.sigma_deriv(t)
        a, b = deriv / sigma + ns.s_deriv(t) / s, deriv * s / sigma
    except (ArithmeticError, ValueError, TypeError):
        return None
    sigma, s, a, b = _real(sigma), _real(s), _real(a), _real(b)
    return None if sigma is None or s is None or a is None or b is None else (sigma, s, a, b)


def _raised(ns: NoiseSchedule, net: NetworkRange, sigma: float, gamma: float) -> Any:
    """t_hat: the time of the noise level sigma (1 + gamma), as the network rounds it."""
    return ns.sigma_inv(net.round(sigma + gamma * sigma))


def _churn_noise(sig_cur: float, sig_hat: float, s_cur: float, s_hat: float, S_noise: float) -> Any:
    """The churn noise's scale relative to x's: sqrt(sigma(t_hat)^2 - sigma(t_i)^2) s(t_hat) S_noise / s(t_i)."""
    return math.sqrt(max(sig_hat ** 2 - sig_cur ** 2, 0)) * s_hat * S_noise / s_cur


def _given(*fields: tuple[str, Any], fallback: str) -> str:
    """The first field the request set (the one to change), else `fallback`."""
    return next((name for name, value in fields if value is not None), fallback)


def check_schedule(net: NetworkRange, *, num_steps: int, sigma_min: float | None = None,
                   sigma_max: float | None = None, rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0,
                   S_max: float = math.inf, S_noise: float = 1.0, solver: str | None = None,
                   discretization: str | None = None, schedule: str | None = None, scaling: str | None = None,
                   epsilon_s: float = EPSILON_S, C_1: float = IDDPM_C_1, C_2: float = IDDPM_C_2, M: int = IDDPM_M,
                   alpha: float = ALPHA) -> EffectiveSchedule:
    """The schedule that model/samplers.py's `sampler_steps` would follow on `net`, computed in float64;
    raises SettingsError naming a setting when any quantity it computes before the network runs is not
    finite, when the time steps are not strictly decreasing (the network's own rounding may repeat a
    level: iDDPM), or when a noise level leaves what the network can take in float32.

    Takes the settings by SamplerSettings' names (`**settings.as_dict()`); the types and choices are
    assumed checked (SamplerSettings.validate, or the job contract's schema)."""
    ablation = any(v is not None for v in (solver, discretization, schedule, scaling))
    disc, sched_name = discretization or "edm", schedule or "linear"
    lo, hi = default_sigma_range(disc, epsilon_s) if ablation else EDM_SIGMA_RANGE
    smin = max(lo if sigma_min is None else sigma_min, net.sigma_min)
    smax = min(hi if sigma_max is None else sigma_max, net.sigma_max)
    _check_range(net, smin, smax, sigma_min, sigma_max, disc if ablation else None)

    beta_d, beta_min = vp_betas_for_range(smin, smax, epsilon_s)
    ns = noise_schedule(sched_name, scaling or "none", beta_d, beta_min)
    levels = _levels(disc, num_steps, smin, smax, rho, epsilon_s, C_1, C_2, M, beta_d, beta_min,
                     sigma_min, sigma_max)
    time_field = _given(("schedule", schedule), ("discretization", discretization), fallback="sigma_min")
    t_steps = [_eval(lambda level: ns.sigma_inv(net.round(level)), level) for level in levels]
    for level, t in zip(levels, t_steps, strict=True):
        if t is None or t <= 0:
            raise SettingsError(time_field, f"the {sched_name} schedule's time of noise level {level:.6g} is not a "
                                "positive finite number in float64")
    times = [t for t in t_steps if t is not None] + [0.0]
    for i in range(num_steps - 1):  # the network's rounding (iDDPM) may repeat a level; nothing else may
        if not (times[i] > times[i + 1] if not net.table else times[i] >= times[i + 1]):
            raise SettingsError(time_field, f"the {sched_name} schedule's time steps are not decreasing in float64 "
                                f"(t = {times[i]:.17g} then {times[i + 1]:.17g})")

    churn = min(S_churn / num_steps, math.sqrt(2) - 1)
    second_stage = (solver or "heun") == "heun"
    loop_field = _given(("schedule", schedule), ("scaling", scaling), fallback="sigma_max")
    evaluations: list[float] = []

    def evaluation(t: float, where: str) -> tuple[float, float]:
        """The noise level and scaling of a network evaluation at time t, checked."""
        point = _point(ns, t)
        if point is None:
            raise SettingsError(loop_field, f"sigma(t), s(t) or the ODE's coefficients at {where} (t = {t:.6g}) "
                                "are not finite in float64")
        sigma, s, _, _ = point
        if not (s > 0 and NETWORK_SIGMA_RANGE[0] <= sigma <= NETWORK_SIGMA_RANGE[1]):
            raise SettingsError(loop_field, f"the noise level {sigma:.6g} at {where} is outside what the network "
                                f"computes in float32 ({NETWORK_SIGMA_RANGE[0]:g} to {NETWORK_SIGMA_RANGE[1]:g})")
        evaluations.append(sigma)
        return sigma, s

    for i in range(num_steps):
        t_cur, t_next = times[i], times[i + 1]
        current = _point(ns, t_cur)
        if current is None or not current[1] > 0:
            raise SettingsError(loop_field, f"sigma(t) or s(t) at step {i} (t = {t_cur:.6g}) is not finite in "
                                "float64")
        sig_cur, s_cur = current[0], current[1]
        # Churn: raise the noise level to sigma(t_hat) = (1 + gamma) sigma(t_i), adding noise to match.
        gamma = churn if S_min <= sig_cur <= S_max else 0
        t_hat = _eval(_raised, ns, net, sig_cur, gamma)
        if t_hat is None:
            raise SettingsError("S_churn", f"the raised noise level of step {i} is not finite in float64")
        sig_hat, s_hat = evaluation(t_hat, f"step {i}")
        noise = _eval(_churn_noise, sig_cur, sig_hat, s_cur, s_hat, S_noise)
        if noise is None:
            raise SettingsError("S_noise", f"the churn noise of step {i} is not finite in float64")
        if second_stage and i < num_steps - 1:
            evaluation(t_hat + alpha * (t_next - t_hat), f"the second stage of step {i}")
    return EffectiveSchedule(smin, smax, tuple(times), tuple(evaluations))


def _check_range(net: NetworkRange, smin: float, smax: float, sigma_min: float | None, sigma_max: float | None,
                 disc: str | None) -> None:
    """The noise range after the defaults and the network's clamp must be a range."""
    if smin < smax:
        return
    if sigma_min is not None and sigma_max is not None:
        raise SettingsError("sigma_min", f"[{sigma_min:g}, {sigma_max:g}] does not overlap the model's noise levels "
                            f"[{net.sigma_min:g}, {net.sigma_max:g}]")
    default = "Algorithm 2's" if disc is None else f"the {disc} discretization's"
    if sigma_min is not None:
        raise SettingsError("sigma_min", f"must be below the effective sigma_max {smax:g} ({default} default, "
                            "within the model's range); give sigma_max too")
    if sigma_max is not None:
        raise SettingsError("sigma_max", f"must be above the effective sigma_min {smin:g} ({default} default, "
                            "within the model's range); give sigma_min too")
    raise SettingsError("discretization" if disc else "sigma_min",
                        f"{default} noise range does not overlap the model's [{net.sigma_min:g}, {net.sigma_max:g}]")


def _levels(disc: str, num_steps: int, smin: float, smax: float, rho: float, epsilon_s: float, C_1: float,
            C_2: float, M: int, beta_d: float, beta_min: float, sigma_min: float | None,
            sigma_max: float | None) -> list[float]:
    """The discretization's noise levels sigma_0 > ... > sigma_{N-1} (model/schedules.py `sigma_steps`)."""
    range_field = _given(("sigma_min", sigma_min), ("sigma_max", sigma_max), fallback="discretization")
    if disc == "iddpm":
        in_range = [u for u in iddpm_table(M, C_1, C_2) if smin <= u <= smax]
        if not in_range:
            raise SettingsError(range_field, f"no iDDPM noise level lies in [{smin:g}, {smax:g}]")
        if len(in_range) < num_steps:
            raise SettingsError("num_steps", f"only {len(in_range)} iDDPM noise levels lie in [{smin:g}, {smax:g}]: "
                                f"at most {len(in_range)} steps, or a wider range")
        return [in_range[round(iddpm_positions(len(in_range), num_steps, float(i)))] for i in range(num_steps)]
    formulas: dict[str, tuple[Callable[[float], Any], str, str]] = {
        "edm": (lambda i: edm_levels(i, num_steps, smin, smax, rho), "rho",
                f"(sigma_max^(1/rho) + ...)^rho with rho = {rho:g}"),
        "ve": (lambda i: math.sqrt(ve_levels_squared(i, num_steps, smin, smax)), range_field,
               "sigma_max (sigma_min/sigma_max)^(i/(N-1))"),
        "vp": (lambda i: vp_sigma(beta_d, beta_min)(vp_level_times(i, num_steps, epsilon_s)), range_field,
               "the VP schedule refitted to the noise range"),
    }
    if disc not in formulas:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {disc!r}")
    formula, bad_field, what = formulas[disc]
    values = [_eval(formula, float(i)) for i in range(num_steps)]
    for i, value in enumerate(values):
        if value is None or value <= 0:
            raise SettingsError(bad_field, f"noise level {i} of {what} is not a positive finite number in float64 "
                                f"(noise range [{smin:g}, {smax:g}])")
    levels = [v for v in values if v is not None]
    for i in range(num_steps - 1):
        if not levels[i] > levels[i + 1]:
            raise SettingsError("num_steps", f"{num_steps} noise levels in [{smin:g}, {smax:g}] are not strictly "
                                f"decreasing in float64 (levels {i} and {i + 1} are {levels[i]:.17g} and "
                                f"{levels[i + 1]:.17g}); use fewer steps or a wider range")
    return levels
