"""LoRA in the trainer: the base the adapters sit on, building the adapted model.

Flags: ``trainer/lora_args.py``. With LoRA and no ``--ref-logprobs``/``--ref-load`` the
reference is the base (the same model with the adapters off): ``ReferenceArgs.mode ==
"base"``, run by ``step/reference.base_reference_logps``.

**The base.** ``--load BASE --finetune`` (a converted Hugging Face model, or any checkpoint
of the same shape) or, without ``--load``, the seeded initialisation. The adapter
checkpoint records it (:func:`base_record`: path, iteration and fingerprint = sha256 of
the base checkpoint's checksum manifest, or of its file list where it has none), so that
``--load SAVE`` alone finds the base again, checks the fingerprint and resumes; a base
whose files changed is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from adadpo_megatron.trainer.config import ConfigError

__all__ = ["base_fingerprint", "base_of_adapter_checkpoint", "base_record", "build_lora_model",
           "read_adapter_meta", "refuse_adapter_checkpoint"]


def _ckpt_dir(root: str) -> tuple[str, int]:
    from adadpo_megatron.trainer.checkpointing import _iter_dir, latest_iteration

    it = latest_iteration(root)
    return _iter_dir(root, it), it


def base_fingerprint(root: str) -> str:
    """sha256 (16 hex) identifying the base checkpoint ``root``'s latest iteration.

    Hashes its checksum manifest (which holds every file's sha256) when it has one (ours,
    the converter's), else every file's relative path and size plus torch_dist's
    ``.metadata`` (Megatron-LM checkpoints). Cheap: no tensor is read.
    """
    from adadpo_megatron.trainer.manifest import MANIFEST

    ckpt, _ = _ckpt_dir(root)
    h = hashlib.sha256()
    manifest = os.path.join(ckpt, MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest, "rb") as f:
            h.update(f.read())
        return h.hexdigest()[:16]
    for dirpath, _, files in sorted(os.walk(ckpt)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(f"{os.path.relpath(path, ckpt)}:{os.path.getsize(path)}\n".encode())
            if name == ".metadata":
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:16]


def base_record(cfg: Any) -> dict[str, Any]:
    """Where this run's base weights come from (stored in every adapter checkpoint)."""
    if cfg.io.load and cfg.io.finetune:
        root = os.path.abspath(cfg.io.load)
        _, it = _ckpt_dir(root)
        return {"source": "checkpoint", "path": root, "iteration": it,
                "fingerprint": base_fingerprint(root)}
    blob = json.dumps({"model": cfg.to_dict()["model"], "seed": cfg.training.seed},
                      sort_keys=True)
    return {"source": "init", "seed": cfg.training.seed,
            "fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16]}


def read_adapter_meta(root: str) -> dict[str, Any] | None:
    """The ``lora`` record of ``root``'s latest checkpoint (None: not an adapter checkpoint)."""
    from adadpo_megatron.trainer.checkpointing import META

    ckpt, _ = _ckpt_dir(root)
    try:
        with open(os.path.join(ckpt, META), encoding="utf-8") as f:
            return json.load(f).get("lora")
    except (OSError, ValueError):
        return None


def base_of_adapter_checkpoint(root: str, default: str | None) -> str | None:
    """The base checkpoint under ``root``'s adapters (None: the seeded initialisation);
    ``default`` when ``root`` is not an adapter checkpoint. Checks the base's fingerprint."""
    from adadpo_megatron.trainer.checkpointing import CheckpointError

    meta = read_adapter_meta(root)
    if meta is None:
        return default
    base = meta["base"]
    if base["source"] != "checkpoint":
        return None
    if not os.path.isdir(base["path"]) or base_fingerprint(base["path"]) != base["fingerprint"]:
        raise CheckpointError(f"{root}: its base checkpoint {base['path']} is gone or has "
                              "changed since the adapters were trained")
    return base["path"]


def refuse_adapter_checkpoint(root: str) -> None:
    """ConfigError when ``root`` holds an adapter checkpoint but this run has no --lora-rank."""
    meta = read_adapter_meta(root)
    if meta is not None:
        raise ConfigError(f"--load {root} is a LoRA adapter checkpoint (rank "
                          f"{meta['settings']['rank']}): give the same --lora-* flags to resume "
                          "it, or merge it into its base with tools/convert_hf_to_megatron.py "
                          "--merge-lora")


def _resolve_base(cfg: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(base record, adapter meta of --load or None) for this run; CheckpointError/ConfigError."""
    from adadpo_megatron.trainer.checkpointing import CheckpointError

    if not cfg.io.load or cfg.io.finetune:
        return base_record(cfg), None
    meta = read_adapter_meta(cfg.io.load)
    if meta is None:
        raise ConfigError(f"--load {cfg.io.load} is not a LoRA adapter checkpoint: to put "
                          "adapters on it as the base, add --finetune")
    base = meta["base"]
    if base["source"] == "checkpoint":
        path = base["path"]
        if not os.path.isdir(path):
            raise CheckpointError(f"--load {cfg.io.load}: its base checkpoint {path} is gone; "
                                  "put the base back there (the adapters only fit that base)")
        got = base_fingerprint(path)
        if got != base["fingerprint"]:
            raise CheckpointError(
                f"--load {cfg.io.load}: its base {path} has changed (fingerprint {got}, the "
                f"adapters were trained on {base['fingerprint']}): refusing to put the "
                "adapters on another base")
    else:
        want = base_record(cfg)
        if want["fingerprint"] != base["fingerprint"]:
            raise CheckpointError(
                f"--load {cfg.io.load}: its base is the seeded initialisation (seed "
                f"{base['seed']}), which this run's model flags or --seed do not reproduce")
    return base, meta


def build_lora_model(cfg: Any, config: Any, vocab: int, max_pos: int,
                     ddp_config: Any) -> tuple[list[torch.nn.Module], dict[str, Any]]:
    """This rank's adapted, DDP-wrapped chunks and the base record.

    Builds the chunks, loads the base (``--finetune --load BASE``, or the base recorded in
    the adapter checkpoint of ``--load``: found, fingerprint-checked), attaches the
    adapters (all other parameters frozen) and wraps the chunks in megatron-core DDP.
    """
    from megatron.core.distributed import DistributedDataParallel

    from adadpo_megatron.step.lora import add_lora
    from adadpo_megatron.step.model import build_model_chunks
    from adadpo_megatron.trainer.checkpointing import load_model_weights

    base, _ = _resolve_base(cfg)
    chunks = build_model_chunks(config, vocab, max_pos, wrap_ddp=False)
    if base["source"] == "checkpoint":
        load_model_weights(base["path"], chunks)
    add_lora(chunks, cfg.lora, seed=cfg.training.seed)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                       disable_bucketing=(i > 0))
               for i, m in enumerate(chunks)]
    return wrapped, base
