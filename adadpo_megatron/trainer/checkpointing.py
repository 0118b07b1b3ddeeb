"""Checkpoints with megatron-core dist-checkpointing: save, resume, and weights-only loads.

Layout (the tracker file name is Megatron-LM's, so its tools find our checkpoints)::

    SAVE/latest_checkpointed_iteration.txt   "3": the newest complete checkpoint
    SAVE/iter_0000003/                       a torch_dist dist-checkpoint, plus
    SAVE/iter_0000003/adadpo_meta.json       step, config fingerprint, layout, data fingerprint

A checkpoint holds the model chunks (``model0``, ``model1``, ... one per virtual stage),
the optimizer (sharded against the model's tensors, so megatron-core can reshard it), the
LR scheduler, the data position, the iteration, the consecutive-skip count, and each
rank's RNG states. When the online reference is the policy's initial weights (no
``--ref-load``), its weights are saved too (``reference0``, ...) so a resume finds it.

Atomicity: everything is written into ``iter_N.tmp-<nonce>``; after a barrier, rank 0
writes ``adadpo_meta.json`` last, renames the directory into place, then replaces the
tracker file (write to a temp file + ``os.replace``). A crash at any point leaves the
previous checkpoint as "latest" and never a directory that looks complete.

Loading checks the tracker, the meta file, the config fingerprint (model shape and
loss) and every file against the checksum manifest (``adadpo_manifest.json``, written
before the meta file: :mod:`adadpo_megatron.trainer.manifest`) before reading any tensor,
and names what differs. Model and optimizer tensors load
at another TP/PP layout where megatron-core can reshard them; RNG states are restored only
at the same layout (with a note otherwise), as Megatron-LM does.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import shutil
import uuid
from typing import Any

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from adadpo_megatron.trainer.manifest import ManifestError, verify_manifest, write_manifest
from adadpo_megatron.trainer.progress import TRACKER

__all__ = [
    "CheckpointError",
    "latest_iteration",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

META = "adadpo_meta.json"
FORMAT_VERSION = 1
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space",
                   "chained_optim_avoid_prefix": True}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt, or made for another run."""


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _layout() -> dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        "cp": parallel_state.get_context_parallel_world_size(),
        "world": torch.distributed.get_world_size(),
    }


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside a DDP wrapper (whose own state dict keys would gain 'module.')."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    while isinstance(chunk, _BaseDataParallel):
        chunk = chunk.module
    return chunk


def _model_sharded(chunks: list[torch.nn.Module], name: str) -> dict[str, Any]:
    prefix = "" if name == "model" else f"{name}."
    return {f"{name}{i}": _unwrap(chunk).sharded_state_dict(prefix=prefix)
            for i, chunk in enumerate(chunks)}


def _optimizer_sharded(optimizer: Any, model_sd: dict[str, Any], is_loading: bool) -> Any:
    flat: dict[str, Any] = {}
    for chunk_sd in model_sd.values():
        flat.update(chunk_sd)
    params = inspect.signature(optimizer.sharded_state_dict).parameters
    kwargs = {"metadata": dict(_OPTIM_METADATA)} if "metadata" in params else {}
    return optimizer.sharded_state_dict(flat, is_loading=is_loading, **kwargs)


def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict[str, Any] | None) -> ShardedObject:
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def save_checkpoint(root: str, iteration: int, *, model: list[torch.nn.Module], optimizer: Any,
                    scheduler: Any, data_state: dict[str, Any], fingerprint: str,
                    config: dict[str, Any], data_fingerprint: str | None,
                    skipped_in_a_row: int = 0,
                    reference: list[torch.nn.Module] | None = None,
                    tokenizer: dict[str, Any] | None = None,
                    model_state: dict[str, Any] | None = None,
                    extra_meta: dict[str, Any] | None = None) -> str:
    """Write checkpoint ``iteration`` under ``root`` atomically; returns its directory.

    Collective over the world. ``model``/``reference`` are this rank's chunks (DDP-wrapped
    or not), ``data_state`` the sampler's JSON-able position, ``fingerprint`` the run's
    ``TrainConfig.fingerprint()``, ``config`` its ``to_dict()``, ``tokenizer`` the training
    data's ``{"fingerprint", "vocab_size"}`` (checked by later loads). ``model_state``
    replaces the chunks' sharded state (LoRA saves its adapters alone: trainer/lora_ckpt.py);
    ``extra_meta`` is merged into ``adadpo_meta.json``.
    """
    rank = torch.distributed.get_rank()
    final = _iter_dir(root, iteration)
    nonce = [uuid.uuid4().hex[:8] if rank == 0 else None]
    torch.distributed.broadcast_object_list(nonce, src=0)
    tmp = f"{final}.tmp-{nonce[0]}"
    if rank == 0:
        os.makedirs(tmp)
    torch.distributed.barrier()

    model_sd = model_state if model_state is not None else _model_sharded(model, "model")
    state: dict[str, Any] = dict(model_sd)
    state["optimizer"] = _optimizer_sharded(optimizer, model_sd, is_loading=False)
    if reference is not None:
        state.update(_model_sharded(reference, "reference"))
    state["scheduler"] = scheduler.state_dict()
    state["data"] = data_state
    state["iteration"] = iteration
    state["skipped_in_a_row"] = skipped_in_a_row
    state["rng_state"] = _rng_sharded(_rng_state())
    dist_checkpointing.save(state, tmp)
    torch.distributed.barrier()
    write_manifest(tmp)  # every file's size and sha256, before the meta file commits it

    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "iteration": iteration,
                "fingerprint": fingerprint, "data_fingerprint": data_fingerprint,
                "layout": _layout(), "has_reference": reference is not None,
                "optimizer_metadata": _OPTIM_METADATA, "config": config,
                "tokenizer": tokenizer, **(extra_meta or {})}
        _write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1, sort_keys=True))
        aside = None
        if os.path.exists(final):  # re-saving a step (a resumed run saving into --load)
            aside = f"{final}.old-{nonce[0]}"
            os.replace(final, aside)
        os.replace(tmp, final)
        _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
        if aside is not None:
            shutil.rmtree(aside)
    torch.distributed.barrier()
    return final


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_iteration(root: str) -> int:
    """The iteration named by ``root``'s tracker file; CheckpointError if absent or garbled."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"--load {root}: no {TRACKER} there, so no complete checkpoint was ever written "
            "(give the --save directory of a run that saved at least once)")
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r} "
                              "(the file is corrupt: fix it or point --load elsewhere)")
    return int(text)


def _read_meta(ckpt: str) -> dict[str, Any]:
    path = os.path.join(ckpt, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{ckpt}: no {META}; the checkpoint is incomplete (its save "
                              "was interrupted) or was not written by adadpo-megatron") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')!r}, this "
                              f"adadpo-megatron reads {FORMAT_VERSION}")
    return meta


def _check_fingerprint(ckpt: str, meta: dict[str, Any], fingerprint: str,
                       config: dict[str, Any]) -> None:
    if meta["fingerprint"] == fingerprint:
        return
    diffs = []
    for group in ("model", "loss"):
        old, new = meta["config"].get(group, {}), config.get(group, {})
        diffs += [f"{group}.{k}: checkpoint {old.get(k)!r} vs now {new.get(k)!r}"
                  for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    raise CheckpointError(
        f"{ckpt} was saved by a run with another model shape or loss; refusing to resume "
        f"({'; '.join(diffs) or 'fingerprints differ'}). Use the same flags, or --finetune to "
        "take only the weights")


def _load(state: dict[str, Any], ckpt: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return dist_checkpointing.load(state, ckpt)
    # torch's CheckpointException derives from BaseException, not Exception.
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - one clear error for any failure
        first = (str(e).strip().splitlines() or [""])[0][:300]  # torch nests whole tracebacks
        raise CheckpointError(
            f"{ckpt}: cannot read the checkpoint ({type(e).__name__}: {first}). It is corrupt, "
            "incomplete, or its shapes do not fit this model") from e


def _verify(ckpt: str) -> None:
    """The checkpoint's files against its checksum manifest (collective); CheckpointError."""
    try:
        verify_manifest(ckpt)
    except ManifestError as e:
        raise CheckpointError(str(e)) from None


def _strip(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    if not prefix:
        return sd
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def load_checkpoint(root: str, *, model: list[torch.nn.Module], optimizer: Any, scheduler: Any,
                    fingerprint: str, config: dict[str, Any], data_fingerprint: str | None,
                    reference: list[torch.nn.Module] | None = None,
                    model_state: dict[str, Any] | None = None,
                    apply_model: Any = None) -> dict[str, Any]:
    """Resume from ``root``'s latest checkpoint, in place; returns the run state.

    ``model_state``/``apply_model(loaded)``: a sharded state other than the chunks' and
    how to put it back (LoRA adapters: trainer/lora_ckpt.py).

    Returns ``{"iteration", "data", "skipped_in_a_row"}``. Raises CheckpointError (before
    reading tensors) when the checkpoint is missing, incomplete, or from a run with another
    model shape, loss or dataset; and when its tensors cannot be read.
    """
    ckpt = _iter_dir(root, latest_iteration(root))
    meta = _read_meta(ckpt)
    _check_fingerprint(ckpt, meta, fingerprint, config)
    _verify(ckpt)
    if data_fingerprint is not None and meta.get("data_fingerprint") not in (None,
                                                                           data_fingerprint):
        raise CheckpointError(
            f"{ckpt} was trained on another dataset (fingerprint {meta['data_fingerprint']}, "
            f"--data-path has {data_fingerprint}); its data position would be meaningless")
    if reference is not None and not meta["has_reference"]:
        raise CheckpointError(f"{ckpt} holds no reference weights: give --ref-load")
    same_layout = meta["layout"] == _layout()

    model_sd = model_state if model_state is not None else _model_sharded(model, "model")
    state: dict[str, Any] = dict(model_sd)
    state["optimizer"] = _optimizer_sharded(optimizer, model_sd, is_loading=True)
    if reference is not None:
        state.update(_model_sharded(reference, "reference"))
    if same_layout:
        state["rng_state"] = _rng_sharded(None)
    loaded = _load(state, ckpt)

    if apply_model is not None:
        apply_model(loaded)
    else:
        for i, chunk in enumerate(model):
            _unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    for i, chunk in enumerate(reference or []):
        _unwrap(chunk).load_state_dict(_strip(loaded[f"reference{i}"], "reference."))
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    elif torch.distributed.get_rank() == 0:
        logger.warning("%s: saved at layout %s, loading at %s: RNG states not restored",
                       ckpt, meta["layout"], _layout())
    return {"iteration": int(loaded["iteration"]), "data": loaded["data"],
            "skipped_in_a_row": int(loaded.get("skipped_in_a_row", 0))}


def _is_torch_dist(ckpt: str) -> bool:
    """True when ``ckpt`` is a megatron-core dist-checkpoint in the torch_dist format."""
    try:
        with open(os.path.join(ckpt, "metadata.json"), encoding="utf-8") as f:
            return json.load(f).get("sharded_backend") == "torch_dist"
    except (OSError, ValueError):
        return False


def load_model_weights(root: str, chunks: list[torch.nn.Module], *,
                       source: str = "model") -> int:
    """Load only model weights from ``root``'s latest checkpoint into ``chunks``.

    Used for ``--finetune``, ``--ref-load`` and precomputing reference log-probs. Reads
    adadpo-megatron checkpoints and any torch_dist checkpoint of the same model without
    ``adadpo_meta.json`` (Megatron-LM's ``--ckpt-format torch_dist``, its default).
    ``source`` is ``"model"`` (the policy) or ``"reference"``. Any TP/PP layout the
    checkpoint can be resharded to works. Returns the checkpoint's iteration.
    """
    iteration = latest_iteration(root)
    ckpt = _iter_dir(root, iteration)
    if os.path.isfile(os.path.join(ckpt, META)) or not _is_torch_dist(ckpt):
        _read_meta(ckpt)  # ours: checked; neither ours nor torch_dist: refused with why
        _verify(ckpt)  # ours carry a checksum manifest
    # else a torch_dist checkpoint another program wrote (Megatron-LM's pretrain(), e.g. an
    # SFT model): its model tensors carry the same sharded keys as ours.
    prefix = "" if source == "model" else f"{source}."
    loaded = _load(_model_sharded(chunks, source), ckpt)
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(_strip(loaded[f"{source}{i}"], prefix))
    return iteration
