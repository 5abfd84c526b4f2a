"""Test helper: WRITE pickles in the NVlabs/edm persistence format from our networks.

This mimics what ``pickle.dump(data, f)`` produces in the reference training loop, where every
class of ``training/networks.py`` (and the loss, the augmentation pipe) is a persistent class:

    torch_utils.persistence._reconstruct_persistent_obj(
        dict(type='class', version=6, module_src=<source>, class_name='EDMPrecond', state={...}))

Tensors are pickled by torch itself (``_rebuild_parameter``/``_rebuild_tensor_v2`` with storages
as ``torch.storage._load_from_bytes(<legacy torch.save bytes>)``) and ``torch.nn.ModuleDict``
normally. Names that do not exist here (``torch_utils.persistence``, ``dnnlib.util.EasyDict``, an
old numpy spelling, attack targets) are written as GLOBAL opcodes by a pure-Python pickler, so no
stub module is ever registered in ``sys.modules``.

The loader (model/nvlabs_pickle.py) never imports this module.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch

PERSISTENT_MODULES = ("model.networks", "model.precond")
DEFAULT_MODULE_SRC = "# stand-in for the source of training/networks.py\nimport torch\n"


class Global:
    """A global name, written as a GLOBAL opcode whether or not it exists here.

    Calling it in a reduce tuple makes the unpickler call whatever the name resolves to."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # save_reduce wants a callable
        raise RuntimeError("a Global is only a name to pickle")

    def __reduce__(self) -> str:
        return self.name  # -> Pickler.save_global(self, name)


PERSISTENCE_HOOK = Global("torch_utils.persistence", "_reconstruct_persistent_obj")


class Call:
    """Pickles as ``func(*args)`` (a REDUCE); func is usually a Global."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


class CallThenBuild(Call):
    """Pickles as ``func(*args)`` followed by a BUILD opcode with `state` (``obj.__setstate__``)."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any) -> None:
        super().__init__(func, *args)
        self.state = state

    def __reduce__(self) -> tuple[Any, tuple[Any, ...], Any]:  # type: ignore[override]
        return self.func, self.args, self.state


class EasyDict(dict):
    """Pickles like dnnlib.util.EasyDict (NEWOBJ + SETITEMS)."""


class PersistentObject:
    """Any object in the persistent format, with a hand-made state (attack tests, loss_fn)."""

    def __init__(self, class_name: str, state: dict[str, Any], *, module_src: str = DEFAULT_MODULE_SRC,
                 version: int = 6, kind: str = "class") -> None:
        self.meta = dict(type=kind, version=version, module_src=module_src, class_name=class_name,
                         state=state)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return PERSISTENCE_HOOK, (self.meta,)


_ALIASES: dict[int, tuple[str, str]] = {id(EasyDict): ("dnnlib.util", "EasyDict")}


class NVlabsPickler(pickle._Pickler):  # the pure-Python pickler: its save_global can be overridden
    def __init__(self, file: io.BytesIO, *, init_kwargs: dict[int, dict[str, Any]], module_src: str,
                 numpy_module: str | None, protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        self.init_kwargs = init_kwargs
        self.module_src = module_src
        self.numpy_module = numpy_module

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, Global):
            target = (obj.module, obj.name)
        elif id(obj) in _ALIASES:
            target = _ALIASES[id(obj)]
        else:
            return super().save_global(obj, name)  # type: ignore[misc]  # pickle._Pickler: untyped
        self.write(pickle.GLOBAL + f"{target[0]}\n{target[1]}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.nn.Module) and type(obj).__module__ in PERSISTENT_MODULES:
            state = obj.__getstate__()
            state["_init_args"] = ()
            state["_init_kwargs"] = self.init_kwargs.get(id(obj), {})
            meta = dict(type="class", version=6, module_src=self.module_src,
                        class_name=type(obj).__name__, state=state)
            return PERSISTENCE_HOOK, (meta,)
        if isinstance(obj, np.generic) and self.numpy_module is not None:
            return Global(self.numpy_module, "scalar"), (obj.dtype, obj.tobytes())
        return NotImplemented


def dumps(data: Any, *, init_kwargs: dict[int, dict[str, Any]] | None = None,
          module_src: str = DEFAULT_MODULE_SRC, numpy_module: str | None = None, protocol: int = 4) -> bytes:
    """Pickle `data`; ``init_kwargs`` maps id(module) -> the '_init_kwargs' to record for it.

    numpy_module: None = numpy's own spelling, else e.g. 'numpy.core.multiarray' for scalars."""
    buf = io.BytesIO()
    NVlabsPickler(buf, init_kwargs=init_kwargs or {}, module_src=module_src, numpy_module=numpy_module,
                  protocol=protocol).dump(data)
    return buf.getvalue()


def edm_loss(P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5) -> PersistentObject:
    kwargs = dict(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
    return PersistentObject("EDMLoss", {**kwargs, "_init_args": (), "_init_kwargs": dict(kwargs)})


def snapshot_bytes(net: torch.nn.Module, init_kwargs: dict[str, Any], *, loss_fn: Any = None,
                   dataset_kwargs: dict[str, Any] | None = None, **options: Any) -> bytes:
    """A network snapshot like training_loop.py writes, for `net` built with `init_kwargs`."""
    data = dict(
        ema=net,
        loss_fn=edm_loss() if loss_fn is None else loss_fn,
        augment_pipe=None,
        dataset_kwargs=EasyDict(dataset_kwargs if dataset_kwargs is not None else
                                dict(class_name="training.dataset.ImageFolderDataset", path="/data/x.zip",
                                     use_labels=False, xflip=False, cache=True, resolution=8, max_size=10)),
    )
    return dumps(data, init_kwargs={id(net): init_kwargs}, **options)


def legacy_storage_bytes(inner_global: tuple[str, str] | None = None) -> bytes:
    """The ``_load_from_bytes`` payload of a float storage (a legacy torch.save stream), as torch
    writes it; `inner_global` swaps its storage type name for another global (an attack hidden in
    a tensor payload)."""
    _, (blob,) = torch.arange(4, dtype=torch.float32)._typed_storage().__reduce__()
    if inner_global is not None:
        blob = blob.replace(b"ctorch\nFloatStorage\n", f"c{inner_global[0]}\n{inner_global[1]}\n".encode())
    return blob


def tensor_from_payload(payload: bytes) -> Call:
    """Pickles as ``_rebuild_tensor_v2(_load_from_bytes(payload), 0, (4,), (1,), False, OrderedDict())``."""
    storage = Call(Global("torch.storage", "_load_from_bytes"), payload)
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), storage, 0, (4,), (1,), False, {})
