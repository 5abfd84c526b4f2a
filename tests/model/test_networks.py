"""model/networks.py: checkpoint compatibility with the official EDM networks, and small forwards.

Compatibility is checked against tests/model/reference, a copy of shared/reference (facts read off the NVlabs code: per
checkpoint the constructor arguments, the parameter count and the state_dict listing). Those
listings belong to the preconditioner, whose network lives under ``model.``; entries outside it
(iDDPM's ``u`` table) are the preconditioner's and are skipped here.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from model.networks import (
    NETWORKS,
    Conv2d,
    DhariwalUNet,
    FourierEmbedding,
    GroupNorm,
    PositionalEmbedding,
    SongUNet,
    UNetBlock,
    attention_weights,
)

ModuleT = TypeVar("ModuleT", bound=torch.nn.Module)

# A copy of the team's shared reference facts (shared/reference), kept with the tests so that they
# run from a bare checkout; test_reference_copy_is_current catches a stale copy.
REFERENCE = Path(__file__).parent / "reference"
SHARED_REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference"
CONFIGS_FILE = REFERENCE / "configs.json"

# Keys of configs.json entries that belong to the preconditioner or are facts, not network kwargs.
_NOT_NETWORK_KWARGS = {"preconditioner", "img_channels", "model_type", "use_fp16", "parameters", "state_dict_entries"}


def _configs() -> dict[str, dict[str, Any]]:
    return json.loads(CONFIGS_FILE.read_text())


@pytest.mark.skipif(not SHARED_REFERENCE.exists(), reason="no shared/ folder beside this checkout")
def test_reference_copy_is_current():
    shared = sorted(p.relative_to(SHARED_REFERENCE) for p in SHARED_REFERENCE.rglob("*") if p.is_file())
    ours = sorted(p.relative_to(REFERENCE) for p in REFERENCE.rglob("*") if p.is_file())
    assert shared == ours
    assert all((SHARED_REFERENCE / p).read_bytes() == (REFERENCE / p).read_bytes() for p in shared)


def _network_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the preconditioner passes to the network: iDDPM predicts mean and variance."""
    kwargs = {k: v for k, v in cfg.items() if k not in _NOT_NETWORK_KWARGS}
    channels = cfg["img_channels"]
    kwargs["in_channels"] = channels
    kwargs["out_channels"] = 2 * channels if cfg["preconditioner"] == "iDDPMPrecond" else channels
    return kwargs


def _build_meta(name: str) -> torch.nn.Module:
    cfg = _configs()[name]
    with torch.device("meta"):  # no memory, no random init: shapes only
        return NETWORKS[cfg["model_type"]](**_network_kwargs(cfg))


def _reference_entries(name: str) -> list[tuple[str, list[int], str]]:
    """The network's part of the reference state_dict listing, ``model.`` prefix stripped."""
    entries = []
    for line in (REFERENCE / "state_dict_keys" / f"{name}.txt").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        if key.startswith("model."):
            entries.append((key.removeprefix("model."), json.loads(shape), dtype))
    return entries


def _n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# Official checkpoints: state_dict layout and parameter counts


@pytest.mark.parametrize("name", sorted(_configs()))
def test_state_dict_matches_reference(name: str) -> None:
    cfg = _configs()[name]
    net = _build_meta(name)
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()]
    expected = _reference_entries(name)
    assert [e[0] for e in ours] == [e[0] for e in expected]  # keys and their order first: clearer diff
    assert ours == expected
    n_outside = len((REFERENCE / "state_dict_keys" / f"{name}.txt").read_text().splitlines()) - len(expected)
    assert len(ours) + n_outside == cfg["state_dict_entries"]
    # The preconditioners own no parameters (iDDPM's `u` is a buffer), so the counts must agree.
    assert _n_params(net) == cfg["parameters"]


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("edm-cifar10-32x32-cond-vp", 55_735_299),  # DDPM++, augment_dim 9
        ("edm-cifar10-32x32-cond-ve", 56_400_643),  # NCSN++
        ("edm-ffhq-64x64-uncond-vp", 61_805_571),  # DDPM++, channel_mult 1,2,2,2
        ("edm-imagenet-64x64-cond-adm", 295_899_267),  # ADM
    ],
)
def test_documented_parameter_counts(name: str, count: int) -> None:
    assert _n_params(_build_meta(name)) == count


def test_networks_table() -> None:
    assert NETWORKS == {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def _defaults(cls: type) -> dict[str, Any]:
    params = inspect.signature(cls).parameters.values()
    return {p.name: (list(p.default) if isinstance(p.default, tuple) else p.default) for p in params}


def test_constructor_keywords_and_defaults() -> None:
    """Checkpoints store their constructor kwargs; names and defaults must be the reference's."""
    empty = inspect.Parameter.empty
    assert _defaults(SongUNet) == {
        "img_resolution": empty,
        "in_channels": empty,
        "out_channels": empty,
        "label_dim": 0,
        "augment_dim": 0,
        "model_channels": 128,
        "channel_mult": [1, 2, 2, 2],
        "channel_mult_emb": 4,
        "num_blocks": 4,
        "attn_resolutions": [16],
        "dropout": 0.10,
        "label_dropout": 0,
        "embedding_type": "positional",
        "channel_mult_noise": 1,
        "encoder_type": "standard",
        "decoder_type": "standard",
        "resample_filter": [1, 1],
    }
    assert _defaults(DhariwalUNet) == {
        "img_resolution": empty,
        "in_channels": empty,
        "out_channels": empty,
        "label_dim": 0,
        "augment_dim": 0,
        "model_channels": 192,
        "channel_mult": [1, 2, 3, 4],
        "channel_mult_emb": 4,
        "num_blocks": 3,
        "attn_resolutions": [32, 16, 8],
        "dropout": 0.10,
        "label_dropout": 0,
    }
    for cls in (SongUNet, DhariwalUNet):
        assert list(inspect.signature(cls.forward).parameters) == [
            "self",
            "x",
            "noise_labels",
            "class_labels",
            "augment_labels",
        ]


# ---------------------------------------------------------------------------------------------
# Layers


def test_resample_filter_buffer_only_when_resampling() -> None:
    plain = Conv2d(4, 4, kernel=3)
    assert "resample_filter" not in plain.state_dict() and plain.resample_filter is None
    down = Conv2d(4, 4, kernel=0, down=True, resample_filter=[1, 3, 3, 1])
    assert list(down.state_dict()) == ["resample_filter"]  # kernel 0: no weight, no bias
    fir = down.state_dict()["resample_filter"]
    assert fir.shape == (1, 1, 4, 4) and math.isclose(fir.sum().item(), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("taps", [[1, 1], [1, 3, 3, 1]])
def test_conv_resampling_shapes_and_constant_preservation(fused: bool, taps: list[int]) -> None:
    x = torch.ones(1, 2, 8, 8)
    up = Conv2d(2, 2, kernel=0, up=True, resample_filter=taps)
    down = Conv2d(2, 2, kernel=0, down=True, resample_filter=taps)
    # Interior of an upsampled/downsampled constant stays that constant (unit DC gain).
    assert torch.allclose(up(x)[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    assert torch.allclose(down(x)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    conv = Conv2d(2, 5, kernel=3, down=True, resample_filter=taps, fused_resample=fused)
    assert conv(torch.randn(2, 2, 8, 8)).shape == (2, 5, 4, 4)
    conv = Conv2d(2, 5, kernel=3, up=True, resample_filter=taps, fused_resample=fused)
    assert conv(torch.randn(2, 2, 8, 8)).shape == (2, 5, 16, 16)


def test_group_norm_group_count() -> None:
    assert GroupNorm(256).num_groups == 32
    assert GroupNorm(64).num_groups == 16  # never fewer than 4 channels per group
    assert GroupNorm(6).num_groups == 1


def test_positional_embedding_values() -> None:
    emb = PositionalEmbedding(8, endpoint=True)(torch.tensor([0.0, 2.0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    assert torch.allclose(emb[1], torch.cat([(2 * freqs).cos(), (2 * freqs).sin()]), atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    fourier = FourierEmbedding(8)
    assert list(fourier.state_dict()) == ["freqs"] and fourier(torch.zeros(3)).shape == (3, 8)


def test_attention_softmax_in_fp32_under_fp16() -> None:
    torch.manual_seed(0)
    q = torch.full((2, 64, 5), 30.0, dtype=torch.float16)  # q.k = 57600: overflows fp16 (max 65504)
    k = (torch.randn(2, 64, 5).to(torch.float16) * 30).requires_grad_()
    w = attention_weights(q.requires_grad_(), k)
    assert w.dtype == torch.float16 and w.shape == (2, 5, 5)
    assert torch.isfinite(w).all()
    assert torch.allclose(w.float().sum(dim=2), torch.ones(2, 5), atol=1e-2)
    (w * torch.randn(2, 5, 5, dtype=torch.float16)).sum().backward()
    assert q.grad is not None and k.grad is not None
    assert q.grad.dtype == k.grad.dtype == torch.float16  # gradients come back in the input dtype
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_attention_backward_matches_autograd() -> None:
    torch.manual_seed(0)
    q = torch.randn(3, 8, 6, requires_grad=True)
    k = torch.randn(3, 8, 6, requires_grad=True)
    g = torch.randn(3, 6, 6)
    (attention_weights(q, k) * g).sum().backward()
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    plain = torch.einsum("bci,bcj->bij", q2, k2 / math.sqrt(8)).softmax(dim=2)
    (plain * g).sum().backward()
    assert q.grad is not None and k.grad is not None and q2.grad is not None and k2.grad is not None
    assert torch.allclose(q.grad, q2.grad, atol=1e-5) and torch.allclose(k.grad, k2.grad, atol=1e-5)


def test_unet_block_heads_and_skip() -> None:
    block = UNetBlock(64, 128, emb_channels=32, attention=True)  # ADM style: 64 channels per head
    assert block.num_heads == 2 and block.skip is not None and block.skip.weight is not None
    same = UNetBlock(64, 64, emb_channels=32, down=True)  # resampling skip without projection
    assert same.skip is not None and same.skip.weight is None and same.num_heads == 0
    out = block(torch.randn(2, 64, 4, 4), torch.randn(2, 32))
    assert out.shape == (2, 128, 4, 4)


# ---------------------------------------------------------------------------------------------
# Small networks: forward passes

TINY_SONG: dict[str, Any] = dict(
    img_resolution=8,
    in_channels=3,
    out_channels=3,
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.0,
)
TINY_ADM: dict[str, Any] = dict(
    img_resolution=8,
    in_channels=3,
    out_channels=6,
    model_channels=32,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.0,
)  # 64 ch at 4x4: one head


def _randomize(net: ModuleT, seed: int = 0) -> ModuleT:
    """Replace the (partly zero) initial weights so that every path influences the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            is_norm_gain = "norm" in name.rsplit(".", 2)[-2] and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if is_norm_gain else 0.0))
    net.eval()
    return net


def _inputs(
    batch: int, label_dim: int, augment_dim: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=gen)
    noise = torch.randn(batch, generator=gen)
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(batch) % label_dim, label_dim).float()
    augment = torch.randn(batch, augment_dim, generator=gen) if augment_dim else None
    return x, noise, labels, augment


@pytest.mark.parametrize("decoder_type", ["standard", "skip"])
@pytest.mark.parametrize("encoder_type", ["standard", "skip", "residual"])
@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
def test_song_unet_variants_forward(embedding_type: str, encoder_type: str, decoder_type: str) -> None:
    torch.manual_seed(0)
    net = SongUNet(
        **TINY_SONG,
        embedding_type=embedding_type,
        encoder_type=encoder_type,
        decoder_type=decoder_type,
        channel_mult_noise=2 if embedding_type == "fourier" else 1,
        resample_filter=[1, 3, 3, 1] if encoder_type == "residual" else [1, 1],
        label_dim=4,
        augment_dim=9,
    )
    _randomize(net)
    x, noise, labels, augment = _inputs(2, 4, 9)
    with torch.no_grad():
        out = net(x, noise, labels, augment)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert any(k.startswith("enc.4x4_aux") for k in net.state_dict()) == (encoder_type != "standard")
    assert ("dec.4x4_aux_conv.weight" in net.state_dict()) == (decoder_type == "skip")


def test_dhariwal_unet_forward() -> None:
    torch.manual_seed(0)
    net = _randomize(DhariwalUNet(**TINY_ADM, label_dim=4, augment_dim=9))
    x, noise, labels, augment = _inputs(2, 4, 9)
    with torch.no_grad():
        out = net(x, noise, labels, augment)
    assert out.shape == (2, 6, 8, 8) and torch.isfinite(out).all()
    in0 = net.dec["4x4_in0"]
    assert isinstance(in0, UNetBlock) and in0.num_heads == 1


@pytest.mark.parametrize("arch", ["song", "adm"])
def test_labels_and_augment_labels_change_output(arch: str) -> None:
    torch.manual_seed(0)
    net: torch.nn.Module = (
        SongUNet(**TINY_SONG, label_dim=4, augment_dim=9)
        if arch == "song"
        else DhariwalUNet(**TINY_ADM, label_dim=4, augment_dim=9)
    )
    _randomize(net)
    x, noise, labels, augment = _inputs(2, 4, 9)
    assert labels is not None and augment is not None
    with torch.no_grad():
        base = net(x, noise, labels, augment)
        other_labels = net(x, noise, labels.roll(1, dims=1), augment)
        no_augment = net(x, noise, labels, None)
        other_noise = net(x, noise + 1, labels, augment)
    for changed in (other_labels, no_augment, other_noise):
        assert not torch.allclose(base, changed)


@pytest.mark.parametrize("arch", ["song", "adm"])
def test_label_dropout_only_in_training(arch: str) -> None:
    torch.manual_seed(0)
    kwargs: dict[str, Any] = dict(label_dim=4, label_dropout=1.0)  # every label dropped while training
    net: torch.nn.Module = SongUNet(**TINY_SONG, **kwargs) if arch == "song" else DhariwalUNet(**TINY_ADM, **kwargs)
    _randomize(net)
    x, noise, labels, _ = _inputs(2, 4, 0)
    assert labels is not None
    with torch.no_grad():
        net.train()
        dropped = net(x, noise, labels)
        zero = net(x, noise, torch.zeros_like(labels))
        net.eval()
        kept = net(x, noise, labels)
    assert torch.equal(dropped, zero) and not torch.allclose(dropped, kept)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["song", "adm"])
def test_reduced_precision_forward(arch: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net: torch.nn.Module
    if arch == "song":
        net = SongUNet(
            **TINY_SONG,
            embedding_type="fourier",
            channel_mult_noise=2,
            encoder_type="residual",
            resample_filter=[1, 3, 3, 1],
            label_dim=4,
        )
    else:
        net = DhariwalUNet(**TINY_ADM, label_dim=4)
    _randomize(net)
    x, noise, labels, _ = _inputs(2, 4, 0)
    with torch.no_grad():
        ref = net(x, noise, labels)
        try:
            low = net(x.to(dtype), noise, labels)
        except RuntimeError as e:  # some CPU builds lack fp16 kernels; the CUDA path is what matters
            if dtype == torch.float16 and "not implemented" in str(e):
                pytest.skip(f"fp16 unsupported on this CPU build: {e}")
            raise
    # The image path runs in the input dtype; weights stay fp32 in the module.
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert all(p.dtype == torch.float32 for p in net.parameters())
    err = (low.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.1


def test_output_layers_start_at_or_near_zero() -> None:
    torch.manual_seed(0)
    adm = DhariwalUNet(**TINY_ADM, label_dim=4, augment_dim=9)
    x, noise, labels, augment = _inputs(2, 4, 9)
    with torch.no_grad():
        assert torch.equal(adm(x, noise, labels, augment), torch.zeros(2, 6, 8, 8))
    assert adm.map_augment is not None and not adm.map_augment.weight.any()
    for block in adm.modules():
        if isinstance(block, UNetBlock):
            conv1 = block.conv1
            assert conv1.weight is not None and conv1.bias is not None
            assert not conv1.weight.any() and not conv1.bias.any()
            if block.num_heads:
                assert block.proj.weight is not None and not block.proj.weight.any()

    song = SongUNet(**TINY_SONG, decoder_type="skip")
    for name, module in song.named_modules():
        if name.endswith(("conv1", "proj", "aux_conv")):
            assert isinstance(module, Conv2d) and module.weight is not None and module.bias is not None
            fan = module.weight[0].numel() + module.weight[:, 0].numel()
            assert module.weight.abs().max() <= 1e-5 * math.sqrt(6 / fan) and not module.bias.any()
    with torch.no_grad():
        out = song(*_inputs(2, 0, 0)[:3])
    assert out.abs().max() < 1e-2


def test_seeded_construction_is_deterministic() -> None:
    torch.manual_seed(3)
    a = SongUNet(**TINY_SONG, embedding_type="fourier", channel_mult_noise=2).state_dict()
    torch.manual_seed(3)
    b = SongUNet(**TINY_SONG, embedding_type="fourier", channel_mult_noise=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_invalid_variant_rejected() -> None:
    with pytest.raises(ValueError, match="encoder_type"):
        SongUNet(**TINY_SONG, encoder_type="fancy")
    with pytest.raises(ValueError, match="class_labels"):
        SongUNet(**TINY_SONG, label_dim=3)(*_inputs(1, 0, 0)[:2], None)
