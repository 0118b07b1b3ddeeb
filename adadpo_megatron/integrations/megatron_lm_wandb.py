"""W&B for the Megatron-LM entry: the plugin's records in Megatron-LM's own W&B run.

Megatron-LM defines ``--wandb-project``, ``--wandb-exp-name``, ``--wandb-save-dir`` and
``--wandb-entity`` itself and opens the run (``global_vars._set_wandb_writer``: on the last
rank, files in ``--wandb-save-dir`` or ``SAVE/wandb``, ``config`` = its arguments) and
finishes it at the end of ``pretrain``. The entry reuses those flags and that run, so one
job has one W&B run holding Megatron-LM's scalars (``lm loss``, ``learning-rate``, ...;
logged by Megatron-LM only with ``--tensorboard-dir``) and the plugin's, under the names
of ``metrics.jsonl`` (``loss``, ``rewards/margins``, ``eval/loss``, ``elapsed_s``, ...).

What the entry adds:

* :func:`check_wandb_flags`: before ``pretrain``, the refusals Megatron-LM would give as
  a traceback (no ``wandb`` package; neither ``--wandb-save-dir`` nor ``--save``), one line.
* Resume: Megatron-LM opens a new W&B run on every launch. :func:`check_wandb_flags`
  sets ``WANDB_RUN_ID`` and ``WANDB_RESUME=allow`` from ``LOAD/wandb_run.json`` (same
  project and entity; not with ``--finetune``) before Megatron-LM's ``wandb.init`` reads
  them, and :func:`megatron_wandb_sink` writes the run id to ``SAVE/wandb_run.json``
  (adadpo-train's file) once the run is open.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from adadpo_megatron.trainer.wandb_logging import (
    WandbSink,
    missing_wandb,
    read_run_id,
    write_run_id,
)

__all__ = ["check_wandb_flags", "megatron_wandb_sink"]


def _known(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--wandb-project", "--wandb-save-dir", "--wandb-entity", "--save", "--load"):
        p.add_argument(flag, default=None)
    p.add_argument("--finetune", action="store_true")
    return p.parse_known_args(list(argv))[0]


def check_wandb_flags(argv: Sequence[str], environ: Any = os.environ) -> str | None:
    """Check the ``--wandb-*`` flags of a Megatron-LM command line; set up the resume.

    Returns the one-line refusal, or None (then ``environ`` holds ``WANDB_RUN_ID`` and
    ``WANDB_RESUME=allow`` when the run resumes a checkpoint that recorded its W&B run).
    """
    a = _known(argv)
    if not a.wandb_project:
        return None
    problem = missing_wandb()
    if problem:
        return problem
    if not (a.wandb_save_dir or a.save):
        return ("--wandb-project needs --wandb-save-dir DIR or --save DIR (Megatron-LM keeps "
                "W&B's files in SAVE/wandb by default)")
    if a.load and not a.finetune:
        run_id = read_run_id(a.load, a.wandb_project, a.wandb_entity)
        if run_id and "WANDB_RUN_ID" not in environ:
            environ["WANDB_RUN_ID"] = run_id
            environ["WANDB_RESUME"] = "allow"
    return None


def megatron_wandb_sink(args: argparse.Namespace) -> WandbSink | None:
    """A sink into Megatron-LM's W&B run on the rank that holds it (None elsewhere).

    Records the run id in ``SAVE/wandb_run.json``. Megatron-LM finishes the run itself.
    """
    from megatron.training.global_vars import get_wandb_writer

    writer = get_wandb_writer()
    run = getattr(writer, "run", None) if writer is not None else None
    if run is None:
        return None
    write_run_id(getattr(args, "save", None), run.id, args.wandb_project,
                 getattr(args, "wandb_entity", None) or None)
    return WandbSink(run, finish=False)
