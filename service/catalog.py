"""Which models exist: name -> checkpoint path, and each one's model card. No torch.

Models come from EDM_MODELS_FILE, then EDM_MODELS (later entries win), plus the bundled digits
model unless EDM_BUNDLED_MODEL=false. A path is our format (the .json card, its .safetensors, or a
folder holding one card) or an NVlabs .pkl. The gateway reads our cards from disk; a pickle's card
only exists once a worker has loaded it, so workers publish the cards of what they load in Redis.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.card import CardError, ModelCard, load_card
from service.settings import CommonSettings, parse_models

log = logging.getLogger("service.catalog")


class CatalogError(ValueError):
    pass


def bundled_card_path() -> Path | None:
    """The bundled model's card (model/bundled/*.json), found without importing torch."""
    spec = importlib.util.find_spec("model")
    if spec is None or not spec.submodule_search_locations:
        return None
    cards = sorted(Path(next(iter(spec.submodule_search_locations)), "bundled").glob("*.json"))
    return cards[0] if cards else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A folder becomes the one card inside it; files are returned as given."""
    path = Path(path).expanduser()
    if path.is_dir():
        cards = sorted(path.glob("*.json"))
        if len(cards) != 1:
            raise CatalogError(f"{path}: expected exactly one .json model card in the folder, found {len(cards)}")
        return cards[0]
    return path


def read_card(path: Path) -> ModelCard | None:
    """Our card for a checkpoint path, or None for a pickle (only a worker can read that)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_card(path)
    if suffix == ".safetensors":
        return load_card(path.with_suffix(".json"))
    return None


def configured_models(settings: CommonSettings) -> dict[str, Path]:
    """name -> resolved checkpoint path, in the order: bundled, models file, EDM_MODELS."""
    models: dict[str, Path] = {}
    if settings.bundled_model:
        card_path = bundled_card_path()
        if card_path is None:
            log.warning("no bundled model found under model/bundled/")
        else:
            models[load_card(card_path).name] = card_path
    if settings.models_file is not None:
        text = settings.models_file.read_text(encoding="utf-8")
        base = settings.models_file.parent
        for name, path in parse_models(text).items():
            models[name] = resolve_checkpoint(base / Path(path).expanduser())
    for name, path in settings.models.items():
        models[name] = resolve_checkpoint(path)
    return models


class Catalog:
    """The configured models and their cards (from disk, or as published by workers)."""

    def __init__(self, models: dict[str, Path], default: str | None = None):
        if default is not None and default not in models:
            raise CatalogError(f"EDM_DEFAULT_MODEL={default!r} is not a configured model ({', '.join(models)})")
        self.models = models
        self.default = default or next(iter(models), None)
        self._cards: dict[str, ModelCard] = {}
        for name, path in models.items():
            try:
                card = read_card(path)
            except CardError as error:
                raise CatalogError(f"model {name!r}: {error}") from error
            if card is not None:
                self._cards[name] = card

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Catalog:
        return cls(configured_models(settings), settings.default_model)

    def card(self, name: str, published: Callable[[], dict[str, dict[str, Any]]]) -> ModelCard | None:
        """The card of `name`; `published` is asked (it reads Redis) only for pickled models."""
        if name in self._cards:
            return self._cards[name]
        raw = published().get(name)
        return None if raw is None else ModelCard.model_validate(raw)

    def describe(self, published: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """GET /v1/models: every model with its card (None until a worker has loaded a pickle)."""
        out = []
        for name, path in self.models.items():
            card = self._cards.get(name)
            card_dict = card.to_dict() if card is not None else published.get(name)
            out.append({"name": name, "default": name == self.default, "format": _format(path),
                        "card": card_dict})
        return out


def _format(path: Path) -> str:
    return "nvlabs-pickle" if path.suffix.lower() in (".pkl", ".pickle") else "safetensors"


def catalog_card_json(card: ModelCard) -> str:
    """A card as workers publish it in Redis."""
    return json.dumps(card.to_dict())
