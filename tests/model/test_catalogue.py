"""The catalogue of official checkpoints agrees with shared/reference and with our own networks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contract.jobs import SamplerParams
from model.catalogue import CATALOGUE, EDM_BASE_URL, lookup
from model.networks import NETWORKS

REFERENCE = Path("/work/shared/reference/configs.json")


def meta_parameters(entry) -> int:
    """Parameters of the catalogued architecture, built on the meta device (no memory)."""
    ref = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    config = dict(ref.get(entry.name) or {})
    if not config:  # the entries the reference does not list follow a listed sibling
        sibling = {"edm-cifar10-32x32-uncond-ve": "edm-cifar10-32x32-cond-ve",
                   "edm-afhqv2-64x64-uncond-vp": "edm-ffhq-64x64-uncond-vp",
                   "edm-afhqv2-64x64-uncond-ve": "edm-ffhq-64x64-uncond-ve",
                   "baseline-ffhq-64x64-uncond-vp": "baseline-cifar10-32x32-uncond-vp",
                   "baseline-afhqv2-64x64-uncond-vp": "baseline-cifar10-32x32-uncond-vp",
                   "baseline-ffhq-64x64-uncond-ve": "baseline-cifar10-32x32-uncond-ve",
                   "baseline-afhqv2-64x64-uncond-ve": "baseline-cifar10-32x32-uncond-ve"}[entry.name]
        config = {**ref[sibling], "label_dim": entry.label_dim, "img_resolution": entry.img_resolution}
    for key in ("preconditioner", "parameters", "state_dict_entries", "use_fp16"):
        config.pop(key, None)
    arch, channels = config.pop("model_type"), config.pop("img_channels")
    out = channels * (2 if entry.preconditioner == "iDDPMPrecond" else 1)
    with torch.device("meta"):
        net = NETWORKS[arch](in_channels=channels, out_channels=out, **config)
    return sum(p.numel() for p in net.parameters())


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference is not mounted")
@pytest.mark.parametrize("name", list(CATALOGUE))
def test_entry_matches_reference_and_our_networks(name):
    entry = CATALOGUE[name]
    ref = json.loads(REFERENCE.read_text()).get(name)
    if ref is not None:
        assert (entry.preconditioner, entry.architecture, entry.img_resolution, entry.label_dim, entry.parameters) \
            == (ref["preconditioner"], ref["model_type"], ref["img_resolution"], ref["label_dim"], ref["parameters"])
    assert entry.parameters == meta_parameters(entry)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_entry_is_well_formed(name):
    entry = CATALOGUE[name]
    assert entry.url.startswith(EDM_BASE_URL) and entry.file_name == f"{name}.pkl"
    assert ("/baseline/" in entry.url) == name.startswith("baseline-")
    assert entry.sha256 is None or len(entry.sha256) == 64
    SamplerParams(**entry.recommended)  # names and values a request accepts
    assert lookup(name) is entry and lookup(f"{name}.pkl") is entry
    assert entry.class_names is None or len(entry.class_names) == entry.label_dim


def test_the_papers_settings():
    assert CATALOGUE["edm-cifar10-32x32-cond-vp"].recommended == {"num_steps": 18}
    assert CATALOGUE["edm-ffhq-64x64-uncond-vp"].recommended == {"num_steps": 40}
    assert CATALOGUE["edm-imagenet-64x64-cond-adm"].recommended == {
        "num_steps": 256, "S_churn": 40, "S_min": 0.05, "S_max": 50, "S_noise": 1.003}
    assert len([n for n in CATALOGUE if n.startswith("edm-")]) == 9
