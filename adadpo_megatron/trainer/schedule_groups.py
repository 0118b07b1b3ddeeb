"""Micro-batch counts megatron-core's schedules accept, and filler micro-batches.

The interleaved (virtual pipeline) schedule runs the micro-batches in groups of
``N = config.microbatch_group_size_per_vp_stage`` (default: the pipeline size PP) and
refuses a call whose count ``M`` has ``M < N``, or ``0 < M % N < PP``. The other
schedules take any ``M >= 1``.

* Training steps always run ``--global-batch-size / (--micro-batch-size x DP)`` micro-
  batches: :func:`step_count_problem` checks that count once, at start.
* Forward-only passes (evaluation, the online reference, precomputing reference
  log-probs) can have any count: :func:`pad_for_schedule` appends filler micro-batches
  (copies of the last real one) up to the next accepted count. The caller drops the
  fillers' results: the schedule returns one result per micro-batch in order on the last
  pipeline stage, so the first ``len(real)`` results are the real micro-batches'. A
  filler never reaches a metric, a count or a side-car.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["accepted_count", "group_size", "pad_for_schedule", "step_count_problem"]


def group_size(model: list[torch.nn.Module]) -> tuple[int, int] | None:
    """``(N, PP)`` of the interleaved schedule for these chunks; None without virtual stages."""
    if len(model) <= 1:
        return None
    from megatron.core.utils import get_model_config

    config = get_model_config(model[0])
    pp = int(config.pipeline_model_parallel_size)
    return int(getattr(config, "microbatch_group_size_per_vp_stage", None) or pp), pp


def accepted_count(m: int, group: int, pp: int) -> int:
    """The smallest micro-batch count ``>= m`` the interleaved schedule accepts.

    ``group``: micro-batches per group (N); ``pp``: the pipeline size. E.g. N = PP = 2:
    1 -> 2, 3 -> 4, 4 -> 4; N = 4, PP = 2: 5 -> 6, 6 -> 6.
    """
    if m < 1:
        raise ValueError(f"a schedule call needs at least one micro-batch, got {m}")
    if m < group:
        return group
    rest = m % group
    return m if rest == 0 or rest >= pp else m + pp - rest


def pad_for_schedule(microbatches: list[dict[str, Any]],
                     model: list[torch.nn.Module]) -> list[dict[str, Any]]:
    """``microbatches`` followed by fillers (the last micro-batch again) up to an accepted count.

    For forward-only calls only: a filler computes like a real micro-batch, so its results
    must be dropped (keep the first ``len(microbatches)``); in a training step it would add
    gradients. Returns the list unchanged when no filler is needed.
    """
    groups = group_size(model)
    if groups is None or not microbatches:
        return microbatches
    need = accepted_count(len(microbatches), *groups)
    return microbatches + [microbatches[-1]] * (need - len(microbatches))


def step_count_problem(num_microbatches: int, pp: int, vpp: int | None) -> str | None:
    """Why a training step of ``num_microbatches`` cannot run interleaved, or None if it can.

    Training cannot pad (a filler would add gradients), so under virtual pipelining the
    step's count must itself be accepted (N = PP, megatron-core's default group size).
    """
    if not vpp or accepted_count(num_microbatches, pp, pp) == num_microbatches:
        return None
    return (f"--global-batch-size gives {num_microbatches} micro-batches per step "
            f"(--global-batch-size / (--micro-batch-size x data-parallel size)); virtual "
            f"pipelining (--num-layers-per-virtual-pipeline-stage) runs them in groups of "
            f"--pipeline-model-parallel-size {pp} and needs a multiple of {pp}: change "
            "--global-batch-size or --micro-batch-size")
