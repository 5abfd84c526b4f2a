"""Model sources: a local path, a catalogue name or an https:// URL, turned into a loadable file.

Syntax (wherever a model path is accepted: EDM_MODELS, the models file, --model, inspect, convert):

    /models/cifar10.json                          a file (or folder) on disk, as before
    edm-imagenet-64x64-cond-adm                   a catalogue name (model/catalogue.py)
    https://host/path/network.pkl                 any NVlabs network-snapshot pickle
    <name or URL>#sha256=<64 hex digits>          the same, pinned to that digest

`materialize` downloads into the cache (model/download.py) if needed and converts the pickle to our
safetensors + card format in ``<cache entry>/converted/`` under the same lock, so that later starts
(and other workers) load the safetensors and never read the pickle again. The converted card
records the source URL and the downloaded file's sha256 (``provenance.source_url`` /
``source_sha256``) and the catalogue's recommended sampler settings. Parsing and
`cached_card_path` need no torch and no network (the gateway uses them).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.card import CardError, ModelCard, load_card
from model.catalogue import CatalogueEntry, lookup
from model.download import (
    DEFAULT_MAX_DOWNLOAD_BYTES,
    Downloaded,
    DownloadError,
    IntegrityError,
    Progress,
    cache_entry_dir,
    cached_download,
    check_url,
    fetch,
    locked,
)

__all__ = ["Source", "SourceError", "cached_card_path", "conversion_options", "download", "materialize",
           "parse_source"]

log = logging.getLogger("model.sources")

_PIN = re.compile(r"^(?P<body>.*)#sha256=(?P<digest>[0-9A-Fa-f]{64})$")


class SourceError(ValueError):
    pass


@dataclass(frozen=True)
class Source:
    text: str                       # as written by the user
    path: Path | None = None        # a local file or folder
    url: str | None = None          # remote sources
    sha256: str | None = None       # pinned digest (the user's, else the catalogue's)
    entry: CatalogueEntry | None = None

    @property
    def remote(self) -> bool:
        return self.url is not None

    @property
    def name(self) -> str:
        """The converted card's name: the catalogue name, else the file's stem."""
        if self.entry is not None:
            return self.entry.name
        stem = (self.url or str(self.path)).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:128] or "model"

    def describe(self) -> dict[str, Any]:
        if self.url is None:
            return {"kind": "path", "path": str(self.path)}
        return {"kind": "catalogue" if self.entry else "url", "url": self.url, "pinned_sha256": self.sha256,
                **({"catalogue_name": self.entry.name} if self.entry else {})}


def parse_source(text: str, *, base: Path | None = None) -> Source:
    """Classify a model source (see the module docstring). A path that exists wins over a catalogue name."""
    text = str(text).strip()
    match = _PIN.match(text)
    body, pinned = (match.group("body"), match.group("digest").lower()) if match else (text, None)
    if "#" in body:
        raise SourceError(f"{text!r}: the only fragment understood is #sha256=<64 hex digits>")
    if "://" in body:
        scheme = body.split("://", 1)[0].lower()
        if scheme not in ("https", "http"):
            raise SourceError(f"{text!r}: unsupported URL scheme {scheme!r}; use https://")
        entry = next((e for e in _catalogue_values() if e.url == body), None)
        return Source(text, url=body, sha256=_pin(text, pinned, entry), entry=entry)
    path = Path(body).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    entry = lookup(body)
    if entry is not None and not path.exists():
        return Source(text, url=entry.url, sha256=_pin(text, pinned, entry), entry=entry)
    if pinned is not None:
        raise SourceError(f"{text!r}: #sha256= pins a download (a catalogue name or a URL), not a local path")
    return Source(text, path=path)


def _catalogue_values() -> list[CatalogueEntry]:
    from model.catalogue import CATALOGUE

    return list(CATALOGUE.values())


def _pin(text: str, pinned: str | None, entry: CatalogueEntry | None) -> str | None:
    known = entry.sha256 if entry is not None else None
    if entry is not None and pinned and known and pinned != known:
        raise SourceError(f"{text!r}: pinned sha256 {pinned} differs from the catalogue's {known} for {entry.name}")
    return pinned or known


def _converted_dir(cache_dir: Path, url: str) -> Path:
    return cache_entry_dir(cache_dir, url) / "converted"


def _usable_card(card_path: Path, *, url: str, sha256: str) -> ModelCard | None:
    """The converted card if it was made from exactly this download; else None."""
    try:
        card = load_card(card_path)
    except CardError:
        return None
    prov = card.provenance
    if prov.get("source_url") != url or prov.get("source_sha256") != sha256:
        return None
    if not (card_path.parent / card.weights_file).is_file():
        return None
    return card


def cached_card_path(source: Source, cache_dir: Path) -> Path | None:
    """The converted card of a remote source if the cache has it (no network, no torch, no lock)."""
    if source.url is None:
        return None
    download = cached_download(cache_dir, source.url)
    if download is None or (source.sha256 is not None and download.sha256 != source.sha256):
        return None
    card_path = _converted_dir(cache_dir, source.url) / f"{source.name}.json"
    return card_path if _usable_card(card_path, url=source.url, sha256=download.sha256) else None


def download(source: Source, cache_dir: Path, *, allow_http: bool = False,
             max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES, progress: Progress | None = None, retries: int = 5,
             backoff_s: float = 1.0, timeout: float = 30.0) -> Downloaded:
    """The cached download of a remote source (fetched first if needed)."""
    if source.url is None:
        raise SourceError(f"{source.text}: a local path, nothing to download")
    return fetch(source.url, cache_dir, sha256=source.sha256, allow_http=allow_http, max_bytes=max_bytes,
                 progress=progress, retries=retries, backoff_s=backoff_s, timeout=timeout)


def conversion_options(source: Source, downloaded: Downloaded) -> dict[str, Any]:
    """model.checkpoint.convert() keywords for a download: its name, the catalogue's class names and
    recommended settings, provenance (URL, sha256) and the digest the bytes read must have."""
    entry = source.entry
    return dict(
        name=source.name,
        class_names=list(entry.class_names) if entry and entry.class_names else None,
        recommended=dict(entry.recommended) if entry else None,
        provenance={"source_url": downloaded.url, "source_sha256": downloaded.sha256,
                    **({"catalogue_name": entry.name, "recommended_from": entry.recommended_from} if entry else {})},
        expected_sha256=downloaded.sha256,
    )


def materialize(source: Source, cache_dir: Path, *, allow_http: bool = False,
                max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES, max_parameters: int | None = None,
                progress: Progress | None = None, retries: int = 5, backoff_s: float = 1.0,
                timeout: float = 30.0) -> Path:
    """A local checkpoint file for `source`: the path itself, or the converted card of a download."""
    if source.url is None:
        assert source.path is not None
        return source.path
    check_url(source.url, allow_http=allow_http)
    done = cached_card_path(source, cache_dir)
    if done is not None:
        return done
    downloaded = download(source, cache_dir, allow_http=allow_http, max_bytes=max_bytes, progress=progress,
                          retries=retries, backoff_s=backoff_s, timeout=timeout)
    card_path = _converted_dir(cache_dir, source.url) / f"{source.name}.json"
    with locked(cache_entry_dir(cache_dir, source.url), f"conversion of {source.url}"):
        if _usable_card(card_path, url=source.url, sha256=downloaded.sha256) is None:
            from model.checkpoint import convert  # torch: only here

            log.info("converting %s to safetensors + card (once; later starts load the conversion)", source.url,
                     extra={"path": str(card_path)})
            card = convert(downloaded.path, card_path, max_parameters=max_parameters,
                           **conversion_options(source, downloaded))
            if source.entry is not None:
                _check_against_catalogue(card, source.entry, card_path)
    return card_path


def _check_against_catalogue(card: ModelCard, entry: CatalogueEntry, card_path: Path) -> None:
    """A file downloaded for a catalogue name must be the network the catalogue describes."""
    expected = {"preconditioner": entry.preconditioner, "architecture": entry.architecture,
                "img_resolution": entry.img_resolution, "img_channels": entry.img_channels,
                "label_dim": entry.label_dim, "parameters": entry.parameters}
    wrong = {k: (getattr(card, k), v) for k, v in expected.items() if getattr(card, k) != v}
    if wrong:
        card_path.unlink(missing_ok=True)
        (card_path.parent / card.weights_file).unlink(missing_ok=True)
        details = ", ".join(f"{k} {got} (expected {want})" for k, (got, want) in wrong.items())
        raise SourceError(f"{entry.url} is not the network the catalogue describes as {entry.name}: {details}")


__all__ += ["DownloadError", "IntegrityError"]
