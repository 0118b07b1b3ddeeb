"""What a checkpoint holds besides the model weights: the optimizer's sharded state and the
RNG states, with the fix-ups megatron-core's distributed optimizer needs over torch's Adam.

Used by :mod:`adadpo_megatron.trainer.checkpointing` (save and resume).
"""

from __future__ import annotations

import inspect
import random
from typing import Any

import numpy as np
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject

__all__ = ["OPTIM_METADATA", "optimizer_sharded", "restore_adam_steps", "rng_sharded",
           "rng_state", "set_rng_state"]

# megatron-core's optimizer sharded_state_dict metadata. The sharding type matters only to
# the distributed optimizer: "dp_reshardable" is Megatron-LM's default (fully parallel save
# and load, no gathers; the DP size may change, TP/PP/VPP/CP may not, see
# checkpointing._check_optimizer_resumable). megatron-core 0.16's dist-checkpointing refuses
# the older "fully_sharded_model_space" (flattened ShardedTensors).
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable",
                  "chained_optim_avoid_prefix": True}


def optimizer_sharded(optimizer: Any, model_sd: dict[str, Any], is_loading: bool,
                      metadata: dict[str, Any] | None = None) -> Any:
    """The optimizer's sharded state, mapped onto ``model_sd`` = ``{"model0": ..., ...}``.

    The per-chunk dicts are handed over nested, as Megatron-LM's ``generate_state_dict``
    does: megatron-core finds each parameter by identity anywhere in the structure. They
    must not be merged into one dict: with virtual pipelining every chunk has the same
    local keys (``decoder.layers.0...``), so a merge keeps only the last chunk's tensors
    and the optimizer fails on the others' ("Param id N does not match any model sharded
    param").
    """
    _prime_adam_state(optimizer)
    params = inspect.signature(optimizer.sharded_state_dict).parameters
    # ChainedOptimizer (what get_megatron_optimizer returns) takes it through **kwargs.
    takes = "metadata" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {"metadata": dict(metadata or OPTIM_METADATA)} if takes else {}
    return optimizer.sharded_state_dict(model_sd, is_loading=is_loading, **kwargs)


def _prime_adam_state(optimizer: Any) -> None:
    """Give a distributed optimizer's torch Adam the state of step 0 where it has none yet.

    Without apex or Transformer Engine (the CPU, or a GPU without them) megatron-core's
    distributed optimizer wraps ``torch.optim.Adam``, which creates its state at its first
    step, and ``DistributedOptimizer.state_dict()`` (called by ``sharded_state_dict``)
    asserts that every state has a ``step``: resuming (a fresh optimizer) would fail. The
    state is what Adam's first step would create (step 0, zero moments); a load overwrites
    it, and a save before any step records exactly that.
    """
    for inner in _torch_adams_of_distributed_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                          exp_avg_sq=torch.zeros_like(p))


def _torch_adams_of_distributed_optimizers(optimizer: Any) -> list[torch.optim.Adam]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(sub, DistributedOptimizer)
            and isinstance(getattr(sub, "optimizer", None), torch.optim.Adam)]


def restore_adam_steps(optimizer: Any) -> None:
    """Each parameter's torch Adam ``step`` from the checkpoint, after a distributed load.

    Without apex/TE, megatron-core's ``DistributedOptimizer`` saves the Adam step count in
    its param groups (``group["step"]``), and its ``load_state_dict`` (a) gives every
    parameter's state one shared ``step`` tensor, which torch's Adam would then increment
    once per parameter per step, and (b) copies over it the per-bucket ``step`` of the
    state it was loading into (step 0 from :func:`_prime_adam_state`). Both would spoil the
    bias correction of every resumed step: each state gets its own tensor holding its
    group's loaded step.
    """
    for adam in _torch_adams_of_distributed_optimizers(optimizer):
        for group in adam.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                if "step" in adam.state[p]:
                    adam.state[p]["step"] = torch.tensor(float(group["step"]))


def rng_state() -> dict[str, Any]:
    """This rank's Python, numpy, torch (and CUDA) RNG states and megatron's tracker states."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded(state: dict[str, Any] | None) -> ShardedObject:
    """``state`` as this rank's entry of a per-rank ``ShardedObject`` (None when loading)."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)
