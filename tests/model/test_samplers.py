"""Samplers against closed-form answers: Gaussian data has an exact denoiser and ODE solution."""

import math

import pytest
import torch

from model.rng import SeedStreams
from model.samplers import SamplerSettings, drive, sample, sampler_steps

MU, S = 0.25, 0.4  # data ~ N(MU, S^2) per pixel


class GaussianDenoiser:
    """The ideal denoiser for N(MU, S^2) data: E[y | y + n] = MU + S^2 / (S^2 + sigma^2) (x - MU)."""

    def __init__(self, sigma_min=0.0, sigma_max=math.inf):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.calls = 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x.to(torch.float64) - MU)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


def exact_ode_solution(latents, sigma_max):
    """The probability-flow ODE maps x(sigma_max) to MU + (x - MU) S / sqrt(S^2 + sigma_max^2)."""
    x_T = latents.to(torch.float64) * sigma_max
    return MU + (x_T - MU) * S / math.sqrt(S ** 2 + sigma_max ** 2)


def test_deterministic_sampler_reproduces_the_data_distribution():
    latents = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    images = sample(GaussianDenoiser(), latents, settings=SamplerSettings(num_steps=64))
    assert abs(images.mean().item() - MU) < 0.01
    assert abs(images.std().item() - S) < 0.01


def _final_error(settings, sigma_max=80.0):
    latents = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    images = sample(GaussianDenoiser(), latents, settings=settings)
    return (images - exact_ode_solution(latents, sigma_max)).abs().max().item()


@pytest.mark.parametrize(("solver", "order"), [("heun", 2.0), ("euler", 1.0)])
def test_convergence_order(solver, order):
    # Linear schedule, EDM time steps; the error must shrink ~2^order when N doubles.
    errors = [_final_error(SamplerSettings(num_steps=n, solver=solver, sigma_min=0.002)) for n in (32, 64, 128)]
    measured = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert all(abs(m - order) < 0.3 for m in measured), (errors, measured)


def test_nfe_counts():
    for settings, expected in [(SamplerSettings(num_steps=18), 35), (SamplerSettings(num_steps=18, solver="euler"), 18),
                               (SamplerSettings(num_steps=40, discretization="vp"), 79)]:
        net = GaussianDenoiser()
        sample(net, torch.zeros(1, 1, 2, 2), settings=settings)
        assert net.calls == expected == settings.nfe_total


def test_generalised_sampler_agrees_with_heun_sampler():
    latents = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for churn in ({}, {"S_churn": 30, "S_min": 0.01, "S_max": 10, "S_noise": 1.007}):
        results = []
        for ablate in ({}, {"solver": "heun", "discretization": "edm", "schedule": "linear", "scaling": "none"}):
            streams = SeedStreams(range(8))
            results.append(sample(GaussianDenoiser(), latents, None, streams.randn_like,
                                  SamplerSettings(num_steps=12, **churn, **ablate)))
        assert (results[0] - results[1]).abs().max().item() < 1e-10


@pytest.mark.parametrize(("solver", "disc", "schedule", "scaling"), [
    ("euler", "vp", "vp", "vp"),        # VP column
    ("euler", "ve", "ve", "none"),      # VE column
    ("euler", "iddpm", "linear", "none"),  # iDDPM + DDIM column
    ("heun", "edm", "linear", "none"),  # EDM column
])
def test_table1_columns_give_finite_images_near_the_data(solver, disc, schedule, scaling):
    latents = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    settings = SamplerSettings(num_steps=64, solver=solver, discretization=disc, schedule=schedule, scaling=scaling)
    images = sample(GaussianDenoiser(), latents, settings=settings)
    assert torch.isfinite(images).all()
    # Loose: at 64 NFE the original VE sampler is far from converged (that is the paper's point).
    assert abs(images.mean().item() - MU) < 0.05 and abs(images.std().item() - S) < 0.5 * S


def test_churn_noise_is_drawn_on_every_step_even_without_churn():
    draws = []

    def counting_randn_like(x):
        draws.append(x.shape)
        return torch.randn_like(x)

    for settings in (SamplerSettings(num_steps=10), SamplerSettings(num_steps=10, solver="euler")):
        draws.clear()
        sample(GaussianDenoiser(), torch.zeros(2, 1, 2, 2), None, counting_randn_like, settings)
        assert len(draws) == 10


def test_churn_changes_images_only_inside_s_min_s_max():
    latents = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(4))

    def run(**churn):
        streams = SeedStreams(range(4))
        return sample(GaussianDenoiser(), latents, None, streams.randn_like, SamplerSettings(num_steps=10, **churn))

    deterministic = run()
    assert torch.equal(deterministic, run(S_churn=40, S_min=100, S_max=200))  # window above every step
    assert not torch.equal(deterministic, run(S_churn=40))


def test_step_wise_form_reports_each_evaluation():
    steps = sampler_steps(GaussianDenoiser(), torch.ones(1, 1, 2, 2), torch.randn_like, SamplerSettings(num_steps=5))
    seen = []

    def evaluate(ev):
        seen.append((ev.step, float(ev.sigma), ev.nfe, ev.nfe_total))
        return GaussianDenoiser()(ev.x, ev.sigma)

    drive(steps, evaluate)
    assert [s[2] for s in seen] == list(range(9)) and all(s[3] == 9 for s in seen)
    assert [s[0] for s in seen] == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    sigmas = [s[1] for s in seen]
    assert sigmas[0] == 80.0 and all(a > b for a, b in zip(sigmas[::2], sigmas[2::2], strict=False))


def test_sigma_range_is_clamped_to_the_network():
    steps = sampler_steps(GaussianDenoiser(sigma_min=0.01, sigma_max=20.0), torch.ones(1, 1, 2, 2), torch.randn_like,
                          SamplerSettings(num_steps=4))
    first = next(steps)
    assert float(first.sigma) == pytest.approx(20.0)


@pytest.mark.parametrize(("field", "value"), [
    ("num_steps", 1), ("sigma_min", -1.0), ("sigma_max", float("nan")), ("rho", 0.0), ("S_churn", -1.0),
    ("solver", "rk4"), ("discretization", "cosine"), ("schedule", "exp"), ("scaling", "sqrt"), ("alpha", 0.0),
])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplerSettings(**{field: value}).validate()


def test_sigma_min_must_be_below_sigma_max():
    with pytest.raises(ValueError, match="sigma_min"):
        SamplerSettings(sigma_min=5.0, sigma_max=1.0).validate()
