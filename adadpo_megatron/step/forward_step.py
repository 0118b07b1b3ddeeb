"""``forward_step`` / ``loss_func`` for megatron-core's ``get_forward_backward_func()``.

Per micro-batch: :func:`~adadpo_megatron.step.batch.prepare_model_inputs` ->
``GPTModel`` (``labels=None``) -> last pipeline stage: per-token log-probs (TP
collectives) -> ``segment_logprob_sums`` (CP all-reduce) -> pair segments ``2i`` (chosen) /
``2i+1`` (rejected) -> ``compute_preference_loss``. Per-token log-probs, by
``logprob_impl`` (``--logprob-impl``, see ``step/output_layer.py``): ``"fused"`` (default),
the model hands over hidden states ``[B, S, H]`` and its output weight and
``fused_vocab_parallel_logprobs`` never forms the logits; ``"chunked"``, the model returns
logits ``[B, S, V/TP]`` and ``vocab_parallel_logprobs`` reduces them.

Normalisation (DESIGN.md: the loss is the mean over all G pairs of the global batch).
Notation: ``n_j`` pairs in micro-batch j of this rank, ``l_p`` the loss of pair p,
``M`` micro-batches on this rank, DP data-parallel and CP context-parallel size.

*Default mode* (``config.calculate_per_token_loss`` False). ``loss_func`` returns
``(sum_p l_p * DP*CP*M/G, 1, report)``. megatron-core's schedule divides the first item
by ``clamp(num_tokens=1, min=1)`` and by ``M`` before backward; megatron-core DDP then
sums gradients over the DP x CP group after scaling them by ``1/(DP*CP)``. The CP
all-reduce of the segment sums has an identity backward, so each CP rank holds only the
part of the gradient that flows through its own tokens, and the CP sum completes it. Net
gradient: ``sum over DP ranks, micro-batches, pairs of grad(l_p) * (DP*CP*M/G)/M/(DP*CP)
= grad(sum_p l_p) / G``. Worked example: DP=2, CP=1, G=10 pairs, rank 0 has micro-batches
of 3 and 2 pairs (M=2), rank 1 one of 5 pairs (M=1). Rank 0 returns ``sum*2*2/10`` per
micro-batch, the schedule divides by 2: ``sum/5``; rank 1 returns ``sum*2*1/10``, divided
by 1: ``sum/5``. DDP: ``(grad(sum_0)/5 + grad(sum_1)/5) / 2 = grad(sum_all)/10``.

*Per-token mode* (``config.calculate_per_token_loss`` True; here a "token" is a pair).
``loss_func`` returns ``(CP * sum_p l_p, n_j, report)``; the schedule does not divide,
``finalize_model_grads`` divides all gradients by the total ``num_tokens`` all-reduced
over DP x CP (``= CP*G``) and DDP sums without scaling: ``grad(CP*sum_all)/(CP*G)``. No
``G`` is needed up front in this mode.

Both modes need ``config.finalize_model_grads_func = finalize_model_grads`` and DDP-wrapped
model chunks (``build_model_chunks(..., wrap_ddp=True)``).

Reporting: the third item is ``{name: tensor([sum over the micro-batch's pairs, pairs])}``
(detached fp32) for ``loss`` and every metric of ``compute_preference_loss``: the
``[sum, count]`` form Megatron-LM's training loop sums over micro-batches, all-reduces
over DP x CP and divides. Metrics whose ``metric_reduction`` is ``"max"``
(``adadpo/coef_max``) carry ``[max, 1]`` and are reduced with MAX by
:func:`reduce_metrics` (Megatron-LM's loop would show the mean of per-micro-batch maxima).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from adadpo_megatron.fused_logprobs import fused_vocab_parallel_logprobs
from adadpo_megatron.logprobs import segment_logprob_sums, vocab_parallel_logprobs
from adadpo_megatron.step.batch import ModelInputs, prepare_model_inputs
from adadpo_megatron.step.output_layer import (
    LOGPROB_IMPLS,
    OutputWeight,
    hidden_states_instead_of_logits,
)

__all__ = [
    "StepContext",
    "make_forward_step",
    "make_reference_forward_step",
    "attach_reference_logps",
    "reduce_metrics",
    "reference_segment_logps",
]


@dataclasses.dataclass(kw_only=True)
class StepContext:
    """What ``loss_func`` needs to know about the whole step; the trainer updates it per step.

    Only the default mode (``calculate_per_token_loss`` False) reads it.
    """

    num_microbatches: int
    """M: micro-batches this rank runs in the step (the ``num_microbatches`` passed to
    forward_backward_func on this rank)."""
    global_num_pairs: int | torch.Tensor
    """G: preference pairs in the whole global batch (all DP ranks, all micro-batches).
    An int, or a 0-dim tensor (e.g. an all-reduced count) on the model's device."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Groups:
    tp: Any
    cp: Any
    dp_size: int
    cp_size: int
    cp_rank: int


def _groups_from_megatron() -> _Groups:
    from megatron.core import parallel_state as ps

    return _Groups(
        tp=ps.get_tensor_model_parallel_group(),
        cp=ps.get_context_parallel_group(),
        dp_size=ps.get_data_parallel_world_size(with_context_parallel=False),
        cp_size=ps.get_context_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
    )


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _model_config(model: torch.nn.Module):
    from megatron.core.utils import get_model_config

    return get_model_config(model)


def _token_logps(
    inputs: ModelInputs, output: torch.Tensor, groups: _Groups, held: OutputWeight | None
) -> torch.Tensor:
    """fp32 per-token log-probs: from logits (``held`` None) or hidden states + weight."""
    if held is None:
        return vocab_parallel_logprobs(output, inputs.labels, groups.tp)
    if held.weight is None:
        raise ValueError(
            "--logprob-impl fused: the model's last stage has no megatron-core output layer "
            "(GPTModel.output_layer) that was called: use --logprob-impl chunked"
        )
    if output.dtype != held.weight.dtype and output.dtype == torch.float32:
        # megatron-core's Float16Module upcasts the last stage's output to fp32: the hidden
        # states were bf16/fp16 (the weight's dtype) a moment ago, so this cast is exact.
        output = output.to(held.weight.dtype)
    return fused_vocab_parallel_logprobs(output, held.weight, inputs.labels, groups.tp)


def _pair_logps(
    inputs: ModelInputs, logits: torch.Tensor, groups: _Groups, held: OutputWeight | None = None
):
    """Per-segment (sum, count) of the micro-batch, split into chosen [N] / rejected [N]."""
    token_logps = _token_logps(inputs, logits, groups, held)
    sums, counts = segment_logprob_sums(
        token_logps.reshape(-1), inputs.loss_mask.reshape(-1), inputs.cu_seqlens, groups.cp
    )
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def _report(losses: torch.Tensor, metrics: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from adadpo_megatron.losses import metric_reduction

    n = torch.full((), losses.shape[0], dtype=torch.float32, device=losses.device)
    out = {"loss": torch.stack([losses.detach().float().sum(), n])}
    for name, value in metrics.items():
        value = value.detach().float().reshape(-1)
        if metric_reduction(name) == "max":
            out[name] = torch.stack([value.max(), torch.ones_like(n)])
        else:
            out[name] = torch.stack([value.sum(), n])
    return out


def _loss_func(
    inputs: ModelInputs,
    loss_cfg,
    step: StepContext | None,
    groups: _Groups,
    per_token: bool,
    logits: torch.Tensor,
    *,
    held: OutputWeight | None = None,
):
    from adadpo_megatron.losses import compute_preference_loss

    pol_w, pol_l, len_w, len_l = _pair_logps(inputs, logits, groups, held)
    ref_w = ref_l = None
    if inputs.ref_logps is not None:
        ref = inputs.ref_logps.to(device=pol_w.device, dtype=pol_w.dtype, non_blocking=True)
        ref_w, ref_l = ref[0::2], ref[1::2]
    elif loss_cfg.needs_reference:
        raise ValueError(
            f"preference loss {loss_cfg.name!r} needs reference log-probs but the micro-batch has "
            "no 'ref_logps': pass --ref-logprobs (precomputed side-car) or --ref-load (online "
            "reference, see make_reference_forward_step)"
        )
    losses, metrics = compute_preference_loss(loss_cfg, pol_w, pol_l, ref_w, ref_l, len_w, len_l)
    total = losses.sum()
    n_pairs = losses.shape[0]
    if per_token:
        # The schedule leaves it alone; finalize_model_grads divides by CP*G (module doc).
        loss = total * groups.cp_size
        num_tokens = torch.tensor(n_pairs, dtype=torch.int, device=total.device)
    else:
        # The schedule divides by num_tokens (=1) and M; DDP by DP*CP (module doc).
        if step is None:
            raise ValueError(
                "make_forward_step(step=None) needs config.calculate_per_token_loss=True "
                "(Megatron-LM --calculate-per-token-loss); otherwise pass a StepContext with "
                "the step's micro-batch count and global pair count"
            )
        loss = total * (groups.dp_size * groups.cp_size * step.num_microbatches)
        loss = loss / step.global_num_pairs
        num_tokens = torch.ones((), dtype=torch.int, device=total.device)
    return loss, num_tokens, _report(losses, metrics)


def make_forward_step(
    loss_cfg,
    step: StepContext | None = None,
    *,
    use_thd: bool | None = None,
    logprob_impl: str = "fused",
):
    """Builds ``forward_step(data_iterator, model)`` for ``get_forward_backward_func()``.

    Args:
        loss_cfg: an ``adadpo_megatron.losses.LossConfig``.
        step: the :class:`StepContext`; the trainer mutates it before each step (read at
            loss time, so one forward_step serves every step). May be None only with
            ``config.calculate_per_token_loss`` (e.g. under Megatron-LM's ``pretrain`` with
            ``--calculate-per-token-loss``, which needs no global pair count).
        use_thd: packed micro-batches through ``PackedSeqParams`` (TE attention) or a
            block-diagonal mask; None: THD exactly when Transformer Engine is usable.
        logprob_impl: ``"fused"`` (hidden states + output weight, no logits) or
            ``"chunked"`` (logits); ``--logprob-impl``, see the module doc.

    Process groups and sizes are read from megatron-core's ``parallel_state`` here, once:
    build a new forward_step after re-initialising the parallel state.

    The returned ``forward_step`` pulls one micro-batch dict (packed or padded, see
    ``adadpo_megatron.step.batch``) from ``data_iterator`` on every pipeline stage,
    runs ``model`` and returns ``(output, loss_func)``; on the last stage ``loss_func``
    returns ``(loss, num_tokens, report)`` as described in the module doc.
    """
    from adadpo_megatron.step.model import transformer_engine_usable

    if use_thd is None:
        use_thd = transformer_engine_usable()
    _check_impl(logprob_impl)
    groups = _groups_from_megatron()

    def forward_step(data_iterator: Iterator[Mapping[str, Any]], model: torch.nn.Module):
        inputs, output, held = _run_model(next(data_iterator), model, use_thd, groups, logprob_impl)
        per_token = bool(_model_config(model).calculate_per_token_loss)
        loss_func = functools.partial(
            _loss_func, inputs, loss_cfg, step, groups, per_token, held=held
        )
        return output, loss_func

    return forward_step



def _prefix_attention(model: torch.nn.Module) -> str | None:
    """The model's prefix-sharing attention (GPTOptions.prefix_attention), None if absent."""
    opts = getattr(_model_config(model), "adadpo_gpt_options", None)
    return getattr(opts, "prefix_attention", None)


def _check_impl(logprob_impl: str) -> None:
    if logprob_impl not in LOGPROB_IMPLS:
        raise ValueError(
            f"--logprob-impl {logprob_impl!r}: choose one of {', '.join(LOGPROB_IMPLS)}"
        )


def _run_model(
    batch: Mapping[str, Any],
    model: torch.nn.Module,
    use_thd: bool,
    groups: _Groups,
    logprob_impl: str = "chunked",
) -> tuple[ModelInputs, torch.Tensor, OutputWeight | None]:
    """Prepares one micro-batch for this rank and runs ``model`` on it (no labels).

    Returns the inputs, the model's output (logits, or hidden states when ``fused``) and
    the output weight holder (None for ``chunked``).
    """
    inputs = prepare_model_inputs(
        batch,
        device=_model_device(model),
        use_thd=use_thd,
        cp_size=groups.cp_size,
        cp_rank=groups.cp_rank,
        shared_attention=_prefix_attention(model),
    )
    fused = logprob_impl == "fused"
    with hidden_states_instead_of_logits(model) if fused else contextlib.nullcontext() as held:
        output = model(
            inputs.input_ids,
            inputs.position_ids,
            inputs.attention_mask,
            labels=None,
            packed_seq_params=inputs.packed_seq_params,
        )
    return inputs, output, held


def _reference_loss_func(
    inputs: ModelInputs, groups: _Groups, logits, non_loss_data=False, *, held=None
):
    with torch.no_grad():
        token_logps = _token_logps(inputs, logits, groups, held)
        sums, _ = segment_logprob_sums(
            token_logps.reshape(-1), inputs.loss_mask.reshape(-1), inputs.cu_seqlens, groups.cp
        )
    if non_loss_data:
        return sums
    zero = torch.zeros((), device=sums.device)
    return zero, {"ref_logps": sums}


def make_reference_forward_step(*, use_thd: bool | None = None, logprob_impl: str = "fused"):
    """Forward step of an online reference pass (the hook for ``--ref-load``).

    Run it with ``forward_only=True, collect_non_loss_data=True`` on the frozen reference
    model chunks, over the same micro-batches (same order, same layout) as the policy
    step. On the last pipeline stage forward_backward_func then returns one fp32 ``[S]``
    tensor of per-segment reference log-prob sums per micro-batch (``[]`` elsewhere); hand
    them to :func:`attach_reference_logps` before the policy pass. ``logprob_impl`` as
    for :func:`make_forward_step` (forward only: the fused path keeps no logits at all).
    """
    from adadpo_megatron.step.model import transformer_engine_usable

    if use_thd is None:
        use_thd = transformer_engine_usable()
    _check_impl(logprob_impl)
    groups = _groups_from_megatron()

    def forward_step(data_iterator, model):
        with torch.no_grad():
            inputs, output, held = _run_model(
                next(data_iterator), model, use_thd, groups, logprob_impl
            )
        return output, functools.partial(_reference_loss_func, inputs, groups, held=held)

    return forward_step


def reference_segment_logps(
    batch: Mapping[str, Any], model: torch.nn.Module, *, use_thd: bool | None = None,
    logprob_impl: str = "fused",
) -> torch.Tensor:
    """Per-segment log-prob sums (fp32 ``[S]``) of one micro-batch under a frozen ``model``.

    Runs ``model`` (a whole, unwrapped GPTModel: no pipeline parallelism) forward-only on
    ``batch`` without a schedule, through the same input preparation and log-prob code as
    the policy (TP collectives in ``vocab_parallel_logprobs``, the CP all-reduce in
    ``segment_logprob_sums``; ``logprob_impl`` as for :func:`make_forward_step`). The online
    reference of Megatron-LM's ``pretrain()`` entry.
    """
    from adadpo_megatron.step.model import transformer_engine_usable

    if use_thd is None:
        use_thd = transformer_engine_usable()
    _check_impl(logprob_impl)
    groups = _groups_from_megatron()
    with torch.no_grad():
        inputs, output, held = _run_model(batch, model, use_thd, groups, logprob_impl)
        sums = _reference_loss_func(inputs, groups, output, non_loss_data=True, held=held)
    return sums.detach().float()


def attach_reference_logps(
    microbatches: Sequence[dict[str, Any]], ref_outputs: Sequence[torch.Tensor]
) -> None:
    """Stores each reference pass result as ``ref_logps`` in its micro-batch dict (in place).

    ``ref_outputs`` is what forward_backward_func returned for
    :func:`make_reference_forward_step`: one ``[S]`` tensor per micro-batch on the last
    pipeline stage, ``[]`` on other stages (which need no reference and are left as is).
    """
    if len(ref_outputs) == 0:
        return
    if len(ref_outputs) != len(microbatches):
        raise ValueError(
            f"{len(ref_outputs)} reference outputs for {len(microbatches)} micro-batches: run the "
            "reference pass over exactly the policy step's micro-batches"
        )
    for mb, ref in zip(microbatches, ref_outputs, strict=True):
        mb["ref_logps"] = ref


def reduce_metrics(
    reports: Sequence[Mapping[str, torch.Tensor]], group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """Global-batch averages of the step's metrics: call once per step, on every rank.

    ``reports`` is the list forward_backward_func returned (one ``loss_func`` report per
    micro-batch on the last pipeline stage, empty elsewhere). Sums and counts of all
    metrics are stacked and all-reduced in one collective over ``group`` (default:
    megatron-core's DP x CP group; the ranks of one such group are all on the same
    pipeline stage), ``max`` metrics (``metric_reduction``) in a second (MAX). Returns ``{name: 0-dim fp32
    tensor}`` on the last stage, ``{}`` elsewhere; no host sync (call ``.item()`` when
    logging). Each CP rank reports the same pairs, which scales sums and counts alike.
    """
    if not reports:
        return {}
    if group is None:
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group(with_context_parallel=True)
    from adadpo_megatron.losses import metric_reduction

    names = list(reports[0].keys())
    mean_names = [n for n in names if metric_reduction(n) != "max"]
    max_names = [n for n in names if metric_reduction(n) == "max"]
    sums = torch.stack([torch.stack([r[n] for r in reports]).sum(0) for n in mean_names])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    out = {n: sums[i, 0] / sums[i, 1].clamp(min=1) for i, n in enumerate(mean_names)}
    if max_names:
        maxes = torch.stack([torch.stack([r[n][0] for r in reports]).max() for n in max_names])
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        out.update({n: maxes[i] for i, n in enumerate(max_names)})
    return out
