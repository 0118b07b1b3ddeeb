"""``moe/aux_loss``: the router load-balancing loss of one step, reduced for logging.

megatron-core's routers record ``aux_loss / coeff`` per MoE layer and micro-batch in a
process-wide tracker (``moe_utils.get_moe_layer_wise_logging_tracker``; only in training
mode with grad enabled, so evaluation and the frozen reference add nothing). Once per
step, on every rank, :func:`moe_step_metrics` turns it into the number that was added to
the objective: ``coeff * sum over MoE layers of the mean over the step's micro-batches
(all DP ranks) of the micro-batch's loss``. Collectives (all SUM, forward only, no
autograd): over the pipeline group (each stage tracks its own layers), over the router's
TP x CP group (each rank holds its share of the loss, see ``switch_load_balancing_loss_func``)
and over the DP group; then divided by DP and the micro-batch count. gloo has no AVG, hence
sums. The tracker is zeroed afterwards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["moe_step_metrics"]

_TRACKED = {"load_balancing_loss": "aux_loss", "seq_load_balancing_loss": "seq_aux_loss"}


def moe_step_metrics(coeff: float, num_microbatches: int) -> dict[str, float]:
    """``{"moe/aux_loss": float}`` for the step just run (0.0 without an aux loss).

    Call on every rank after the policy's forward-backward (it runs collectives).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    total = torch.zeros((), dtype=torch.float64)
    for name in sorted(_TRACKED):  # same order on every rank
        entry = tracker.get(name)
        if entry is None:
            continue
        values = entry["values"].detach().to(torch.float64).cpu().clone()
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        if entry.get("reduce_group") is not None:
            dist.all_reduce(values, group=entry["reduce_group"])
        dist.all_reduce(values, group=ps.get_data_parallel_group(with_context_parallel=False))
        total += values.sum()
        entry["values"].zero_()
    dp = ps.get_data_parallel_world_size(with_context_parallel=False)
    return {"moe/aux_loss": float(total) * coeff / (dp * num_microbatches)}
