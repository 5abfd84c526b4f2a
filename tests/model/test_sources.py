"""Model sources: names and URLs downloaded from a loopback server, converted once, loaded from the cache;
hostile files refused before they cost time or memory."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from model import nvlabs_pickle
from model.catalogue import CATALOGUE, CatalogueEntry
from model.checkpoint import load_model
from model.download import DownloadError, IntegrityError, cached_download
from model.generate import generate
from model.images import encode_png
from model.samplers import SamplerSettings
from model.sources import SourceError, cached_card_path, materialize, parse_source
from tests.model import nvlabs_format as nv
from tests.model.file_server import FileServer
from tests.model.test_generate import TINY_KWARGS, tiny_net

ROOT = Path(__file__).resolve().parents[2]
CLASSES = tuple(f"class{k}" for k in range(10))


@pytest.fixture(scope="module")
def snapshot() -> bytes:
    return nv.snapshot_bytes(tiny_net(), TINY_KWARGS)


@pytest.fixture()
def server(snapshot):
    with FileServer({"/tiny.pkl": snapshot}) as s:
        yield s


@pytest.fixture()
def entry(server, monkeypatch) -> CatalogueEntry:
    """A catalogue entry for the tiny network, served by the loopback server."""
    net = tiny_net()
    e = CatalogueEntry(name="test-tiny-8x8-cond", url=server.url("/tiny.pkl"), dataset="test",
                       preconditioner="EDMPrecond", architecture="SongUNet", config="tiny", img_resolution=8,
                       img_channels=1, label_dim=10, parameters=sum(p.numel() for p in net.parameters()),
                       recommended={"num_steps": 7, "S_churn": 1.5}, recommended_from="this test",
                       class_names=CLASSES)
    monkeypatch.setitem(CATALOGUE, e.name, e)
    return e


def test_parse_source(tmp_path):
    local = tmp_path / "m.json"
    local.write_text("{}")
    assert parse_source(str(local)).path == local and not parse_source(str(local)).remote
    s = parse_source("edm-imagenet-64x64-cond-adm")
    assert s.url == "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl"
    assert s.entry is CATALOGUE["edm-imagenet-64x64-cond-adm"] and s.name == "edm-imagenet-64x64-cond-adm"
    assert parse_source("edm-cifar10-32x32-cond-vp.pkl").entry is CATALOGUE["edm-cifar10-32x32-cond-vp"]
    pin = "ab" * 32
    s = parse_source(f"https://example.org/a/net-1.pkl#sha256={pin.upper()}")
    assert (s.url, s.sha256, s.entry, s.name) == ("https://example.org/a/net-1.pkl", pin, None, "net-1")
    assert parse_source(CATALOGUE["baseline-cifar10-32x32-uncond-vp"].url).entry is not None
    for bad in ("ftp://example.org/x.pkl", f"{local}#sha256={pin}", "https://example.org/x.pkl#v2"):
        with pytest.raises(SourceError):
            parse_source(bad)


def images(path: Path | str) -> list[bytes]:
    net = load_model(path).net
    out = generate(net, [0, 1, 2], [3, None, 9], SamplerSettings(num_steps=5, S_churn=10, S_max=50))
    return [encode_png(img.pixels) for img in out if img is not None]


def test_name_is_downloaded_converted_once_and_then_loaded_without_the_pickle(server, entry, snapshot, tmp_path,
                                                                            monkeypatch):
    source = parse_source(entry.name)
    card_path = materialize(source, tmp_path, allow_http=True, backoff_s=0)
    card = json.loads(card_path.read_text())
    assert card_path.parent.name == "converted" and card["name"] == entry.name
    assert card["provenance"]["source_url"] == entry.url
    assert card["provenance"]["source_sha256"] == hashlib.sha256(snapshot).hexdigest()
    assert card["recommended"] == {"num_steps": 7, "S_churn": 1.5} and card["class_names"] == list(CLASSES)
    assert server.full_gets("/tiny.pkl") == 1

    # The reference images come from the pickle itself.
    pickle_path = cached_download(tmp_path, entry.url).path
    expected = images(pickle_path)

    # Second start: no request, no pickle read, byte-identical images.
    def no_pickle(*args, **kwargs):
        raise AssertionError("the pickle was read again")

    monkeypatch.setattr(nvlabs_pickle, "read_snapshot", no_pickle)
    before = len(server.requests)
    assert materialize(source, tmp_path, allow_http=True) == card_path
    assert cached_card_path(source, tmp_path) == card_path and len(server.requests) == before
    assert images(card_path) == expected


def test_url_source_with_pin(server, snapshot, tmp_path):
    digest = hashlib.sha256(snapshot).hexdigest()
    good = parse_source(f"{server.url('/tiny.pkl')}#sha256={digest}")
    assert load_model(materialize(good, tmp_path, allow_http=True)).card.provenance["source_sha256"] == digest
    other = tmp_path / "other"
    bad = parse_source(f"{server.url('/tiny.pkl')}#sha256={'1' * 64}")
    with pytest.raises(IntegrityError, match="was pinned"):
        materialize(bad, other, allow_http=True)
    assert cached_card_path(good, other) is None and cached_download(other, good.url or "") is None
    with pytest.raises(DownloadError, match="refusing plain http://"):
        materialize(good, other)


def test_a_file_that_is_not_the_catalogued_network_is_refused(server, entry, tmp_path, monkeypatch):
    monkeypatch.setitem(CATALOGUE, entry.name, dataclasses.replace(entry, label_dim=1000))
    with pytest.raises(SourceError, match="not the network the catalogue describes.*label_dim 10 \\(expected 1000\\)"):
        materialize(parse_source(entry.name), tmp_path, allow_http=True)
    assert not list((tmp_path / "downloads").glob("*/converted/*.json"))


def test_uncached_name_without_network_names_the_url(tmp_path, monkeypatch):
    with socket.socket() as s:  # no network: every request goes to a proxy port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    url = CATALOGUE["edm-cifar10-32x32-cond-vp"].url
    with pytest.raises(DownloadError, match=f"cannot download {url}: .*not in the cache"):
        materialize(parse_source("edm-cifar10-32x32-cond-vp"), tmp_path, retries=0)


# ---------------------------------------------------------------------------------------------
# Hostile files: refused within seconds, before anything large is allocated. Measured in a fresh
# process (ru_maxrss is a high-water mark): peak RSS after the attempt minus before it.

PROBE = textwrap.dedent("""
    import json, sys, time
    import torch
    from model.checkpoint import load_model
    from model.nvlabs_pickle import CheckpointError

    def status(key):  # kB
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

    path, limit = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the current RSS
    before = status("VmRSS")
    started = time.perf_counter()
    try:
        load_model(path, max_parameters=limit)
        error = None
    except CheckpointError as e:
        error = str(e)
    seconds = time.perf_counter() - started
    print(json.dumps({"error": error, "seconds": seconds, "peak_mib": (status("VmHWM") - before) / 1024}))
""")


def probe(path: Path, limit: int = 10**9) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, str(path), str(limit)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    print(path.name, result)
    return result


def claimed_parameters(kwargs: dict) -> int:
    from model.precond import EDMPrecond

    with torch.device("meta"):
        return sum(p.numel() for p in EDMPrecond(**kwargs).parameters())


def test_claimed_size_that_does_not_match_the_tensors_is_refused_cheaply(tmp_path):
    hostile = {**TINY_KWARGS, "model_channels": 1024}
    assert claimed_parameters(hostile) * 4 > 2 << 30  # it would be a > 2 GiB network
    path = tmp_path / "claims.pkl"
    path.write_bytes(nv.snapshot_bytes(tiny_net(), hostile))
    result = probe(path)
    assert "shape mismatch" in result["error"] and result["seconds"] < 5
    assert result["peak_mib"] < 200


def test_card_claiming_a_larger_network_than_its_weights_is_refused_cheaply(tmp_path):
    bundled = ROOT / "model" / "bundled"
    for f in bundled.glob("edm-digits-8x8-cond.*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    card_path = tmp_path / "edm-digits-8x8-cond.json"
    card = json.loads(card_path.read_text())
    card["network_kwargs"]["model_channels"] = 1024  # the 4.7 GB network
    card_path.write_text(json.dumps(card))
    result = probe(card_path)
    assert "shape mismatch" in result["error"] and result["seconds"] < 5 and result["peak_mib"] < 200


def test_network_over_the_limit_is_refused(tmp_path):
    path = tmp_path / "big.pkl"
    path.write_bytes(nv.snapshot_bytes(tiny_net(), TINY_KWARGS))
    result = probe(path, limit=1000)
    assert "over the limit of 1000" in result["error"] and result["peak_mib"] < 100


def test_shared_references_that_expand_are_refused(tmp_path):
    nested: list = [1]
    for _ in range(40):  # 2**40 nodes when walked as a tree
        nested = [nested, nested]
    kwargs = {**TINY_KWARGS, "extra": nested}
    blob = nv.dumps({"ema": nv.PersistentObject("EDMPrecond", {"_init_args": (), "_init_kwargs": kwargs})})
    assert len(blob) < 1000
    path = tmp_path / "expands.pkl"
    path.write_bytes(blob)
    result = probe(path)
    assert "refusing a structure that expands" in result["error"] and result["seconds"] < 5


def test_nested_tuple_keys_are_refused_before_hashing(tmp_path):
    key: tuple = ()
    for _ in range(40):  # hashing this tuple visits 2**40 nodes
        key = (key, key)
    body = pickle.dumps(key, protocol=2)[2:-1]  # pickling memoizes by id: no hashing here
    path = tmp_path / "keys.pkl"
    path.write_bytes(b"\x80\x02}" + body + b"K\x01s.")  # {key: 1}: EMPTY_DICT, key, 1, SETITEM, STOP
    result = probe(path)
    assert "not a plain key" in result["error"] and result["seconds"] < 5


def test_safetensors_whose_header_overlaps_or_misstates_sizes_is_refused(tmp_path):
    from model.checkpoint import save_model

    save_model(tiny_net(), tmp_path / "t.json", name="t", init_kwargs=TINY_KWARGS)
    weights, card_path = tmp_path / "t.safetensors", tmp_path / "t.json"
    blob = weights.read_bytes()
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + size])
    names = [k for k in header if k != "__metadata__"]
    for tamper, message in (("overlap", "overlap or leave gaps"), ("shape", "has offsets")):
        h = json.loads(json.dumps(header))
        if tamper == "overlap":  # two tensors over the same bytes (and a gap elsewhere)
            h[names[1]]["data_offsets"] = h[names[0]]["data_offsets"]
            h[names[1]]["shape"], h[names[1]]["dtype"] = h[names[0]]["shape"], h[names[0]]["dtype"]
        else:  # a shape larger than its bytes
            h[names[0]]["shape"] = [1 << 20]
        text = json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        tampered = len(text).to_bytes(8, "little") + text + blob[8 + size:]
        weights.write_bytes(tampered)
        card = json.loads(card_path.read_text())
        card["weights_sha256"] = hashlib.sha256(tampered).hexdigest()  # a card made to match
        card_path.write_text(json.dumps(card))
        with pytest.raises(nvlabs_pickle.CheckpointError, match=message):
            load_model(card_path)


def test_payloads_no_storage_uses_cost_no_memory(tmp_path):
    junk = bytes(64 << 20)  # 64 MiB beside a 0.7 MiB network: skipped, never read
    net = tiny_net()
    path = tmp_path / "junk.pkl"
    path.write_bytes(nv.dumps({"ema": net, "junk": junk}, init_kwargs={id(net): TINY_KWARGS}))
    result = probe(path)
    assert result["error"] is None and result["peak_mib"] < 32, result


def test_a_payload_shared_by_two_storages_is_refused(tmp_path):
    _, (payload,) = torch.zeros(1 << 15)._typed_storage().__reduce__()  # 128 KiB: read lazily
    rebuild = nv.Global("torch._utils", "_rebuild_tensor_v2")
    storage = nv.Global("torch.storage", "_load_from_bytes")
    tensors = {name: nv.Call(rebuild, nv.Call(storage, payload), 0, (1 << 15,), (1,), False, {})
               for name in ("a", "b")}  # the same bytes object: the second is a memo reference
    state = {"_init_args": (), "_init_kwargs": {}, "_parameters": tensors, "_buffers": {}, "_modules": {}}
    path = tmp_path / "shared.pkl"
    path.write_bytes(nv.dumps({"ema": nv.PersistentObject("EDMPrecond", state)}))
    assert "used by two storages" in probe(path)["error"]


def test_too_many_opcodes_are_refused_in_bounded_time(tmp_path):
    path = tmp_path / "ops.pkl"
    path.write_bytes(pickle.dumps({"ema": [0] * 3_000_000}, protocol=4))  # ~3 M opcodes, 6 MB
    result = probe(path)
    assert "more than 2000000 pickle opcodes" in result["error"] and result["seconds"] < 5, result
