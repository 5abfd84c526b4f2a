"""The model card: what a checkpoint is, in JSON, without torch.

A card sits next to its weights (``NAME.json`` beside ``NAME.safetensors``) and is everything the
gateway needs to validate a request (resolution, channels, classes, supported noise range) and
everything the worker needs to rebuild the network before loading the weights
(``preconditioner(**precond_kwargs, model_type=architecture, **network_kwargs)``).

This module imports pydantic only: the gateway image has no torch.

Infinity: JSON has no inf, and EDMPrecond's default ``sigma_max`` is ``float('inf')`` ("no upper
limit"). Cards write non-finite floats as the strings ``"Infinity"`` / ``"-Infinity"``
(pydantic's ``ser_json_inf_nan='strings'``) and read them back as floats, both for the
``sigma_min``/``sigma_max`` fields and inside ``precond_kwargs``/``network_kwargs``. NaN is
rejected everywhere. (``null`` was not chosen: it reads as "unknown", not "unbounded".)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ARCHITECTURES",
    "CARD_FORMAT_VERSION",
    "PRECONDITIONER_NAMES",
    "SAMPLER_FIELDS",
    "CardError",
    "ModelCard",
    "load_card",
    "save_card",
]

CARD_FORMAT_VERSION = 1
ARCHITECTURES = ("SongUNet", "DhariwalUNet")
PRECONDITIONER_NAMES = ("VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond")

# The sampler settings a request may give (contract/jobs.py SamplerParams; generate.py's options).
SAMPLER_FIELDS = ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "solver",
                  "discretization", "schedule", "scaling")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_INF_STRINGS = {"Infinity": math.inf, "-Infinity": -math.inf}


class CardError(ValueError):
    """A card file that cannot be read or does not validate; the message names the file."""


def _json_value(value: Any, where: str) -> Any:
    """Check that `value` is plain JSON data; tuples become lists, "Infinity" strings floats."""
    if value is None or isinstance(value, bool | int | str):
        return _INF_STRINGS.get(value, value) if isinstance(value, str) else value
    if isinstance(value, float):
        if math.isnan(value):
            raise ValueError(f"{where} is NaN, which a card cannot hold")
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has a non-string key {k!r}")
            out[k] = _json_value(v, f"{where}[{k!r}]")
        return out
    raise ValueError(f"{where} has a value of type {type(value).__name__}, which is not plain JSON data")


class ModelCard(BaseModel):
    """Metadata of one servable model. See the module docstring for the JSON conventions."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings", allow_inf_nan=True)

    format_version: int = Field(CARD_FORMAT_VERSION, ge=1)
    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '-'; <= 128 chars")
    architecture: Literal["SongUNet", "DhariwalUNet"]
    network_kwargs: dict[str, Any] = Field(default_factory=dict)
    preconditioner: Literal["VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond"]
    precond_kwargs: dict[str, Any] = Field(default_factory=dict)
    img_resolution: int = Field(gt=0)
    img_channels: int = Field(gt=0)
    label_dim: int = Field(ge=0)
    class_names: list[str] | None = None
    sigma_min: float = Field(ge=0, description="lowest noise level the network supports")
    sigma_max: float = Field(gt=0, description="highest noise level; Infinity = unbounded")
    parameters: int = Field(ge=0, description="number of trainable parameters")
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights_file: str = Field(description="weights file name, relative to the card's folder")
    provenance: dict[str, Any] = Field(default_factory=dict)
    quality: dict[str, Any] | None = None
    recommended: dict[str, Any] | None = Field(
        default=None, description="sampler settings recommended for this model (request field names); a "
        "request that omits a setting gets the value given here, else the reference's default")

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > CARD_FORMAT_VERSION:
            raise ValueError(f"card format_version {v} is newer than this edm-serve reads "
                             f"(up to {CARD_FORMAT_VERSION}); upgrade edm-serve")
        return v

    @field_validator("network_kwargs", "precond_kwargs", "provenance", "quality")
    @classmethod
    def _plain_json(cls, v: dict[str, Any] | None, info: Any) -> dict[str, Any] | None:
        return None if v is None else _json_value(v, info.field_name)

    @field_validator("recommended")
    @classmethod
    def _sampler_names(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        unknown = sorted(set(v) - set(SAMPLER_FIELDS))
        if unknown:
            raise ValueError(f"recommended has unknown sampler settings {unknown}; expected some of "
                             f"{list(SAMPLER_FIELDS)}")
        return _json_value(v, "recommended")

    @field_validator("sigma_min", "sigma_max")
    @classmethod
    def _not_nan(cls, v: float, info: Any) -> float:
        if math.isnan(v):
            raise ValueError(f"{info.field_name} must be a number, not NaN")
        return v

    @field_validator("weights_file")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        if not v or v in {".", ".."} or "/" in v or "\\" in v or "\x00" in v:
            raise ValueError(f"weights_file must be a bare file name next to the card, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        if self.class_names is not None:
            if self.label_dim == 0:
                raise ValueError("class_names given for an unconditional model (label_dim = 0)")
            if len(self.class_names) != self.label_dim:
                raise ValueError(f"class_names has {len(self.class_names)} entries but label_dim is "
                                 f"{self.label_dim}; give one name per class or none")
            if len(set(self.class_names)) != len(self.class_names):
                dupes = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
                raise ValueError(f"class_names must be unique; repeated: {dupes[:10]}")
        if "model_type" in self.precond_kwargs:
            raise ValueError("precond_kwargs must not hold 'model_type'; it is the card's 'architecture'")
        for key in ("img_resolution", "img_channels", "label_dim"):
            if key in self.precond_kwargs and self.precond_kwargs[key] != getattr(self, key):
                raise ValueError(f"precond_kwargs[{key!r}] = {self.precond_kwargs[key]!r} disagrees with "
                                 f"{key} = {getattr(self, key)!r}")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats as "Infinity" strings, like the file)."""
        return json.loads(self.model_dump_json())


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(card)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def load_card(path: str | Path) -> ModelCard:
    """Read and validate a card file; any problem raises CardError naming the file and the fields."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CardError(f"{path.name}: cannot read model card: {e}") from e
    try:
        return ModelCard.model_validate_json(text)
    except ValidationError as e:
        raise CardError(f"{path.name}: invalid model card:\n{_describe(e)}") from e


def save_card(card: ModelCard, path: str | Path) -> None:
    Path(path).write_text(card.to_json(), encoding="utf-8")
