"""The gateway's catalog: the configured models and their cards, for validation and GET /v1/models.
No torch, and no downloads: it reads our cards from disk, a remote model's converted card from the
cache when it shares the worker's EDM_CACHE_DIR, and otherwise the cards workers publish in Redis
once they have loaded a model. Which models exist and where their files are: contract/models.py."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contract.models import (
    CatalogError,
    cache_dir,
    configured_sources,
    read_card,
)
from contract.settings import CommonSettings
from model.card import CardError, ModelCard
from model.download import default_cache_dir
from model.sources import Source, cached_card_path

log = logging.getLogger("service.catalog")


class Catalog:
    """The configured models and their cards (from disk, or as published by workers)."""

    def __init__(self, models: dict[str, Path] | dict[str, Source], default: str | None = None,
                 cache: Path | None = None):
        if default is not None and default not in models:
            raise CatalogError(f"EDM_DEFAULT_MODEL={default!r} is not a configured model ({', '.join(models)})")
        self.sources: dict[str, Source] = {
            name: value if isinstance(value, Source) else Source(str(value), path=Path(value))
            for name, value in models.items()}
        self.models = self.sources  # names in configuration order
        self.default = default or next(iter(models), None)
        self.cache = cache if cache is not None else default_cache_dir()
        self._cards: dict[str, ModelCard] = {}
        for name, source in self.sources.items():
            path = source.path if source.path is not None else cached_card_path(source, self.cache)
            if path is None:
                continue
            try:
                card = read_card(path)
            except CardError as error:
                raise CatalogError(f"model {name!r}: {error}") from error
            if card is not None:
                self._cards[name] = card

    @classmethod
    def from_settings(cls, settings: CommonSettings) -> Catalog:
        return cls(configured_sources(settings), settings.default_model, cache_dir(settings))

    def card(self, name: str, published: Callable[[], dict[str, dict[str, Any]]]) -> ModelCard | None:
        """The card of `name`; `published` is asked (it reads Redis) only for pickled or remote models."""
        if name in self._cards:
            return self._cards[name]
        raw = published().get(name)
        return None if raw is None else ModelCard.model_validate(raw)

    def describe(self, published: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """GET /v1/models: every model with its source, sha256, recommended settings and card (None
        until a worker has loaded a pickle or a download)."""
        out = []
        for name, source in self.sources.items():
            card = self._cards.get(name)
            card_dict = card.to_dict() if card is not None else published.get(name)
            out.append({"name": name, "default": name == self.default, "format": _format(source),
                        "source": _describe_source(source), "sha256": _sha256(source, card_dict),
                        "recommended": _recommended(source, card_dict), "card": card_dict})
        return out


def _describe_source(source: Source) -> dict[str, Any]:
    if source.url is None:
        return {"kind": "path", "path": str(source.path)}
    return source.describe()


def _sha256(source: Source, card: dict[str, Any] | None) -> str | None:
    """The digest of the file the model came from: the downloaded pickle, else the weights file."""
    if card is not None:
        prov = card.get("provenance") or {}
        return prov.get("source_sha256") or card.get("weights_sha256")
    return source.sha256


def _recommended(source: Source, card: dict[str, Any] | None) -> dict[str, Any] | None:
    if card is not None and card.get("recommended") is not None:
        return card["recommended"]
    return dict(source.entry.recommended) if source.entry is not None else None


def _format(source: Source) -> str:
    if source.path is None:
        return "download"
    return "nvlabs-pickle" if source.path.suffix.lower() in (".pkl", ".pickle") else "safetensors"
