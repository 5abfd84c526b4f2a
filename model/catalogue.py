"""The official NVlabs/edm checkpoints by name: URL, architecture, size and recommended sampler.

No torch: the gateway reads this too. Facts come from the NVlabs/edm README (URLs and the
recommended ``generate.py`` settings per dataset), the paper (Karras et al. 2022, Table 5 for the
stochastic settings of the baselines) and shared/reference/configs.json (architectures and
parameter counts, checked against our own networks by tests/model/test_catalogue.py).

``sha256`` is None where the digest of the published file is not known to us yet: the download is
then recorded with the digest it had (model card, ``provenance.source_sha256``) and a user can pin
one with ``NAME#sha256=HEX``. Fill a digest in here once it has been verified against the CDN.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CATALOGUE", "CatalogueEntry", "EDM_BASE_URL", "lookup"]

EDM_BASE_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The README's "for best results" settings (generate.py options with the same names as ours).
_CIFAR = {"num_steps": 18}                  # deterministic Heun, NFE 35
_64PX = {"num_steps": 40}                   # FFHQ / AFHQv2: deterministic Heun, NFE 79
_IMAGENET = {"num_steps": 256, "S_churn": 40, "S_min": 0.05, "S_max": 50, "S_noise": 1.003}  # NFE 511
# Baselines (config A networks) with the EDM sampler: the README's Figure 2a "+ Our sigma(t) & s(t)"
# command for the VP/VE baselines; ImageNet's iDDPM baseline with the paper's Table 5 stochastic settings.
_BASELINE_EDM_SAMPLER = {"num_steps": 18, "solver": "heun", "discretization": "edm", "schedule": "linear",
                         "scaling": "none"}
_BASELINE_64PX = {**_BASELINE_EDM_SAMPLER, "num_steps": 40}
_BASELINE_IMAGENET = {"num_steps": 256, "S_churn": 80, "S_min": 0.05, "S_max": 50, "S_noise": 1.003}


@dataclass(frozen=True)
class CatalogueEntry:
    name: str
    url: str
    dataset: str
    preconditioner: str
    architecture: str            # "SongUNet" (DDPM++ / NCSN++) or "DhariwalUNet" (ADM)
    config: str                  # the paper's name of the network configuration
    img_resolution: int
    img_channels: int
    label_dim: int
    parameters: int
    recommended: dict[str, Any]  # sampler settings (our request field names)
    recommended_from: str
    sha256: str | None = None
    class_names: tuple[str, ...] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (edm-serve models --json, GET /v1/models)."""
        return {"name": self.name, "url": self.url, "sha256": self.sha256, "dataset": self.dataset,
                "preconditioner": self.preconditioner, "architecture": self.architecture, "config": self.config,
                "img_resolution": self.img_resolution, "img_channels": self.img_channels,
                "label_dim": self.label_dim, "parameters": self.parameters,
                "recommended": dict(self.recommended), "recommended_from": self.recommended_from,
                "note": self.note}


_README = "NVlabs/edm README, 'for best results'"
_FIG2A = "NVlabs/edm README, Figure 2a '+ Our sigma(t) & s(t)' (EDM sampler on the baseline network)"
_TABLE5 = "paper Table 5, stochastic sampler for the iDDPM ImageNet-64 network"
_UNVERIFIED = ("architecture assumed from configuration A's defaults at 64x64 (not in shared/reference); "
               "the loader checks it against the file's tensors")

# sampler key -> (recommended settings, where they come from)
_SAMPLERS: dict[str, tuple[dict[str, Any], str]] = {
    "cifar": (_CIFAR, _README), "64px": (_64PX, _README), "imagenet": (_IMAGENET, _README),
    "base": (_BASELINE_EDM_SAMPLER, _FIG2A), "base64": (_BASELINE_64PX, _FIG2A),
    "base-imagenet": (_BASELINE_IMAGENET, _TABLE5),
}

# name, dataset, preconditioner, architecture, configuration, resolution, classes, parameters, sampler
_ROWS: list[tuple[str, str, str, str, str, int, int, int, str]] = [
    ("edm-cifar10-32x32-cond-vp", "CIFAR-10", "EDMPrecond", "SongUNet", "DDPM++ (config F)", 32, 10, 55_735_299,
     "cifar"),
    ("edm-cifar10-32x32-cond-ve", "CIFAR-10", "EDMPrecond", "SongUNet", "NCSN++ (config F)", 32, 10, 56_400_643,
     "cifar"),
    ("edm-cifar10-32x32-uncond-vp", "CIFAR-10", "EDMPrecond", "SongUNet", "DDPM++ (config F)", 32, 0, 55_733_891,
     "cifar"),
    ("edm-cifar10-32x32-uncond-ve", "CIFAR-10", "EDMPrecond", "SongUNet", "NCSN++ (config F)", 32, 0, 56_397_827,
     "cifar"),
    ("edm-ffhq-64x64-uncond-vp", "FFHQ", "EDMPrecond", "SongUNet", "DDPM++ (config F)", 64, 0, 61_805_571, "64px"),
    ("edm-ffhq-64x64-uncond-ve", "FFHQ", "EDMPrecond", "SongUNet", "NCSN++ (config F)", 64, 0, 62_761_091, "64px"),
    ("edm-afhqv2-64x64-uncond-vp", "AFHQv2", "EDMPrecond", "SongUNet", "DDPM++ (config F)", 64, 0, 61_805_571,
     "64px"),
    ("edm-afhqv2-64x64-uncond-ve", "AFHQv2", "EDMPrecond", "SongUNet", "NCSN++ (config F)", 64, 0, 62_761_091,
     "64px"),
    ("edm-imagenet-64x64-cond-adm", "ImageNet", "EDMPrecond", "DhariwalUNet", "ADM (config F)", 64, 1000,
     295_899_267, "imagenet"),
    ("baseline-cifar10-32x32-uncond-vp", "CIFAR-10", "VPPrecond", "SongUNet", "DDPM++ (config A, Song et al.)", 32,
     0, 61_804_419, "base"),
    ("baseline-cifar10-32x32-uncond-ve", "CIFAR-10", "VEPrecond", "SongUNet", "NCSN++ (config A, Song et al.)", 32,
     0, 62_758_787, "base"),
    ("baseline-ffhq-64x64-uncond-vp", "FFHQ", "VPPrecond", "SongUNet", "DDPM++ (config A)", 64, 0, 61_804_419,
     "base64"),
    ("baseline-ffhq-64x64-uncond-ve", "FFHQ", "VEPrecond", "SongUNet", "NCSN++ (config A)", 64, 0, 62_758_787,
     "base64"),
    ("baseline-afhqv2-64x64-uncond-vp", "AFHQv2", "VPPrecond", "SongUNet", "DDPM++ (config A)", 64, 0, 61_804_419,
     "base64"),
    ("baseline-afhqv2-64x64-uncond-ve", "AFHQv2", "VEPrecond", "SongUNet", "NCSN++ (config A)", 64, 0, 62_758_787,
     "base64"),
    ("baseline-imagenet-64x64-cond-adm", "ImageNet", "iDDPMPrecond", "DhariwalUNet", "ADM (Dhariwal & Nichol)", 64,
     1000, 295_904_454, "base-imagenet"),
]


def _entry(row: tuple[str, str, str, str, str, int, int, int, str]) -> CatalogueEntry:
    name, dataset, preconditioner, architecture, config, resolution, label_dim, parameters, sampler = row
    recommended, source = _SAMPLERS[sampler]
    baseline = name.startswith("baseline-")
    return CatalogueEntry(
        name=name, url=f"{EDM_BASE_URL}{'baseline/' if baseline else ''}{name}.pkl", dataset=dataset,
        preconditioner=preconditioner, architecture=architecture, config=config, img_resolution=resolution,
        img_channels=3, label_dim=label_dim, parameters=parameters, recommended=dict(recommended),
        recommended_from=source,
        class_names=CIFAR10_CLASSES if dataset == "CIFAR-10" and label_dim == 10 else None,
        note=_UNVERIFIED if baseline and resolution == 64 and dataset != "ImageNet" else "")


_ENTRIES = [_entry(row) for row in _ROWS]

CATALOGUE: dict[str, CatalogueEntry] = {entry.name: entry for entry in _ENTRIES}


def lookup(name: str) -> CatalogueEntry | None:
    """The entry named `name` (with or without '.pkl'), or None."""
    return CATALOGUE.get(name.removesuffix(".pkl"))
