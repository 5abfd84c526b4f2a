"""Read NVlabs/edm network-snapshot pickles without executing anything from the file.

The official snapshots (``network-snapshot-*.pkl``, ``edm-*.pkl``) are ``pickle.dump`` of

    {'ema': <network>, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': {...}}

where every NVlabs class is written by ``torch_utils.persistence`` as a call

    torch_utils.persistence._reconstruct_persistent_obj(meta)
    meta = {'type': 'class', 'version': 6, 'module_src': <Python source of its module>,
            'class_name': 'EDMPrecond', 'state': <the object's __dict__, incl. '_init_kwargs'>}

The reference loader ``exec``s ``module_src``; plain ``pickle.load`` would also call any global a
hostile file names. Here instead:

* A ``pickle.Unpickler`` subclass resolves globals through an explicit allow-list
  (``_SafeUnpickler.find_class``); every name maps to a function or class defined in this module or
  to an inert builtin container. Nothing else is ever imported or looked up, so any other global
  (``os.system``, ``builtins.eval``, ``subprocess.Popen``, the real ``torch.nn`` classes, ...)
  raises ``UnsafeCheckpointError`` naming it, before it could be called.
* The persistence hook becomes ``_reconstruct_persistent``: it checks the meta's shape, keeps the
  class name, the init arguments and the state, and only hashes ``module_src`` (never compiles,
  executes or imports it). The result is a ``PersistentRecord``, plain data.
* ``torch.nn`` modules the networks hold (ModuleDict, ...) become ``InertModule`` stand-ins that
  only keep their state dict.
* Tensors: with plain ``pickle.dump`` a tensor is ``_rebuild_tensor_v2(storage, offset, size,
  stride, ...)`` and its storage is ``torch.storage._load_from_bytes(b)``, ``b`` being a legacy
  ``torch.save`` stream. That stream is parsed here (``_parse_legacy_storage``): its four small
  pickles go through a second unpickler whose allow-list holds only the ``torch.*Storage`` type
  names, and the raw little-endian data is read straight from the file into a new tensor. We do not hand
  those bytes to ``torch.load(weights_only=True)``: its legacy-format path has had a remote code
  execution bug (CVE-2025-32434, torch <= 2.5.1), its allow-list is much larger than what a
  storage needs and changes between torch versions; a 60-line parser of a frozen format is easier
  to audit.
* numpy scalars (``numpy.core.multiarray.scalar`` or ``numpy._core.multiarray.scalar``) decode to
  Python numbers for plain numeric dtypes only.

Bounded work and memory, whatever the file (a file up to 1 GB is loaded or refused within seconds
plus the time to read it, using about the memory of the weights it really carries):

* The unpickler is the pure-Python one, so each expanding opcode can be checked: at most
  ``MAX_OPCODES`` opcodes; dict keys and set members must be flat (hashing nested tuples with
  shared references is exponential); strings up to 64 MiB. Large byte payloads are not read when
  met: the file is skipped past them (``_Payload``) and a payload is read, once, straight into its
  tensor when a storage uses it, so junk costs nothing and no payload is held twice.
* Every later walk of the data (constructor arguments, module tree, provenance) draws on a
  ``NodeBudget``: shared references cannot expand into exponentially many nodes. Error messages
  show file data through a bounded repr (``show``).
* Only after the whole file has been read into inert records do we build a network, and only from
  our own classes (``PRECONDITIONERS[class_name]`` with ``model_type`` one of ``NETWORKS``):
  ``build_with_weights`` constructs it from the claimed arguments with its weights on the meta
  device and its torch calls counted, requires exactly the keys, shapes and dtypes of the tensors
  the file carries and at most ``max_parameters`` weights, then makes those tensors its weights.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import pickle
import re
import reprlib
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.utils._device  # noqa: F401 - _ClaimsOnly uses its list of factory functions

from model.networks import NETWORKS
from model.precond import PRECONDITIONERS, Precond

__all__ = [
    "DEFAULT_MAX_PARAMETERS",
    "MAX_NODES",
    "CheckpointError",
    "InertModule",
    "NetworkSpec",
    "PersistentRecord",
    "Snapshot",
    "TensorRef",
    "UnsafeCheckpointError",
    "build_precond",
    "build_with_weights",
    "show",
    "collect_state_dict",
    "load_network_pickle",
    "load_state_dict_strict",
    "read_snapshot",
    "spec_from_record",
]

PERSISTENCE_VERSION = 6
_MAX_LISTED = 12  # keys listed in an error message
_MAX_DEPTH = 64   # nesting of modules / init arguments
# Work bounds for whatever a file holds. Unpickling itself is linear in the file's size (every
# opcode builds at most one object; shared references cost nothing); what can expand is walking
# the result as a tree (shared references visited again and again, 2**depth times) and hashing
# nested tuples (dict keys, set members). So every walk of file data draws on a node budget, and
# keys and set members must be flat.
MAX_NODES = 200_000            # nodes visited per walk (init arguments, provenance, module tree)
_SMALL_BYTES = 1 << 16         # larger byte payloads are read only when a storage uses them
MAX_OPCODES = 2_000_000        # a real network pickle has about 100 opcodes per tensor (~44,000 for CIFAR-10)
_MAX_TEXT = 64 << 20           # longest string (module_src is ~100 kB)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def show(value: Any) -> str:
    """A bounded repr of file data for error messages (a plain repr of shared references expands)."""
    return _REPR.repr(value)


class NodeBudget:
    """Counts the nodes a walk of file data visits; past `limit` the file is refused."""

    def __init__(self, what: str, limit: int = MAX_NODES) -> None:
        self.what, self.limit, self.used = what, limit, 0

    def take(self, n: int = 1) -> None:
        self.used += n
        if self.used > self.limit:
            raise CheckpointError(f"{self.what}: more than {self.limit} nodes once shared references are "
                                  "followed; refusing a structure that expands")


class UnsafeCheckpointError(CheckpointError):
    """The file asks for something outside the allow-list (a global, an unexpected object shape)."""


# ---------------------------------------------------------------------------------------------
# Inert stand-ins


class _Inert:
    """Base of the objects our allow-listed callables return: a BUILD opcode (``__setstate__``)
    aimed at one of them is refused, so a file can never set attributes on them."""

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"pickle tries to set state on a {type(self).__name__}")


@dataclass(eq=False)
class PersistentRecord(_Inert):
    """What ``_reconstruct_persistent_obj(meta)`` stood for, as plain data."""

    class_name: str
    init_args: list[Any] | None
    init_kwargs: dict[str, Any] | None
    state: dict[str, Any]
    module_src_sha256: str
    version: int = PERSISTENCE_VERSION


class InertModule:
    """Stand-in for an allowed ``torch.nn`` module (ModuleDict, Dropout, ...): keeps its state only."""

    torch_name: ClassVar[str] = "torch.nn.Module"
    state: dict[str, Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never called by pickle (NEWOBJ uses __new__)
        raise UnsafeCheckpointError(f"pickle tries to call {self.torch_name}")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UnsafeCheckpointError(f"unexpected state of type {type(state).__name__} for {self.torch_name}")
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.torch_name}>"


# The torch.nn modules that may appear inside a network: containers and parameter-free layers.
_INERT_TORCH_NAMES = (
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.activation.SiLU",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.GELU",
    "torch.nn.modules.linear.Identity",
)
_INERT_CLASSES: dict[str, type[InertModule]] = {
    qualname: type(qualname.rsplit(".", 1)[1], (InertModule,), {"torch_name": qualname})
    for qualname in _INERT_TORCH_NAMES
}


class _Storage(_Inert):
    """A decoded storage: a flat tensor of its dtype."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat


class TensorRef(_Inert):
    """A tensor read from the file. Kept wrapped while unpickling so no pickle opcode ever
    reaches a real torch object; ``collect_state_dict`` unwraps it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __repr__(self) -> str:
        return f"TensorRef({list(self.tensor.shape)}, {self.tensor.dtype})"


class _OrderedDict(OrderedDict):  # type: ignore[type-arg]
    """collections.OrderedDict as the file sees it: items via SETITEMS only, no BUILD."""

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError("pickle tries to set attributes on an OrderedDict")


class _NumpyDtype:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` + ``__setstate__`` while unpickling."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = False) -> None:
        if not isinstance(spec, str) or not re.fullmatch(r"[biuf]\d{1,2}", spec):
            raise UnsafeCheckpointError(f"numpy dtype {spec!r} is not a plain numeric dtype")
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise UnsafeCheckpointError(f"unexpected numpy dtype state {show(state)}")
        self.byteorder = state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> bool | int | float:
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes):
        raise UnsafeCheckpointError("numpy scalar with unexpected arguments")
    np_dtype = np.dtype(dtype.spec)
    if dtype.byteorder in "<>":
        np_dtype = np_dtype.newbyteorder(cast(Any, dtype.byteorder))
    if len(data) != np_dtype.itemsize:
        raise CheckpointError(f"numpy scalar of dtype {dtype.spec} has {len(data)} bytes")
    return np.frombuffer(data, dtype=np_dtype)[0].item()


# ---------------------------------------------------------------------------------------------
# Tensors


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclass(frozen=True)
class _StorageType(_Inert):
    dtype: torch.dtype


@dataclass(frozen=True)
class _StorageRef(_Inert):
    key: str
    dtype: torch.dtype
    numel: int


class _LegacyUnpickler(pickle.Unpickler):
    """For the small pickles inside a legacy ``torch.save`` stream: storage type names only."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.refs: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafeCheckpointError(f"refusing global {module}.{name} inside a tensor storage")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id in a tensor storage: {show(pid)}")
        _, storage_type, key, location, numel, view = pid
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(location, str)
                and isinstance(numel, int) and numel >= 0 and view is None):
            raise UnsafeCheckpointError(f"unexpected storage reference {show(pid)}")
        ref = _StorageRef(key, storage_type.dtype, numel)
        if self.refs.setdefault(key, ref) != ref:
            raise CheckpointError(f"storage {key} declared twice")
        return ref


class _Payload(_Inert):
    """A byte payload of the file, read only when a tensor storage uses it (and only once): a file's
    large payloads cost no memory unless they become weights."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        self.f, self.offset, self.length, self.used = f, offset, length, False

    def head(self, limit: int = _SMALL_BYTES) -> bytes:
        """The start of the payload (a storage's small header pickles)."""
        return self._read(0, min(self.length, limit))

    def _read(self, start: int, n: int) -> bytes:
        where = self.f.tell()
        try:
            self.f.seek(self.offset + start)
            return cast(bytes, self.f.read(n))
        finally:
            self.f.seek(where)

    def read_into(self, start: int, buffer: Any) -> None:
        if self.used:
            raise UnsafeCheckpointError("one tensor payload used by two storages")
        self.used = True
        where = self.f.tell()
        try:
            self.f.seek(self.offset + start)
            if self.f.readinto(buffer) != len(buffer):
                raise CheckpointError("tensor storage payload is truncated")
        finally:
            self.f.seek(where)


def _parse_legacy_storage(data: Any) -> _Storage:
    """Decode ``torch.storage._load_from_bytes(data)``: one storage in the legacy torch.save layout.

    Layout: pickle(magic), pickle(protocol), pickle(sys_info), pickle(the storage, as a persistent
    id), pickle([keys]), then per key: int64 little-endian element count + raw little-endian data.
    """
    if isinstance(data, bytes):
        data = _Payload(io.BytesIO(data), 0, len(data))
    if not isinstance(data, _Payload):
        raise UnsafeCheckpointError("tensor storage payload is not bytes")
    f = io.BytesIO(data.head())
    if _LegacyUnpickler(f).load() != _LEGACY_MAGIC:
        raise CheckpointError("tensor storage has a bad magic number")
    if _LegacyUnpickler(f).load() != _LEGACY_PROTOCOL:
        raise CheckpointError("tensor storage has an unknown protocol version")
    sys_info = _LegacyUnpickler(f).load()
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise CheckpointError("tensor storage is not little-endian or lacks its sys_info")
    main = _LegacyUnpickler(f)
    ref = main.load()
    keys = _LegacyUnpickler(f).load()
    if not isinstance(ref, _StorageRef) or keys != [ref.key] or list(main.refs) != [ref.key]:
        raise CheckpointError("tensor storage payload does not hold exactly one storage")
    (count,) = struct.unpack("<q", f.read(8).ljust(8, b"\xff"))  # short read -> -1
    itemsize = torch.empty((), dtype=ref.dtype).element_size()
    if count != ref.numel:
        raise CheckpointError(f"tensor storage declares {ref.numel} elements but holds {count}")
    start, nbytes = f.tell(), count * itemsize
    if start + nbytes != data.length:
        raise CheckpointError("tensor storage payload is truncated or has trailing bytes")
    flat = torch.empty(count, dtype=ref.dtype)  # read straight from the file into the tensor
    if nbytes:
        data.read_into(start, flat.view(torch.uint8).numpy())
    return _Storage(flat)


def _is_int_seq(x: Any) -> bool:
    return isinstance(x, tuple | list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    backward_hooks: Any = None, metadata: Any = None) -> TensorRef:
    """``torch._utils._rebuild_tensor_v2`` for plain CPU tensors; hooks must be empty."""
    if not (isinstance(storage, _Storage) and isinstance(offset, int) and offset >= 0
            and _is_int_seq(size) and _is_int_seq(stride) and len(size) == len(stride)
            and all(v >= 0 for v in (*size, *stride))):
        raise UnsafeCheckpointError("tensor rebuild with unexpected arguments")
    if backward_hooks or (metadata is not None and not isinstance(metadata, dict)):
        raise UnsafeCheckpointError("tensor with backward hooks or unknown metadata")
    numel = storage.flat.numel()
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= numel:
            raise CheckpointError(f"tensor of size {list(size)} reaches past its storage ({numel} elements)")
    elif offset > numel:
        raise CheckpointError("tensor offset past its storage")
    return TensorRef(storage.flat.as_strided(tuple(size), tuple(stride), offset))


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> TensorRef:
    """``torch._utils._rebuild_parameter(_with_state)``: the plain tensor is all we keep."""
    if not isinstance(data, TensorRef) or backward_hooks:
        raise UnsafeCheckpointError("parameter rebuild with unexpected arguments")
    return TensorRef(data.tensor)


# ---------------------------------------------------------------------------------------------
# The outer unpickler


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(text, 'latin1')``: how protocol 0-2 pickles write ``bytes``."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode with arguments other than (str, 'latin1')")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 object creation), for our stand-ins only."""
    if isinstance(cls, type) and issubclass(cls, InertModule) and base is object and state is None:
        return cls.__new__(cls)
    if cls is dict and base in (dict, _dict):  # an EasyDict in protocol 0/1 ("builtins.dict" is _dict)
        return _dict(state or {})
    raise UnsafeCheckpointError("copyreg._reconstructor with arguments outside the allow-list")


def _reconstruct_persistent(meta: Any) -> PersistentRecord:
    """Our ``torch_utils.persistence._reconstruct_persistent_obj``: meta -> inert record.

    ``module_src`` is only type-checked and hashed: never compiled, executed or imported.
    """
    if not isinstance(meta, dict):
        raise UnsafeCheckpointError("persistent object meta is not a dict")
    kind, version, src = meta.get("type"), meta.get("version"), meta.get("module_src")
    class_name, state = meta.get("class_name"), meta.get("state")
    if kind != "class" or not isinstance(src, str):
        raise CheckpointError(f"persistent object of unknown type {kind!r}")
    if version != PERSISTENCE_VERSION:
        raise CheckpointError(f"persistent object format version {version!r} (expected {PERSISTENCE_VERSION})")
    if not isinstance(class_name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,200}", class_name):
        raise CheckpointError(f"persistent object with bad class name {show(class_name)}")
    if not isinstance(state, dict):
        raise CheckpointError(f"persistent object {class_name} has no state dict")
    args, kwargs = state.get("_init_args"), state.get("_init_kwargs")
    if args is not None and not isinstance(args, tuple | list):
        raise CheckpointError(f"{class_name}: _init_args is a {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise CheckpointError(f"{class_name}: _init_kwargs is a {type(kwargs).__name__}")
    return PersistentRecord(
        class_name=class_name,
        init_args=None if args is None else list(args),
        init_kwargs=None if kwargs is None else dict(kwargs),
        state=state,
        module_src_sha256=hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest(),
        version=version,
    )


def _flat_key(value: Any) -> bool:
    """Dict keys and set members: atoms or short tuples of atoms (hashing nested tuples expands)."""
    atoms = (str, bytes, int, float, bool, type(None))
    return isinstance(value, atoms) or (isinstance(value, tuple) and len(value) <= 16
                                        and all(isinstance(v, atoms) for v in value))


def _check_keys(values: Any, what: str) -> None:
    for value in values:
        if not _flat_key(value):
            raise UnsafeCheckpointError(f"{what} {show(value)} is not a plain key")


def _set(items: Any = ()) -> set[Any]:
    items = list(items)
    _check_keys(items, "set member")
    return set(items)


def _frozenset(items: Any = ()) -> frozenset[Any]:
    return frozenset(_set(items))


def _dict(items: Any = ()) -> dict[Any, Any]:
    pairs = list(items.items()) if isinstance(items, dict) else list(items)
    _check_keys((k for k, _ in pairs), "dict key")
    return dict(pairs)


class _OrderedDictFromFile(_OrderedDict):
    def __init__(self, items: Any = ()) -> None:
        super().__init__(_dict(items))


_ALLOWED: dict[str, Any] = {
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.storage._load_from_bytes": _parse_legacy_storage,
    "collections.OrderedDict": _OrderedDictFromFile,
    "builtins.set": _set,
    "builtins.frozenset": _frozenset,
    "builtins.object": object,
    "builtins.dict": _dict,
    "copyreg._reconstructor": _reconstructor,
    "_codecs.encode": _latin1_bytes,
    "dnnlib.util.EasyDict": dict,
    "dnnlib.EasyDict": dict,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.dtype": _NumpyDtype,
    **_INERT_CLASSES,
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _Dropped:
    """What the memo keeps instead of a large bytes payload: network pickles never refer to one twice."""

    def __repr__(self) -> str:
        return "<payload dropped from the memo>"


_DROPPED = _Dropped()


def _memo_value(value: Any) -> Any:
    if isinstance(value, bytes) and len(value) > _SMALL_BYTES:
        return _DROPPED
    if isinstance(value, tuple) and len(value) <= 8 and any(
            isinstance(v, bytes) and len(v) > _SMALL_BYTES for v in value):
        return _DROPPED
    return value


_PyUnpickler: Any = pickle._Unpickler  # type: ignore[attr-defined]  # the pure-Python implementation


def _counted(load: Any) -> Any:
    """An opcode handler that counts: unpickling any file stops after MAX_OPCODES opcodes."""
    def run(self: Any) -> None:
        self.ops += 1
        if self.ops > MAX_OPCODES:
            raise CheckpointError(f"more than {MAX_OPCODES} pickle opcodes; a network pickle has far fewer")
        load(self)
    return run


class _SafeUnpickler(_PyUnpickler):
    """The pure-Python unpickler, so that every opcode that could expand can be checked: dict keys
    and set members must be flat (``_flat_key``); large byte payloads (tensor storages) are not kept
    in the memo, so each is freed once its tensor is built (peak memory about 1x the weights)."""

    dispatch = dict(_PyUnpickler.dispatch)

    def __init__(self, f: Any, size: int) -> None:
        super().__init__(f)
        self.raw, self.size, self.ops = f, size, 0

    def _bytes(self, n: int) -> None:
        """A BINBYTES payload: small ones and those inside a frame as read; large ones become a
        _Payload (offset and length) and the file is skipped past them."""
        frame = self._unframer.current_frame
        if frame is not None:
            here = frame.tell()
            if here < frame.seek(0, io.SEEK_END):
                frame.seek(here)
                self.append(self.read(n))
                return
            self._unframer.current_frame = None
        if n <= _SMALL_BYTES:
            self.append(self.read(n))
            return
        start = self.raw.tell()
        if start + n > self.size:
            raise CheckpointError(f"a payload of {n} bytes runs past the end of the file")
        self.raw.seek(start + n)
        self.append(_Payload(self.raw, start, n))

    def load_binbytes(self) -> None:
        (n,) = struct.unpack("<I", self.read(4))
        self._bytes(n)

    def load_binbytes8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self._bytes(n)

    def _text(self, n: int) -> None:
        if n > _MAX_TEXT:
            raise CheckpointError(f"a string of {n} bytes (at most {_MAX_TEXT})")
        self.append(str(self.read(n), "utf-8", "surrogatepass"))

    def load_binunicode(self) -> None:
        (n,) = struct.unpack("<I", self.read(4))
        self._text(n)

    def load_binunicode8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self._text(n)

    def _put(self, index: Any) -> None:
        self.memo[index] = _memo_value(self.stack[-1])

    def load_put(self) -> None:
        index = int(self.readline()[:-1])
        if index < 0:
            raise pickle.UnpicklingError("negative PUT argument")
        self._put(index)

    def load_binput(self) -> None:
        self._put(self.read(1)[0])

    def load_long_binput(self) -> None:
        (index,) = struct.unpack("<I", self.read(4))
        self._put(index)

    def load_memoize(self) -> None:
        self._put(len(self.memo))

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        _check_keys((key,), "dict key")
        self.stack[-1][key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        _check_keys(items[0::2], "dict key")
        target = self.stack[-1]
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        _check_keys(items, "set member")
        target = self.stack[-1]
        if not isinstance(target, set):
            raise UnsafeCheckpointError(f"ADDITEMS on a {type(target).__name__}")
        target.update(items)

    def load_frozenset(self) -> None:
        self.append(_frozenset(self.pop_mark()))

    for _op, _fn in ((pickle.PUT, load_put), (pickle.BINPUT, load_binput), (pickle.LONG_BINPUT, load_long_binput),
                     (pickle.MEMOIZE, load_memoize), (pickle.SETITEM, load_setitem),
                     (pickle.SETITEMS, load_setitems), (pickle.ADDITEMS, load_additems),
                     (pickle.FROZENSET, load_frozenset), (pickle.BINBYTES, load_binbytes),
                     (pickle.BINBYTES8, load_binbytes8), (pickle.BINUNICODE, load_binunicode),
                     (pickle.BINUNICODE8, load_binunicode8)):
        dispatch[_op[0]] = _fn
    dispatch = {op: _counted(fn) for op, fn in dispatch.items()}
    del _op, _fn

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{_PY2_MODULES.get(module, module)}.{name}"
        try:
            return _ALLOWED[qualname]
        except KeyError:
            raise UnsafeCheckpointError(
                f"refusing global {qualname:.200}: not on the allow-list of an NVlabs network pickle") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("persistent ids are not used by network pickles")


# ---------------------------------------------------------------------------------------------
# Reading a snapshot


@dataclass(eq=False)
class Snapshot:
    """The unpickled snapshot dict (inert data) and where it came from."""

    data: dict[str, Any]
    ema: PersistentRecord
    source: str        # file name
    sha256: str        # of the whole file


def _sha256_stream(f: Any) -> str:
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def read_snapshot(path: str | Path) -> Snapshot:
    """Unpickle a network snapshot into inert records; raises CheckpointError / UnsafeCheckpointError.

    Two passes over the file, never held whole in memory: sha256, then the unpickler, which skips
    large payloads and reads each straight into its tensor when a storage uses it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _read(f, source=path.name)
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read: {e}") from e


def read_snapshot_bytes(blob: bytes, *, source: str = "<bytes>") -> Snapshot:
    return _read(io.BytesIO(blob), source=source)


def _read(f: Any, *, source: str) -> Snapshot:
    head = f.read(4)
    if not head:
        raise CheckpointError(f"{source}: empty file, not a network pickle")
    if head == b"PK\x03\x04":
        raise CheckpointError(f"{source}: a zip archive (torch.save's format?), not a network snapshot pickle")
    f.seek(0)
    digest = _sha256_stream(f)
    size = f.tell()
    f.seek(0)
    try:
        data = _SafeUnpickler(f, size).load()
    except CheckpointError as e:
        raise type(e)(f"{source}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RuntimeError, struct.error, OverflowError, MemoryError, RecursionError) as e:
        raise CheckpointError(f"{source}: corrupt or truncated pickle ({type(e).__name__}: {show(e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: a network snapshot is a dict, this pickle holds a {type(data).__name__}")
    if "ema" not in data:
        keys = sorted(show(k) for k in list(data)[:_MAX_LISTED])
        raise CheckpointError(f"{source}: no 'ema' network in the snapshot (keys: {keys})")
    ema = data["ema"]
    if not isinstance(ema, PersistentRecord):
        raise CheckpointError(f"{source}: 'ema' is not a persistent NVlabs network object")
    return Snapshot(data=data, ema=ema, source=source, sha256=digest)


def collect_state_dict(record: PersistentRecord | InertModule) -> dict[str, torch.Tensor]:
    """The state_dict the real module would have: parameters, persistent buffers, then children."""
    out: dict[str, torch.Tensor] = {}
    budget = NodeBudget("the module tree")

    def visit(obj: Any, prefix: str, path: tuple[int, ...]) -> None:
        where = prefix.rstrip(".") or "(root)"
        budget.take()
        if not isinstance(obj, PersistentRecord | InertModule):
            raise CheckpointError(f"submodule {where} is a {type(obj).__name__}, not a module")
        if id(obj) in path:
            raise CheckpointError(f"module {where} contains itself")
        if len(path) > _MAX_DEPTH:
            raise CheckpointError(f"modules nested deeper than {_MAX_DEPTH} levels at {where:.200}")
        state = obj.state
        skip = state.get("_non_persistent_buffers_set") or set()
        for slot in ("_parameters", "_buffers", "_modules"):
            entries = state.get(slot, {})
            if not isinstance(entries, dict):
                raise CheckpointError(f"{where}: {slot} is a {type(entries).__name__}")
            budget.take(len(entries))
            for name, value in entries.items():
                if not isinstance(name, str) or not name or "." in name:
                    raise CheckpointError(f"{where}: bad entry name {show(name)} in {slot}")
                if value is None or (slot == "_buffers" and name in skip):
                    continue
                if slot == "_modules":
                    visit(value, f"{prefix}{name}.", (*path, id(obj)))
                elif not isinstance(value, TensorRef):
                    raise CheckpointError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
                else:
                    out[prefix + name] = value.tensor

    visit(record, "", ())
    return out


# ---------------------------------------------------------------------------------------------
# Building our network


@dataclass
class NetworkSpec:
    """How to construct one of our networks: ``PRECONDITIONERS[preconditioner](**precond_kwargs,
    model_type=architecture, **network_kwargs)``."""

    preconditioner: str
    architecture: str
    precond_kwargs: dict[str, Any] = field(default_factory=dict)
    network_kwargs: dict[str, Any] = field(default_factory=dict)

    def init_kwargs(self) -> dict[str, Any]:
        return {**self.precond_kwargs, "model_type": self.architecture, **self.network_kwargs}


def _plain(value: Any, where: str, depth: int = 0, budget: NodeBudget | None = None) -> Any:
    """Init arguments must be plain data (no tensors, no records), and not expand when copied."""
    budget = budget or NodeBudget(where)
    budget.take()
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"{where} is nested too deeply")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_plain(v, f"{where}[{i}]", depth + 1, budget) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CheckpointError(f"{where} has non-string keys")
        return {k: _plain(v, f"{where}[{k[:40]!r}]", depth + 1, budget) for k, v in value.items()}
    raise CheckpointError(f"{where} is a {type(value).__name__}, expected plain data")


def spec_from_init(preconditioner: str, args: list[Any] | tuple[Any, ...] | None,
                   kwargs: Mapping[str, Any] | None, *, source: str = "") -> NetworkSpec:
    """Split a preconditioner's constructor arguments into its own and the network's."""
    where = f"{source}: " if source else ""
    if preconditioner not in PRECONDITIONERS:
        raise CheckpointError(f"{where}unknown preconditioner {preconditioner!r}; "
                              f"expected one of {sorted(PRECONDITIONERS)}")
    cls = PRECONDITIONERS[preconditioner]
    sig = inspect.signature(cls)
    try:
        bound = sig.bind(*(args or ()), **dict(kwargs or {}))
    except TypeError as e:
        raise CheckpointError(f"{where}arguments do not fit {preconditioner}: {e}") from None
    precond_kwargs: dict[str, Any] = {}
    network_kwargs: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            network_kwargs.update(value)
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            raise CheckpointError(f"{where}too many positional arguments for {preconditioner}")
        else:
            precond_kwargs[name] = value
    budget = NodeBudget(f"{where}the constructor arguments")
    precond_kwargs = _plain(precond_kwargs, f"{where}{preconditioner} argument", budget=budget)
    network_kwargs = _plain(network_kwargs, f"{where}network argument", budget=budget)
    model_type = precond_kwargs.pop("model_type", sig.parameters["model_type"].default)
    if model_type not in NETWORKS:
        raise CheckpointError(f"{where}unknown model_type {model_type!r}; expected one of {sorted(NETWORKS)}")
    return NetworkSpec(preconditioner, model_type, precond_kwargs, network_kwargs)


def spec_from_record(record: PersistentRecord, *, source: str = "") -> NetworkSpec:
    if record.init_kwargs is None and record.init_args is None:
        raise CheckpointError(f"{source}: {record.class_name} did not record its constructor arguments")
    return spec_from_init(record.class_name.rsplit(".", 1)[-1], record.init_args, record.init_kwargs,
                          source=source)


def build_precond(spec: NetworkSpec, *, source: str = "") -> Precond:
    """Construct (randomly initialised) ``PRECONDITIONERS[spec.preconditioner]`` from the spec."""
    where = f"{source}: " if source else ""
    if spec.preconditioner not in PRECONDITIONERS or spec.architecture not in NETWORKS:
        raise CheckpointError(f"{where}unknown network {spec.preconditioner}/{spec.architecture}")
    try:
        with torch.no_grad():
            return PRECONDITIONERS[spec.preconditioner](**spec.init_kwargs())
    except Exception as e:  # whatever the constructor objects to, the checkpoint is at fault
        raise CheckpointError(f"{where}cannot construct {spec.preconditioner} with "
                              f"{spec.init_kwargs()}: {type(e).__name__}: {e}") from None


DEFAULT_MAX_PARAMETERS = 1_000_000_000  # elements of a network's state_dict (4 GB in fp32)
_CONSTRUCTION_CALLS = 500_000            # torch calls a network's constructor may make
_REAL_TENSOR_ELEMENTS = 1 << 16          # factory results up to this size are real; larger ones meta
_REAL_TOTAL_ELEMENTS = 1 << 24           # all real tensors made while constructing, together


class _ClaimsOnly(torch.overrides.TorchFunctionMode):
    """While a network is constructed from claimed arguments: large tensors are created on the meta
    device (no memory, no random init), small ones for real (the preconditioners compute scalars in
    their constructors); the number of torch calls and of real elements are bounded."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.calls = 0
        self.real_elements = 0
        self.constructors = torch.utils._device._device_constructors()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.calls += 1
        if self.calls > _CONSTRUCTION_CALLS:
            raise CheckpointError(f"{self.where}constructing the network takes more than {_CONSTRUCTION_CALLS} "
                                  "torch calls; refusing what the file claims")
        shape = _elementwise_on_meta(func, args, kwargs)
        if shape is not None:  # weights being scaled (_random_init): no need to run meta kernels
            return shape
        if func in self.constructors and kwargs.get("device") is None:
            probe = func(*args, **{**kwargs, "device": "meta"})
            if isinstance(probe, torch.Tensor):
                if probe.numel() > _REAL_TENSOR_ELEMENTS:
                    return probe
                self.real_elements += probe.numel()
                if self.real_elements > _REAL_TOTAL_ELEMENTS:
                    raise CheckpointError(f"{self.where}the network's constructor allocates more than "
                                          f"{_REAL_TOTAL_ELEMENTS} elements in small tensors")
        return func(*args, **kwargs)


_ELEMENTWISE = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__add__, torch.Tensor.__radd__,
                torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__truediv__, torch.Tensor.__neg__,
                torch.Tensor.mul, torch.Tensor.add, torch.Tensor.sub, torch.Tensor.div, torch.mul, torch.add,
                torch.sub, torch.div}


def _elementwise_on_meta(func: Any, args: Any, kwargs: Any) -> torch.Tensor | None:
    """A meta tensor times/plus/minus a Python number is a meta tensor of the same shape. Answered
    here because the first meta kernel a process runs imports torch._dynamo (seconds)."""
    if func not in _ELEMENTWISE or kwargs:
        return None
    metas = [a for a in args if isinstance(a, torch.Tensor)]
    if len(metas) != 1 or not metas[0].is_meta or not all(
            isinstance(a, int | float) and not isinstance(a, bool) for a in args if a is not metas[0]):
        return None
    x = metas[0]
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _expected_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict(keep_vars=True).items()}


def build_with_weights(spec: NetworkSpec, tensors: Mapping[str, torch.Tensor], *, source: str = "",
                       max_parameters: int | None = DEFAULT_MAX_PARAMETERS) -> Precond:
    """Our network for `spec`, holding exactly `tensors` (no copy, no random initialisation).

    Bounded before anything large is allocated: the file's tensors must not exceed `max_parameters`
    elements; the constructor runs under ``_ClaimsOnly`` (weights on the meta device, torch calls
    counted); the claimed network must then have exactly the file's keys, shapes and dtypes, so a
    file cannot make us build more than it carries. The tensors are then assigned as the weights.
    """
    where = f"{source}: " if source else ""
    carried = sum(t.numel() for t in tensors.values())
    if max_parameters is not None and carried > max_parameters:
        raise CheckpointError(f"{where}the file carries {carried} weights, over the limit of {max_parameters} "
                              "(EDM_MAX_PARAMETERS)")
    if spec.preconditioner not in PRECONDITIONERS or spec.architecture not in NETWORKS:
        raise CheckpointError(f"{where}unknown network {spec.preconditioner}/{spec.architecture}")
    try:
        with torch.no_grad(), _ClaimsOnly(where):
            net = PRECONDITIONERS[spec.preconditioner](**spec.init_kwargs())
    except CheckpointError:
        raise
    except Exception as e:  # whatever the constructor objects to, the checkpoint is at fault
        raise CheckpointError(f"{where}cannot construct {spec.preconditioner} with "
                              f"{show(spec.init_kwargs())}: {type(e).__name__}: {show(e)}") from None
    expected = _expected_state(net)
    claimed = sum(v.numel() for v in expected.values())
    if max_parameters is not None and claimed > max_parameters:
        raise CheckpointError(f"{where}the network claims {claimed} weights, over the limit of {max_parameters} "
                              "(EDM_MAX_PARAMETERS)")
    _check_layout(type(net).__name__, expected, tensors, where)
    net.load_state_dict(dict(tensors), strict=True, assign=True)
    left = [k for k, v in (*net.named_parameters(), *net.named_buffers()) if v.is_meta]
    if left:
        raise CheckpointError(f"{where}no weights in the file for {_listing(left)}")
    return net


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(k[:200] for k in keys[:_MAX_LISTED]) + more


def load_state_dict_strict(net: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *,
                           source: str = "") -> None:
    """Copy `tensors` into `net`; any missing/unexpected key, shape or dtype mismatch is an error."""
    where = f"{source}: " if source else ""
    _check_layout(type(net).__name__, net.state_dict(), tensors, where)
    net.load_state_dict(dict(tensors), strict=True)


def _check_layout(kind: str, expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                  where: str) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    shapes = [f"{k} {list(tensors[k].shape)} vs {list(v.shape)}" for k, v in expected.items()
              if k in tensors and tensors[k].shape != v.shape]
    if shapes:
        problems.append(f"shape mismatch (file vs network): {_listing(shapes)}")
    dtypes = [f"{k} {tensors[k].dtype} vs {v.dtype}" for k, v in expected.items()
              if k in tensors and tensors[k].shape == v.shape and tensors[k].dtype != v.dtype]
    if dtypes:
        problems.append(f"dtype mismatch (file vs network): {_listing(dtypes)}")
    if problems:
        raise CheckpointError(f"{where}weights do not fit {kind}: " + "; ".join(problems))


def load_network_pickle(path: str | Path, *, max_parameters: int | None = DEFAULT_MAX_PARAMETERS,
                        ) -> tuple[Precond, NetworkSpec, Snapshot]:
    """Read an NVlabs snapshot and return (our network with its weights, its spec, the snapshot)."""
    snapshot = read_snapshot(path)
    spec = spec_from_record(snapshot.ema, source=snapshot.source)
    tensors = collect_state_dict(snapshot.ema)
    net = build_with_weights(spec, tensors, source=snapshot.source, max_parameters=max_parameters)
    return net, spec, snapshot
