"""Downloads into the model cache: https only, resumable, size-limited, verified, placed atomically,
one download per URL however many processes ask at once. No torch (the gateway imports this).

Cache layout (``EDM_CACHE_DIR``, default ``$XDG_CACHE_HOME/edm-serve`` or ``~/.cache/edm-serve``)::

    downloads/<file stem>-<sha256(url)[:16]>/
        lock                 flock(2)ed by whoever downloads or converts this URL
        <file>.part          bytes received so far (resumed with a Range request)
        <file>.part.json     the URL and the server's ETag / Last-Modified for If-Range
        source.json          url, size, sha256 of the complete file (written before it is placed)
        <file>               the complete file: only ever appears by os.replace() of a verified .part
        converted/           our safetensors + card made from it on first load (model/sources.py)

A file is "cached" when it and a ``source.json`` of the same size exist. A pinned sha256 that
differs from the download's is refused before the file is placed (the .part is deleted), and a
cached file whose recorded sha256 differs from a pin is refused without being read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "DownloadError",
    "Downloaded",
    "IntegrityError",
    "Progress",
    "cache_entry_dir",
    "cached_download",
    "default_cache_dir",
    "fetch",
    "locked",
]

log = logging.getLogger("model.download")

DEFAULT_MAX_DOWNLOAD_BYTES = 4 << 30
CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


class DownloadError(ValueError):
    """A model could not be downloaded; the message names the URL."""


class IntegrityError(DownloadError):
    """The downloaded (or cached) file is not the one that was pinned."""


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    size: int
    url: str


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edm-serve"


def _file_name(url: str) -> str:
    name = url.split("#", 1)[0].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).lstrip(".-")[:120]
    return name or "model.pkl"


def cache_entry_dir(cache_dir: Path, url: str) -> Path:
    """Where `url` is kept: one folder per URL, named readably and uniquely."""
    name = _file_name(url)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return Path(cache_dir) / "downloads" / f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


def check_url(url: str, *, allow_http: bool) -> None:
    scheme = url.split(":", 1)[0].lower()
    if scheme == "https":
        return
    if scheme == "http":
        if allow_http:
            return
        raise DownloadError(f"refusing plain http:// download {url}: use https://, or allow it explicitly "
                            "(EDM_ALLOW_HTTP=true / --allow-http) for a server you trust on a network you trust")
    raise DownloadError(f"unsupported URL scheme in {url!r}: only https:// (and http:// when allowed)")


@contextlib.contextmanager
def locked(folder: Path, what: str = "") -> Iterator[None]:
    """An exclusive flock on folder/lock; says so in the log when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            log.info("waiting for another process working on %s", what or folder, extra={"cache": str(folder)})
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cached_download(cache_dir: Path, url: str) -> Downloaded | None:
    """The complete cached file of `url`, or None (no network, no lock, no hashing)."""
    folder = cache_entry_dir(cache_dir, url)
    path = folder / _file_name(url)
    meta = _read_json(folder / "source.json")
    if meta is None or meta.get("url") != url or not path.is_file():
        return None
    size, digest = meta.get("size"), meta.get("sha256")
    if not isinstance(size, int) or not isinstance(digest, str) or path.stat().st_size != size:
        return None
    return Downloaded(path, digest, size, url)


def _check_pin(url: str, actual: str, pinned: str | None, where: str) -> None:
    if pinned is not None and actual != pinned.lower():
        raise IntegrityError(f"{url}: sha256 of the {where} is {actual}, but {pinned.lower()} was pinned; "
                             "refusing to use it")


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https:// (or http:// when allowed)."""

    def __init__(self, allow_http: bool) -> None:
        self.allow_http = allow_http

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        check_url(newurl, allow_http=self.allow_http)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_TRANSIENT = (http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError, socket.timeout,
              TimeoutError)


def _total_from(resp: Any, start: int) -> int | None:
    if resp.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != start:
            raise DownloadError(f"{resp.url}: server answered a resume from byte {start} with "
                                f"Content-Range {resp.headers.get('Content-Range')!r}")
        return None if match.group(3) == "*" else int(match.group(3))
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _download_once(url: str, part: Path, part_meta: Path, *, allow_http: bool, max_bytes: int, timeout: float,
                   progress: Progress | None) -> bool:
    """One request: continue `part` (Range) or restart it. True when the file is complete."""
    have = part.stat().st_size if part.exists() else 0
    validators = _read_json(part_meta) or {}
    if validators.get("url") != url:
        have = 0
    headers = {"User-Agent": "edm-serve", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = validators.get("etag") or validators.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    opener = urllib.request.build_opener(_Redirects(allow_http))
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()  # its body is not wanted; the socket goes now, not at garbage collection
        if e.code == 416 and have:  # our part is not a prefix of what the server has now
            part.unlink(missing_ok=True)
            return False
        if e.code >= 500 or e.code == 429:  # the server's trouble: retried like a dropped connection
            raise ConnectionError(f"HTTP {e.code} {e.reason}") from None
        raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    with resp:
        if resp.status == 206 and have:
            total = _total_from(resp, have)
            mode = "ab"
        else:
            have = 0
            total = _total_from(resp, 0)
            mode = "wb"
            _write_json_atomic(part_meta, {"url": url, "etag": resp.headers.get("ETag"),
                                           "last_modified": resp.headers.get("Last-Modified")})
        if total is not None and total > max_bytes:
            raise DownloadError(f"{url} is {total} bytes, over the download limit of {max_bytes} bytes "
                                "(EDM_MAX_DOWNLOAD_BYTES)")
        done = have
        if progress:
            progress(done, total)
        with open(part, mode) as f:
            while True:
                chunk = resp.read1(CHUNK)  # what has arrived (up to CHUNK): progress as it comes
                if not chunk:
                    break
                done += len(chunk)
                if done > max_bytes:
                    raise DownloadError(f"{url} is larger than the download limit of {max_bytes} bytes "
                                        "(EDM_MAX_DOWNLOAD_BYTES)")
                f.write(chunk)
                if progress:
                    progress(done, total)
            f.flush()
            os.fsync(f.fileno())
        if total is not None and done < total:
            raise http.client.IncompleteRead(b"", total - done)
        return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, cache_dir: Path, *, sha256: str | None = None, allow_http: bool = False,
          max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES, timeout: float = 30.0, retries: int = 5,
          backoff_s: float = 1.0, progress: Progress | None = None) -> Downloaded:
    """The cached file of `url`, downloading it first if needed (see the module docstring).

    Transient failures (dropped connection, timeout, refused connection) are retried `retries`
    times with exponential backoff, each retry resuming where the last one stopped.
    """
    check_url(url, allow_http=allow_http)
    folder = cache_entry_dir(cache_dir, url)
    with locked(folder, url):
        cached = cached_download(cache_dir, url)
        if cached is not None:
            _check_pin(url, cached.sha256, sha256, "cached file")
            return cached
        name = _file_name(url)
        part, part_meta = folder / f"{name}.part", folder / f"{name}.part.json"
        attempt = 0
        while True:
            try:
                if _download_once(url, part, part_meta, allow_http=allow_http, max_bytes=max_bytes,
                                  timeout=timeout, progress=progress):
                    break
                continue  # restart after a 416
            except (*_TRANSIENT, urllib.error.URLError) as e:
                reason = getattr(e, "reason", None) or e
                if attempt >= retries:
                    raise DownloadError(
                        f"cannot download {url}: {reason}; it is not in the cache {folder} either. Check the "
                        "network (and proxy), or pull it on a connected machine (edm-serve pull) into the same "
                        "EDM_CACHE_DIR") from None
                attempt += 1
                wait = backoff_s * 2 ** (attempt - 1)
                log.warning("download of %s interrupted (%s); resuming in %.1f s (retry %d of %d)", url, reason,
                            wait, attempt, retries)
                time.sleep(wait)
        digest = _sha256(part)
        if sha256 is not None and digest != sha256.lower():
            part.unlink(missing_ok=True)
            part_meta.unlink(missing_ok=True)
            _check_pin(url, digest, sha256, "download")
        final = folder / name
        size = part.stat().st_size
        _write_json_atomic(folder / "source.json", {"url": url, "size": size, "sha256": digest,
                                                    "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds")})
        os.replace(part, final)
        part_meta.unlink(missing_ok=True)
        log.info("downloaded %s (%d bytes, sha256 %s)", url, size, digest, extra={"path": str(final)})
        return Downloaded(final, digest, size, url)
