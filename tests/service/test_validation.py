"""Requests resolved against a model card (pure: no Redis, no HTTP)."""

from __future__ import annotations

import pytest

from contract.jobs import JobSpec, SamplerParams
from contract.settings import parse_models
from model.card import ModelCard
from service.errors import Problem
from service.schemas import GenerateRequest
from service.settings import GatewaySettings
from service.validation import resolve

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
