"""The engine: a batch of several jobs gives each job the images it would get alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from contract.jobs import JobSpec, SamplerParams
from model.checkpoint import load_model
from model.generate import SamplerSettings, generate
from model.images import decode_png, read_png_text
from worker.batcher import Claimed, plan_batch
from worker.engine import Engine


def claimed(job_id: str, seeds: list[int], labels: list[int | None]) -> Claimed:
    spec = JobSpec(model="tiny", seeds=seeds, class_labels=labels, sampler=SamplerParams(num_steps=4))
    return Claimed(job_id, spec, created_at=0.0)


def test_batched_images_equal_single_runs_and_carry_metadata(tiny_model: Path) -> None:
    engine = Engine("cpu", "auto")
    engine.load("tiny", tiny_model)
    a, b = claimed("a", [3, 4], [1, None]), claimed("b", [5], [7])
    images = engine.run(plan_batch([a, b], 8).batch)
    net = load_model(tiny_model).net
    alone = generate(net, [3, 4], [1, None], SamplerSettings(num_steps=4)) + generate(
        net, [5], [7], SamplerSettings(num_steps=4))
    for got, want in zip(images, alone, strict=True):
        assert got is not None and want is not None
        assert got.seed == want.seed and got.class_label == want.class_label
        np.testing.assert_array_equal(got.pixels, want.pixels)
    data, text = engine.encode(a.spec, images[0])
    assert read_png_text(data) == text
    np.testing.assert_array_equal(decode_png(data), images[0].pixels)
    assert text["edm:model"] == "tiny" and text["edm:seed"] == "3" and text["edm:class_label"] == "1"
    assert text["edm:class_name"] == "1" and text["edm:num_steps"] == "4" and text["edm:S_max"] == "inf"
    assert text["edm:weights_sha256"] == engine.models["tiny"].card.weights_sha256
    assert text["edm:dtype"] == "fp32" and text["Software"].startswith("edm-serve ")
    assert engine.encode(a.spec, images[0])[0] == data  # deterministic bytes


def test_check_refuses_what_cannot_run(tiny_model: Path) -> None:
    engine = Engine("cpu", "auto")
    engine.load("tiny", tiny_model)
    assert engine.check(claimed("a", [1], [3]).spec) is None
    assert "class_label" in engine.check(claimed("a", [1], [12]).spec)
    other = JobSpec(model="nope", seeds=[1], class_labels=[None])
    assert "not loaded" in engine.check(other)
