"""Read Megatron-LM ``torch``-format files without running code they might carry.

A ``model_optim_rng.pt`` is a pickle: loaded with ``torch.load(weights_only=False)`` a
crafted one runs any callable it names (``__reduce__``). :func:`load_megatron_torch` loads
with ``weights_only=True`` (PyTorch's restricted unpickler: tensors, containers, numbers,
strings, dtypes) plus an allow-list of the few classes Megatron-LM's ``save_checkpoint``
puts there, and nothing else:

* ``args``: ``argparse.Namespace`` holding strings, numbers, lists, ``torch.dtype``,
  megatron-core enums (``AttnBackend``, ``CudaGraphScope``, ``ModelType``), ``Signals``
  (``--exit-signal``), ``PosixPath``, ``SimpleNamespace``;
* ``rng_state``: ``random.getstate()`` (tuples of ints), ``np.random.get_state()`` (a numpy
  ``uint32`` array: ``_reconstruct``, ``ndarray``, ``dtype``, ``UInt32DType``), torch tensors;
* ``optimizer`` / ``opt_param_scheduler``: tensors and plain values (``OptimizerConfig``
  in recent releases); ``rerun_state_machine``: ``RerunDiagnostic``/``RerunMode``/``RerunState``;
* TE layers' ``_extra_state``: ``io.BytesIO``.

That is megatron-core's own list (``megatron.core.safe_globals.SAFE_GLOBALS``, which
Megatron-LM's loader relies on), used when it imports and rebuilt from the same names
otherwise. Anything else is refused with one line naming the file and the type.

``torch_dist`` checkpoints (:func:`check_dist_checkpoint`): PyTorch DCP unpickles the
``.metadata`` file with plain ``pickle.load`` and every non-tensor object (RNG state, TE
extra state) with ``torch.load(weights_only=False)``. Before megatron-core's loader runs,
the metadata is unpickled here with a restricted unpickler (DCP's own dataclasses and enums,
``torch.Size``, dtypes, layouts) and each object's bytes are test-loaded with
``weights_only=True`` and the allow-list above; anything else refuses the checkpoint.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "allowed_globals", "check_dist_checkpoint",
           "load_megatron_torch"]

# megatron-core 0.16.1's SAFE_GLOBALS, by name (used when that module is absent or moved).
_FALLBACK_NAMES = (
    "types:SimpleNamespace", "pathlib:PosixPath", "numpy.core.multiarray:_reconstruct",
    "numpy:ndarray", "numpy:dtype", "numpy.dtypes:UInt32DType", "argparse:Namespace",
    "megatron.core.transformer.enums:AttnBackend",
    "megatron.core.transformer.enums:CudaGraphScope", "megatron.core.enums:ModelType",
    "megatron.core.optimizer:OptimizerConfig",
    "megatron.core.rerun_state_machine:RerunDiagnostic",
    "megatron.core.rerun_state_machine:RerunMode",
    "megatron.core.rerun_state_machine:RerunState", "io:BytesIO", "signal:Signals",
)


@contextlib.contextmanager
def _allowing(extra: list[Any]) -> Iterator[None]:
    """``extra`` allowed for ``weights_only`` loads within the block; the process-wide list
    restored exactly afterwards. (``torch.serialization.safe_globals`` removes its entries on
    exit even when they were registered before, e.g. by ``import megatron.core``, which then
    breaks megatron-core's own loads.)"""
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals(extra)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


class UnsafeCheckpointError(ValueError):
    """A torch file holds a type outside the allow-list (it was not unpickled)."""


def allowed_globals() -> list[Any]:
    """The classes/functions a Megatron-LM ``model_optim_rng.pt`` may reference."""
    try:
        from megatron.core.safe_globals import SAFE_GLOBALS

        return list(SAFE_GLOBALS)
    except ImportError:
        pass
    import importlib
    import warnings

    out = []
    for entry in _FALLBACK_NAMES:
        module, name = entry.split(":")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # a type this install lacks cannot be in a file it could read either
    return out


def load_megatron_torch(path: str) -> dict[str, Any]:
    """``torch.load`` of a Megatron-LM torch-format file, restricted (module doc).

    Returns the checkpoint dict (tensors on the CPU). Raises :class:`UnsafeCheckpointError`
    naming ``path`` and the refused type when the file references anything outside the
    allow-list; nothing it names is ever imported or called.
    """
    try:
        with _allowing(allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle {_refused(e)}: not a type a Megatron-LM checkpoint holds "
            "(tensors, argparse.Namespace, megatron enums, numpy RNG state); the file may run "
            "code when loaded. Re-save it from a trusted Megatron-LM, or convert from the "
            "torch_dist format") from None
    if not isinstance(obj, dict):
        raise UnsafeCheckpointError(f"{path}: holds a {type(obj).__name__}, not the dict a "
                                    "Megatron-LM checkpoint is")
    return obj


_DCP_MODULES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: only DCP/megatron dataclasses and enums, torch.Size,
    dtypes, layouts, memory formats and OrderedDict; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        import collections
        import dataclasses
        import enum
        import importlib

        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout,
                                                     torch.memory_format)):
                return obj
        elif (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout  # a layout by its name
        elif (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        elif module.startswith(_DCP_MODULES) and not name.startswith("__"):
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj)
                                          or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def check_dist_checkpoint(ckpt: str) -> None:
    """Refuse a ``torch_dist`` checkpoint directory whose pickles hold anything but data.

    Reads ``ckpt/.metadata`` with :class:`_MetadataUnpickler` and test-loads every
    non-tensor object's bytes (from the ``.distcp`` files) with ``weights_only=True`` and
    :func:`allowed_globals`. Raises :class:`UnsafeCheckpointError` (one line: the file, the
    object, the refused type). A missing ``.metadata`` is left to the loader to report.
    """
    import io
    import os

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta_path = os.path.join(ckpt, ".metadata")
    if not os.path.isfile(meta_path):
        return
    try:
        with open(meta_path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{meta_path}: refused to unpickle {_refused(e)}: a torch_dist checkpoint's "
            "metadata holds only PyTorch DCP's own records; the file may run code when "
            "loaded") from None
    except (EOFError, ValueError, AttributeError) as e:
        raise UnsafeCheckpointError(f"{meta_path}: not a readable DCP metadata file "
                                    f"({type(e).__name__}: {e})") from None
    objects = {k for k, v in getattr(meta, "state_dict_metadata", {}).items()
               if isinstance(v, BytesStorageMetadata)}
    allowed = allowed_globals()
    for index, info in (getattr(meta, "storage_data", None) or {}).items():
        if getattr(index, "fqn", None) not in objects:
            continue
        path = os.path.join(ckpt, info.relative_path)
        if getattr(info, "transform_descriptors", None):
            raise UnsafeCheckpointError(f"{path}: object {index.fqn} is stored transformed "
                                        f"({info.transform_descriptors}): cannot be checked")
        with open(path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            with _allowing(allowed):
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{path}: object {index.fqn}: refused to unpickle {_refused(e)}: not a type "
                "a checkpoint holds; the file may run code when loaded") from None


def _refused(e: Exception) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return found.group(1) if found else str(e).strip().splitlines()[-1][:200]
