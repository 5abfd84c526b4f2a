"""model/numerics.py: the float64 walk of the sampler's schedule agrees with the sampler, evaluation by
evaluation, and refuses (naming the setting) what the sampler cannot compute."""

import math

import pytest
import torch

from model.bundled import DEFAULT_MODEL
from model.card import load_card
from model.numerics import (
    IDDPM_C_1,
    IDDPM_C_2,
    IDDPM_M,
    NetworkRange,
    SettingsError,
    check_schedule,
    iddpm_table,
)
from model.precond import iddpm_noise_levels, iDDPMPrecond
from model.samplers import SamplerSettings, drive, sampler_steps
from tests.model.test_samplers import GaussianDenoiser

BUNDLED = NetworkRange.of(load_card(DEFAULT_MODEL))


class TableDenoiser(GaussianDenoiser):
    """A Gaussian denoiser that rounds sigma to the iDDPM table, as iDDPMPrecond does."""

    round_sigma = iDDPMPrecond.round_sigma

    def __init__(self) -> None:
        self.u = iddpm_noise_levels(IDDPM_M, IDDPM_C_1, IDDPM_C_2, dtype=torch.float32)
        super().__init__(float(self.u[IDDPM_M - 1]), float(self.u[0]))


def iddpm_range() -> NetworkRange:
    table = iddpm_table(IDDPM_M, IDDPM_C_1, IDDPM_C_2, float32=True)
    return NetworkRange(table[IDDPM_M - 1], table[0], tuple(sorted(table)))


NETWORKS = {  # name -> (a stand-in network for the sampler, its range for the check)
    "edm": (lambda: GaussianDenoiser(), NetworkRange(0.0, math.inf)),
    "ve": (lambda: GaussianDenoiser(0.02, 100.0), NetworkRange(0.02, 100.0)),
    "vp": (lambda: GaussianDenoiser(0.001, 152.0), NetworkRange(0.001, 152.0)),
    "iddpm": (TableDenoiser, iddpm_range()),
}
CHURN = {"S_churn": 30.0, "S_min": 0.05, "S_max": 10.0, "S_noise": 1.007}
SETTINGS = [
    {},
    {"num_steps": 7, "rho": 3.0, **CHURN},
    {"num_steps": 9, "sigma_min": 0.01, "sigma_max": 50.0},
    {"num_steps": 10, "solver": "euler", "discretization": "vp", "schedule": "vp", "scaling": "vp"},
    {"num_steps": 10, "solver": "euler", "discretization": "ve", "schedule": "ve", "scaling": "none"},
    {"num_steps": 10, "solver": "euler", "discretization": "iddpm", "schedule": "linear", "scaling": "none"},
    {"num_steps": 8, "discretization": "vp", "schedule": "ve", "scaling": "vp", **CHURN},
    {"num_steps": 8, "discretization": "iddpm", "schedule": "vp", "scaling": "vp", "sigma_max": 20.0, **CHURN},
    {"num_steps": 6, "discretization": "edm", "schedule": "vp", "rho": 2.0, "sigma_min": 0.005},
]


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("settings", SETTINGS, ids=[str(k) for k in range(len(SETTINGS))])
def test_the_check_walks_the_samplers_schedule_evaluation_by_evaluation(network, settings):
    make_net, net_range = NETWORKS[network]
    seen = []

    def evaluate(ev):
        seen.append(float(ev.sigma))
        return ev.x  # any finite answer: the noise levels do not depend on it

    st = SamplerSettings(**settings)
    drive(sampler_steps(make_net(), torch.zeros(1, 1, 2, 2), torch.randn_like, st), evaluate)
    planned = check_schedule(net_range, **st.as_dict()).network_sigmas
    assert len(planned) == len(seen) == st.nfe_total
    # The iDDPM table's float32 sin differs by an ulp here and there between numpy and torch.
    table = network == "iddpm" or settings.get("discretization") == "iddpm"
    assert planned == pytest.approx(seen, rel=1e-4 if table else 1e-12)


def test_the_iddpm_table_is_the_preconditioners():
    for float32, dtype in ((False, torch.float64), (True, torch.float32)):
        ours = iddpm_table(IDDPM_M, IDDPM_C_1, IDDPM_C_2, float32=float32)
        theirs = iddpm_noise_levels(IDDPM_M, IDDPM_C_1, IDDPM_C_2, dtype=dtype).tolist()
        assert ours == pytest.approx(theirs, rel=1e-4) and ours[-1] == 0.0
    assert NETWORKS["iddpm"][1].round(5.0) == pytest.approx(float(TableDenoiser().round_sigma(torch.tensor(5.0))))


def refusal(net=BUNDLED, **settings):
    with pytest.raises(SettingsError) as caught:
        check_schedule(net, **{"num_steps": 18, **settings})
    return caught.value


@pytest.mark.parametrize(("settings", "field"), [
    ({"sigma_max": 1e30}, "sigma_max"),               # float64 fine, sigma^2 overflows float32: black PNG
    ({"rho": 5e-324}, "rho"),                         # 1/rho = inf: NaN steps
    ({"rho": 0.001}, "rho"),                          # 80^1000: OverflowError in the worker
    ({"sigma_min": 90.0}, "sigma_min"),               # above Algorithm 2's default sigma_max: steps go up
    ({"sigma_min": 90.0, "discretization": "iddpm"}, "sigma_min"),
    ({"sigma_max": 0.001}, "sigma_max"),              # below the default sigma_min
    ({"discretization": "iddpm", "sigma_min": 95.0, "sigma_max": 100.0}, "sigma_min"),  # no table level there
    ({"discretization": "iddpm", "sigma_min": 1.0, "sigma_max": 1.2, "num_steps": 100}, "num_steps"),  # 58 levels
    ({"sigma_min": 1.0, "sigma_max": 1.0 + 1e-13, "num_steps": 1000}, "num_steps"),  # steps tie in float64
    ({"schedule": "vp", "sigma_min": 1e-9, "sigma_max": 1e5}, "schedule"),  # refitted betas: sqrt of < 0
])
def test_what_the_sampler_cannot_compute_is_refused_naming_the_setting(settings, field):
    error = refusal(**settings)
    assert error.field == field and str(error).startswith(f"{field}: ")


@pytest.mark.parametrize("settings", [
    {"rho": 0.001}, {"sigma_min": 90.0}, {"sigma_max": 1e30}, {"rho": 5e-324},
    {"schedule": "vp", "sigma_min": 1e-9, "sigma_max": 1e5},
])
def test_what_is_refused_does_fail_in_the_sampler(settings):
    """Not a cautious check: each refusal above is a real failure (an error, a NaN, steps going up)."""
    st = SamplerSettings(num_steps=18, **settings)
    seen = []

    def evaluate(ev):
        seen.append(float(ev.sigma))
        return torch.zeros_like(ev.x) if ev.sigma.item() > 1e18 else ev.x * 0.5

    try:
        images = drive(sampler_steps(GaussianDenoiser(), torch.ones(1, 1, 2, 2), torch.randn_like, st), evaluate)
    except (ArithmeticError, ValueError):
        return
    increasing = any(b > a for a, b in zip(seen[::2], seen[2::2], strict=False))
    assert increasing or not torch.isfinite(images).all() or max(seen) > 1e18


def test_a_network_that_rounds_may_repeat_a_level_and_the_check_says_what_it_will_see():
    plan = check_schedule(iddpm_range(), num_steps=400)  # EDM steps, more than the table has near sigma_min
    assert len(set(plan.t_steps)) < len(plan.t_steps)
    assert all(a >= b for a, b in zip(plan.t_steps, plan.t_steps[1:], strict=False))


def test_the_default_schedule_and_the_reference_settings_pass():
    plan = check_schedule(BUNDLED, num_steps=18)
    assert plan.sigma_min == 0.002 and plan.sigma_max == 80.0 and plan.t_steps[0] == 80.0
    check_schedule(BUNDLED, num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
    for column in ({"discretization": "vp", "schedule": "vp", "scaling": "vp"},
                   {"discretization": "ve", "schedule": "ve"}, {"discretization": "iddpm"}):
        check_schedule(BUNDLED, num_steps=256, solver="euler", **column)
