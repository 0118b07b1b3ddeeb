"""A checkpoint write that fails (full disk, I/O error): agreed by every rank, one line.

:func:`agree` is the collective that makes every rank raise the same error (so the
job prints it once: :mod:`adadpo_megatron.trainer.job_report`) instead of some ranks
waiting forever at the next barrier. :func:`resume_hint` names the checkpoint a rerun
resumes from.
"""

from __future__ import annotations

import os

import torch

from adadpo_megatron.trainer.progress import TRACKER

__all__ = ["agree", "remove_quietly", "resume_hint"]


def agree(error: str | None) -> str | None:
    """The first (lowest-rank) non-None ``error`` of all ranks, on every rank (collective)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error
    world = torch.distributed.get_world_size()
    if world == 1:
        return error
    out: list[str | None] = [None] * world
    torch.distributed.all_gather_object(out, error)
    return next((e for e in out if e is not None), None)


def resume_hint(root: str) -> str:
    """Where a rerun of the same command resumes: the tracker's checkpoint, or nowhere."""
    try:
        with open(os.path.join(root, TRACKER), encoding="utf-8") as f:
            step = int(f.read().strip())
    except (OSError, ValueError):
        return "no earlier checkpoint exists: a rerun starts from step 0"
    return (f"the last good checkpoint is {os.path.join(root, f'iter_{step:07d}')}: free space "
            "and rerun the same command to resume from it")


def remove_quietly(path: str) -> None:
    """Remove a file or directory tree, ignoring errors (cleanup after a failed write)."""
    import shutil

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
