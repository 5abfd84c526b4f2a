"""Requests resolved against a model card (pure: no Redis, no HTTP)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from contract.jobs import JobSpec, SamplerParams
from contract.ledger import new_job_id
from contract.settings import parse_models
from model.card import ModelCard
from service.errors import Problem
from service.schemas import GenerateRequest
from service.settings import GatewaySettings
from service.validation import check_idempotency_key, known_job_id, resolve

CARD = ModelCard(name="digits", architecture="SongUNet", preconditioner="EDMPrecond", img_resolution=8,
                 img_channels=1, label_dim=10, class_names=[f"c{k}" for k in range(10)], sigma_min=0.002,
                 sigma_max=80.0, parameters=1, weights_sha256="0" * 64, weights_file="digits.safetensors")


def run(**body: object) -> JobSpec:
    return resolve(GenerateRequest(**body), "digits", CARD, max_images=16, max_steps=50, draw=lambda: 1234)


def field_of(**body: object) -> str | None:
    with pytest.raises(Problem) as caught:
        run(**body)
    assert caught.value.status == 422
    return caught.value.field


def test_seeds_classes_and_defaults() -> None:
    assert run().seeds == [1234] and run().class_labels == [None]
    assert run(count=3).seeds == [0, 1, 2]
    assert run(count=2, start=7).seeds == [7, 8]
    assert run(start=9).seeds == [9]
    spec = run(seeds=[4, 4, 5], class_label="c3")
    assert spec.seeds == [4, 4, 5] and spec.class_labels == [3, 3, 3]
    assert run(class_label=2).class_labels == [2]
    assert run(class_label="7").class_labels == [7]


def test_refusals_name_the_field() -> None:
    assert field_of(class_label=10) == "class_label"
    assert field_of(class_label="dog") == "class_label"
    assert field_of(class_label="\u00b2") == "class_label"  # isdigit() is True, int() refuses it
    assert field_of(class_label="\u0663") == "class_label"  # an Arabic-Indic digit: not an index either
    assert field_of(count=17) == "count"
    assert field_of(seeds=list(range(17))) == "seeds"
    assert field_of(seeds=[1], start=2) == "start"
    assert field_of(count=2, start=2**32 - 1) == "count"
    assert field_of(num_steps=51) == "num_steps"
    assert field_of(sigma_min=1.0, sigma_max=0.5) == "sigma_min"
    assert field_of(sigma_min=100.0) == "sigma_min"
    assert field_of(sigma_max=0.001) == "sigma_max"
    assert field_of(S_min=1.0, S_max=0.5) == "S_max"


def test_unconditional_model_refuses_a_class() -> None:
    card = CARD.model_copy(update={"label_dim": 0, "class_names": None})
    with pytest.raises(Problem) as caught:
        resolve(GenerateRequest(class_label=1), "u", card, max_images=4, max_steps=50)
    assert caught.value.field == "class_label"


def test_sampler_params_nfe_and_settings() -> None:
    assert SamplerParams().nfe_per_image == 35
    assert SamplerParams(num_steps=10, solver="euler").nfe_per_image == 10
    assert SamplerParams().settings_kwargs()["S_max"] == float("inf")
    assert run(num_steps=5).nfe_total == 9
    # Equal settings batch together; any difference separates them.
    assert run(seeds=[1]).batch_key() == run(seeds=[2], class_label=3).batch_key()
    assert run(num_steps=5).batch_key() != run(num_steps=6).batch_key()


def test_settings_parse_models_and_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_models("a=/x/a.json, b=/y/b.pkl") == {"a": "/x/a.json", "b": "/y/b.pkl"}
    assert parse_models('{"a": "/x"}') == {"a": "/x"}
    with pytest.raises(ValueError):
        parse_models("just-a-path")
    monkeypatch.setenv("EDM_MODELS", "m=/tmp/m.json")
    monkeypatch.setenv("EDM_API_KEYS", "k1,k2")
    monkeypatch.setenv("EDM_MAX_QUEUED_NFE", "123")
    settings = GatewaySettings()
    assert settings.models == {"m": "/tmp/m.json"}
    assert settings.api_keys == ["k1", "k2"] and settings.max_queued_nfe == 123


# -- numbers: one rule per kind; bounds; the schedule as a whole ---------------------------------------

EDM_CARD = CARD.model_copy(update={"sigma_min": 0.0, "sigma_max": math.inf})  # EDMPrecond: no range of its own


@pytest.mark.parametrize(("body", "field"), [
    ('{"num_steps": 18.0}', "num_steps"),   # integer fields take JSON integers only
    ('{"num_steps": "18"}', "num_steps"),
    ('{"num_steps": true}', "num_steps"),
    ('{"count": 2.0}', "count"),
    ('{"seeds": [1.0]}', "seeds"),
    ('{"start": false}', "start"),
    ('{"class_label": 3.0}', "class_label"),
    ('{"class_label": true}', "class_label"),
    ('{"sigma_min": true}', "sigma_min"),   # number fields: integers or floats, never booleans or strings
    ('{"rho": "7"}', "rho"),
    ('{"S_churn": false}', "S_churn"),
    ('{"S_noise": 1e400}', "S_noise"),
    ('{"sigma_min": 1e-06}', "sigma_min"),  # the published bounds (model/numerics.py)
    ('{"sigma_max": 100000.5}', "sigma_max"),
    ('{"rho": 0.05}', "rho"),
    ('{"rho": 101}', "rho"),
    ('{"S_noise": 10.5}', "S_noise"),
    ('{"model": "' + "m" * 257 + '"}', "model"),
    ('{"class_label": "' + "x" * 257 + '"}', "class_label"),
])
def test_numbers_follow_one_rule_per_kind_and_the_published_bounds(body: str, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate_json(body)
    assert caught.value.errors()[0]["loc"][0] == field


def test_number_fields_take_integers_and_keep_floats() -> None:
    req = GenerateRequest.model_validate_json('{"rho": 7, "sigma_min": 1, "S_max": 50, "num_steps": 20}')
    assert req.rho == 7.0 and isinstance(req.rho, float) and isinstance(req.sigma_min, float)
    assert req.sampler() == SamplerParams(rho=7.0, sigma_min=1.0, S_max=50.0, num_steps=20)


@pytest.mark.parametrize(("settings", "field"), [
    ({"sigma_min": 90.0}, "sigma_min"),       # above the EDM sampler's default sigma_max (80): steps would go up
    ({"sigma_max": 0.001}, "sigma_max"),      # below its default sigma_min
    ({"rho": 0.2}, "rho"),                    # 80^5 + (0.002^5 - 80^5) = 0 in float64: a zero last step
    ({"discretization": "iddpm", "sigma_min": 95.0, "sigma_max": 100.0}, "sigma_min"),  # no iDDPM level there
    ({"discretization": "iddpm", "sigma_min": 1.0, "sigma_max": 1.2, "num_steps": 100}, "num_steps"),
    ({"schedule": "vp", "sigma_min": 1e-5, "sigma_max": 1e-5 * (1 + 1e-12)}, "schedule"),
])
def test_settings_the_sampler_cannot_compute_are_refused_naming_the_field(settings: dict, field: str) -> None:
    with pytest.raises(Problem) as caught:
        resolve(GenerateRequest(**settings), "edm", EDM_CARD, max_images=4, max_steps=1000)
    assert caught.value.status == 422 and caught.value.field == field, caught.value.detail
    assert caught.value.detail.startswith(f"{field}: ")


def test_sigma_min_alone_is_checked_against_the_discretizations_default_sigma_max() -> None:
    assert run(sigma_min=50.0).sampler.sigma_min == 50.0  # below 80: fine
    with pytest.raises(Problem, match="effective sigma_max 80"):
        resolve(GenerateRequest(sigma_min=90.0), "edm", EDM_CARD, max_images=4, max_steps=1000)
    spec = resolve(GenerateRequest(sigma_min=90.0, discretization="ve"), "edm", EDM_CARD, max_images=4,
                   max_steps=1000)  # VE's default sigma_max is 100
    assert spec.sampler.sigma_min == 90.0


def test_long_class_labels_give_a_bounded_422() -> None:
    for digits in (11, 256):  # longer strings are the schema's (at most 256 characters)
        with pytest.raises(Problem) as caught:
            run(class_label="1" * digits)
        assert caught.value.status == 422 and caught.value.field == "class_label"
        assert len(caught.value.detail) < 200, caught.value.detail
    with pytest.raises(ValidationError):
        GenerateRequest(class_label="1" * 4301)
    with pytest.raises(Problem) as caught:
        run(class_label=10 ** 4000)
    assert len(caught.value.detail) < 200
    assert field_of(class_label="07") == "class_label"  # an index is written in its one decimal form
    assert field_of(class_label=" 7") == "class_label"
    assert run(class_label="7").class_labels == [7]


def test_idempotency_key_rule() -> None:
    assert check_idempotency_key(None) is None
    assert check_idempotency_key("order-1") == "order-1" and check_idempotency_key("a b") == "a b"
    for bad in ("", " a", "a ", "x" * 256, "caf\u00e9", "a\x00b", "a\tb"):
        with pytest.raises(Problem) as caught:
            check_idempotency_key(bad)
        assert caught.value.status == 422 and caught.value.field == "Idempotency-Key"


def test_job_ids_have_one_form() -> None:
    for _ in range(200):
        job_id = new_job_id()
        assert known_job_id(job_id) == job_id
    for bad in ("not-a-job", new_job_id() + "x", new_job_id()[:-1] + "=", "x" * 5000):
        with pytest.raises(Problem) as caught:
            known_job_id(bad)
        assert caught.value.status == 404 and len(caught.value.detail) < 200
