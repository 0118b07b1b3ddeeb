"""Optimizer, DDP wrapping, the learning-rate schedule, and the step that skips NaN/inf.

megatron-core does the heavy lifting: ``DistributedDataParallel`` (grad buffers, the DP
all-reduce or reduce-scatter), ``get_megatron_optimizer`` (Adam, mixed precision, the
distributed optimizer, on the CPU too) and ``OptimizerParamScheduler`` (warm-up, cosine decay).

The optimizer step is split into megatron-core's own two halves, ``prepare_grads`` and
``step_with_ready_grads``, with our check in between: the global grad norm is computed
once (fp32), NaN/inf in it or in the loss skips the step on every rank, and otherwise
the gradients are clipped to ``--clip-grad``. Doing the norm and the clip here (instead of
``optimizer.step()``) also makes clipping work on the CPU, where megatron-core's
``clip_grad_by_total_norm_fp32`` asserts CUDA tensors.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from adadpo_megatron.trainer.config import TrainConfig

__all__ = ["StepResult", "build_optimizer", "build_scheduler", "ddp_config", "optimizer_step"]


def ddp_config(cfg: TrainConfig) -> DistributedDataParallelConfig:
    """megatron-core DDP settings for this run (pass to ``model.build_model_chunks``).

    Gradients are reduced in fp32 (``grad_reduce_in_fp32``) so that bf16 runs average
    exactly; NaN checks are ours (``optimizer_step``), not DDP's, which would raise.
    """
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )


def build_optimizer(cfg: TrainConfig, ddp_chunks: list[DistributedDataParallel]) -> Any:
    """Adam (decoupled weight decay) over the DDP-wrapped chunks via ``get_megatron_optimizer``.

    Returns a megatron-core ``MegatronOptimizer``. ``clip_grad`` is kept in its config
    for the record, but clipping happens in :func:`optimizer_step`.
    """
    o = cfg.optim
    kwargs: dict[str, Any] = dict(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=cfg.training.bf16,
        params_dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    fields = set(inspect.signature(OptimizerConfig).parameters)
    return get_megatron_optimizer(
        OptimizerConfig(**{k: v for k, v in kwargs.items() if k in fields}), ddp_chunks)


def build_scheduler(cfg: TrainConfig, optimizer: Any) -> OptimizerParamScheduler:
    """Linear warm-up from 0 over ``--lr-warmup-fraction`` of the steps, then the decay style.

    Counted in optimizer steps (call ``scheduler.step(1)`` after each successful step).
    """
    iters = cfg.training.train_iters
    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=int(o.lr_warmup_fraction * iters), lr_decay_steps=iters,
        lr_decay_style=o.lr_decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=iters, wd_incr_style="constant",
        # The schedule is a function of the flags: a resumed run must not keep stale values.
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """What one optimizer step did."""

    stepped: bool
    """False when the step was skipped for a non-finite loss or gradient."""
    grad_norm: float
    """Global L2 norm of the gradients before clipping (nan/inf when skipped for it)."""
    loss_finite: bool
    """Whether the loss was finite on every rank."""


def _sub_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _grad_norm(optimizer: Any) -> torch.Tensor:
    """Global fp32 L2 norm of the main grads (a 0-dim tensor, not yet synced to the host).

    Each sub-optimizer lists its grads without TP duplicates or shared copies; the sum
    of squares is all-reduced (SUM) over its grad-stats group: the model-parallel group,
    or the whole world under the distributed optimizer (each rank holds a shard).
    """
    total = None
    for sub in _sub_optimizers(optimizer):
        grads = sub.get_main_grads_for_grad_norm()
        sq = torch.zeros((), dtype=torch.float32, device=_device_of(sub))
        for g in grads:
            sq = sq + g.detach().float().pow(2).sum()
        torch.distributed.all_reduce(sq, group=sub.get_grad_stats_parallel_group())
        total = sq if total is None else total + sq
    return torch.sqrt(total) if total is not None else torch.zeros(())


def _device_of(sub: Any) -> torch.device:
    for p in sub.get_parameters():
        return p.device
    return torch.device("cpu")


def _clip(optimizer: Any, max_norm: float, norm: float) -> None:
    coeff = max_norm / (norm + 1.0e-6)
    if coeff >= 1.0:
        return
    for sub in _sub_optimizers(optimizer):
        decoupled = getattr(sub.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False)
        grads = [getattr(p, "decoupled_grad", None) if decoupled else p.grad
                 for p in sub.get_parameters()]
        grads = [g for g in grads if g is not None]
        if grads:
            torch._foreach_mul_(grads, coeff)


def optimizer_step(optimizer: Any, scheduler: OptimizerParamScheduler, clip_grad: float,
                   loss_finite: bool) -> StepResult:
    """Check, clip and apply the gradients already reduced by DDP; skip on NaN/inf.

    ``loss_finite`` is this rank's verdict on the loss (ranks without the loss pass True);
    it is combined over the whole world (MIN all-reduce of one flag) so every rank takes
    the same decision. A skipped step leaves parameters, optimizer state and the
    schedule untouched (the next step zeroes the gradients). One host sync per step.
    """
    found_inf = bool(optimizer.prepare_grads())
    norm_t = _grad_norm(optimizer)
    flag = torch.tensor([1.0 if loss_finite else 0.0], device=norm_t.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    norm = float(norm_t)
    all_loss_finite = bool(flag.item() > 0.5)
    if found_inf or not math.isfinite(norm) or not all_loss_finite:
        return StepResult(stepped=False, grad_norm=norm, loss_finite=all_loss_finite)
    if clip_grad > 0:
        _clip(optimizer, clip_grad, norm)
    stepped = bool(optimizer.step_with_ready_grads())
    if stepped:
        scheduler.step(increment=1)
    return StepResult(stepped=stepped, grad_norm=norm, loss_finite=True)
