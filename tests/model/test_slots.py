"""The slot engine: exactness whatever shares a pass, fairness, cancellation, failure isolation."""

import random

import numpy as np
import pytest
import torch

from model.generate import generate
from model.images import encode_png
from model.precond import EDMPrecond, VEPrecond, iDDPMPrecond
from model.samplers import SamplerSettings
from model.slots import GroupFailed, PassSizes, SlotEngine, cohorts_of
from tests.model.test_generate import TINY_KWARGS, tiny_net

ADM_KWARGS = dict(img_resolution=8, img_channels=1, model_type="DhariwalUNet", model_channels=32, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], dropout=0.0)
NCSN_KWARGS = {**TINY_KWARGS, "embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "standard",
               "resample_filter": [1, 3, 3, 1]}


def randomized(net):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)


NETS = {
    "ddpm-cond": lambda: tiny_net(label_dim=10),
    "ddpm-uncond": lambda: tiny_net(label_dim=0),
    "ncsn-uncond": lambda: randomized(VEPrecond(**{**NCSN_KWARGS, "label_dim": 0})),
    "adm-cond": lambda: randomized(iDDPMPrecond(**ADM_KWARGS, label_dim=10)),
    "adm-uncond": lambda: randomized(EDMPrecond(**ADM_KWARGS, label_dim=0)),
}

SETTINGS = [
    SamplerSettings(num_steps=5),
    SamplerSettings(num_steps=7),
    SamplerSettings(num_steps=4, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003),
    SamplerSettings(num_steps=6, solver="euler"),
    SamplerSettings(num_steps=5, solver="euler", discretization="vp", schedule="vp", scaling="vp"),
    SamplerSettings(num_steps=5, solver="euler", discretization="ve", schedule="ve", scaling="none"),
    SamplerSettings(num_steps=4, solver="heun", discretization="iddpm", schedule="linear", scaling="none"),
    SamplerSettings(num_steps=3, sigma_min=0.01, sigma_max=20, rho=3),
]


@pytest.mark.parametrize("name", list(NETS))
def test_row_numbers_do_not_depend_on_the_pass(name):
    """Float-level: a row's D(x; sigma) is the same bits whether its pass holds one noise level (the
    reference's call, a scalar sigma) or many, and at every pass size the engine uses."""
    net = NETS[name]()
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64) * 2
    levels = torch.tensor([0.02, 0.5, 3.0, 40.0], dtype=torch.float64)
    sigma = levels[torch.arange(16) % 4]
    labels = torch.eye(10)[torch.arange(16) % 10] if net.label_dim else None
    mixed = net(x, sigma, labels)
    for level in range(4):
        rows = (torch.arange(16) % 4 == level).nonzero().flatten()
        alone = net(x[rows], levels[level], None if labels is None else labels[rows])  # the reference's call
        assert torch.equal(alone, mixed[rows]), f"level {level}"
    for size in (4, 5, 8, 12):
        parts = [net(x[s:s + size], sigma[s:s + size], None if labels is None else labels[s:s + size])
                 for s in range(0, 16 - size + 1, size)]
        got = torch.cat(parts)
        assert torch.equal(got, mixed[:len(got)]), f"pass of {size} rows"


def solo_png(net, seed, label, settings):
    return encode_png(generate(net, [seed], [label], settings)[0].pixels)


@pytest.mark.parametrize("name", ["ddpm-cond", "ddpm-uncond", "adm-cond"])
def test_mixed_traffic_is_byte_identical_to_solo_runs(name):
    """Random arrivals, settings, cohort sizes, cancellations and a small pass limit (so passes carry
    different subsets): every finished image equals `generate()` of its seed alone."""
    net = NETS[name]()
    rng = random.Random(7)
    engine = SlotEngine(net, capacity=12, max_pass_rows=6)
    jobs, finished, cancelled = {}, {}, set()
    next_job = 0
    for turn in range(400):
        if next_job < 14 and engine.free_rows and rng.random() < 0.5:
            count = rng.randint(1, min(3, engine.free_rows))
            seeds = [rng.randrange(1 << 32) for _ in range(count)]
            labels = [rng.choice([None, rng.randrange(10)]) if net.label_dim else None for _ in range(count)]
            settings = rng.choice(SETTINGS)
            engine.admit(next_job, list(range(count)), seeds, labels, settings)
            jobs[next_job] = (seeds, labels, settings)
            next_job += 1
        if engine.groups() and (turn in (5, 20) or rng.random() < 0.03):
            victim = rng.choice(engine.groups())
            assert engine.cancel(victim) > 0
            cancelled.add(victim)
        report = engine.step()
        assert not report.failed
        assert report.rows_used <= 6
        for image in report.finished:
            finished[(image.group, image.key)] = image
        if next_job >= 14 and not engine.occupied:
            break
    assert not engine.occupied and next_job == 14
    assert cancelled and len(finished) >= 10
    for (job, k), image in finished.items():
        assert job not in cancelled
        seeds, labels, settings = jobs[job]
        assert image.seed == seeds[k]
        assert encode_png(image.pixels) == solo_png(net, seeds[k], labels[k], settings), (job, k)


def test_generate_matches_engine_cohorts_of_any_size():
    net = tiny_net()
    seeds, labels = list(range(10)), [None, 1, 2, None, 4, 5, None, 7, 8, 9]
    whole = generate(net, seeds, labels, SETTINGS[2])
    engine = SlotEngine(net, capacity=10, max_pass_rows=10)
    for rows in cohorts_of(10, 3):
        engine.admit("job", list(rows), [seeds[k] for k in rows], [labels[k] for k in rows], SETTINGS[2])
    out = {}
    while engine.occupied:
        for image in engine.step().finished:
            out[image.key] = image
    assert all(np.array_equal(out[k].pixels, whole[k].pixels) for k in range(10))


def test_fair_share_evaluates_a_small_group_on_every_pass():
    net = tiny_net()
    engine = SlotEngine(net, capacity=40, max_pass_rows=8)
    for rows in cohorts_of(32, 4):
        engine.admit("big", list(rows), [100 + k for k in rows], [None] * len(rows), SamplerSettings(num_steps=30))
    engine.step()
    engine.admit("small", [0], [5], [3], SamplerSettings(num_steps=4))
    passes = 0
    while engine.rows_of("small"):
        report = engine.step()
        passes += 1
        assert "small" in {ev.group for ev in report.evaluated}, "the small job waited a pass"
        assert report.rows_used <= 8 and report.waiting_rows == engine.occupied - report.rows_used
    assert passes == SamplerSettings(num_steps=4).nfe_total
    # the big group got the rest of every pass, its cohorts in turn
    assert engine.rows_of("big") == 32


def test_cancel_frees_rows_at_once():
    net = tiny_net()
    engine = SlotEngine(net, capacity=6)
    engine.admit("a", [0, 1, 2], [1, 2, 3], [None] * 3, SamplerSettings(num_steps=5))
    engine.admit("b", [0, 1], [4, 5], [None] * 2, SamplerSettings(num_steps=5))
    engine.step()
    assert engine.free_rows == 1
    assert engine.cancel("a") == 3
    assert engine.free_rows == 4
    report = engine.step()
    assert {ev.group for ev in report.evaluated} == {"b"} and report.rows_used == 2


def test_admission_checks():
    net = tiny_net()
    engine = SlotEngine(net, capacity=4, max_pass_rows=3)
    with pytest.raises(ValueError, match="exceeds a pass of 3 rows"):
        engine.admit("a", list(range(4)), list(range(4)), [None] * 4, SamplerSettings())
    engine.admit("b", [0, 1, 2], [0, 1, 2], [None] * 3, SamplerSettings())
    with pytest.raises(ValueError, match="free rows"):
        engine.admit("a", [0, 1], [0, 1], [None] * 2, SamplerSettings())
    engine.cancel("b")
    with pytest.raises(ValueError, match="class_label"):
        engine.admit("a", [0], [0], [10], SamplerSettings())
    with pytest.raises(ValueError, match="num_steps"):
        engine.admit("a", [0], [0], [None], SamplerSettings(num_steps=1))
    assert engine.occupied == 0


class FailsOnLabel(torch.nn.Module):
    """A network that raises whenever class 7 is in its batch: an error attributable to one job's rows."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.label_dim, self.img_channels, self.img_resolution = net.label_dim, net.img_channels, net.img_resolution
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, labels):
        if labels is not None and bool(labels[:, 7].any()):
            raise RuntimeError("class 7 breaks this network")
        return self.net(x, sigma, labels)


def test_a_failing_group_fails_alone():
    net = FailsOnLabel(tiny_net())
    engine = SlotEngine(net, capacity=8)
    engine.admit("good", [0, 1], [1, 2], [1, 2], SamplerSettings(num_steps=3))
    engine.admit("bad", [0], [3], [7], SamplerSettings(num_steps=3))
    report = engine.step()
    assert set(report.failed) == {"bad"} and "class 7" in str(report.failed["bad"])
    assert engine.groups() == ["good"]
    finished = []
    while engine.occupied:
        finished += engine.step().finished
    reference = generate(tiny_net(), [1, 2], [1, 2], SamplerSettings(num_steps=3))
    assert [f.pixels.tobytes() for f in finished] == [r.pixels.tobytes() for r in reference]


def test_non_finite_images_fail_their_group():
    net = tiny_net()
    engine = SlotEngine(net, capacity=4)
    engine.admit("huge", [0], [1], [None], SamplerSettings(num_steps=3, sigma_max=1e30))
    engine.admit("fine", [0], [1], [None], SamplerSettings(num_steps=3))
    failed, finished = {}, []
    while engine.occupied:
        report = engine.step()
        failed.update(report.failed)
        finished += report.finished
    assert isinstance(failed["huge"], GroupFailed) and "non-finite" in str(failed["huge"])
    assert [f.group for f in finished] == ["fine"]


def test_pass_sizes():
    assert PassSizes().rows_for(1) == 4 and PassSizes().rows_for(9) == 9
    cuda = PassSizes.for_device(torch.device("cuda"), 64)
    assert cuda.sizes == (8, 16, 32, 64) and cuda.rows_for(1) == 8 and cuda.rows_for(17) == 32
    with pytest.raises(ValueError):
        cuda.rows_for(65)
    assert PassSizes.parse("2+") == PassSizes(min_rows=2) and PassSizes.parse("16,8").sizes == (8, 16)
    engine = SlotEngine(tiny_net(), capacity=3, pass_sizes=PassSizes((8,)))
    engine.admit("a", [0], [1], [None], SamplerSettings(num_steps=3))
    report = engine.step()
    assert (report.rows_used, report.rows_padded) == (1, 7)


def test_a_cohort_shared_by_groups_sheds_a_cancelled_group():
    """Jobs with equal settings admitted together share one sampler coroutine; cancelling one frees its
    rows at once and changes nothing for the others."""
    net = tiny_net()
    settings = SETTINGS[2]
    engine = SlotEngine(net, capacity=6)
    engine.admit_rows(["a", "b", "a", "c"], [0, 0, 1, 0], [11, 12, 13, 14], [1, 2, 3, None], settings)
    engine.step()
    assert engine.cancel("a") == 2 and engine.occupied == 2 and engine.free_rows == 4
    report = engine.step()
    assert report.rows_used == 2 and {ev.group for ev in report.evaluated} == {"b", "c"}
    finished = {}
    while engine.occupied:
        finished.update({image.group: image for image in engine.step().finished})
    assert set(finished) == {"b", "c"}
    assert encode_png(finished["b"].pixels) == solo_png(net, 12, 2, settings)
    assert encode_png(finished["c"].pixels) == solo_png(net, 14, finished["c"].class_label, settings)


def test_a_failing_group_in_a_shared_cohort_fails_alone():
    net = FailsOnLabel(tiny_net())
    engine = SlotEngine(net, capacity=8)
    engine.admit_rows(["good", "bad", "good"], [0, 0, 1], [1, 3, 2], [1, 7, 2], SamplerSettings(num_steps=3))
    report = engine.step()
    assert set(report.failed) == {"bad"} and engine.groups() == ["good"]
    finished = []
    while engine.occupied:
        finished += engine.step().finished
    reference = generate(tiny_net(), [1, 2], [1, 2], SamplerSettings(num_steps=3))
    assert [f.pixels.tobytes() for f in finished] == [r.pixels.tobytes() for r in reference]
