"""The training loop: set-up, one optimizer step, evaluation, checkpoints.

One step, on every rank (megatron-core's schedules run the micro-batches)::

    this DP rank's packs of the global batch (DataPosition) -> micro-batches (collate_packs)
    -> [online reference: forward-only pass over the same micro-batches -> ref_logps]
    -> zero grads -> forward_backward_func(policy forward step) -> finalize_model_grads
       (DP all-reduce inside) -> reduce metrics over DP x CP -> optimizer_step
       (global grad norm, NaN/inf skip decision, clip, Adam, LR schedule)

Steps are numbered from 1 (the step that has just been taken), as in Megatron-LM.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from adadpo_megatron.trainer.config import TrainConfig

__all__ = ["Run", "collate_packs", "run_step", "evaluate", "train"]


class TrainingStopped(RuntimeError):
    """Training gave up (too many consecutive non-finite steps)."""


def collate_packs(packs: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate packs (THD dicts of ``PackedPairDataset``) into one THD micro-batch.

    ``tokens/position_ids/labels/loss_mask`` are concatenated ([sum T]); ``cu_seqlens``
    is rebuilt (int32 [sum S + 1]); ``pair_index/is_chosen`` (and ``ref_logps`` when every
    pack has it) concatenated; ``max_seqlen`` the max. A single pack is returned as is.
    """
    if len(packs) == 1:
        return packs[0]
    out: dict[str, Any] = {k: torch.cat([p[k] for p in packs])
                           for k in ("tokens", "position_ids", "labels", "loss_mask",
                                     "pair_index", "is_chosen")}
    bounds, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for p in packs:
        bounds.append(p["cu_seqlens"][1:] + offset)
        offset += int(p["cu_seqlens"][-1])
    out["cu_seqlens"] = torch.cat(bounds).to(torch.int32)
    out["max_seqlen"] = max(int(p["max_seqlen"]) for p in packs)
    if "shared_prefix_len" in packs[0]:  # one dataset, one layout: all packs have it
        out["shared_prefix_len"] = torch.cat([p["shared_prefix_len"] for p in packs])
    if all("ref_logps" in p for p in packs):
        out["ref_logps"] = torch.cat([p["ref_logps"] for p in packs])
    return out


@dataclasses.dataclass(kw_only=True)
class Run:
    """Everything the loop needs, built by ``adadpo_megatron.train.build_run``."""

    cfg: TrainConfig
    model: list[torch.nn.Module]
    """Policy chunks (megatron-core DDP-wrapped), one per virtual pipeline stage."""
    optimizer: Any
    scheduler: Any
    train_data: Any
    """PackedPairDataset of --data-path."""
    position: Any
    """The resumable DP-sharded position in the training data (see ``data/sampler.py``)."""
    eval_data: Any | None
    forward_step: Callable
    step_context: Any
    """forward_step.StepContext, updated before each policy pass."""
    reference: list[torch.nn.Module] | None = None
    reference_step: Callable | None = None
    precomputed: Any | None = None
    """reference.PrecomputedReference of the training data, when --ref-logprobs."""
    eval_precomputed: Any | None = None
    """The eval split's side-car (EVAL_DIR/ref_logprobs.npz), when --ref-logprobs."""
    writer: Any = None
    """metrics.MetricsWriter (enabled on the logging rank only)."""
    iteration: int = 0
    skipped_in_a_row: int = 0
    save_reference: bool = False
    """Save the reference weights in checkpoints (online reference from initial weights)."""
    reference_source: dict[str, Any] | None = None
    """The --ref-load checkpoint of an online reference, recorded in each checkpoint."""
    on_step: Callable[[int, dict[str, Any]], None] | None = None
    """Optional callback(step, metrics) on every rank (tests use it)."""
    exits: Any = None
    """exits.ExitPolicy: --exit-interval, --exit-duration-in-mins, --exit-signal-handler."""
    lora_base: dict[str, Any] | None = None
    """LoRA runs: where the frozen base came from (trainer/lora_run.base_record); the
    checkpoints then hold the adapters alone, and with no --ref-* flag the reference is
    the policy with its adapters off."""


def _iterators(run_model: list[torch.nn.Module], microbatches: list[dict[str, Any]]) -> Any:
    # With virtual pipelining each chunk pulls from its own iterator, all over the same list.
    if len(run_model) == 1:
        return iter(microbatches)
    return [iter(microbatches) for _ in run_model]


def _schedule(model: list[torch.nn.Module], step_fn: Callable, microbatches: list[dict[str, Any]],
              *, forward_only: bool, collect_non_loss_data: bool = False) -> list[Any]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from adadpo_megatron.step.batch import schedule_shape
    from adadpo_megatron.trainer.schedule_groups import pad_for_schedule

    real = len(microbatches)
    if forward_only:  # any count: fillers up to one the schedule accepts, results dropped
        microbatches = pad_for_schedule(microbatches, model)
    seq_length, mbs = schedule_shape(microbatches[0])
    out = get_forward_backward_func()(
        forward_step_func=step_fn,
        data_iterator=_iterators(model, microbatches),
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    )
    return out[:real]  # last stage: one result per micro-batch, in order; [] elsewhere


def _with_reference(run: Run, microbatches: list[dict[str, Any]],
                    precomputed: Any | None) -> list[dict[str, Any]]:
    if precomputed is not None:
        return [precomputed.attach(mb) for mb in microbatches]
    if run.cfg.reference.mode == "base":
        from adadpo_megatron.step.reference import base_reference_logps

        return base_reference_logps(
            run.model, lambda mbs: _schedule(run.model, run.reference_step, mbs,
                                             forward_only=True, collect_non_loss_data=True),
            microbatches)
    if run.reference is None:
        return microbatches
    from adadpo_megatron.step.reference import reference_logps

    return reference_logps(
        lambda mbs: _schedule(run.reference, run.reference_step, mbs, forward_only=True,
                              collect_non_loss_data=True),
        microbatches)


def _microbatches(run: Run, pack_ids: list[int]) -> list[dict[str, Any]]:
    mbs = run.cfg.training.micro_batch_size
    return [collate_packs([run.train_data[i] for i in pack_ids[j:j + mbs]])
            for j in range(0, len(pack_ids), mbs)]


def _dp_group() -> Any:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=False)


def _device(run: Run) -> torch.device:
    return next(run.model[0].parameters()).device


def _counts(microbatches: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
    """[pairs, real tokens, padded tokens] of this rank's micro-batches (from CPU data).

    Real tokens: the sequences' own tokens (``step.batch.real_token_count``: from the loss
    mask and the segment bounds, never from token ids, as id 0 is a real token in many
    vocabularies); padded: every token the model runs, padding included.
    """
    from adadpo_megatron.step.batch import real_token_count

    pairs = sum(int(mb["pair_index"].numel()) // 2 for mb in microbatches)
    real = sum(real_token_count(mb) for mb in microbatches)
    padded = sum(int(mb["tokens"].numel()) for mb in microbatches)
    return torch.tensor([pairs, real, padded], dtype=torch.float64, device=device)


def run_step(run: Run) -> tuple[dict[str, float], Any]:
    """One optimizer step on this rank; returns (metrics, StepResult).

    Metrics: global-batch means under LOSSES.md's names (last pipeline stage only), plus on
    every rank ``pairs``, ``tokens`` (real), ``padded_tokens`` of the global batch and the
    ``lr`` the step applied.
    """
    from adadpo_megatron.step.forward_step import reduce_metrics
    from adadpo_megatron.trainer.optim import optimizer_step

    cfg = run.cfg
    pack_ids = run.position.next_step()
    microbatches = _with_reference(run, _microbatches(run, pack_ids), run.precomputed)
    counts = _set_step_context(run, microbatches)

    for chunk in run.model:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    reports = _schedule(run.model, run.forward_step, microbatches, forward_only=False)
    metrics_t = reduce_metrics(reports)
    loss_finite = bool(torch.isfinite(metrics_t["loss"])) if metrics_t else True
    lr = _lr(run)  # the rate this step applies (the scheduler moves on after it)
    result = optimizer_step(run.optimizer, run.scheduler, cfg.optim.clip_grad, loss_finite)
    metrics = {k: float(v) for k, v in metrics_t.items()}
    pairs, real, padded = counts.tolist()
    metrics.update(pairs=pairs, tokens=real, padded_tokens=padded, lr=lr)
    if cfg.arch is not None and cfg.arch.num_experts:  # router load-balancing loss
        from adadpo_megatron.trainer.moe_metrics import moe_step_metrics

        metrics.update(moe_step_metrics(cfg.arch.moe_aux_loss_coeff, len(microbatches),
                                        run.model))
    return metrics, result



def _set_step_context(run: Run, microbatches: list[dict]) -> torch.Tensor:
    """Counts this step's global batch and sets the forward step's normalisation context.

    Returns float64 ``[3]``: pairs (G, the loss normaliser), real and padded tokens, summed
    over DP (the only collective here: one all-reduce SUM on the DP group).
    """
    counts = _counts(microbatches, _device(run))
    torch.distributed.all_reduce(counts, group=_dp_group())
    run.step_context.num_microbatches = len(microbatches)
    run.step_context.global_num_pairs = counts[0].to(torch.float32)
    return counts

def _lr(run: Run) -> float:
    groups = run.optimizer.param_groups
    return float(groups[0]["lr"]) if groups else 0.0


def _is_logging_rank() -> bool:
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def evaluate(run: Run) -> dict[str, float]:
    """Held-out metrics (``eval/`` names) over --eval-iters global batches (or all packs).

    This DP rank takes packs ``rank, rank + DP, ...`` in order; forward-only, in one
    schedule call. Any count runs under every schedule: under virtual pipelining the call
    is padded with filler micro-batches whose results are dropped (``_schedule``), so the
    metrics are exactly the means over the real pairs.
    """
    from megatron.core import parallel_state as ps

    from adadpo_megatron.step.forward_step import reduce_metrics

    cfg, data = run.cfg, run.eval_data
    limit = len(data) if cfg.io.eval_iters is None else min(
        len(data), cfg.io.eval_iters * cfg.training.global_batch_size)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ids = list(range(rank, limit, dp))
    mbs = cfg.training.micro_batch_size
    microbatches = [collate_packs([data[i] for i in ids[j:j + mbs]])
                    for j in range(0, len(ids), mbs)]
    microbatches = _with_reference(run, microbatches, run.eval_precomputed)
    _set_step_context(run, microbatches)
    for chunk in run.model:
        chunk.eval()
    try:
        with torch.no_grad():
            reports = _schedule(run.model, run.forward_step, microbatches, forward_only=True)
    finally:
        for chunk in run.model:
            chunk.train()
    return {f"eval/{k}": float(v) for k, v in reduce_metrics(reports).items()}


def _save(run: Run) -> None:
    from adadpo_megatron.trainer.checkpointing import save_checkpoint
    from adadpo_megatron.trainer.identity import tokenizer_record

    cfg = run.cfg
    if run.lora_base is not None:
        from adadpo_megatron.trainer.lora_ckpt import save_lora_checkpoint

        run.writer.message(f"saved adapter checkpoint {save_lora_checkpoint(run, run.lora_base)}")
        return
    path = save_checkpoint(
        cfg.io.save, run.iteration, model=run.model, optimizer=run.optimizer,
        scheduler=run.scheduler, data_state=run.position.state_dict(),
        fingerprint=cfg.fingerprint(), config=cfg.to_dict(),
        data_fingerprint=run.train_data.fingerprint, skipped_in_a_row=run.skipped_in_a_row,
        reference=run.reference if run.save_reference else None,
        tokenizer=tokenizer_record(run.train_data), reference_source=run.reference_source)
    run.writer.message(f"saved checkpoint {path}")


def _log_metrics(run: Run, metrics: dict[str, float], result: Any, seconds: float) -> dict:
    out = dict(metrics)
    out.update(grad_norm=result.grad_norm, skipped_steps=run.skipped_in_a_row,
               step_time_s=seconds)
    if seconds > 0:
        out["tokens_per_s"] = metrics["tokens"] / seconds
        out["pairs_per_s"] = metrics["pairs"] / seconds
    # Fill of the packs' capacity, as adadpo-pack reports it: real / (packs * --seq-length).
    t = run.cfg.training
    out["packing_efficiency"] = metrics["tokens"] / (t.global_batch_size * run.cfg.model.seq_length)
    return out


def train(run: Run) -> None:
    """Run steps ``run.iteration + 1 .. --train-iters`` with logging, eval and checkpoints.

    Raises ``TrainingStopped`` after --max-skipped-steps consecutive non-finite steps.
    """
    from adadpo_megatron.trainer.eta import StepClock

    cfg = run.cfg
    clock = StepClock(cfg.training.train_iters)  # elapsed_s, eta_s: median step time
    for chunk in run.model:
        chunk.train()
    while run.iteration < cfg.training.train_iters:
        start = time.perf_counter()
        metrics, result = run_step(run)
        seconds = time.perf_counter() - start
        run.iteration += 1
        step = run.iteration
        if result.stepped:
            run.skipped_in_a_row = 0
        else:
            run.skipped_in_a_row += 1
            what = "loss" if not result.loss_finite else f"grad norm ({result.grad_norm})"
            run.writer.message(f"step {step}: non-finite {what}; skipped the update "
                               f"({run.skipped_in_a_row} in a row, limit "
                               f"{cfg.training.max_skipped_steps})")
        clock.add(seconds)
        logged = {**_log_metrics(run, metrics, result, seconds), **clock.metrics(step)}
        if run.on_step is not None:
            run.on_step(step, logged)
        last = step == cfg.training.train_iters
        stop = run.skipped_in_a_row >= cfg.training.max_skipped_steps
        if step % cfg.io.log_interval == 0 or last or stop:
            run.writer.log(step, cfg.training.train_iters, logged)
        if stop:
            raise TrainingStopped(
                f"stopping at step {step}: {run.skipped_in_a_row} consecutive steps had a "
                "non-finite loss or gradient (--max-skipped-steps "
                f"{cfg.training.max_skipped_steps}); lower --lr or check the data")
        if run.eval_data is not None and (
                (cfg.io.eval_interval and step % cfg.io.eval_interval == 0) or last):
            run.writer.log(step, cfg.training.train_iters, evaluate(run))
        saved = bool(cfg.io.save and ((cfg.io.save_interval and step % cfg.io.save_interval == 0)
                                      or last))
        if saved:
            _save(run)
        reason = run.exits.reason(step) if run.exits is not None and not last else None
        if reason:  # Megatron-LM's exits: the step is finished; save and return (exit 0)
            if cfg.io.save and not saved:
                _save(run)
            run.writer.message(f"exiting after step {step}: {reason}")
            return
