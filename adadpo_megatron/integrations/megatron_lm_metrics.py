"""The plugin's own metrics under Megatron-LM's ``pretrain()``.

Megatron-LM's console line prints a reported value only when its average is above 0
(``training_log``: ``if avg > 0.0``), so ``logps/*``, negative rewards and margins and a
zero ``adadpo/clip_frac`` never show there, and it would average ``adadpo/coef_max``
over micro-batches and DP ranks (the mean of per-micro-batch maxima). So the plugin
writes its metrics itself, with ``adadpo-train``'s names, format and values
(``trainer.metrics.MetricsWriter``): a log line, ``--log-dir/metrics.jsonl`` and
TensorBoard scalars under ``--tensorboard-dir/adadpo`` (a separate run beside
Megatron-LM's own scalars).

How: :class:`StepMetrics` sees every ``loss_func`` report on the last pipeline stage.
After the last micro-batch of a training step (``M`` reports) or of an evaluation
(``--eval-iters * M``), it reduces them once over DP x CP with
``forward_step.reduce_metrics`` (a collective among the last-stage ranks, which all
reach that micro-batch together) and writes the record for step
``args.curr_iteration + 1``. It then rewrites, in place, the ``max`` metrics of the
step's reports (still held by Megatron-LM's schedule, reduced only after the last
micro-batch): ``[global max, 1]`` in the last report, ``[0, 0]`` in the others, so
Megatron-LM's sum-over-sum reduction shows the true maximum on its own line too.

Training records also carry ``elapsed_s`` and ``eta_s`` (``trainer/eta.py``): the step
time is the wall time between two training records (the first: since the first forward
step), so evaluations and checkpoints between steps count, and the median discounts them;
both are the maximum over the last stage's ranks (one all-reduce), so every rank agrees.
With ``--wandb-project``, the records also go to Megatron-LM's own W&B run (``wandb``:
``megatron_lm_wandb.MegatronWandbSink`` on the rank that holds it, Megatron-LM's last).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["StepMetrics"]


class StepMetrics:
    """Collects one step's (or one evaluation's) reports and writes the reduced record.

    Args:
        writer: a ``MetricsWriter`` (enabled on the logging rank only).
        step_fn: returns the number of the step being run (from 1).
        train_iters: ``--train-iters`` (for the log line).
        train_period: ``M``, reports per training step on this rank.
        eval_period: reports per evaluation on this rank (``--eval-iters * M``).
        log_interval: write training records every this many steps (``--log-interval``)
            and at the last step, as adadpo-train does; evaluations are always written.
        wandb: a sink (``log(step, metrics)``) on the rank that logs to W&B, else None.
    """

    def __init__(self, *, writer: Any, step_fn: Callable[[], int], train_iters: int,
                 train_period: int, eval_period: int, log_interval: int = 1,
                 wandb: Any = None) -> None:
        from adadpo_megatron.trainer.eta import StepClock

        self.writer = writer
        self.wandb = wandb
        self.clock = StepClock(train_iters)
        self.log_interval = max(1, int(log_interval))
        self.step_fn = step_fn
        self.train_iters = train_iters
        self.periods = {True: train_period, False: eval_period}
        self.pending: dict[bool, list[dict[str, torch.Tensor]]] = {True: [], False: []}
        self.last: dict[bool, dict[str, float]] = {}
        """The last written record of each kind (True: training, False: evaluation)."""

    def add(self, report: dict[str, torch.Tensor], training: bool) -> None:
        """Record one micro-batch's report; after the period's last one, reduce and write."""
        reports = self.pending[training]
        reports.append(report)
        if len(reports) < self.periods[training]:
            return
        self.pending[training] = []
        self._flush(reports, training)

    def _flush(self, reports: list[dict[str, torch.Tensor]], training: bool) -> None:
        from adadpo_megatron.losses import metric_reduction
        from adadpo_megatron.step.forward_step import reduce_metrics

        reduced = reduce_metrics(reports)
        for name, value in reduced.items():
            if metric_reduction(name) == "max":
                for r in reports:
                    r[name].zero_()
                reports[-1][name][0] = value
                reports[-1][name][1] = 1.0
        metrics = {k: float(v) for k, v in reduced.items()}
        step = self.step_fn()
        if training:  # as adadpo-train: pairs of the step's global batch, elapsed, ETA
            metrics["pairs"] = _pairs(reports)
            self.clock.lap()
            metrics.update(_agreed(self.clock.metrics(step), reports[-1]["loss"].device))
        else:
            metrics = {f"eval/{k}": v for k, v in metrics.items()}
        self.last[training] = metrics
        if not training or step % self.log_interval == 0 or step >= self.train_iters:
            self.writer.log(step, self.train_iters, metrics)
            if self.wandb is not None:
                self.wandb.log(step, metrics)


def _pairs(reports: list[dict[str, torch.Tensor]]) -> float:
    """Pairs in the global batch: the all-reduced count of ``loss`` (one per pair)."""
    from megatron.core import parallel_state as ps

    n = torch.stack([r["loss"][1] for r in reports]).sum().reshape(1).double()
    torch.distributed.all_reduce(n, group=ps.get_data_parallel_group(with_context_parallel=False))
    return float(n[0])


def _agreed(timing: dict[str, float], device: torch.device) -> dict[str, float]:
    """The last stage's maximum of each timing value, so every rank of the stage (the
    metrics.jsonl rank and Megatron-LM's W&B rank among them) writes the same numbers."""
    from megatron.core import parallel_state as ps

    keys = sorted(timing)
    t = torch.tensor([timing[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX,
                                 group=ps.get_tensor_and_data_parallel_group(
                                     with_context_parallel=True))
    return dict(zip(keys, t.tolist(), strict=True))
