"""Models configured by catalogue name or URL: the worker's configured_models downloads and converts
them; the gateway lists source, sha256 and recommended settings; requests that omit sampler
settings get the recommended ones."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from contract.models import configured_models, configured_sources
from contract.settings import WorkerSettings
from model.card import ModelCard
from model.catalogue import CATALOGUE, CatalogueEntry
from service.app import create_app
from service.catalog import Catalog
from service.schemas import GenerateRequest
from service.settings import GatewaySettings
from service.validation import resolve
from tests.integration.servers import RedisServer, ThreadedServer
from tests.model import nvlabs_format as nv
from tests.model.file_server import FileServer
from tests.model.test_generate import TINY_KWARGS, tiny_net

RECOMMENDED = {"num_steps": 7, "S_churn": 1.5, "S_max": 50}


@pytest.fixture(scope="module")
def blob() -> bytes:
    return nv.snapshot_bytes(tiny_net(), TINY_KWARGS)


@pytest.fixture()
def served(blob, monkeypatch):
    """A loopback server with the tiny pickle, catalogued as 'test-tiny'."""
    with FileServer({"/tiny.pkl": blob}) as server:
        entry = CatalogueEntry(name="test-tiny", url=server.url("/tiny.pkl"), dataset="test",
                               preconditioner="EDMPrecond", architecture="SongUNet", config="tiny", img_resolution=8,
                               img_channels=1, label_dim=10, parameters=sum(p.numel() for p in tiny_net().parameters()),
                               recommended=RECOMMENDED, recommended_from="this test")
        monkeypatch.setitem(CATALOGUE, entry.name, entry)
        yield server


def test_sources_from_settings_need_no_network(tmp_path):
    pin = "cd" * 32
    settings = GatewaySettings(models=f"imagenet=edm-imagenet-64x64-cond-adm,mine=https://example.org/n.pkl#sha256={pin}",
                               bundled_model=False, cache_dir=tmp_path)
    sources = configured_sources(settings)
    assert sources["imagenet"].entry is CATALOGUE["edm-imagenet-64x64-cond-adm"]
    assert (sources["mine"].url, sources["mine"].sha256) == ("https://example.org/n.pkl", pin)
    listed = {m["name"]: m for m in Catalog.from_settings(settings).describe({})}
    assert listed["imagenet"]["format"] == "download" and listed["imagenet"]["card"] is None
    assert listed["imagenet"]["source"]["url"].endswith("/edm-imagenet-64x64-cond-adm.pkl")
    assert listed["imagenet"]["recommended"]["num_steps"] == 256 and listed["imagenet"]["sha256"] is None
    assert listed["mine"]["sha256"] == pin and listed["mine"]["recommended"] is None


def test_worker_downloads_and_gateway_lists_source_sha256_and_recommended(served, blob, tmp_path,
                                                                          redis_server: RedisServer):
    common = {"models": "tiny=test-tiny", "bundled_model": False, "cache_dir": tmp_path, "allow_http": True,
              "redis_url": redis_server.url}
    # A worker serving another model does not download this one.
    assert configured_models(WorkerSettings(**common), only=[]) and served.requests == []
    models = configured_models(WorkerSettings(**common))
    assert models["tiny"].parent.name == "converted" and served.full_gets("/tiny.pkl") == 1
    assert configured_models(WorkerSettings(**common)) == models and len(served.requests) == 1  # cached

    with ThreadedServer(create_app(GatewaySettings(**common))) as gateway:
        listing = httpx.get(f"{gateway.url}/v1/models", timeout=10).json()
    (tiny,) = listing["models"]
    assert tiny["source"] == {"kind": "catalogue", "url": served.url("/tiny.pkl"), "pinned_sha256": None,
                              "catalogue_name": "test-tiny"}
    assert tiny["sha256"] == hashlib.sha256(blob).hexdigest()
    assert tiny["recommended"] == RECOMMENDED and tiny["card"]["recommended"] == RECOMMENDED


def test_configuring_an_unreachable_model_names_it(tmp_path):
    settings = WorkerSettings(models="x=https://127.0.0.1:9/none.pkl", bundled_model=False, cache_dir=tmp_path,
                              download_retries=0)
    with pytest.raises(ValueError, match="model 'x': cannot download https://127.0.0.1:9/none.pkl: .*not in the cache"):
        configured_models(settings)


CARD = ModelCard(name="m", architecture="SongUNet", preconditioner="EDMPrecond", img_resolution=8, img_channels=1,
                 label_dim=0, sigma_min=0.002, sigma_max=80.0, parameters=1, weights_sha256="0" * 64,
                 weights_file="m.safetensors", recommended={"num_steps": 256, "S_churn": 40, "S_min": 0.05,
                                                            "S_max": 50, "S_noise": 1.003})


def sampler(**body: object):
    return resolve(GenerateRequest(**body), "m", CARD, max_images=4, max_steps=1000, draw=lambda: 1).sampler


def test_omitted_sampler_settings_take_the_recommended_ones():
    got = sampler()
    assert (got.num_steps, got.S_churn, got.S_min, got.S_max, got.S_noise) == (256, 40, 0.05, 50, 1.003)
    given = sampler(num_steps=18, S_churn=0)  # given settings are kept, even at the reference defaults
    assert (given.num_steps, given.S_churn, given.S_max) == (18, 0, 50)
    plain = resolve(GenerateRequest(), "m", CARD.model_copy(update={"recommended": None}), max_images=4,
                    max_steps=1000, draw=lambda: 1).sampler
    assert plain.num_steps == 18 and plain.S_churn == 0


def test_the_bundled_card_recommends_its_own_settings():
    from contract.models import bundled_card_path
    from model.card import load_card

    path = bundled_card_path()
    assert path is not None and load_card(path).recommended == {"num_steps": 18}


def test_two_workers_starting_together_download_and_convert_once(blob, tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).resolve().parents[2]
    with FileServer({"/tiny.pkl": blob}) as server:
        server.chunk, server.delay_s = 4096, 0.002  # ~0.4 s per download: the starts overlap
        script = textwrap.dedent(f"""
            import logging
            logging.basicConfig(level=logging.INFO)
            from contract.models import configured_models
            from contract.settings import WorkerSettings
            settings = WorkerSettings(models={{"tiny": {server.url('/tiny.pkl')!r}}}, bundled_model=False,
                                      cache_dir={str(tmp_path)!r}, allow_http=True)
            print(configured_models(settings)["tiny"])
        """)
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=root) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] and outs[0][0].strip().endswith("converted/tiny.json")
    assert server.requests == [("/tiny.pkl", None)]
    converting = [err.count("converting") for _, err in outs]
    assert sorted(converting) == [0, 1], outs  # one converted, the other found the conversion
