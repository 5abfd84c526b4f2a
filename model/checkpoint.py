"""Checkpoints: our format (safetensors + JSON card) and loading of either format.

Our format is two files side by side:

* ``NAME.safetensors``: the preconditioner's state_dict (no code, no pickle);
* ``NAME.json``: the ``ModelCard`` (model/card.py) with ``weights_file`` = ``NAME.safetensors``
  and its sha256, which ``load_model`` checks before using the weights.

``load_model`` also reads NVlabs network-snapshot pickles through the restricted unpickler of
model/nvlabs_pickle.py (nothing in the file is executed); ``convert`` turns one into our format.
Networks are always rebuilt from our own classes from the card's (or the pickle's) constructor
arguments, then the weights must match exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save as safetensors_save

from model.card import CARD_FORMAT_VERSION, CardError, ModelCard, load_card
from model.nvlabs_pickle import (
    DEFAULT_MAX_PARAMETERS,
    CheckpointError,
    InertModule,
    NetworkSpec,
    NodeBudget,
    PersistentRecord,
    Snapshot,
    TensorRef,
    UnsafeCheckpointError,
    build_with_weights,
    load_network_pickle,
    spec_from_init,
)
from model.precond import PRECONDITIONERS, Precond

__all__ = [
    "CheckpointError",
    "LoadedModel",
    "UnsafeCheckpointError",
    "convert",
    "inspect",
    "load_model",
    "save_model",
    "sha256_file",
]

PICKLE_SUFFIXES = (".pkl", ".pickle")


@dataclass
class LoadedModel:
    net: Precond  # eval mode, requires_grad False, on the requested device
    card: ModelCard


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _jsonable(value: Any, depth: int = 0, budget: NodeBudget | None = None) -> Any:
    """Plain-JSON view of pickle data for provenance (records -> class + init kwargs)."""
    budget = budget or NodeBudget("the snapshot's metadata")
    budget.take()
    if depth > 32:
        return "<nested too deeply>"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v, depth + 1, budget) for v in value]
    if isinstance(value, dict):
        return {str(k)[:200]: _jsonable(v, depth + 1, budget) for k, v in value.items()}
    if isinstance(value, PersistentRecord):
        return {"class_name": value.class_name, "init_kwargs": _jsonable(value.init_kwargs, depth + 1, budget)}
    if isinstance(value, InertModule):
        return {"class_name": value.torch_name}
    if isinstance(value, TensorRef):
        return f"tensor {list(value.tensor.shape)} {value.tensor.dtype}"
    return f"<{type(value).__name__}>"


def _make_card(net: Precond, spec: NetworkSpec, **fields: Any) -> ModelCard:
    try:
        return ModelCard.model_validate(dict(
            format_version=CARD_FORMAT_VERSION,
            architecture=spec.architecture,
            network_kwargs=spec.network_kwargs,
            preconditioner=spec.preconditioner,
            precond_kwargs=spec.precond_kwargs,
            img_resolution=int(net.img_resolution),
            img_channels=int(net.img_channels),
            label_dim=int(net.label_dim),
            sigma_min=float(net.sigma_min),
            sigma_max=float(net.sigma_max),
            parameters=_count_parameters(net),
            **fields,
        ))
    except ValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'card'}: {err['msg']}" for err in e.errors())
        raise CardError(f"cannot describe {spec.preconditioner} with a model card: {details}") from None


def _finish(net: Precond, spec: NetworkSpec, device: str | torch.device) -> Precond:
    setattr(net, "init_kwargs", spec.init_kwargs())  # noqa: B010 - lets save_model() re-save a loaded net
    return net.eval().requires_grad_(False).to(torch.device(device))


def _name_from_stem(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-")[:128]
    return name or "model"


# ---------------------------------------------------------------------------------------------
# Saving


def _out_paths(path: str | Path, name: str) -> tuple[Path, Path]:
    """(weights, card): next to `path` if it names a .json/.safetensors file, else inside folder `path`."""
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        folder, stem = path.parent, path.stem
    else:
        folder, stem = path, name
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(
    net: Precond,
    path: str | Path,
    *,
    name: str,
    class_names: list[str] | None = None,
    provenance: dict[str, Any] | None = None,
    quality: dict[str, Any] | None = None,
    init_kwargs: dict[str, Any] | None = None,
    recommended: dict[str, Any] | None = None,
) -> ModelCard:
    """Write ``NAME.safetensors`` + ``NAME.json`` and return the card.

    `path` is a folder (files named after `name`) or a ``.json``/``.safetensors`` path (files
    named after its stem). The constructor arguments of `net` come from `init_kwargs`, else from
    ``net.init_kwargs`` (set by load_model); a fresh network is built from them and must have the
    same state_dict layout, so the card is known to load.
    """
    init_kwargs = init_kwargs if init_kwargs is not None else getattr(net, "init_kwargs", None)
    if not isinstance(init_kwargs, dict):
        raise CheckpointError(f"save_model needs the constructor arguments of the {type(net).__name__}: "
                              "pass init_kwargs={...} (the keywords it was built with)")
    kind = type(net).__name__
    if PRECONDITIONERS.get(kind) is not type(net):
        raise CheckpointError(f"save_model expects one of {sorted(PRECONDITIONERS)}, got {type(net).__qualname__}")
    spec = spec_from_init(kind, None, init_kwargs)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    build_with_weights(spec, tensors, source=f"{name} (check of init_kwargs)", max_parameters=None)

    weights_path, card_path = _out_paths(path, name)
    try:
        blob = safetensors_save(tensors, metadata={"format": "pt"})  # same weights, same bytes
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot serialise the weights: {e}") from None
    card = _make_card(
        net, spec, name=name, class_names=class_names, quality=quality, recommended=recommended,
        weights_file=weights_path.name, weights_sha256=hashlib.sha256(blob).hexdigest(),
        provenance={"saved_at": _now(), **(provenance or {})},
    )
    _write_atomic(weights_path, blob)
    _write_atomic(card_path, card.to_json().encode("utf-8"))  # the card last: it vouches for the weights
    return card


# ---------------------------------------------------------------------------------------------
# Loading


def _read_card(card_path: Path) -> ModelCard:
    try:
        return load_card(card_path)
    except CardError as e:
        raise CheckpointError(str(e)) from None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_views(blob: torch.Tensor, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (`blob`, uint8) as views of it: no copy, except where a
    tensor is not aligned to its element size. So a loaded network's weights share one storage
    (pickling one duplicates it; safetensors and torch.save do not). Layout: u64 header size, JSON
    header {name: {dtype, shape, data_offsets}}, then the data, every byte in exactly one tensor."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: not a readable safetensors file: {why}")

    if len(blob) < 8:
        raise bad("shorter than its header size")
    size = int.from_bytes(blob[:8].numpy().tobytes(), "little")
    if size > min(len(blob) - 8, 100 << 20):
        raise bad(f"header of {size} bytes")
    try:
        header = json.loads(blob[8:8 + size].numpy().tobytes())
    except ValueError as e:
        raise bad(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + size
    base = blob
    tensors: dict[str, torch.Tensor] = {}
    spans = []
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(str(info.get("dtype"))) if isinstance(info, dict) else None
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if (dtype is None or not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise bad(f"bad entry for {name[:100]!r}")
        begin, end = offsets
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(blob) - start or end - begin != math.prod(shape) * itemsize:
            raise bad(f"{name[:100]!r} has offsets {offsets} for shape {shape} {info['dtype']}")
        spans.append((begin, end))
        view = base[start + begin:start + end]
        if view.data_ptr() % itemsize:
            view = view.clone()  # torch kernels expect aligned elements
        tensors[name] = view.view(dtype).reshape(shape)
    spans.sort()
    ends = [0, *(e for _, e in spans)]
    if [b for b, _ in spans] != ends[:-1] or ends[-1] != len(blob) - start:
        raise bad("tensors overlap or leave gaps in the data")
    return tensors


def _load_ours(card_path: Path, device: str | torch.device, max_parameters: int | None) -> LoadedModel:
    card = _read_card(card_path)
    weights_path = card_path.parent / card.weights_file
    try:
        with open(weights_path, "rb") as f:  # hash and parse the same bytes, read once into one buffer
            blob = torch.empty(os.fstat(f.fileno()).st_size, dtype=torch.uint8)  # not zero-filled
            raw: Any = blob.numpy()  # the same memory, as a buffer
            if f.readinto(raw) != blob.numel() or f.read(1):
                raise OSError("the file changed while it was read")
    except OSError as e:
        raise CheckpointError(f"{card_path.name}: cannot read weights {card.weights_file}: {e}") from None
    actual = hashlib.sha256(raw).hexdigest()
    if actual != card.weights_sha256:
        raise CheckpointError(f"{weights_path.name}: sha256 {actual} does not match the card's "
                              f"{card.weights_sha256} ({card_path.name}); the weights were changed or replaced")
    tensors = _safetensors_views(blob, weights_path.name)
    spec = NetworkSpec(card.preconditioner, card.architecture, dict(card.precond_kwargs),
                       dict(card.network_kwargs))
    del blob
    net = build_with_weights(spec, tensors, source=card_path.name, max_parameters=max_parameters)
    for key in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max"):
        if getattr(net, key) != getattr(card, key):
            raise CheckpointError(f"{card_path.name}: card says {key} = {getattr(card, key)} but the network "
                                  f"built from it has {getattr(net, key)}")
    if _count_parameters(net) != card.parameters:
        raise CheckpointError(f"{card_path.name}: card says {card.parameters} parameters, the network has "
                              f"{_count_parameters(net)}")
    return LoadedModel(_finish(net, spec, device), card)


def _pickle_provenance(snapshot: Snapshot) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "source_file": snapshot.source,
        "source_sha256": snapshot.sha256,
        "source_format": "nvlabs-network-snapshot-pickle",
        "persistence_version": snapshot.ema.version,
        "source_class": snapshot.ema.class_name,
        "source_module_src_sha256": snapshot.ema.module_src_sha256,
    }
    budget = NodeBudget(f"{snapshot.source}: the snapshot's metadata")
    for key in ("loss_fn", "augment_pipe", "dataset_kwargs"):
        if key in snapshot.data:
            prov[key] = _jsonable(snapshot.data[key], budget=budget)
    return prov


def _load_pickle(path: Path, device: str | torch.device, max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
                 expected_sha256: str | None = None) -> LoadedModel:
    net, spec, snapshot = load_network_pickle(path, max_parameters=max_parameters)
    if expected_sha256 is not None and snapshot.sha256 != expected_sha256:
        raise CheckpointError(f"{path.name}: sha256 {snapshot.sha256} is not the {expected_sha256} it was "
                              "downloaded with; the file changed in the cache")
    card = _make_card(net, spec, name=_name_from_stem(path.stem), weights_file=path.name,
                      weights_sha256=snapshot.sha256, provenance=_pickle_provenance(snapshot))
    return LoadedModel(_finish(net, spec, device), card)


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               max_parameters: int | None = DEFAULT_MAX_PARAMETERS) -> LoadedModel:
    """Load our ``.json`` card (or its ``.safetensors``) or an NVlabs ``.pkl``; the network comes back
    in eval mode with requires_grad False, on `device`. A file whose network has more than
    `max_parameters` weights is refused before the network is built."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _load_ours(path, device, max_parameters)
    if suffix == ".safetensors":
        card_path = path.with_suffix(".json")
        if not card_path.is_file():
            raise CheckpointError(f"{path.name}: no model card {card_path.name} next to the weights")
        card = _read_card(card_path)
        if card.weights_file != path.name:
            raise CheckpointError(f"{card_path.name} describes {card.weights_file}, not {path.name}")
        return _load_ours(card_path, device, max_parameters)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, device, max_parameters)
    raise CheckpointError(f"{path.name}: unknown checkpoint type; expected .json, .safetensors or .pkl")


def convert(
    pkl: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    class_names: list[str] | None = None,
    provenance: dict[str, Any] | None = None,
    recommended: dict[str, Any] | None = None,
    max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
    expected_sha256: str | None = None,
) -> ModelCard:
    """NVlabs pickle -> our format (see save_model for `out`); provenance records the source file.

    expected_sha256: refuse unless the bytes read are exactly these (a download's digest)."""
    loaded = _load_pickle(Path(pkl), "cpu", max_parameters, expected_sha256)
    prov = {**loaded.card.provenance, "converted_at": _now(), **(provenance or {})}
    return save_model(loaded.net, out, name=name or loaded.card.name, class_names=class_names,
                      provenance=prov, init_kwargs=getattr(loaded.net, "init_kwargs"),  # noqa: B009
                      recommended=recommended)


def inspect(path: str | Path) -> dict[str, Any]:
    """The model card as a JSON-ready dict (incl. the parameter count).

    Our format: read from the card without loading weights. A pickle: loaded (safely) to derive it.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        return _read_card(path).to_dict()
    if path.suffix.lower() == ".safetensors" and path.with_suffix(".json").is_file():
        return _read_card(path.with_suffix(".json")).to_dict()
    return load_model(path).card.to_dict()
