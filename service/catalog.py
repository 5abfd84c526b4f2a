"""Which models exist: name -> source (a path, a catalogue name or a URL), and each one's card. No torch.

Models come from EDM_MODELS_FILE, then EDM_MODELS (later entries win), plus the bundled digits
model unless EDM_BUNDLED_MODEL=false. A source is a local checkpoint (our .json card, its
.safetensors, a folder holding one card, or an NVlabs .pkl), a catalogue name
(``edm-imagenet-64x64-cond-adm``, model/catalogue.py) or an ``https://`` URL of a network pickle,
optionally pinned: ``NAME_OR_URL#sha256=HEX`` (model/sources.py).

The gateway never downloads: it reads our cards from disk, a remote model's converted card from
the cache when it shares the worker's EDM_CACHE_DIR, and otherwise the cards workers publish in
Redis once they have loaded a model. Workers call `configured_models`, which downloads and
converts what they serve (once per cache, under a lock) and returns local files.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from contract.settings import CommonSettings, parse_models
from model.card import CardError, ModelCard, load_card
from model.download import Progress, default_cache_dir
from model.sources import Source, cached_card_path, materialize, parse_source

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


def cache_dir(settings: CommonSettings) -> Path:
    return settings.cache_dir if settings.cache_dir is not None else default_cache_dir()


def _source(text: str, base: Path | None = None) -> Source:
    try:
        source = parse_source(text, base=base)
    except ValueError as error:
        raise CatalogError(str(error)) from None
    if source.path is not None:
        return Source(source.text, path=resolve_checkpoint(source.path))
    return source


def configured_sources(settings: CommonSettings) -> dict[str, Source]:
    """name -> source, in the order: bundled, models file, EDM_MODELS. No network, no torch."""
    sources: dict[str, Source] = {}
    if settings.bundled_model:
        card_path = bundled_card_path()
        if card_path is None:
            log.warning("no bundled model found under model/bundled/")
        else:
            sources[load_card(card_path).name] = Source(str(card_path), path=card_path)
    if settings.models_file is not None:
        text = settings.models_file.read_text(encoding="utf-8")
        base = settings.models_file.parent
        for name, value in parse_models(text).items():
            sources[name] = _source(value, base)
    for name, value in settings.models.items():
        sources[name] = _source(value)
    return sources


class LogProgress:
    """Download progress as log lines, at most one every `every_s` seconds (workers have no terminal)."""

    def __init__(self, name: str, url: str, every_s: float = 5.0) -> None:
        self.name, self.url, self.every_s, self.last = name, url, every_s, 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done != total:
            return
        self.last = now
        share = f" ({100 * done / total:.0f}%)" if total else ""
        log.info("downloading model %s: %d of %s bytes%s", self.name, done, total if total else "?", share,
                 extra={"model": self.name, "url": self.url, "bytes": done, "total_bytes": total})


def configured_models(settings: CommonSettings, *, only: Iterable[str] | None = None,
                      progress: Callable[[str, Source], Progress] | None = None) -> dict[str, Path]:
    """name -> a local checkpoint file, downloading and converting remote models (worker side).

    Remote models are made local only if they are in `only` (default: the worker's EDM_SERVE, else
    all); the others map to where their converted card will be. `progress(name, source)` makes a
    download-progress callback (default: log lines)."""
    sources = configured_sources(settings)
    wanted = set(only if only is not None else (getattr(settings, "serve", None) or sources))
    root = cache_dir(settings)
    models: dict[str, Path] = {}
    for name, source in sources.items():
        if source.path is not None:
            models[name] = source.path
        elif name not in wanted:
            models[name] = cached_card_path(source, root) or root / "not-downloaded" / f"{source.name}.json"
        else:
            assert source.url is not None
            on_progress = progress(name, source) if progress else LogProgress(name, source.url)
            try:
                models[name] = materialize(source, root, allow_http=settings.allow_http,
                                           max_bytes=settings.max_download_bytes,
                                           max_parameters=settings.max_parameters, progress=on_progress,
                                           retries=settings.download_retries)
            except ValueError as error:
                raise CatalogError(f"model {name!r}: {error}") from None
    return models


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


def catalog_card_json(card: ModelCard) -> str:
    """A card as workers publish it in Redis."""
    return json.dumps(card.to_dict())
