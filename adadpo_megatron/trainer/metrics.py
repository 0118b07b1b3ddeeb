"""Metrics output: the Megatron-style log line, metrics.jsonl and TensorBoard.

The values are global-batch means (``forward_step.reduce_metrics`` reduces the forward
step's ``[sum, count]`` reports over micro-batches and the DP x CP group).

Output, written by one rank (the last pipeline stage's first TP/CP/DP rank):

* a log line every ``--log-interval`` steps, Megatron-LM style::

    [2026-11-27 17:00:01] step 3/6 | loss 0.6931 | lr 1.000E-04 | grad_norm 0.412 | ...

* ``LOG_DIR/metrics.jsonl``: one JSON object per logged step, ``{"step": N, ...}`` with
  ``step`` counted from 1. Training records carry the metric names of LOSSES.md
  (``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
  ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, ``adadpo/coef_mean``,
  ``adadpo/coef_max``, ``adadpo/clip_frac``, ``balance/grad_ratio``, all global-batch
  means, rewards beta-scaled) and the trainer's: ``lr`` (the rate the step applied),
  ``grad_norm`` (global L2 norm before clipping), ``pairs``, ``tokens`` (real) and
  ``padded_tokens`` of the global batch, ``tokens_per_s``, ``pairs_per_s``,
  ``packing_efficiency`` (real tokens / (packs x --seq-length)), ``step_time_s``,
  ``skipped_steps`` (consecutive non-finite steps so far), ``elapsed_s`` and ``eta_s``
  (``trainer/eta.py``; shown as ``elapsed H:MM:SS | eta H:MM:SS`` on the line). Evaluations are separate
  objects with the same ``step`` and ``eval/``-prefixed names. NaN/inf are written as
  the strings "nan"/"inf".
* TensorBoard scalars under the same names when ``tensorboard`` is installed.
* Weights & Biases (``--wandb-project``): the same names and values, through a sink
  from ``trainer/wandb_logging.py``.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, TextIO

from adadpo_megatron.io_errors import WriteFailed, describe_os_error
from adadpo_megatron.trainer.eta import format_duration
from adadpo_megatron.trainer.progress import truncate_metrics

__all__ = ["MetricsWriter", "format_log_line"]


_LINE_ORDER = ("loss", "lr", "grad_norm", "tokens_per_s", "pairs_per_s", "packing_efficiency",
               "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
               "logps/chosen", "logps/rejected", "adadpo/coef_mean", "adadpo/coef_max",
               "adadpo/clip_frac", "balance/grad_ratio", "balance/log_grad_ratio",
               "skipped_steps")


def _fmt(name: str, value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return f"{name} {value}"
    if name == "lr":
        return f"{name} {value:.3E}"
    if name in ("tokens_per_s", "pairs_per_s"):
        return f"{name} {value:.1f}"
    return f"{name} {value:.4f}"


def format_log_line(step: int, train_iters: int, metrics: dict[str, Any]) -> str:
    """One Megatron-style line: time, ``step N/M``, then the known metrics in a fixed order."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [f"[{stamp}] step {step}/{train_iters}"]
    for key in ("elapsed_s", "eta_s"):
        if isinstance(metrics.get(key), int | float):
            parts.append(f"{key[:-2]} {format_duration(metrics[key])}")
    prefix = "eval/" if any(k.startswith("eval/") for k in metrics) else ""
    for name in _LINE_ORDER:
        key = prefix + name
        if key in metrics:
            parts.append(_fmt(key, metrics[key]))
    return " | ".join(parts)


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; "nan"/"inf" strings keep the record parseable
    return v


class MetricsWriter:
    """Writes log lines, ``metrics.jsonl``, TensorBoard and W&B scalars on the logging rank.

    ``enabled`` is False on every other rank (then every method is a no-op). ``log_dir``
    and ``tensorboard_dir`` may be None; ``wandb`` is an open sink (``log(step, metrics)``,
    ``close()``; ``trainer.wandb_logging.WandbSink``) or None. Appends to an existing ``metrics.jsonl`` (a
    resumed run continues it) after dropping records past ``start_step`` (and a partial
    last line, with a note: :func:`~adadpo_megatron.trainer.progress.truncate_metrics`).
    """

    def __init__(self, *, enabled: bool, log_dir: str | None, tensorboard_dir: str | None,
                 start_step: int = 0, print_fn=print, wandb: Any = None) -> None:
        self.enabled = enabled
        self._print = print_fn
        self._jsonl: TextIO | None = None
        self._path: str | None = None
        self._tb = None
        self._wandb = wandb if enabled else None
        if not enabled:
            return
        if log_dir:
            path = os.path.join(log_dir, "metrics.jsonl")
            self._path = path
            try:
                os.makedirs(log_dir, exist_ok=True)
                truncate_metrics(path, start_step, note=self._print)
                self._jsonl = open(path, "a", encoding="utf-8")
            except OSError as e:
                raise WriteFailed(f"cannot write the metrics log ({describe_os_error(e, path)})"
                                  ) from None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # noqa: BLE001 - tensorboard is an optional extra
                self._print("note: tensorboard is not installed; --tensorboard-dir ignored "
                            "(pip install 'adadpo-megatron[tensorboard]')")
            else:
                self._tb = SummaryWriter(log_dir=tensorboard_dir, purge_step=start_step + 1)

    def log(self, step: int, train_iters: int, metrics: dict[str, Any]) -> None:
        """Print the log line and record ``metrics`` for ``step`` (counted from 1)."""
        if not self.enabled:
            return
        self._print(format_log_line(step, train_iters, metrics), flush=True)
        if self._jsonl is not None:
            record = {"step": step, **{k: _json_value(v) for k, v in metrics.items()}}
            try:
                self._jsonl.write(json.dumps(record) + "\n")
                self._jsonl.flush()
            except OSError as e:  # a full disk: one line, the partial record dropped on resume
                self._abandon()
                raise WriteFailed(f"cannot write the metrics log of step {step} "
                                  f"({describe_os_error(e, self._path)})") from None
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(step, metrics)

    def message(self, text: str) -> None:
        """Print a one-off message (skips, checkpoints, evaluation) on the logging rank."""
        if self.enabled:
            self._print(text, flush=True)

    def _abandon(self) -> None:
        """Close the log after a failed write without flushing again (which would fail)."""
        jsonl, self._jsonl = self._jsonl, None
        if jsonl is not None:
            try:
                jsonl.close()
            except OSError:
                pass

    def close(self) -> None:
        """Flush and close the files (WriteFailed when the last flush fails)."""
        if self._jsonl is not None:
            jsonl, self._jsonl = self._jsonl, None
            try:
                jsonl.close()
            except OSError as e:
                raise WriteFailed(f"cannot write the metrics log "
                                  f"({describe_os_error(e, self._path)})") from None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
