"""Checksum manifest of a checkpoint directory: written with it, verified before loading it.

``ITER_DIR/adadpo_manifest.json`` lists every file of the checkpoint (relative path, size
in bytes, sha256) except itself and ``adadpo_meta.json`` (written after it, as the commit
marker; it is JSON-checked on its own). It is written atomically inside the staging
directory, before that directory is renamed into place, so a checkpoint that looks
complete always has one. Loading checks every listed file before torch reads any tensor:
a file that is missing, of another size (truncated) or of other contents is refused in
one line naming it. Each rank hashes the files it wrote (``__R_*.distcp``: rank R); a
verification spreads the files over the ranks (rank r takes files r, r + W, ...).

torch's own checks catch only some of this: a truncated shard gives a long traceback and
flipped bytes inside a ``.distcp`` tensor payload load silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import torch

__all__ = ["MANIFEST", "RECORD", "ManifestError", "record_checkpoint", "recorded",
           "verify_manifest", "write_manifest"]

MANIFEST = "adadpo_manifest.json"
RECORD = "adadpo_checkpoints.json"
"""``SAVE/adadpo_checkpoints.json``: ``{"iterations": {"6": MANIFEST_SHA256, ...}}``, the
second record of each checkpoint written here. A checkpoint it lists must have its meta
file and a manifest with that sha256: deleting ``adadpo_meta.json`` (or the manifest)
no longer makes it look like a foreign checkpoint that is read unverified."""
_SKIP = {MANIFEST, "adadpo_meta.json"}
_CHUNK = 1 << 22


class ManifestError(RuntimeError):
    """A checkpoint file does not match its manifest (or there is no manifest)."""


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _list_files(root: str) -> list[str]:
    names = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel not in _SKIP:
                names.append(rel)
    return sorted(names)


def _digest(path: str) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def _from_rank0(value: Any) -> Any:
    rank, world = _dist()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    rank, world = _dist()
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, value)
    return out


def _writer(name: str, world: int) -> int:
    """The rank that wrote ``name``: torch's shard files are ``__R_N.distcp`` (written by
    rank R); the rest (``metadata.json``, ``common.pt``) rank 0's. Each rank hashes what
    it just wrote, while it is still in its own page cache."""
    match = re.match(r"__(\d+)_\d+\.distcp$", os.path.basename(name))
    rank = int(match.group(1)) if match else 0
    return rank if rank < world else rank % world


def write_manifest(ckpt: str) -> None:
    """Hash every file of ``ckpt`` and write its manifest (collective when distributed).

    Args:
        ckpt: the checkpoint directory, all its files written (after the save's barrier).
    """
    rank, world = _dist()
    names = _from_rank0(_list_files(ckpt) if rank == 0 else None)
    try:
        mine: Any = {name: _digest(os.path.join(ckpt, name))
                     for name in names if _writer(name, world) == rank}
    except OSError as e:  # a failing disk: every rank raises it, none waits at the gather
        mine = e
    parts = _gather(mine)
    failed = [p for p in parts if isinstance(p, OSError)]
    if failed:
        raise failed[0]
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    if rank == 0:
        payload = {"version": 1, "algorithm": "sha256", "files": dict(sorted(merged.items()))}
        tmp = os.path.join(ckpt, f"{MANIFEST}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(ckpt, MANIFEST))


def _read(ckpt: str) -> dict[str, Any] | str:
    path = os.path.join(ckpt, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
        return files
    except FileNotFoundError:
        return (f"{path} is missing: the checkpoint is incomplete or was written without one "
                "(by an older adadpo-megatron: --adopt-unverified-checkpoint hashes it once "
                "and writes one)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({type(e).__name__}: {e})"


def _check(ckpt: str, name: str, want: dict[str, Any]) -> str | None:
    path = os.path.join(ckpt, name)
    if not os.path.isfile(path):
        return f"{path} is missing"
    size = os.path.getsize(path)
    if size != want["size"]:
        what = "truncated" if size < want["size"] else "longer than written"
        return f"{path} is {what}: {size} bytes, the manifest says {want['size']}"
    if _digest(path)["sha256"] != want["sha256"]:
        return f"{path} was changed: its sha256 differs from the manifest's"
    return None


def verify_manifest(ckpt: str) -> None:
    """Check every file ``ckpt``'s manifest lists (collective when distributed).

    Raises:
        ManifestError: on every rank, one line naming the first bad file (and how many
            more there are), or the missing/unreadable manifest.
    """
    rank, world = _dist()
    files = _from_rank0(_read(ckpt) if rank == 0 else None)
    if isinstance(files, str):
        raise ManifestError(files)
    names = sorted(files)
    mine = [err for name in names[rank::world] if (err := _check(ckpt, name, files[name]))]
    errors = sorted(err for part in _gather(mine) for err in part)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ManifestError(f"damaged checkpoint: {errors[0]}{more}; resume from an earlier "
                            "checkpoint (point the tracker file at it) or re-create this one")


def _sha256(path: str) -> str:
    return _digest(path)["sha256"]


def record_checkpoint(root: str, iteration: int, ckpt: str, write_atomic) -> None:
    """Add ``iteration`` (its manifest's sha256) to ``root``'s record (rank 0, at commit).

    ``write_atomic(path, text)`` writes a file atomically.
    """
    path = os.path.join(root, RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        iterations = dict(record.get("iterations", {}))
    except (OSError, ValueError, AttributeError):
        iterations = {}
    iterations[str(iteration)] = _sha256(os.path.join(ckpt, MANIFEST))
    write_atomic(path, json.dumps({"version": 1, "iterations": iterations}, indent=1,
                                  sort_keys=True))


def recorded(root: str, iteration: int) -> str | None:
    """The manifest sha256 ``root``'s record holds for ``iteration``, or None."""
    try:
        with open(os.path.join(root, RECORD), encoding="utf-8") as f:
            value = json.load(f)["iterations"].get(str(iteration))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def check_recorded_manifest(ckpt: str, want: str) -> str | None:
    """Why ``ckpt``'s manifest is not the one recorded at save time, or None."""
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.isfile(path):
        return f"{path} is missing, but {RECORD} records this checkpoint with one"
    if _sha256(path) != want:
        return f"{path} was changed since the save ({RECORD} records another sha256)"
    return None
