"""Never destroy progress: what a run resumes from, and what it may overwrite.

Decided at start, from files only (before the process group, before any step):

* ``--save DIR`` already holding a checkpoint (its tracker file names step M):
  - no ``--load``: the run **resumes from DIR** (step M), with a note. This also makes a
    restarted job (``torchrun --max-restarts``) continue from its last checkpoint;
  - ``--load DIR`` (the same directory): the usual resume;
  - ``--load OTHER`` or ``--finetune``: refused, naming ``--save``: saving there would
    roll DIR's tracker back below step M or mix two runs' checkpoints.
* ``--log-dir`` holding a ``metrics.jsonl``: a resumed run drops only the records past
  the step it resumes from (they are the killed tail of the same run, logged again);
  a run starting at step 0 refuses when the records came from another configuration
  (``config.json`` there differs), rather than overwrite them.

Reading ``metrics.jsonl`` for a resume, a partial last line (a kill during a write) is
dropped with a note; other lines that are not JSON are kept as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from adadpo_megatron.trainer.config import ConfigError, TrainConfig

__all__ = ["TRACKER", "read_tracker", "resolve_resume", "check_metrics_log", "truncate_metrics"]

TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's tracker file name: the newest complete checkpoint's step."""


def read_tracker(root: str | None) -> int | None:
    """The step in ``root``'s tracker file, or None when there is none.

    Raises:
        ConfigError: the tracker exists but does not hold a step number.
    """
    if not root:
        return None
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if not text.isdigit():
        raise ConfigError(f"{path}: expected an iteration number, found {text!r} (the file is "
                          "corrupt: fix it or point the flag elsewhere)")
    return int(text)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def resolve_resume(cfg: TrainConfig, note: Callable[[str], None] = print) -> TrainConfig:
    """Apply the ``--save``/``--load`` rule of the module docstring.

    Args:
        cfg: the validated configuration.
        note: where the one-line note of an automatic resume goes.

    Returns:
        ``cfg``, or a copy with ``io.load = io.save`` when the run resumes from ``--save``.

    Raises:
        ConfigError: ``--save`` holds a checkpoint this run would roll back, or
            ``--log-dir`` holds another run's metrics (see :func:`check_metrics_log`).
    """
    io = cfg.io
    held = read_tracker(io.save)
    if held is not None:
        if io.load is None:
            note(f"adadpo-train: --save {io.save} holds checkpoint step {held}: resuming from it "
                 "(give another --save to start a new run)")
            cfg = dataclasses.replace(cfg, io=dataclasses.replace(io, load=io.save))
        elif io.finetune or not _same_dir(io.load, io.save):
            what = "--finetune --load" if io.finetune else "--load"
            raise ConfigError(
                f"--save {io.save} already holds checkpoint step {held} of another run; saving "
                f"this run ({what} {io.load}) there would roll its tracker back or mix two runs: "
                f"give an empty --save, or resume that run with --load {io.save}")
    start = 0
    if cfg.io.load and not cfg.io.finetune:
        start = read_tracker(cfg.io.load) or 0
    check_metrics_log(cfg, start)
    return cfg


def check_metrics_log(cfg: TrainConfig, start_step: int) -> None:
    """Refuse a run starting at step 0 whose ``--log-dir`` holds another run's metrics.

    Another run: ``config.json`` in ``--log-dir`` is absent or differs from ``cfg``'s.
    A restart of the same configuration may rewrite its own records from step 0.
    """
    log_dir = cfg.io.log_dir
    if not log_dir or start_step > 0:
        return
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        with open(os.path.join(log_dir, "config.json"), encoding="utf-8") as f:
            same = json.load(f) == json.loads(json.dumps(cfg.to_dict()))
    except (OSError, ValueError):
        same = False
    if not same:
        raise ConfigError(
            f"--log-dir {log_dir} holds metrics.jsonl of another run (config.json there differs "
            "or is missing) and this run starts at step 0: give another --log-dir, or resume "
            "that run (--load)")


def truncate_metrics(path: str, start_step: int, note: Callable[[str], None] = print) -> None:
    """Keep the records of ``path`` with ``step <= start_step``, rewritten atomically.

    A last line without its newline (a write cut short) is dropped with a note; a line
    that is not a JSON object is kept unchanged.
    """
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    partial = lines.pop()  # b"" when the file ends with a newline
    keep = []
    for raw in lines:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            step = record.get("step", 0) if isinstance(record, dict) else 0
        except ValueError:
            keep.append(raw)
            continue
        if not isinstance(step, int | float) or step <= start_step:
            keep.append(raw)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(raw + b"\n" for raw in keep))
    os.replace(tmp, path)
    if partial.strip():
        note(f"adadpo-train: {path}: dropped a partial last line ({len(partial)} bytes; a write "
             "was cut short)")
