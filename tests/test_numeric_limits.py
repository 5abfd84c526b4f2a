"""Property: sampler settings within the published limits are either refused at submission (the gateway's
422) or give finite images in the real sampler on the bundled model; the worker's admission check agrees
with the gateway's. Never accepted and then failed, never a non-finite image.

Hypothesis draws the settings (a fixed seed, a bounded number of examples: the run is the same every
time and takes seconds)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from contract.jobs import JobSpec, SamplerParams
from model.bundled import DEFAULT_MODEL
from model.card import load_card
from model.choices import DISCRETIZATIONS, SCALINGS, SCHEDULES, SOLVERS
from model.generate import generate
from model.numerics import (
    RHO_HIGHEST,
    RHO_LOWEST,
    S_NOISE_HIGHEST,
    SIGMA_HIGHEST,
    SIGMA_LOWEST,
    NetworkRange,
    SettingsError,
    check_schedule,
)
from model.samplers import SamplerSettings, drive, sampler_steps
from service.errors import Problem
from service.schemas import GenerateRequest
from service.validation import resolve
from tests.model.test_samplers import GaussianDenoiser
from worker.engine import Engine

CARD = load_card(DEFAULT_MODEL)
MAX_STEPS = 1000
FIXED = settings(derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def finite(lo: float, hi: float | None = None) -> st.SearchStrategy[float]:
    return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)


def sigmas() -> st.SearchStrategy[float]:
    """Anywhere in the published range, often at its ends and near the usual values."""
    return st.one_of(finite(SIGMA_LOWEST, SIGMA_HIGHEST), st.sampled_from([SIGMA_LOWEST, SIGMA_HIGHEST, 0.002, 80.0]),
                     st.floats(min_value=math.log(SIGMA_LOWEST), max_value=math.log(SIGMA_HIGHEST)).map(math.exp)
                     .filter(lambda s: SIGMA_LOWEST <= s <= SIGMA_HIGHEST))


@st.composite
def sampler_bodies(draw: st.DrawFn, max_steps: int) -> dict[str, Any]:
    body: dict[str, Any] = {"num_steps": draw(st.integers(2, max_steps))}
    optional = {
        "sigma_min": sigmas(), "sigma_max": sigmas(),
        "rho": st.one_of(finite(RHO_LOWEST, RHO_HIGHEST), st.sampled_from([RHO_LOWEST, RHO_HIGHEST])),
        "S_churn": st.one_of(finite(0.0), st.sampled_from([0.0, 40.0, 1e300])),
        "S_min": st.one_of(finite(0.0), finite(0.0, 100.0)), "S_max": maybe(st.one_of(finite(0.0), finite(0.0, 100.0))),
        "S_noise": finite(0.0, S_NOISE_HIGHEST),
        "solver": maybe(st.sampled_from(SOLVERS)), "discretization": maybe(st.sampled_from(DISCRETIZATIONS)),
        "schedule": maybe(st.sampled_from(SCHEDULES)), "scaling": maybe(st.sampled_from(SCALINGS)),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            body[name] = draw(strategy)
    return body


def submitted(body: dict[str, Any]) -> JobSpec | None:
    """The job the gateway would queue, or None when it refuses the request (422)."""
    try:
        return resolve(GenerateRequest.model_validate({**body, "seeds": [7], "class_label": 3}), "bundled", CARD,
                       max_images=4, max_steps=MAX_STEPS)
    except (ValidationError, Problem) as refused:
        assert not isinstance(refused, Problem) or refused.status == 422
        event(f"refused: {refused.field if isinstance(refused, Problem) else 'schema'}")
        return None


@pytest.fixture(scope="module")
def engine() -> Engine:
    served = Engine("cpu", "fp32")
    served.load("bundled", DEFAULT_MODEL)
    return served


@settings(FIXED, max_examples=60)
@given(body=sampler_bodies(max_steps=6))
def test_accepted_settings_give_finite_images_on_the_bundled_model(engine: Engine, body: dict[str, Any]) -> None:
    spec = submitted(body)
    if spec is None:
        return
    assert engine.check(spec) is None, body  # the worker admits what the gateway accepted
    net = engine.models["bundled"].net
    sampler = SamplerSettings(**spec.sampler.settings_kwargs())
    (image,) = generate(net, spec.seeds, spec.class_labels, sampler)  # raises ValueError on a non-finite image
    assert image.pixels.shape == (8, 8, 1)


@settings(FIXED, max_examples=80)
@given(body=sampler_bodies(max_steps=MAX_STEPS))
def test_the_check_and_the_sampler_agree_at_any_step_count(body: dict[str, Any]) -> None:
    """Up to the server's step limit, on an exact float64 denoiser (no network: fast): what the gateway
    accepts runs to finite images through exactly the noise levels the check planned."""
    spec = submitted(body)
    if spec is None:
        return
    sampler = SamplerSettings(**spec.sampler.settings_kwargs())
    plan = check_schedule(NetworkRange.of(CARD), **sampler.as_dict())
    seen: list[float] = []

    def evaluate(ev: Any) -> torch.Tensor:
        seen.append(float(ev.sigma))
        return GaussianDenoiser()(ev.x, ev.sigma)

    images = drive(sampler_steps(GaussianDenoiser(), torch.randn(2, 1, 2, 2), torch.randn_like, sampler), evaluate)
    assert torch.isfinite(images).all(), body
    iddpm = sampler.discretization == "iddpm"  # its table: numpy's float32 sin and torch's differ by an ulp
    assert plan.network_sigmas == pytest.approx(seen, rel=1e-4 if iddpm else 1e-12), body


def test_the_issues_examples_are_refused_at_submission_and_by_the_worker(engine: Engine) -> None:
    examples = (({"sigma_max": 1e30}, "sigma_max"), ({"rho": 5e-324}, "rho"), ({"rho": 0.001}, "rho"),
                ({"sigma_min": 90.0}, "sigma_min"), ({"sigma_min": 90.0, "discretization": "iddpm"}, "sigma_min"))
    for body, field in examples:
        try:
            submitted_spec = resolve(GenerateRequest.model_validate({**body, "seeds": [1]}), "bundled", CARD,
                                     max_images=4, max_steps=MAX_STEPS)
        except ValidationError as error:
            assert error.errors()[0]["loc"] == (field,), body  # outside the published bounds: the schema says so
        except Problem as problem:
            assert problem.status == 422 and problem.field == field, body
        else:
            raise AssertionError(f"accepted {body}: {submitted_spec}")
    # The worker, as a second line, refuses the same settings in a job that bypassed the gateway.
    sampler = SamplerParams.model_construct(**{**SamplerParams().model_dump(), "rho": 0.001})
    bypass = JobSpec.model_construct(model="bundled", seeds=[1], class_labels=[None], sampler=sampler)
    reason = engine.check(bypass)
    assert reason is not None and reason.startswith("rho: "), reason
    with pytest.raises(SettingsError):
        bypass.sampler.schedule_on(CARD)
