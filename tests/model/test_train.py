"""Training: the losses' weights and noise distributions, augmentation, exact resume, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from model.data import ImageDataset, load_digits_dataset, load_png_folder
from model.train import AugmentPipe, EDMLoss, TrainConfig, Trainer, VELoss, VPLoss, validation_loss

TINY = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
        "channel_mult_emb": 1, "dropout": 0.1}


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_digits_dataset()


def test_digits_are_scaled_to_minus_one_one(digits: ImageDataset) -> None:
    assert digits.images.shape == (1797, 1, 8, 8)
    assert float(digits.images.min()) == -1.0 and float(digits.images.max()) == 1.0
    assert digits.class_names == [str(k) for k in range(10)]
    assert digits.labels is not None
    assert torch.bincount(digits.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


class _Zero(torch.nn.Module):
    """D(x; sigma) = 0, recording the sigmas it was called with."""

    def forward(self, x, sigma, labels=None, **kwargs):
        self.sigma = sigma.flatten()
        return torch.zeros_like(x)


@pytest.mark.parametrize("loss_fn", [EDMLoss(), EDMLoss(sigma_data=0.8), VPLoss(), VELoss()],
                         ids=["edm", "edm-sd0.8", "vp", "ve"])
def test_loss_weight_is_the_formula(loss_fn, monkeypatch) -> None:
    sigmas = torch.tensor([0.002, 0.05, 0.5, 1.0, 3.0, 80.0])
    if isinstance(loss_fn, EDMLoss):
        sd = loss_fn.sigma_data
        expected = [(s ** 2 + sd ** 2) / (s * sd) ** 2 for s in sigmas.tolist()]
    else:
        expected = [1 / s ** 2 for s in sigmas.tolist()]
    assert loss_fn.weight(sigmas).tolist() == pytest.approx(expected, rel=1e-6)

    # Through the whole loss: with D = 0 the per-pixel loss is lambda(sigma) * y^2.
    monkeypatch.setattr(type(loss_fn), "sample_sigma", lambda self, n, device: sigmas[:n])
    y = torch.full([len(sigmas), 1, 2, 2], 0.5)
    net = _Zero()
    loss = loss_fn(net, y)
    assert net.sigma.tolist() == pytest.approx(sigmas.tolist())
    assert loss[:, 0, 0, 0].tolist() == pytest.approx([0.25 * w for w in expected], rel=1e-6)


def test_noise_distributions() -> None:
    torch.manual_seed(0)
    log_sigma = EDMLoss().sample_sigma(200_000, torch.device("cpu")).log()
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.01)
    assert float(log_sigma.std()) == pytest.approx(1.2, abs=0.01)

    ve = VELoss().sample_sigma(200_000, torch.device("cpu"))
    assert 0.02 <= float(ve.min()) and float(ve.max()) <= 100
    u = (ve.log() - math.log(0.02)) / (math.log(100) - math.log(0.02))  # uniform in [0, 1]
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005) and float(u.var()) == pytest.approx(1 / 12, abs=0.002)

    vp = VPLoss()
    t = vp.sample_sigma(200_000, torch.device("cpu"))
    lo, hi = float(vp.sigma(torch.tensor(1e-5))), float(vp.sigma(torch.tensor(1.0)))
    assert lo <= float(t.min()) and float(t.max()) <= hi
    # sigma^-1 of the draws is uniform on (eps_t, 1)
    inv = ((0.1 ** 2 + 2 * 19.9 * (1 + t ** 2).log()).sqrt() - 0.1) / 19.9
    assert float(inv.mean()) == pytest.approx(0.5, abs=0.005)


def test_augmentation_is_exact_and_labelled(digits: ImageDataset) -> None:
    images = digits.images[:64]
    torch.manual_seed(0)
    same, labels = AugmentPipe(["xflip", "translate", "scale", "rotate"], p=0.0)(images)
    assert torch.equal(same, images) and labels.shape == (64, 1 + 2 + 1 + 2) and not labels.any()

    flipped, labels = AugmentPipe(["xflip"], p=1.0)(images)
    assert torch.equal(flipped, images.flip(3)) and bool((labels == 1).all())

    torch.manual_seed(1)
    moved, labels = AugmentPipe(["translate"], p=1.0)(images)
    for k in range(len(images)):  # whole-pixel shifts, reflected at the border
        dx, dy = (labels[k] * 8).round().long().tolist()
        if dx == 0 and dy == 0:
            assert torch.equal(moved[k], images[k])
        else:
            inner = moved[k, :, max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)]
            source = images[k, :, max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)]
            torch.testing.assert_close(inner, source, atol=1e-5, rtol=0)
    assert set(labels.flatten().mul(8).round().tolist()) <= {-1.0, 0.0, 1.0}

    with pytest.raises(ValueError, match="unknown augmentation"):
        AugmentPipe(["mixup"])


def _tiny_config(**overrides) -> TrainConfig:
    base = dict(network=dict(TINY), batch_size=32, total_steps=40, lr=2e-3, lr_rampup_kimg=0.0,
                ema_halflife_kimg=0.5, seed=3)
    return TrainConfig(**{**base, **overrides})


def test_short_training_lowers_the_loss(digits: ImageDataset) -> None:
    trainer = Trainer(_tiny_config(), digits)
    before = validation_loss(trainer.net, trainer.loss_fn, digits)
    trainer.run()
    after_net = validation_loss(trainer.net, trainer.loss_fn, digits)
    after_ema = validation_loss(trainer.ema, trainer.loss_fn, digits)
    assert trainer.step == 40
    assert after_net < 0.8 * before, (before, after_net)
    assert after_ema < 0.9 * before, (before, after_ema)


def test_resume_continues_bit_exactly(digits: ImageDataset, tmp_path) -> None:
    # Dropout and augmentation on: both draw from the RNG whose state the checkpoint must carry.
    config = _tiny_config(total_steps=8, augment=["translate", "rotate"], augment_p=0.5)
    straight = Trainer(config, digits)
    straight.run()

    first = Trainer(config, digits)
    first.run(4, checkpoint_path=tmp_path / "state.pt")
    torch.manual_seed(999)  # whatever happens in between must not matter
    resumed = Trainer(config, digits)
    resumed.load_checkpoint(tmp_path / "state.pt")
    assert resumed.step == 4
    resumed.run()

    assert resumed.step == straight.step == 8
    for which in ("net", "ema"):
        a, b = getattr(straight, which).state_dict(), getattr(resumed, which).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{which}.{key} differs after resume"
    a_opt, b_opt = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(a_opt[k]["exp_avg_sq"], b_opt[k]["exp_avg_sq"]) for k in a_opt)

    other = Trainer(_tiny_config(total_steps=8, lr=1e-3), digits)
    with pytest.raises(ValueError, match="different settings"):
        other.load_checkpoint(tmp_path / "state.pt")


def test_png_folder_loader(tmp_path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    for k in range(5):
        Image.fromarray(pixels[k]).save(tmp_path / f"img{k}.png")
    (tmp_path / "labels.txt").write_text("# file,label\n" + "".join(f"img{k}.png,{'cat' if k % 2 else 'dog'}\n"
                                                                    for k in range(5)))
    data = load_png_folder(tmp_path, tmp_path / "labels.txt")
    assert data.images.shape == (5, 1, 4, 4)
    torch.testing.assert_close(data.images[:, 0], torch.from_numpy(pixels).float() / 127.5 - 1)
    assert data.labels is not None
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [1, 0, 1, 0, 1]

    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[f"img{k}.png", k % 3] for k in range(5)]}))
    data = load_png_folder(tmp_path, tmp_path / "dataset.json")
    assert data.labels is not None
    assert data.class_names == ["0", "1", "2"] and data.labels.tolist() == [0, 1, 2, 0, 1]
    assert load_png_folder(tmp_path).labels is None

    (tmp_path / "bad.txt").write_text("img0.png,1\n")
    with pytest.raises(ValueError, match="no label"):
        load_png_folder(tmp_path, tmp_path / "bad.txt")


def test_train_cli_writes_a_loadable_card_and_resumes(tmp_path, capsys) -> None:
    from model.checkpoint import load_model
    from model.train_cli import main

    out = tmp_path / "m.json"
    args = ["--data", "digits", "--outdir", str(tmp_path / "run"), "--out", str(out), "--batch", "16",
            "--channels", "16", "--blocks", "1", "--attn", "", "--emb_mult", "1", "--threads", "1"]
    assert main([*args, "--steps", "3", "--checkpoint_every", "2"]) == 0
    assert main([*args, "--steps", "3"]) == 2  # the run exists: refuses to overwrite it
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--steps", "5", "--resume"]) == 0

    loaded = load_model(out)
    card = loaded.card
    assert card.preconditioner == "EDMPrecond" and card.label_dim == 10 and card.class_names == list("0123456789")
    assert card.provenance["steps"] == 5 and card.provenance["images_seen"] == 80
    first, second = card.provenance["command"].split(" && ")  # both sessions: re-running them reproduces it
    assert first.startswith("edm-serve train --data digits") and second.endswith("--steps 5 --resume")
    assert [(s["from_step"], s["to_step"]) for s in card.provenance["sessions"]] == [(0, 3), (3, 5)]
    assert card.provenance["data"]["name"] == "sklearn.datasets.load_digits"
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 5
    with torch.no_grad():
        out_x = loaded.net(torch.zeros(2, 1, 8, 8), torch.tensor(1.0), torch.eye(10)[:2])
    assert out_x.shape == (2, 1, 8, 8) and bool(torch.isfinite(out_x).all())


@pytest.mark.parametrize("loss", ["vp", "ve"])
def test_vp_ve_losses_train_and_save_their_preconditioners(digits: ImageDataset, loss: str, tmp_path) -> None:
    from model.checkpoint import load_model, save_model

    trainer = Trainer(_tiny_config(loss=loss, total_steps=2), digits)
    trainer.run()
    assert type(trainer.net).__name__ == {"vp": "VPPrecond", "ve": "VEPrecond"}[loss]
    save_model(trainer.ema, tmp_path / "m.json", name="m", init_kwargs=trainer.precond_init_kwargs)
    loaded = load_model(tmp_path / "m.json")
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.eye(10)[:3]
    with torch.no_grad():
        assert torch.equal(loaded.net(x, sigma, labels), trainer.ema(x, sigma, labels))
