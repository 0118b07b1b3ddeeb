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

import json
import logging
import os
import shutil
import uuid
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state

from adadpo_megatron.io_errors import describe_os_error
from adadpo_megatron.trainer.checkpoint_state import (
    OPTIM_METADATA,
    optimizer_sharded,
    restore_adam_steps,
    rng_sharded,
    rng_state,
    set_rng_state,
)
from adadpo_megatron.trainer.manifest import (
    MANIFEST,
    ManifestError,
    check_recorded_manifest,
    record_checkpoint,
    recorded,
    verify_manifest,
    write_manifest,
)
from adadpo_megatron.trainer.progress import TRACKER
from adadpo_megatron.trainer.save_lease import lost_lease
from adadpo_megatron.trainer.write_failure import agree, remove_quietly, resume_hint

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "latest_iteration",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

META = "adadpo_meta.json"
FORMAT_VERSION = 1


def _drop_repeated_write_errors(record: logging.LogRecord) -> bool:
    # megatron-core logs each failed writer process ("Local process 1 encountered an
    # error: ...") and then raises; save_checkpoint reports the raise in one line.
    return not record.getMessage().startswith("Local process")


logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").addFilter(
    _drop_repeated_write_errors)


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
    from adadpo_megatron.step.model import unwrap_ddp

    return unwrap_ddp(chunk)


def _model_sharded(chunks: list[torch.nn.Module], name: str) -> dict[str, Any]:
    prefix = "" if name == "model" else f"{name}."
    return {f"{name}{i}": _unwrap(chunk).sharded_state_dict(prefix=prefix)
            for i, chunk in enumerate(chunks)}


def save_checkpoint(root: str, iteration: int, *, model: list[torch.nn.Module], optimizer: Any,
                    scheduler: Any, data_state: dict[str, Any], fingerprint: str,
                    config: dict[str, Any], data_fingerprint: str | None,
                    skipped_in_a_row: int = 0,
                    reference: list[torch.nn.Module] | None = None,
                    tokenizer: dict[str, Any] | None = None,
                    reference_source: dict[str, Any] | None = None,
                    model_state: dict[str, Any] | None = None,
                    extra_meta: dict[str, Any] | None = None) -> str:
    """Write checkpoint ``iteration`` under ``root`` atomically; returns its directory.

    Collective over the world. ``model``/``reference`` are this rank's chunks (DDP-wrapped
    or not), ``data_state`` the sampler's JSON-able position, ``fingerprint`` the run's
    ``TrainConfig.fingerprint()``, ``config`` its ``to_dict()``, ``tokenizer`` the training
    data's ``{"fingerprint", "vocab_size"}`` (checked by later loads), ``reference_source``
    where the online reference's weights came from when they are not saved here
    (``trainer/reference_source.py``). ``model_state`` replaces the chunks' sharded state
    (LoRA saves its adapters alone: trainer/lora_ckpt.py); ``extra_meta`` is merged into
    ``adadpo_meta.json``.
    """
    rank = torch.distributed.get_rank()
    final = _iter_dir(root, iteration)
    nonce = [uuid.uuid4().hex[:8] if rank == 0 else None]
    torch.distributed.broadcast_object_list(nonce, src=0)
    tmp = f"{final}.tmp-{nonce[0]}"
    error = None
    if rank == 0:
        try:
            error = lost_lease(root)  # another job took this --save over: write nothing
            if error is None:
                os.makedirs(tmp)
        except OSError as e:
            error = describe_os_error(e, tmp)
    _raise_if_failed(agree(error), root, final, tmp)
    try:
        model_sd = model_state if model_state is not None else _model_sharded(model, "model")
        state: dict[str, Any] = dict(model_sd)
        state["optimizer"] = optimizer_sharded(optimizer, model_sd, is_loading=False)
        if reference is not None:
            state.update(_model_sharded(reference, "reference"))
        state["scheduler"] = scheduler.state_dict()
        state["data"] = data_state
        state["iteration"] = iteration
        state["skipped_in_a_row"] = skipped_in_a_row
        state["rng_state"] = rng_sharded(rng_state())
        error = _write_guarded(lambda: dist_checkpointing.save(state, tmp), tmp)
        _raise_if_failed(agree(error), root, final, tmp)
        torch.distributed.barrier()
        # every file's size and sha256, before the meta file commits it
        error = _write_guarded(lambda: write_manifest(tmp), tmp)
        _raise_if_failed(agree(error), root, final, tmp)
        if rank == 0:
            meta = {"format_version": FORMAT_VERSION, "iteration": iteration,
                    "fingerprint": fingerprint, "data_fingerprint": data_fingerprint,
                    "layout": _layout(), "has_reference": reference is not None,
                    "optimizer_metadata": OPTIM_METADATA, "config": config,
                    "tokenizer": tokenizer, "reference_source": reference_source,
                    **(extra_meta or {})}
            error = _write_guarded(lambda: _commit(root, final, tmp, nonce[0], iteration, meta),
                                   tmp)
        _raise_if_failed(agree(error), root, final, tmp)
    except BaseException:  # interrupted (Ctrl-C) or failed: no staging directory stays behind
        if rank == 0:
            remove_quietly(tmp)
        raise
    torch.distributed.barrier()
    return final


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (a full or failing disk): nothing of it was committed."""


def _write_guarded(write, tmp: str) -> str | None:
    """Run ``write()``; the one-line description of a failure, or None."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        write()
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - torch's is a BaseException
        return describe_os_error(e, tmp)
    return None


def _raise_if_failed(error: str | None, root: str, final: str, tmp: str) -> None:
    if error is None:
        return
    if torch.distributed.get_rank() == 0:
        remove_quietly(tmp)
    raise CheckpointWriteError(f"cannot write checkpoint {final} ({error}); the tracker and "
                               f"earlier checkpoints are untouched and {tmp} was removed; "
                               f"{resume_hint(root)}")


def _commit(root: str, final: str, tmp: str, nonce: str, iteration: int,
            meta: dict[str, Any]) -> None:
    """Rank 0: meta file last, the directory into place, then the tracker."""
    _write_atomic(os.path.join(tmp, META), json.dumps(meta, indent=1, sort_keys=True))
    aside = None
    if os.path.exists(final):  # re-saving a step (a resumed run saving into --load)
        aside = f"{final}.old-{nonce}"
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
        record_checkpoint(root, iteration, final, _write_atomic)  # the second record
        _write_atomic(os.path.join(root, TRACKER), f"{iteration}\n")
    except BaseException:
        if os.path.isdir(final) and not os.path.exists(tmp):
            os.replace(final, tmp)  # back to staging (removed by the caller)
        if aside is not None:
            os.replace(aside, final)  # the old checkpoint of this step, as it was
        raise
    if aside is not None:
        shutil.rmtree(aside)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


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


def _check_optimizer_resumable(ckpt: str, meta: dict[str, Any], config: dict[str, Any]) -> None:
    """The optimizer state of ``ckpt`` fits this run's optimizer (CheckpointError if not).

    The distributed optimizer's state (flat per-bucket shards) and the plain one's (per
    parameter) are different objects; a ``dp_reshardable`` distributed-optimizer state
    reshards over DP only, so TP, PP, virtual PP and CP must match.
    """
    saved = bool(meta["config"].get("parallel", {}).get("use_distributed_optimizer", False))
    now = bool(config.get("parallel", {}).get("use_distributed_optimizer", False))
    if saved != now:
        raise CheckpointError(
            f"{ckpt} was saved {'with' if saved else 'without'} --use-distributed-optimizer, "
            f"this run is {'with' if now else 'without'} it: its optimizer state does not fit. "
            "Resume with the same setting, or --finetune to take only the weights")
    sharding = meta.get("optimizer_metadata", {}).get("distrib_optim_sharding_type")
    if saved and sharding == "dp_reshardable":
        old, new = meta["layout"], _layout()
        keys = ("tp", "pp", "vpp", "cp")
        if any(old.get(k) != new.get(k) for k in keys):
            raise CheckpointError(
                f"{ckpt}: the distributed optimizer's state was saved at "
                f"{', '.join(f'{k.upper()}={old.get(k)}' for k in keys)} and reshards over "
                f"data parallelism only; this run has "
                f"{', '.join(f'{k.upper()}={new.get(k)}' for k in keys)}. Resume at the saved "
                "layout (any DP size), or --finetune to take only the weights")


def _load(state: dict[str, Any], ckpt: str) -> dict[str, Any]:
    from torch.distributed.checkpoint.api import CheckpointException

    from adadpo_megatron.conversion.safe_load import UnsafeCheckpointError, check_dist_checkpoint

    try:  # DCP unpickles .metadata and objects: check them without running anything first
        check_dist_checkpoint(ckpt)
    except UnsafeCheckpointError as e:
        raise CheckpointError(str(e)) from None
    try:
        return dist_checkpointing.load(state, ckpt)
    # torch's CheckpointException derives from BaseException, not Exception.
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - one clear error for any failure
        first = (str(e).strip().splitlines() or [""])[0][:300]  # torch nests whole tracebacks
        raise CheckpointError(
            f"{ckpt}: cannot read the checkpoint ({type(e).__name__}: {first}). It is corrupt, "
            "incomplete, or its shapes do not fit this model") from e


_ADOPT = {"enabled": False}


def adopt_unverified(enabled: bool) -> None:
    """``--adopt-unverified-checkpoint``: loads hash a checkpoint without a manifest once
    (one warning) and write its manifest, instead of refusing it."""
    _ADOPT["enabled"] = bool(enabled)


def _adopt(ckpt: str) -> None:
    """Write the manifest of a pre-manifest checkpoint (collective), with one warning."""
    from adadpo_megatron.trainer.job_report import say

    if torch.distributed.get_rank() == 0:
        say(f"adadpo-train: warning: {ckpt} has no checksum manifest (written before "
            "manifests); --adopt-unverified-checkpoint: hashing it once, unverified, and "
            f"writing {MANIFEST}: later loads verify against it")
    write_manifest(ckpt)
    torch.distributed.barrier()


def _verify(ckpt: str) -> None:
    """The checkpoint's files against its checksum manifest (collective); CheckpointError."""
    if _ADOPT["enabled"] and not os.path.isfile(os.path.join(ckpt, MANIFEST)):
        _adopt(ckpt)
    root, name = os.path.split(ckpt.rstrip("/"))
    want = recorded(root, int(name[5:])) if name.startswith("iter_") and name[5:].isdigit() \
        else None
    problem = check_recorded_manifest(ckpt, want) if want else None
    if problem:
        raise CheckpointError(f"damaged checkpoint: {problem}")
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
    ref_from = None
    if reference is not None and not meta["has_reference"]:
        ref_from = _recorded_reference(ckpt, meta)
    same_layout = meta["layout"] == _layout()
    _check_optimizer_resumable(ckpt, meta, config)

    model_sd = model_state if model_state is not None else _model_sharded(model, "model")
    state: dict[str, Any] = dict(model_sd)
    metadata = meta.get("optimizer_metadata")
    if (metadata or {}).get("distrib_optim_sharding_type") == "fully_sharded_model_space":
        # Written by versions that never handed it to megatron-core's ChainedOptimizer
        # (no distributed optimizer could save then): they saved as with no metadata,
        # which keys the state as the current default does.
        metadata = None
    state["optimizer"] = optimizer_sharded(optimizer, model_sd, is_loading=True,
                                           metadata=metadata)
    if reference is not None and ref_from is None:
        state.update(_model_sharded(reference, "reference"))
    if same_layout:
        state["rng_state"] = rng_sharded(None)
    loaded = _load(state, ckpt)

    if apply_model is not None:
        apply_model(loaded)
    else:
        for i, chunk in enumerate(model):
            _unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if ref_from is not None:  # the recorded --ref-load checkpoint, verified unchanged
        load_model_weights(ref_from["source"], reference)
    else:
        for i, chunk in enumerate(reference or []):
            _unwrap(chunk).load_state_dict(_strip(loaded[f"reference{i}"], "reference."))
    with torch.no_grad():  # the distributed optimizer copies into views of fp32 parameters
        optimizer.load_state_dict(loaded["optimizer"])
    restore_adam_steps(optimizer)
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        set_rng_state(loaded["rng_state"])
    elif torch.distributed.get_rank() == 0:
        logger.warning("%s: saved at layout %s, loading at %s: RNG states not restored",
                       ckpt, meta["layout"], _layout())
    return {"iteration": int(loaded["iteration"]), "data": loaded["data"],
            "skipped_in_a_row": int(loaded.get("skipped_in_a_row", 0)),
            "reference_source": ref_from}


def _recorded_reference(ckpt: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The reference checkpoint ``meta`` records, checked unchanged; CheckpointError."""
    from adadpo_megatron.trainer.reference_source import reference_problem

    record = meta.get("reference_source")
    if not record:
        raise CheckpointError(f"{ckpt} holds no reference weights and records no reference "
                              "source: give --ref-load")
    problem = reference_problem(record)
    if problem:
        raise CheckpointError(f"{ckpt}: its online reference came from {record['source']} "
                              f"(iteration {record.get('iteration')}), but {problem}; give "
                              "--ref-load with the original reference weights")
    return record


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
    ours = (os.path.isfile(os.path.join(ckpt, META)) or recorded(root, iteration)
            or os.path.isfile(os.path.join(ckpt, MANIFEST)))  # deleting one file is not enough
    if ours or not _is_torch_dist(ckpt):
        _read_meta(ckpt)  # ours: checked; neither ours nor torch_dist: refused with why
        _verify(ckpt)  # ours carry a checksum manifest
    # else a torch_dist checkpoint another program wrote (Megatron-LM's pretrain(), e.g. an
    # SFT model): its model tensors carry the same sharded keys as ours.
    prefix = "" if source == "model" else f"{source}."
    loaded = _load(_model_sharded(chunks, source), ckpt)
    for i, chunk in enumerate(chunks):
        _unwrap(chunk).load_state_dict(_strip(loaded[f"{source}{i}"], prefix))
    return iteration
