"""Where an online reference's weights came from, recorded in each checkpoint.

A run whose online reference is a checkpoint (``--ref-load REF``, e.g. the same SFT model
as ``--load INIT --finetune``) does not copy those weights into its checkpoints. Each
checkpoint's ``adadpo_meta.json`` records instead ``reference_source``: REF's absolute
path, the iteration its tracker named, and a fingerprint of that checkpoint. A relaunch
with ``--load SAVE`` alone (a Slurm requeue re-running the resume command) then finds
REF there, checks the fingerprint (the reference must be the very same weights, or the
losses would silently change), and loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from adadpo_megatron.trainer.progress import TRACKER

__all__ = ["fingerprint_reference", "reference_problem"]


def _fingerprint(ckpt: str) -> str:
    """sha256 of the checkpoint's manifest when it has one (it covers every file's sha256),
    else of ``metadata.json`` and every file's name and size (a Megatron-LM checkpoint)."""
    h = hashlib.sha256()
    manifest = os.path.join(ckpt, "adadpo_manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, "rb") as f:
            h.update(f.read())
        return "manifest:" + h.hexdigest()
    entries = []
    for dirpath, _, files in os.walk(ckpt):
        for name in files:
            path = os.path.join(dirpath, name)
            entries.append((os.path.relpath(path, ckpt), os.path.getsize(path)))
    h.update(json.dumps(sorted(entries)).encode())
    meta = os.path.join(ckpt, "metadata.json")
    if os.path.isfile(meta):
        with open(meta, "rb") as f:
            h.update(f.read())
    return "files:" + h.hexdigest()


def fingerprint_reference(root: str) -> dict[str, Any]:
    """``{"source", "iteration", "fingerprint"}`` of the checkpoint ``root``'s tracker names."""
    with open(os.path.join(root, TRACKER), encoding="utf-8") as f:
        iteration = int(f.read().strip())
    ckpt = os.path.join(root, f"iter_{iteration:07d}")
    return {"source": os.path.abspath(root), "iteration": iteration,
            "fingerprint": _fingerprint(ckpt)}


def reference_problem(record: dict[str, Any]) -> str | None:
    """Why the recorded reference cannot be used now (moved, changed), or None."""
    root = record.get("source")
    try:
        now = fingerprint_reference(root)
    except (OSError, ValueError, TypeError) as e:
        return f"it cannot be read any more ({type(e).__name__}: {e})"
    if now["iteration"] != record.get("iteration") or now["fingerprint"] != record.get(
            "fingerprint"):
        return (f"it changed since (now iteration {now['iteration']}, fingerprint "
                f"{now['fingerprint'][:24]}...; recorded iteration {record.get('iteration')}, "
                f"{str(record.get('fingerprint'))[:24]}...)")
    return None
