"""Weights & Biases logging for ``adadpo-train``, with Megatron-LM's flags and layout.

Flags (Megatron-LM's names, meaning and defaults):

* ``--wandb-project NAME``: log to W&B (off without it).
* ``--wandb-exp-name NAME``: the run's display name (default: W&B picks one).
* ``--wandb-save-dir DIR``: W&B's local files (default ``--save``/wandb as in Megatron-LM,
  else ``--log-dir``/wandb, else W&B's default ``./wandb``).
* ``--wandb-entity NAME``: the user or team (default: W&B's default entity).

What goes there: every record ``MetricsWriter`` writes to ``metrics.jsonl``, under the same
names and at the same ``step`` (training scalars, ``eval/`` scalars, ``elapsed_s``,
``eta_s``); NaN/inf as the float. Written by the logging rank only (one W&B run per job);
``config`` is the run's ``TrainConfig.to_dict()``.

Resume: the run's id is kept in ``SAVE/wandb_run.json`` (beside the checkpoints). A run
that resumes from ``--load DIR`` (not ``--finetune``) and finds ``DIR/wandb_run.json`` of
the same project and entity continues that W&B run (``wandb.init(id=..., resume="allow")``);
W&B drops values logged at steps below the run's last step (steps past the checkpoint that
an interrupted process had already logged are not rewritten).

``WANDB_MODE=offline`` (or ``wandb offline``) works as with any W&B run: the files stay
under the save directory until ``wandb sync``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
from typing import Any

__all__ = ["RUN_ID_FILE", "WandbConfig", "WandbSink", "WandbStartError", "add_wandb_args", "default_save_dir",
           "missing_wandb", "open_wandb", "read_run_id", "wandb_config_from_args",
           "write_run_id"]

RUN_ID_FILE = "wandb_run.json"
"""Name of the run-id file in the checkpoint directory (``--save``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandbConfig:
    """The ``--wandb-*`` flags (``project`` set: W&B logging is on)."""

    project: str
    exp_name: str | None = None
    save_dir: str | None = None
    entity: str | None = None


class WandbStartError(RuntimeError):
    """``wandb.init`` failed (the message names the flag and the cause, in one line)."""


def add_wandb_args(parser: argparse.ArgumentParser) -> None:
    """Adds Megatron-LM's ``--wandb-project``, ``--wandb-exp-name``, ``--wandb-save-dir``
    and ``--wandb-entity`` (group "Weights & Biases") to ``parser``."""
    g = parser.add_argument_group("Weights & Biases (Megatron-LM's flags; needs wandb)")
    g.add_argument("--wandb-project", default=None,
                   help="log the metrics.jsonl scalars to this W&B project (rank 0 only)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run name")
    g.add_argument("--wandb-save-dir", default=None,
                   help="W&B's local files (default SAVE/wandb, else LOG_DIR/wandb)")
    g.add_argument("--wandb-entity", default=None, help="W&B user or team")


def missing_wandb(flag: str = "--wandb-project") -> str | None:
    """The one-line refusal when the ``wandb`` package is missing, else None."""
    if importlib.util.find_spec("wandb") is not None:
        return None
    return (f"{flag} needs the wandb package, which is not installed: "
            "pip install 'adadpo-megatron[wandb]' (or pip install wandb), or drop the flag")


def wandb_config_from_args(a: argparse.Namespace) -> WandbConfig | None:
    """``WandbConfig`` from the flags, None without ``--wandb-project``.

    Raises ValueError naming the flag: another ``--wandb-*`` flag without a project, or
    the ``wandb`` package missing.
    """
    project = getattr(a, "wandb_project", None)
    others = {f"--wandb-{k.replace('_', '-')}": getattr(a, f"wandb_{k}", None)
              for k in ("exp_name", "save_dir", "entity")}
    if not project:
        given = [flag for flag, v in others.items() if v]
        if given:
            raise ValueError(f"{given[0]} needs --wandb-project NAME (W&B logging is off "
                             "without a project)")
        return None
    problem = missing_wandb()
    if problem:
        raise ValueError(problem)
    return WandbConfig(project=project, exp_name=a.wandb_exp_name or None,
                       save_dir=a.wandb_save_dir or None, entity=a.wandb_entity or None)


def read_run_id(directory: str | None, project: str, entity: str | None) -> str | None:
    """The W&B run id saved in ``directory`` for this project and entity, else None."""
    if not directory:
        return None
    try:
        with open(os.path.join(directory, RUN_ID_FILE), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("project") != project:
        return None
    if saved.get("entity") != entity:
        return None
    run_id = saved.get("id")
    return run_id if isinstance(run_id, str) and run_id else None


def write_run_id(directory: str | None, run_id: str, project: str, entity: str | None) -> None:
    """Write ``directory/wandb_run.json`` (atomically) so a resumed run finds the id."""
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, RUN_ID_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"id": run_id, "project": project, "entity": entity}, f)
        f.write("\n")
    os.replace(tmp, path)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record (NaN/inf stay floats: W&B stores them as such)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


class WandbSink:
    """Logs records to an open W&B run: ``log(step, metrics)``, ``close()``.

    Args:
        run: the ``wandb`` run object (``wandb.init``'s result).
        finish: ``close`` finishes the run (False when its owner finishes it, as
            Megatron-LM does with its own run).
    """

    def __init__(self, run: Any, *, finish: bool = True) -> None:
        self.run = run
        self._finish = finish

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Log the numeric ``metrics`` at ``step`` (the trainer's step, from 1)."""
        values = _scalars(metrics)
        if values:
            self.run.log(values, step=int(step))

    def close(self) -> None:
        """Finish the run (uploads in online mode) and stop W&B's service process, which
        would otherwise live until this process exits."""
        if self.run is not None and self._finish:
            import wandb

            self.run.finish()
            wandb.teardown()
        self.run = None


def default_save_dir(cfg: WandbConfig, save: str | None, log_dir: str | None) -> str | None:
    """Where W&B's local files go: ``--wandb-save-dir``, ``SAVE/wandb``, ``LOG_DIR/wandb``."""
    if cfg.save_dir:
        return cfg.save_dir
    for base in (save, log_dir):
        if base:
            return os.path.join(base, "wandb")
    return None


def open_wandb(cfg: WandbConfig | None, *, enabled: bool, save: str | None,
               log_dir: str | None, resume_from: str | None,
               config: dict[str, Any] | None = None) -> WandbSink | None:
    """Start (or continue) the W&B run on the logging rank; None elsewhere or when off.

    Args:
        cfg: the ``--wandb-*`` flags (None: off).
        enabled: this rank logs (``MetricsWriter``'s rank).
        save: ``--save``: the run id is written there.
        log_dir: ``--log-dir`` (the fallback location of W&B's files).
        resume_from: the checkpoint directory a resumed run loaded (``--load`` without
            ``--finetune``), None for a run from step 0.
        config: the run's settings, W&B's ``config``.
    """
    if cfg is None or not enabled:
        return None
    import wandb

    directory = default_save_dir(cfg, save, log_dir)
    kwargs: dict[str, Any] = {"project": cfg.project, "name": cfg.exp_name,
                              "entity": cfg.entity, "config": config or {}}
    if directory:
        os.makedirs(directory, exist_ok=True)
        kwargs["dir"] = directory
    run_id = read_run_id(resume_from, cfg.project, cfg.entity)
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    try:
        run = wandb.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - no login, no network, a bad entity: one line
        text = " ".join(str(exc).split())
        raise WandbStartError(f"--wandb-project {cfg.project}: W&B could not start the run "
                              f"({type(exc).__name__}: {text}); log in (wandb login), or "
                              "set WANDB_MODE=offline and wandb sync later") from None
    write_run_id(save, run.id, cfg.project, cfg.entity)
    return WandbSink(run)
