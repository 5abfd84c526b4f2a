"""Evaluation: the Fréchet distance, the digit classifier, and loose quality floors for the bundled
model (the full bars are measured by `edm-serve eval`, see the model card)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.bundled import DEFAULT_MODEL
from model.evaluate import (
    Classifier,
    evaluate_run,
    frechet_distance,
    gaussian_stats,
    reference_stats,
    settings_for,
    train_classifier,
)


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    s1 = a @ a.T + 0.1 * np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0, abs=1e-9)
    # Diagonal covariances: sum (sqrt(v1) - sqrt(v2))^2 plus the squared mean difference.
    v1, v2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = 4.0 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu, np.diag(v1), mu + np.array([2, 0, 0, 0, 0, 0]), np.diag(v2)) == pytest.approx(expected)
    # General case against scipy's matrix square root.
    from scipy.linalg import sqrtm

    b = rng.normal(size=(6, 6))
    s2 = b @ b.T + 0.1 * np.eye(6)
    reference = np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(reference, rel=1e-8)


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return train_classifier()


def test_classifier_heldout_accuracy(classifier: Classifier) -> None:
    assert classifier.test_size == 450 and classifier.train_size == 1347
    assert classifier.heldout_accuracy >= 0.97


@pytest.fixture(scope="module")
def bundled():
    from model.checkpoint import load_model

    return load_model(DEFAULT_MODEL)


def test_bundled_card(bundled) -> None:
    card = bundled.card
    assert (card.img_resolution, card.img_channels, card.label_dim) == (8, 1, 10)
    assert card.class_names == [str(k) for k in range(10)]
    assert 200_000 <= card.parameters <= 1_000_000
    assert card.provenance["command"].startswith("edm-serve train --data digits")
    assert card.provenance["steps"] > 0 and card.provenance["wall_time_s"] > 0
    assert card.quality and card.quality["bars"]


def test_bundled_model_quality_floors(bundled, classifier: Classifier) -> None:
    """100 samples (10 per class) at 35 NFE: far above chance and near the real data. A broken or
    untrained network lands at ~10% accuracy and FDs in the hundreds."""
    reference = reference_stats(classifier)
    result = evaluate_run(bundled.net, classifier, reference, "EDM", settings_for("EDM", 35), num_samples=100)
    assert result.nfe == 35
    assert result.accuracy >= 0.8, result.accuracy
    assert result.fd < 20, result.fd
    assert float(result.images.min()) >= -1 and float(result.images.max()) <= 1

    # The same seeds from the sample features alone: real digits sit far closer than noise does.
    _, noise_features = classifier(torch.rand(100, 1, 8, 8) * 2 - 1)
    assert frechet_distance(*reference, *gaussian_stats(noise_features)) > 5 * result.fd


def test_sample_cli_is_byte_identical_run_to_run(tmp_path) -> None:
    from model.cli import sample_main
    from model.images import decode_png

    for run in ("a", "b"):
        assert sample_main(["--model", str(DEFAULT_MODEL), "--seeds", "0-11", "--outdir", str(tmp_path / run),
                            "--device", "cpu"]) == 0
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"{seed:06d}.png" for seed in range(12)]
    for name in names:
        first, second = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert first == second, name
        assert decode_png(first).shape == (8, 8, 1)


def test_eval_cli_writes_a_self_describing_report(tmp_path, classifier: Classifier, monkeypatch) -> None:
    import model.evaluate
    from model.eval_cli import main

    monkeypatch.setattr(model.evaluate, "train_classifier", lambda **kwargs: classifier)
    assert main(["--samples", "20", "--steps", "5", "--sweep", "full", "--presets", "VE,EDM", "--nfe", "5,9",
                 "--grid_seeds", "2", "--outdir", str(tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model"]["name"] == "edm-digits-8x8-cond"
    assert report["classifier"]["heldout_accuracy"] == classifier.heldout_accuracy
    assert report["main"]["nfe"] == 9 and report["main"]["solver"] == "heun"
    assert {(r["name"], r["nfe"]) for r in report["results"]} == {("VE", 5), ("VE", 9), ("EDM", 5), ("EDM", 9)}
    ve5 = next(r for r in report["results"] if (r["name"], r["nfe"]) == ("VE", 5))
    assert (ve5["solver"], ve5["discretization"], ve5["schedule"], ve5["scaling"]) == ("euler", "ve", "ve", "none")
    assert report["fd_table"]["EDM"]["9"] == report["main"]["fd"]  # identical settings: sampled once
    assert report["png_identical_run_to_run"] is True
    assert (tmp_path / "grid.png").stat().st_size > 0 and (tmp_path / "fd_vs_nfe.png").stat().st_size > 0
