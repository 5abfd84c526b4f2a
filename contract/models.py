"""Which models exist: name -> source (a path, a catalogue name or a URL), and each one's local file.

Shared by the gateway (service/catalog.py, which never downloads) and the worker (which downloads
and converts what it serves). Models come from EDM_MODELS_FILE, then EDM_MODELS (later entries win),
plus the bundled digits model unless EDM_BUNDLED_MODEL=false. A source is a local checkpoint (our
.json card, its .safetensors, a folder holding one card, or an NVlabs .pkl), a catalogue name
(``edm-imagenet-64x64-cond-adm``, model/catalogue.py) or an ``https://`` URL of a network pickle,
optionally pinned: ``NAME_OR_URL#sha256=HEX`` (model/sources.py). No torch.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from contract.settings import CommonSettings, parse_models
from model.card import ModelCard, load_card
from model.download import Progress, default_cache_dir
from model.sources import Source, cached_card_path, materialize, parse_source

log = logging.getLogger("contract.models")


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


def catalog_card_json(card: ModelCard) -> str:
    """A card as workers publish it in Redis."""
    return json.dumps(card.to_dict())
