"""`edm-serve models / pull / inspect / convert / sample` with catalogue names and URLs, as real processes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.catalogue import CATALOGUE
from tests.model import nvlabs_format as nv
from tests.model.file_server import FileServer
from tests.model.test_generate import TINY_KWARGS, tiny_net

ROOT = Path(__file__).resolve().parents[2]


def edm_serve(*args: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "EDM_CACHE_DIR": str(cache), **env}
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=full,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def served():
    blob = nv.snapshot_bytes(tiny_net(), TINY_KWARGS)
    with FileServer({"/tiny.pkl": blob}) as server:
        yield server, hashlib.sha256(blob).hexdigest()


def test_models_lists_the_catalogue(tmp_path):
    r = edm_serve("models", "--json", cache=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["name"] for row in rows] == list(CATALOGUE)
    assert all(row["cached"] is None and row["url"].startswith("https://") for row in rows)
    table = edm_serve("models", cache=tmp_path)
    assert "edm-imagenet-64x64-cond-adm" in table.stdout and "S_churn=40" in table.stdout


def test_pull_inspect_convert_and_sample_by_url(served, tmp_path):
    server, digest = served
    url = server.url("/tiny.pkl")
    cache = tmp_path / "cache"
    refused = edm_serve("pull", url, cache=cache)
    assert refused.returncode == 2 and "refusing plain http://" in refused.stderr
    pulled = edm_serve("pull", f"{url}#sha256={digest}", "--allow-http", cache=cache)
    assert pulled.returncode == 0, pulled.stderr
    card_path = Path(pulled.stdout.strip())
    assert card_path.name == "tiny.json" and card_path.is_file() and "tiny" in pulled.stderr  # progress bar
    before = len(server.requests)
    inspected = edm_serve("inspect", url, cache=cache, EDM_ALLOW_HTTP="true")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["provenance"]["source_sha256"] == digest
    out = tmp_path / "copy" / "tiny.json"
    converted = edm_serve("convert", url, str(out), "--allow-http", cache=cache)
    assert converted.returncode == 0, converted.stderr
    assert json.loads(out.read_text())["provenance"]["source_url"] == url
    sampled = edm_serve("sample", "--model", url, "--allow-http", "--seeds", "0-1", "--steps", "3",
                        "--outdir", str(tmp_path / "out"), "--device", "cpu", cache=cache)
    assert sampled.returncode == 0, sampled.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000000.png", "000001.png"]
    assert len(server.requests) == before  # all from the cache
    wrong = edm_serve("pull", f"{url}#sha256={'0' * 64}", "--allow-http", cache=cache)
    assert wrong.returncode == 2 and "was pinned" in wrong.stderr
