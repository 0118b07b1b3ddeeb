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
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "allowed_globals", "load_megatron_torch"]

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
        with torch.serialization.safe_globals(allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else str(e).strip().splitlines()[-1][:200]
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle {what}: not a type a Megatron-LM checkpoint holds "
            "(tensors, argparse.Namespace, megatron enums, numpy RNG state); the file may run "
            "code when loaded. Re-save it from a trusted Megatron-LM, or convert from the "
            "torch_dist format") from None
    if not isinstance(obj, dict):
        raise UnsafeCheckpointError(f"{path}: holds a {type(obj).__name__}, not the dict a "
                                    "Megatron-LM checkpoint is")
    return obj
