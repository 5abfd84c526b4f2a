"""Downloads into the model cache, from a real HTTP server on loopback (tests/model/file_server.py)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model.download import DownloadError, IntegrityError, cache_entry_dir, cached_download, fetch
from tests.model.file_server import FileServer

ROOT = Path(__file__).resolve().parents[2]
BLOB = bytes(range(256)) * 4096  # 1 MiB, every offset distinguishable
DIGEST = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture()
def server():
    with FileServer({"/net.pkl": BLOB}) as s:
        yield s


def get(server: FileServer, cache: Path, **options):
    options = {"allow_http": True, "backoff_s": 0.0, **options}
    return fetch(server.url("/net.pkl"), cache, **options)


def test_download_reports_progress_and_is_recorded(server, tmp_path):
    seen: list[tuple[int, int | None]] = []
    got = get(server, tmp_path, progress=lambda done, total: seen.append((done, total)))
    assert got.path.read_bytes() == BLOB and got.sha256 == DIGEST and got.size == len(BLOB)
    assert seen[0] == (0, len(BLOB)) and seen[-1] == (len(BLOB), len(BLOB))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) > 1
    assert cached_download(tmp_path, server.url("/net.pkl")) == got
    # a second call uses the cache: no request
    before = len(server.requests)
    assert get(server, tmp_path) == got and len(server.requests) == before
    assert not list(got.path.parent.glob("*.part*"))


def test_resume_after_the_server_drops_the_connection(server, tmp_path):
    server.drop_after["/net.pkl"] = 300_000
    got = get(server, tmp_path, retries=2)
    assert got.path.read_bytes() == BLOB
    assert server.requests == [("/net.pkl", None), ("/net.pkl", "bytes=300000-")]
    assert server.sent_bytes == len(BLOB)  # nothing sent twice


def test_server_errors_are_retried_client_errors_are_not(server, tmp_path):
    server.fail_next["/net.pkl"] = 503
    assert get(server, tmp_path, retries=1).sha256 == DIGEST and len(server.requests) == 2
    server.fail_next["/net.pkl"] = 403
    with pytest.raises(DownloadError, match="HTTP 403"):
        get(server, tmp_path / "other", retries=3)
    assert len(server.requests) == 3


def test_resume_in_a_later_process_after_giving_up(server, tmp_path):
    server.drop_after["/net.pkl"] = 200_000
    with pytest.raises(DownloadError, match="cannot download http://127.0.0.1.*net.pkl"):
        get(server, tmp_path, retries=0)
    folder = cache_entry_dir(tmp_path, server.url("/net.pkl"))
    assert (folder / "net.pkl.part").stat().st_size == 200_000 and not (folder / "net.pkl").exists()
    assert cached_download(tmp_path, server.url("/net.pkl")) is None  # a half file is never "cached"
    got = get(server, tmp_path)
    assert got.path.read_bytes() == BLOB and server.requests[-1] == ("/net.pkl", "bytes=200000-")


def test_a_changed_file_restarts_instead_of_resuming(server, tmp_path):
    server.drop_after["/net.pkl"] = 100_000
    with pytest.raises(DownloadError):
        get(server, tmp_path, retries=0)
    server.files["/net.pkl"] = new = BLOB[::-1]  # a new ETag: If-Range fails, the server sends it all
    got = get(server, tmp_path)
    assert got.path.read_bytes() == new and got.sha256 == hashlib.sha256(new).hexdigest()


def test_two_starters_download_once(server, tmp_path):
    server.delay_s = 0.01  # ~0.6 s per download: the second process starts while the first runs
    script = textwrap.dedent(f"""
        from pathlib import Path
        from model.download import fetch
        got = fetch({server.url('/net.pkl')!r}, Path({str(tmp_path)!r}), allow_http=True)
        print(got.path, got.sha256)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] and outs[0][0].split()[1] == DIGEST
    assert server.full_gets("/net.pkl") == 1 and len(server.requests) == 1
    assert server.sent_bytes == len(BLOB)


def test_wrong_pinned_sha256_is_refused_and_leaves_no_usable_file(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(IntegrityError, match=f"sha256 of the download is {DIGEST}, but {wrong} was pinned"):
        get(server, tmp_path, sha256=wrong)
    folder = cache_entry_dir(tmp_path, server.url("/net.pkl"))
    assert sorted(p.name for p in folder.iterdir()) == ["lock"]
    assert cached_download(tmp_path, server.url("/net.pkl")) is None
    # the right pin downloads it; a wrong pin is then refused for the cached file too, without a request
    assert get(server, tmp_path, sha256=DIGEST).sha256 == DIGEST
    before = len(server.requests)
    with pytest.raises(IntegrityError, match="cached file"):
        get(server, tmp_path, sha256=wrong)
    assert len(server.requests) == before


def test_plain_http_is_refused_by_default(server, tmp_path):
    with pytest.raises(DownloadError, match="refusing plain http://.*EDM_ALLOW_HTTP"):
        fetch(server.url("/net.pkl"), tmp_path)
    assert server.requests == []
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        fetch("ftp://example.org/net.pkl", tmp_path)


def test_size_limit(server, tmp_path):
    with pytest.raises(DownloadError, match=f"{len(BLOB)} bytes, over the download limit of 1000 bytes"):
        get(server, tmp_path, max_bytes=1000)
    folder = cache_entry_dir(tmp_path, server.url("/net.pkl"))
    assert not (folder / "net.pkl.part").exists()  # refused on Content-Length, before the body was read
    assert cached_download(tmp_path, server.url("/net.pkl")) is None


def test_unreachable_server_names_the_url(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/net.pkl"
    with pytest.raises(DownloadError, match=f"cannot download {url}: .*not in the cache"):
        fetch(url, tmp_path, allow_http=True, retries=1, backoff_s=0.0)
