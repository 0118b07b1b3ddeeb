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

``moe/load_imbalance``: per MoE layer, the step's token-to-expert assignments counted by a
forward hook on each router (:func:`watch_routers`; training passes only), summed over the
router's TP x CP group and DP, then ``max over experts / mean over experts`` (1.0 = every
expert got the same number of tokens; padding tokens count too), averaged over the layers
(SUM over the pipeline group). The per-expert counts stay on the routers
(``_adadpo_expert_load``) until the next step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["moe_step_metrics", "watch_routers"]

_TRACKED = {"load_balancing_loss": "aux_loss", "seq_load_balancing_loss": "seq_aux_loss"}


def _device() -> torch.device:
    """Where the reductions run: the current GPU under NCCL (it takes no CPU tensors)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _count_assignments(router, args, output) -> None:
    if router.training and torch.is_grad_enabled():
        routing_map = output[1]  # [tokens, E] bool: which experts each token goes to
        router._adadpo_expert_load += routing_map.sum(0).detach().to(
            router._adadpo_expert_load.device, torch.float64)  # no host sync on a GPU


def watch_routers(chunks) -> int:
    """Count each router's token-to-expert assignments (a forward hook); returns the number
    of routers found in ``chunks`` (this rank's policy model chunks)."""
    from megatron.core.transformer.moe.router import TopKRouter

    found = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter) and not hasattr(module, "_adadpo_expert_load"):
                module._adadpo_expert_load = torch.zeros(
                    module.config.num_moe_experts, dtype=torch.float64, device=_device())
                module.register_forward_hook(_count_assignments)
                found += 1
    return found


def _load_imbalance(chunks) -> float:
    from megatron.core import parallel_state as ps

    # [sum of max/mean over layers, layers]
    ratios = torch.zeros(2, dtype=torch.float64, device=_device())
    for chunk in chunks:
        for module in chunk.modules():
            load = getattr(module, "_adadpo_expert_load", None)
            if load is None:
                continue
            total = load.clone()
            dist.all_reduce(total, group=module.tp_cp_group)
            dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=False))
            counted = (total.sum() > 0).to(total.dtype)  # no host sync: no branch
            ratios[0] += counted * total.max() / total.mean().clamp(min=1e-30)
            ratios[1] += counted
            load.zero_()
    dist.all_reduce(ratios, group=ps.get_pipeline_model_parallel_group())
    return float(ratios[0] / ratios[1].clamp(min=1))


def moe_step_metrics(coeff: float, num_microbatches: int, chunks=()) -> dict[str, float]:
    """``moe/aux_loss`` (0.0 without an aux loss) and, when :func:`watch_routers` watches
    ``chunks``' routers, ``moe/load_imbalance``, for the step just run.

    Call on every rank after the policy's forward-backward (it runs collectives).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    total = torch.zeros((), dtype=torch.float64, device=_device())
    for name in sorted(_TRACKED):  # same order on every rank
        entry = tracker.get(name)
        if entry is None:
            continue
        values = entry["values"].detach().to(_device(), torch.float64, copy=True)
        dist.all_reduce(values, group=ps.get_pipeline_model_parallel_group())
        if entry.get("reduce_group") is not None:
            dist.all_reduce(values, group=entry["reduce_group"])
        dist.all_reduce(values, group=ps.get_data_parallel_group(with_context_parallel=False))
        total += values.sum()
        entry["values"].zero_()
    dp = ps.get_data_parallel_world_size(with_context_parallel=False)
    out = {"moe/aux_loss": float(total) * coeff / (dp * num_microbatches)}
    if chunks:
        out["moe/load_imbalance"] = _load_imbalance(chunks)
    return out
