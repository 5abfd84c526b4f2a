"""Checkpoint formats: NVlabs pickles read without executing code, our safetensors + card format."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from model.card import CardError, ModelCard, load_card
from model.checkpoint import LoadedModel, convert, inspect, load_model, save_model
from model.nvlabs_pickle import (
    CheckpointError,
    InertModule,
    PersistentRecord,
    TensorRef,
    UnsafeCheckpointError,
    read_snapshot,
)
from model.precond import PRECONDITIONERS, Precond
from tests.model import nvlabs_format as nv

torch.set_num_threads(1)

DDPMPP = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
              augment_dim=9, dropout=0.13)
NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4])
ADM = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4])
ARCHS = {"ddpmpp": DDPMPP, "ncsnpp": NCSNPP, "adm": ADM}


def make_net(precond: str = "EDMPrecond", arch: str = "ddpmpp", label_dim: int = 0,
             seed: int = 0) -> tuple[Precond, dict[str, Any]]:
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=label_dim, **ARCHS[arch])
    torch.manual_seed(seed)
    net = PRECONDITIONERS[precond](**kwargs)
    with torch.no_grad():  # no zero-initialised layers: every weight must make it through
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net.eval(), kwargs


def run(net: Precond) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.3, 4.0])
    labels = torch.eye(net.label_dim)[[0, net.label_dim - 1]] if net.label_dim else None
    with torch.no_grad():
        return net(x, sigma, labels)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


@pytest.fixture(scope="module")
def snapshot() -> tuple[Precond, bytes]:
    net, kwargs = make_net("EDMPrecond", "ddpmpp", label_dim=3)
    return net, nv.snapshot_bytes(net, kwargs)


# ---------------------------------------------------------------------------------------------
# NVlabs pickles: round trip


@pytest.mark.parametrize("precond", ["VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond"])
@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp", "adm"])
def test_nvlabs_pickle_round_trip_is_bit_exact(tmp_path: Path, precond: str, arch: str) -> None:
    label_dim = 0 if arch == "ncsnpp" else 4
    net, kwargs = make_net(precond, arch, label_dim)
    pkl = write(tmp_path / f"edm-{precond}-{arch}.pkl", nv.snapshot_bytes(net, kwargs))

    loaded = load_model(pkl)
    assert isinstance(loaded, LoadedModel) and type(loaded.net) is type(net)
    assert_same_weights(net, loaded.net)
    assert torch.equal(run(net), run(loaded.net))
    assert not loaded.net.training
    assert not any(p.requires_grad for p in loaded.net.parameters())

    card = loaded.card
    assert card.preconditioner == precond and card.architecture == kwargs["model_type"]
    assert card.name == f"edm-{precond}-{arch}" and card.label_dim == label_dim
    assert (card.sigma_min, card.sigma_max) == (float(net.sigma_min), float(net.sigma_max))
    assert card.parameters == sum(p.numel() for p in net.parameters())
    assert card.provenance["source_file"] == pkl.name
    assert card.provenance["loss_fn"]["class_name"] == "EDMLoss"
    assert ModelCard.model_validate_json(card.to_json()) == card


def test_converted_model_loads_bit_exact(tmp_path: Path, snapshot: tuple[Precond, bytes]) -> None:
    net, blob = snapshot
    pkl = write(tmp_path / "edm-cifar10-32x32-cond-vp.pkl", blob)
    card = convert(pkl, tmp_path / "out", class_names=["a", "b", "c"], provenance={"training_command": "train.py"})
    assert (tmp_path / "out" / "edm-cifar10-32x32-cond-vp.safetensors").is_file()
    on_disk = load_card(tmp_path / "out" / "edm-cifar10-32x32-cond-vp.json")
    assert on_disk == card
    assert card.provenance["source_sha256"] == __import__("hashlib").sha256(blob).hexdigest()
    assert card.provenance["training_command"] == "train.py" and "converted_at" in card.provenance
    assert card.weights_file == "edm-cifar10-32x32-cond-vp.safetensors"

    loaded = load_model(tmp_path / "out" / "edm-cifar10-32x32-cond-vp.json")
    assert_same_weights(net, loaded.net)
    assert torch.equal(run(net), run(loaded.net))
    assert loaded.card.class_names == ["a", "b", "c"]


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_numpy_scalars_in_both_spellings(tmp_path: Path, numpy_module: str) -> None:
    net, kwargs = make_net("VEPrecond", "ddpmpp")
    np_kwargs = {**kwargs, "dropout": np.float64(0.13), "augment_dim": np.int64(9), "label_dim": np.int32(0)}
    dataset = dict(path="/x.zip", xflip=np.bool_(True), resolution=np.int64(8), scale=np.float32(0.5))
    blob = nv.dumps(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=nv.EasyDict(dataset)),
                    init_kwargs={id(net): np_kwargs}, numpy_module=numpy_module)
    assert f"{numpy_module}\nscalar".encode() in blob
    loaded = load_model(write(tmp_path / "np.pkl", blob))
    assert_same_weights(net, loaded.net)
    assert loaded.card.network_kwargs["dropout"] == 0.13 and type(loaded.card.network_kwargs["dropout"]) is float
    assert loaded.card.network_kwargs["augment_dim"] == 9
    assert loaded.card.provenance["dataset_kwargs"] == dict(path="/x.zip", xflip=True, resolution=8, scale=0.5)


def test_reader_returns_inert_records_and_imports_nothing(tmp_path: Path,
                                                          snapshot: tuple[Precond, bytes]) -> None:
    pkl = write(tmp_path / "s.pkl", snapshot[1])
    modules_before = set(sys.modules)
    snap = read_snapshot(pkl)
    load_model(pkl)
    assert set(sys.modules) - modules_before == set()  # nothing imported (no torch_utils, dnnlib, ...)

    assert isinstance(snap.ema, PersistentRecord) and snap.ema.class_name == "EDMPrecond"
    assert snap.ema.init_kwargs is not None and snap.ema.init_kwargs["model_type"] == "SongUNet"
    assert type(snap.data["dataset_kwargs"]) is dict

    found: list[Any] = []

    def walk(obj: Any) -> None:
        found.append(obj)
        if isinstance(obj, PersistentRecord | InertModule):
            obj = obj.state
        if isinstance(obj, dict):
            for v in obj.values():
                walk(v)

    walk(snap.data)
    assert not any(isinstance(o, torch.nn.Module | torch.Tensor) for o in found)  # stand-ins only
    assert any(isinstance(o, InertModule) and o.torch_name.endswith("ModuleDict") for o in found)
    assert any(isinstance(o, TensorRef) for o in found)


# ---------------------------------------------------------------------------------------------
# Attacks: refused, naming the global, and the payload never ran


class _SystemCall:
    """Pickles, via a classic __reduce__, as os.system(cmd) (spelled posix.system)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.cmd,)


def _write_marker_code(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned')"


ATTACKS = {
    "os.system": lambda m: {"ema": nv.Call(nv.Global("os", "system"), f"touch '{m}'")},
    "posix.system": lambda m: {"ema": _SystemCall(f"touch '{m}'")},
    "builtins.eval": lambda m: {"ema": nv.Call(nv.Global("builtins", "eval"), _write_marker_code(m))},
    "builtins.exec": lambda m: {"ema": nv.Call(nv.Global("builtins", "exec"), _write_marker_code(m))},
    "subprocess.Popen": lambda m: {"ema": nv.Call(nv.Global("subprocess", "Popen"), ["touch", str(m)])},
    "subprocess.check_call": lambda m: {"ema": nv.Call(nv.Global("subprocess", "check_call"), ["touch", str(m)])},
}


@pytest.mark.parametrize("target", sorted(ATTACKS))
def test_code_execution_globals_are_refused(tmp_path: Path, target: str) -> None:
    marker = tmp_path / "pwned"
    pkl = write(tmp_path / "evil.pkl", nv.dumps(ATTACKS[target](marker)))
    with pytest.raises(UnsafeCheckpointError, match=rf"evil\.pkl: refusing global {target.replace('.', '[.]')}"):
        load_model(pkl)
    assert not marker.exists()

    # Control: the payload is live, plain pickle runs it (in a child process without torch).
    code = "import pickle, sys\ntry: pickle.loads(open(sys.argv[1], 'rb').read())\nexcept Exception: pass"
    subprocess.run([sys.executable, "-c", code, str(pkl)], check=True, timeout=60, capture_output=True)
    assert marker.exists()


def test_attack_nested_in_loss_fn_is_refused(tmp_path: Path, snapshot: tuple[Precond, bytes]) -> None:
    marker = tmp_path / "pwned"
    net, _ = snapshot
    loss = nv.PersistentObject("EDMLoss", {"P_mean": -1.2, "weights": [{"x": _SystemCall(f"touch '{marker}'")}],
                                           "_init_args": (), "_init_kwargs": {}})
    blob = nv.snapshot_bytes(net, dict(img_resolution=8, img_channels=3, label_dim=3, **DDPMPP), loss_fn=loss)
    with pytest.raises(UnsafeCheckpointError, match="refusing global posix.system"):
        load_model(write(tmp_path / "nested.pkl", blob))
    assert not marker.exists()


def test_attack_in_init_kwargs_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    net, kwargs = make_net()
    evil = {**kwargs, "model_channels": nv.Call(nv.Global("builtins", "exec"), _write_marker_code(marker))}
    blob = nv.dumps(dict(ema=net), init_kwargs={id(net): evil})
    with pytest.raises(UnsafeCheckpointError, match="refusing global builtins.exec"):
        load_model(write(tmp_path / "kw.pkl", blob))
    assert not marker.exists()


def test_module_src_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = _write_marker_code(marker) + "\nimport torch\nclass EDMPrecond(torch.nn.Module):\n    pass\n"
    net, kwargs = make_net()
    pkl = write(tmp_path / "src.pkl", nv.snapshot_bytes(net, kwargs, module_src=src))
    loaded = load_model(pkl)  # a well-formed snapshot: it loads, from our classes
    assert_same_weights(net, loaded.net)
    assert not marker.exists()
    exec(compile(src, "module_src", "exec"), {})  # control: the reference loader's exec would write it
    assert marker.exists()


@pytest.mark.parametrize("module,name", [
    ("torch.nn.modules.linear", "Linear"),       # real torch classes are never instantiated
    ("torch", "load"),
    ("torch.serialization", "load"),
    ("torch._utils", "_rebuild_from_type_v2"),
    ("builtins", "getattr"),
    ("__builtin__", "eval"),                      # python 2 spelling maps to builtins.eval
    ("copyreg", "__newobj__"),
    ("training.networks", "EDMPrecond"),
    ("torch_utils.persistence", "_src_to_module"),
    ("numpy.core.multiarray", "_reconstruct"),
])
def test_other_globals_are_refused(tmp_path: Path, module: str, name: str) -> None:
    qualname = f"{'builtins' if module == '__builtin__' else module}.{name}"
    blob = nv.dumps({"ema": nv.Call(nv.Global(module, name), "x")})
    with pytest.raises(UnsafeCheckpointError, match=f"refusing global {qualname}"):
        load_model(write(tmp_path / "g.pkl", blob))


@pytest.mark.parametrize("func,args", [
    (nv.Global("collections", "OrderedDict"), ()),
    (nv.Global("torch._utils", "_rebuild_tensor_v2"),
     (nv.Call(nv.Global("torch.storage", "_load_from_bytes"), nv.legacy_storage_bytes()), 0, (4,), (1,), False, {})),
    (nv.Global("torch_utils.persistence", "_reconstruct_persistent_obj"),
     (dict(type="class", version=6, module_src="", class_name="EDMPrecond", state={}),)),
    (nv.Global("numpy", "dtype"), ("f8", False, True)),
])
def test_setting_attributes_on_loaded_objects_is_refused(tmp_path: Path, func: Any, args: Any) -> None:
    """A BUILD opcode after an allowed call may only feed the stand-ins' own checked __setstate__."""
    state = {"items": 1} if func.name != "dtype" else ("|", 1)
    blob = nv.dumps({"ema": nv.CallThenBuild(func, args, state)})
    with pytest.raises(UnsafeCheckpointError, match="set state|set attributes|dtype state"):
        read_snapshot(write(tmp_path / "b.pkl", blob))


def test_attack_inside_tensor_storage_is_refused(tmp_path: Path) -> None:
    net, _ = make_net()
    payload = nv.legacy_storage_bytes(inner_global=("os", "system"))
    blob = nv.dumps({"ema": net, "loss_fn": nv.tensor_from_payload(payload)}, init_kwargs={})
    with pytest.raises(UnsafeCheckpointError, match="refusing global os.system inside a tensor storage"):
        load_model(write(tmp_path / "t.pkl", blob))


def test_real_storage_payload_decodes(tmp_path: Path) -> None:
    blob = nv.dumps({"ema": nv.PersistentObject("X", {"_parameters": {"w": nv.tensor_from_payload(
        nv.legacy_storage_bytes())}})})
    snap = read_snapshot(write(tmp_path / "t.pkl", blob))
    assert torch.equal(snap.ema.state["_parameters"]["w"].tensor, torch.arange(4, dtype=torch.float32))


def test_persistent_meta_shape_is_checked(tmp_path: Path) -> None:
    for bad, message in [
        (nv.PersistentObject("EDMPrecond", {}, version=5), "format version 5"),
        (nv.PersistentObject("EDMPrecond", {}, kind="function"), "unknown type"),
        (nv.PersistentObject("os.system; x", {}), "bad class name"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            load_model(write(tmp_path / "m.pkl", nv.dumps({"ema": bad})))


# ---------------------------------------------------------------------------------------------
# Corrupt or foreign files


@pytest.mark.parametrize("cut", [1, 2, 100, 5000, 0.5, -200, -1])
def test_truncated_pickle(tmp_path: Path, snapshot: tuple[Precond, bytes], cut: float) -> None:
    blob = snapshot[1]
    n = int(len(blob) * cut) if isinstance(cut, float) else cut
    with pytest.raises(CheckpointError, match="trunc.pkl"):
        load_model(write(tmp_path / "trunc.pkl", blob[:n]))


@pytest.mark.parametrize("blob", [
    b"",
    random.Random(0).randbytes(4096),
    b"\x80\x04" + random.Random(1).randbytes(4096),
    b"PK\x03\x04 not really a zip",
    b"hello world\n",
])
def test_not_a_snapshot(tmp_path: Path, blob: bytes) -> None:
    with pytest.raises(CheckpointError, match="junk.pkl"):
        load_model(write(tmp_path / "junk.pkl", blob))


def test_torch_save_file_is_not_a_snapshot(tmp_path: Path) -> None:
    torch.save({"ema": torch.zeros(3)}, tmp_path / "ts.pkl")
    with pytest.raises(CheckpointError, match="ts.pkl: a zip archive"):
        load_model(tmp_path / "ts.pkl")


@pytest.mark.parametrize("data,message", [
    ({"loss_fn": None, "dataset_kwargs": {}}, "no 'ema' network"),
    ([1, 2, 3], "holds a list"),
    ({"ema": {"weights": 1}}, "'ema' is not a persistent"),
    ({"ema": nv.PersistentObject("Evil", {"_init_kwargs": {}})}, "unknown preconditioner 'Evil'"),
    ({"ema": nv.PersistentObject("EDMPrecond", {})}, "did not record its constructor arguments"),
])
def test_snapshot_structure_errors(tmp_path: Path, data: Any, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        load_model(write(tmp_path / "s.pkl", nv.dumps(data)))


def test_unknown_model_type(tmp_path: Path) -> None:
    net, kwargs = make_net()
    blob = nv.snapshot_bytes(net, {**kwargs, "model_type": "EvilNet"})
    with pytest.raises(CheckpointError, match=r"unknown model_type 'EvilNet'.*DhariwalUNet"):
        load_model(write(tmp_path / "mt.pkl", blob))


def test_weights_that_do_not_fit_are_named(tmp_path: Path) -> None:
    net, kwargs = make_net()
    wrong = nv.snapshot_bytes(net, {**kwargs, "augment_dim": 0})
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.map_augment\.weight"):
        load_model(write(tmp_path / "a.pkl", wrong))
    shape = nv.snapshot_bytes(net, {**kwargs, "augment_dim": 5})
    with pytest.raises(CheckpointError, match=r"shape mismatch .*model\.map_augment\.weight \[16, 9\] vs \[16, 5\]"):
        load_model(write(tmp_path / "b.pkl", shape))
    del cast(Any, net.model).map_layer1._parameters["bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: model\.map_layer1\.bias"):
        load_model(write(tmp_path / "c.pkl", nv.snapshot_bytes(net, kwargs)))


def test_corrupt_storage_payload(tmp_path: Path) -> None:
    payload = nv.legacy_storage_bytes()
    for bad in (payload[:-3], payload + b"\x00", payload.replace(b"\x8a\nl\xfc", b"\x8a\nm\xfc", 1)):
        blob = nv.dumps({"ema": nv.PersistentObject("X", {"_parameters": {"w": nv.tensor_from_payload(bad)}})})
        with pytest.raises(CheckpointError, match="p.pkl"):
            read_snapshot(write(tmp_path / "p.pkl", blob))


# ---------------------------------------------------------------------------------------------
# Our format


def test_our_format_round_trip(tmp_path: Path) -> None:
    net, kwargs = make_net("iDDPMPrecond", "adm", label_dim=2)
    card = save_model(net, tmp_path, name="tiny-adm", class_names=["cat", "dog"], init_kwargs=kwargs,
                      provenance={"training_command": "edm-serve train ..."}, quality={"fid": 12.5})
    assert card.weights_file == "tiny-adm.safetensors"
    for path in (tmp_path / "tiny-adm.json", tmp_path / "tiny-adm.safetensors"):
        loaded = load_model(path)
        assert loaded.card == card
        assert_same_weights(net, loaded.net)
        assert torch.equal(run(net), run(loaded.net))
        assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
    # a loaded network remembers its constructor arguments, so it can be saved again as is
    again = save_model(loaded.net, tmp_path / "copy.json", name="tiny-adm-copy")
    assert again.weights_sha256 == card.weights_sha256 and again.weights_file == "copy.safetensors"

    info = inspect(tmp_path / "tiny-adm.json")
    assert info["parameters"] == sum(p.numel() for p in net.parameters()) and info["name"] == "tiny-adm"
    assert info["quality"] == {"fid": 12.5}


def test_card_file_is_plain_json_with_infinity(tmp_path: Path) -> None:
    net, kwargs = make_net("EDMPrecond", "ddpmpp")
    save_model(net, tmp_path / "m.json", name="m", init_kwargs={**kwargs, "sigma_max": math.inf})
    raw = json.loads((tmp_path / "m.json").read_text())
    assert raw["sigma_max"] == "Infinity" and raw["precond_kwargs"]["sigma_max"] == "Infinity"
    assert raw["weights_file"] == "m.safetensors" and len(raw["weights_sha256"]) == 64
    card = load_card(tmp_path / "m.json")
    assert card.sigma_max == math.inf and card.precond_kwargs["sigma_max"] == math.inf
    assert load_model(tmp_path / "m.json").net.sigma_max == math.inf


def test_sha256_mismatch_is_detected(tmp_path: Path) -> None:
    net, kwargs = make_net()
    save_model(net, tmp_path, name="m", init_kwargs=kwargs)
    weights = tmp_path / "m.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-5] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"m\.safetensors: sha256 .* does not match"):
        load_model(tmp_path / "m.json")


def test_our_format_errors(tmp_path: Path) -> None:
    net, kwargs = make_net()
    with pytest.raises(CheckpointError, match="pass init_kwargs"):
        save_model(net, tmp_path, name="m")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        save_model(net, tmp_path, name="m", init_kwargs={**kwargs, "model_channels": 32})
    with pytest.raises(CardError, match="class_names has 2 entries but label_dim is 0|unconditional"):
        save_model(net, tmp_path, name="m", init_kwargs=kwargs, class_names=["a", "b"])
    card = save_model(net, tmp_path, name="m", init_kwargs=kwargs)

    (tmp_path / "orphan.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="no model card orphan.json"):
        load_model(tmp_path / "orphan.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "missing.json")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_model(tmp_path / "m.txt")
    (tmp_path / "bad.json").write_text(card.to_json().replace('"SongUNet"', '"EvilNet"'))
    with pytest.raises(CheckpointError, match=r"bad\.json: invalid model card:\n  architecture"):
        load_model(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="broken.json"):
        load_model(tmp_path / "broken.json")


# ---------------------------------------------------------------------------------------------
# The card


def card_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        name="edm-cifar10-32x32-cond-vp", architecture="SongUNet", network_kwargs={"channel_mult": (2, 2, 2)},
        preconditioner="EDMPrecond", precond_kwargs={"img_resolution": 32, "label_dim": 10},
        img_resolution=32, img_channels=3, label_dim=10, class_names=[f"c{i}" for i in range(10)],
        sigma_min=0.0, sigma_max=math.inf, parameters=55735299, weights_sha256="ab" * 32,
        weights_file="edm.safetensors", provenance={"source_file": "edm.pkl"},
    )
    fields.update(overrides)
    return fields


def test_card_json_round_trip() -> None:
    card = ModelCard(**card_fields())
    text = card.to_json()
    assert json.loads(text)["network_kwargs"] == {"channel_mult": [2, 2, 2]}
    assert ModelCard.model_validate_json(text) == card
    assert card.format_version == 1 and card.quality is None


@pytest.mark.parametrize("overrides,message", [
    (dict(class_names=["a"]), "class_names has 1 entries but label_dim is 10"),
    (dict(class_names=["a"] * 10), "class_names must be unique"),
    (dict(label_dim=0, class_names=["a"], precond_kwargs={}), "unconditional"),
    (dict(sigma_min=80.0, sigma_max=0.002), "must be below sigma_max"),
    (dict(sigma_max=math.nan), "sigma_max"),
    (dict(network_kwargs={"dropout": math.nan}), "NaN"),
    (dict(architecture="ResNet"), "architecture"),
    (dict(preconditioner="Evil"), "preconditioner"),
    (dict(name="../etc/passwd"), "name"),
    (dict(weights_file="../x.safetensors"), "bare file name"),
    (dict(weights_sha256="xyz"), "weights_sha256"),
    (dict(precond_kwargs={"img_resolution": 64}), "disagrees with img_resolution = 32"),
    (dict(precond_kwargs={"model_type": "SongUNet"}), "architecture"),
    (dict(format_version=99), "newer than this edm-serve"),
    (dict(unknown_field=1), "unknown_field"),
    (dict(network_kwargs={"x": object()}), "not plain JSON"),
])
def test_card_validation_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelCard(**card_fields(**overrides))


def test_card_module_does_not_import_torch() -> None:
    code = "import sys, model.card; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 5])
def test_other_pickle_protocols(tmp_path: Path, protocol: int) -> None:
    """Older protocols spell things differently (GLOBAL opcodes, copyreg._reconstructor for
    ModuleDict and EasyDict, _codecs.encode for bytes); they read the same."""
    net, kwargs = make_net("VPPrecond", "ddpmpp")
    loaded = load_model(write(tmp_path / "p.pkl", nv.snapshot_bytes(net, kwargs, protocol=protocol)))
    assert_same_weights(net, loaded.net)
    assert loaded.card.provenance["dataset_kwargs"]["resolution"] == 8
