"""generate(): per-seed determinism, batch invariance, label order, cancellation."""

import numpy as np
import pytest
import torch

from model.generate import PassSizes, generate
from model.images import decode_png, encode_png
from model.precond import EDMPrecond
from model.samplers import SamplerSettings

TINY_KWARGS = dict(img_resolution=8, img_channels=1, label_dim=10, model_type="SongUNet", model_channels=16,
                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def tiny_net(label_dim=10, seed=0):
    """A small random DDPM++-style network with all weights perturbed (zero-init layers would make F = 0)."""
    torch.manual_seed(seed)
    net = EDMPrecond(**{**TINY_KWARGS, "label_dim": label_dim})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def net():
    return tiny_net()


def pngs(images):
    return {img.seed: encode_png(img.pixels) for img in images}


STOCHASTIC = SamplerSettings(num_steps=6, S_churn=20, S_min=0.01, S_max=50, S_noise=1.003)


@pytest.mark.parametrize("settings", [SamplerSettings(num_steps=6), STOCHASTIC], ids=["deterministic", "churn"])
def test_images_do_not_depend_on_batch_composition(net, settings):
    seeds = list(range(8))
    labels = [None, 3, None, 7, 0, None, 9, 1]
    full = pngs(generate(net, seeds, labels, settings))
    for size in (1, 3):
        for start in range(0, 8, size):
            part = pngs(generate(net, seeds[start:start + size], labels[start:start + size], settings))
            assert all(full[s] == part[s] for s in part), f"batch size {size} changed an image"
    mixed_seeds = [100, 5, 101, 2, 102]
    mixed_labels = [4, labels[5], 2, labels[2], None]
    mixed = pngs(generate(net, mixed_seeds, mixed_labels, settings))
    assert mixed[5] == full[5] and mixed[2] == full[2]


def test_random_label_is_drawn_from_the_seed(net):
    first = generate(net, [11, 12, 13], None, SamplerSettings(num_steps=3))
    again = generate(net, [13, 11], None, SamplerSettings(num_steps=3))
    assert {i.seed: i.class_label for i in first}[13] == again[0].class_label
    assert {i.seed: i.class_label for i in first}[11] == again[1].class_label
    assert all(0 <= i.class_label < 10 for i in first)


def test_given_class_keeps_the_noise_stream(net):
    # The random label is drawn even when a class is given, so the churn noise afterwards is the same
    # stream: with the drawn class given explicitly, the image is the same as with no class.
    free = generate(net, [21], None, STOCHASTIC)[0]
    fixed = generate(net, [21], [free.class_label], STOCHASTIC)[0]
    assert np.array_equal(free.pixels, fixed.pixels)


def test_class_label_changes_the_image(net):
    a = generate(net, [5], [1], SamplerSettings(num_steps=4))[0]
    b = generate(net, [5], [2], SamplerSettings(num_steps=4))[0]
    assert not np.array_equal(a.pixels, b.pixels)


def test_bad_class_labels(net):
    with pytest.raises(ValueError, match="class_label"):
        generate(net, [0], [10], SamplerSettings(num_steps=3))
    with pytest.raises(ValueError, match="class_label"):
        generate(tiny_net(label_dim=0), [0], [1], SamplerSettings(num_steps=3))


def test_on_eval_reports_every_evaluation(net):
    events = []

    def on_eval(ev):
        events.append((ev.step, ev.nfe, ev.nfe_total, tuple(ev.rows), ev.x0.shape[0]))

    images = generate(net, [1, 2, 3], [0, 0, 0], SamplerSettings(num_steps=4), on_eval=on_eval)
    assert [e[1] for e in events] == list(range(1, 8)) and all(e[2] == 7 for e in events)
    assert [e[0] for e in events] == [0, 0, 1, 1, 2, 2, 3]
    assert all(e[3] == (0, 1, 2) and e[4] == 3 for e in events)
    assert [image.seed for image in images] == [1, 2, 3]


def test_non_finite_results_are_refused(net):
    with pytest.raises(ValueError, match="non-finite"):
        generate(net, [0], [0], SamplerSettings(num_steps=3, sigma_max=1e30))


def test_png_round_trip_and_grayscale(net):
    image = generate(net, [0], [0], SamplerSettings(num_steps=3))[0]
    data = encode_png(image.pixels, {"seed": "0"})
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(decode_png(data), image.pixels) and image.pixels.shape == (8, 8, 1)


def test_fixed_pass_sizes_keep_images_independent_of_the_batch(net):
    # Every pass padded to 8 rows (the shape of a CUDA pass): the padding changes no image.
    seeds = list(range(7))
    full = pngs(generate(net, seeds, None, STOCHASTIC, pass_sizes=PassSizes((8,))))
    for part_seeds in ([3], [6, 0, 2], [5, 4, 1, 3, 0]):
        part = pngs(generate(net, part_seeds, None, STOCHASTIC, pass_sizes=PassSizes((8,))))
        assert all(part[s] == full[s] for s in part_seeds)
    assert full == pngs(generate(net, seeds, None, STOCHASTIC))


def test_more_seeds_than_one_pass(net):
    seeds = list(range(10))
    capped = pngs(generate(net, seeds, None, STOCHASTIC, pass_sizes=PassSizes((4,))))
    assert capped == pngs(generate(net, seeds, None, STOCHASTIC))
