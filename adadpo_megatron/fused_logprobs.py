"""Per-token log-probs straight from the output layer's input: the logits never exist whole.

``fused_vocab_parallel_logprobs(hidden, weight, targets)`` equals
``vocab_parallel_logprobs(hidden @ weight.T, targets)`` (``logprobs.py``, the ``chunked``
reference) without ever holding the ``[T, V/TP]`` logits: it works on one
``[chunk_tokens, chunk_vocab]`` tile of logits at a time, in forward and in backward.

* Forward, per token chunk: per vocabulary block, logits tile = ``h @ W_b.T`` (the
  inputs' dtype, as the output layer makes them), upcast into one reused fp32 buffer; an
  online logsumexp (running max and rescaled sum-exp per token) and the target logit.
  Then the TP reductions of ``logprobs.py``: an all-reduce MAX of the per-token max and
  one all-reduce SUM of the stacked (rescaled sum-exp, target logit). Saved for backward:
  references to ``hidden`` and ``weight``, the local targets and the fp32 logsumexp
  ``[T]``.
* Backward recomputes each tile's logits, forms the logits' gradient
  ``grad_t * (1[v == target] - softmax)`` in fp32, casts it to the inputs' dtype (the value
  the chunked path would hold in its logits gradient) and multiplies it into the
  gradients of ``hidden`` (``g @ W_b``) and ``weight`` (``g.T @ h``). The loop runs over
  vocabulary blocks outside, token chunks inside, so a block's weight gradient sums in one
  fp32 ``[chunk_vocab, H]`` buffer and is written once; the hidden gradient sums over
  blocks in fp32 ``[T, H]`` (small: ``H << V``). Backward has no collective: the gradient
  of ``hidden`` is this rank's vocabulary shard's part; megatron-core's mapping in front of
  the output layer (:func:`output_layer_input`) all-reduces it (TP) or reduce-scatters it
  (sequence parallelism), exactly as ``ColumnParallelLinear`` does.

Cost: four ``T x V/TP x H`` matrix products (forward 1, backward 3: recompute, input and
weight gradients) against three for output layer + log-softmax; no ``[T, V/TP]`` tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from adadpo_megatron.logprobs import _group_rank_size, _megatron_group

__all__ = ["fused_vocab_parallel_logprobs", "output_layer_input"]

ProcessGroup = dist.ProcessGroup


def _mm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``; ``acc`` may be fp32 while ``a``, ``b`` are bf16/fp16."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        # CUDA: bf16 inputs, fp32 product (no rounding of the partial to bf16).
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.add_(a @ b)  # CPU has no mixed-dtype mm: the partial is rounded once


def _target_in_block(local_target, owned, start, end):
    """(in-block mask, column index within the block, clamped) for vocab block [start, end)."""
    inside = owned & (local_target >= start) & (local_target < end)
    return inside, (local_target - start).clamp_(0, end - start - 1)


class _FusedOutputLogprobs(torch.autograd.Function):
    """log p(target) = (h W^T)[target] - logsumexp(h W^T), vocabulary split over TP."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, group, chunk_tokens, chunk_vocab):  # noqa: D102
        num_tokens, vocab_local = hidden.shape[0], weight.shape[0]
        compute = torch.promote_types(hidden.dtype, torch.float32)
        rank, size = _group_rank_size(group)
        local_target = targets - rank * vocab_local
        owned = (local_target >= 0) & (local_target < vocab_local)
        local_target = torch.where(owned, local_target, torch.zeros_like(local_target))

        run_max = torch.empty(num_tokens, dtype=compute, device=hidden.device)
        run_sum = torch.zeros(num_tokens, dtype=compute, device=hidden.device)
        target_logit = torch.zeros(num_tokens, dtype=compute, device=hidden.device)
        buffer = torch.empty(
            (min(chunk_tokens, num_tokens), min(chunk_vocab, vocab_local)),
            dtype=compute, device=hidden.device,
        )  # fmt: skip
        for t0 in range(0, num_tokens, chunk_tokens):
            t1 = min(t0 + chunk_tokens, num_tokens)
            h, m, s = hidden[t0:t1], run_max[t0:t1], run_sum[t0:t1]
            for v0 in range(0, vocab_local, chunk_vocab):
                v1 = min(v0 + chunk_vocab, vocab_local)
                logits = h @ weight[v0:v1].T  # the output layer's tile, inputs' dtype
                inside, col = _target_in_block(local_target[t0:t1], owned[t0:t1], v0, v1)
                picked = logits.gather(1, col[:, None]).squeeze(1).to(compute)
                target_logit[t0:t1] = torch.where(inside, picked, target_logit[t0:t1])
                block = buffer[: t1 - t0, : v1 - v0]
                block.copy_(logits)
                del logits
                block_max = block.amax(dim=-1)
                if v0 == 0:
                    m.copy_(block_max)
                else:
                    new_max = torch.maximum(m, block_max)
                    s.mul_((m - new_max).exp_())
                    m.copy_(new_max)
                block.sub_(m[:, None]).exp_()
                s.add_(block.sum(dim=-1))
        del buffer
        if size > 1:
            # Collective 1 (TP group, all-reduce MAX, forward): the global per-token max.
            token_max = run_max.clone()
            dist.all_reduce(token_max, op=dist.ReduceOp.MAX, group=group)
            run_sum.mul_((run_max - token_max).exp_())
        else:
            token_max = run_max
        sums = torch.stack([run_sum, torch.where(owned, target_logit - token_max, 0.0)])
        if size > 1:
            # Collective 2 (TP group, all-reduce SUM, forward): row 0 the sum-exp of every
            # shard (all relative to the global max), row 1 the target logit from its owner.
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        log_sum = sums[0].log()
        ctx.save_for_backward(hidden, weight, local_target, owned, token_max + log_sum)
        ctx.chunks = (chunk_tokens, chunk_vocab)
        return sums[1] - log_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        hidden, weight, local_target, owned, logsumexp = ctx.saved_tensors
        chunk_tokens, chunk_vocab = ctx.chunks
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens, vocab_local = hidden.shape[0], weight.shape[0]
        compute, dtype, device = logsumexp.dtype, hidden.dtype, hidden.device
        grad_out = grad_output.to(compute)
        target_grad = torch.where(owned, grad_out, 0.0)
        grad_hidden = grad_weight = weight_acc = None
        if need_hidden:
            grad_hidden = torch.zeros(hidden.shape, dtype=compute, device=device)
        if need_weight:
            grad_weight = torch.empty_like(weight)
            if weight.dtype != compute:
                weight_acc = torch.empty(
                    (min(chunk_vocab, vocab_local), weight.shape[1]), dtype=compute, device=device
                )
        buffer = torch.empty(
            (min(chunk_tokens, num_tokens), min(chunk_vocab, vocab_local)),
            dtype=compute, device=device,
        )  # fmt: skip
        for v0 in range(0, vocab_local, chunk_vocab):
            v1 = min(v0 + chunk_vocab, vocab_local)
            w = weight[v0:v1]
            acc = None
            if need_weight:
                acc = grad_weight[v0:v1] if weight_acc is None else weight_acc[: v1 - v0]
                acc.zero_()
            for t0 in range(0, num_tokens, chunk_tokens):
                t1 = min(t0 + chunk_tokens, num_tokens)
                h = hidden[t0:t1]
                block = buffer[: t1 - t0, : v1 - v0]
                block.copy_(h @ w.T).sub_(logsumexp[t0:t1, None]).exp_()
                block.mul_(grad_out[t0:t1, None].neg())  # -grad * softmax
                inside, col = _target_in_block(local_target[t0:t1], owned[t0:t1], v0, v1)
                picked = torch.where(inside, target_grad[t0:t1], 0.0)
                block.scatter_add_(1, col[:, None], picked[:, None])  # + grad at the target
                grad_logits = block if dtype == compute else block.to(dtype)
                if need_weight:
                    _mm_into(acc, grad_logits.T, h)
                if need_hidden:
                    _mm_into(grad_hidden[t0:t1], grad_logits, w)
            if weight_acc is not None:
                grad_weight[v0:v1].copy_(acc)
        if grad_hidden is not None and dtype != compute:
            grad_hidden = grad_hidden.to(dtype)
        return grad_hidden, grad_weight, None, None, None, None


def fused_vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    tp_group: ProcessGroup | None = None,
    chunk_tokens: int = 1024,
    chunk_vocab: int = 8192,
) -> torch.Tensor:
    """Per-token ``log p(target)`` of the logits ``hidden @ weight.T``, never materialised.

    Args:
        hidden: ``[T, H]`` or ``[S, B, H]`` (any leading shape equal to ``targets``'), the
            output layer's input *after* megatron-core's TP mapping (every token of the
            sequence on every TP rank: see :func:`output_layer_input`); float dtype.
        weight: ``[V/TP, H]``, this rank's vocabulary shard of the output weight (the
            embedding when tied), same dtype and device as ``hidden``. Never modified.
        targets: integer global vocabulary ids in ``[0, V)``, the leading shape of
            ``hidden``. An id outside every shard yields ``-logsumexp``, as in
            ``vocab_parallel_logprobs``.
        tp_group: the group the vocabulary is split over; ``None``: megatron-core's TP
            group, or no TP when its parallel state is not initialised.
        chunk_tokens, chunk_vocab: the logits tile ``[chunk_tokens, chunk_vocab]``. Peak
            extra memory is one such tile in fp32 and one in the inputs' dtype, plus in
            backward a fp32 ``[chunk_vocab, H]`` weight-gradient block and (for bf16/fp16
            inputs) a fp32 copy of the hidden gradient ``[T, H]``; no ``[T, V/TP]`` tensor.

    Returns:
        fp32 log-probs with the shape of ``targets`` (fp64 for fp64 inputs), identical on
        every TP rank. Differentiable w.r.t. ``hidden`` and ``weight``; the gradients have
        their dtypes. Backward runs no collective (see the module doc).
    """
    if hidden.dim() < 2 or targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal the hidden states' leading shape "
            f"(hidden {tuple(hidden.shape)}): pass labels aligned with the tokens, e.g. "
            "[T] / [T, H] or [B, S] / [B, S, H]"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight {tuple(weight.shape)} must be [V/TP, H] with H = {hidden.shape[-1]} "
            f"(the hidden size of hidden {tuple(hidden.shape)})"
        )
    if not hidden.dtype.is_floating_point or weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one float dtype"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer vocabulary ids, got dtype {targets.dtype}")
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError(f"chunk_tokens and chunk_vocab must be >= 1, got {chunk_tokens}, "
                         f"{chunk_vocab}")
    if tp_group is None:
        tp_group = _megatron_group("tp")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if flat_hidden.shape[0] == 0:
        compute = torch.promote_types(hidden.dtype, torch.float32)
        return hidden.sum(dim=-1).to(compute)  # empty, still attached to the graph
    logps = _FusedOutputLogprobs.apply(
        flat_hidden, weight, targets.reshape(-1), tp_group, chunk_tokens, chunk_vocab
    )
    return logps.view(targets.shape)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    megatron-core's TP all-reduce of a gradient (``mappings._reduce``) reduces
    ``grad.contiguous()`` and returns ``grad``: for a non-contiguous gradient (GPTModel
    transposes its output to batch-first, so ours arrives transposed) the reduced copy
    would be dropped silently. Inside ``ColumnParallelLinear`` the gradient comes from a
    matmul and is always contiguous; here this function makes it so.
    """

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad.contiguous()


def output_layer_input(hidden: torch.Tensor, output_layer: torch.nn.Module) -> torch.Tensor:
    """What megatron-core's ``ColumnParallelLinear`` multiplies: ``hidden`` after its TP mapping.

    Args:
        hidden: ``[s, b, H]`` the last stage's hidden states as the output layer receives
            them (sequence-parallel: ``[s/TP, b, H]``, this rank's part of the sequence).
        output_layer: the model's ``ColumnParallelLinear`` output layer (its settings decide
            the mapping).

    Returns:
        ``[s, b, H]`` with every token on every TP rank. Sequence parallelism: all-gather
        forward, reduce-scatter backward (``gather_from_sequence_parallel_region``).
        TP > 1 otherwise: identity forward, all-reduce backward
        (``copy_to_tensor_model_parallel_region``); this is what the layer's own
        ``allreduce_dgrad`` does inside its matmul. TP = 1: ``hidden`` itself. The
        gradient reaching the mapping is made contiguous first (see ``_ContiguousGrad``).
    """
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    group = getattr(output_layer, "tp_group", None)
    if getattr(output_layer, "sequence_parallel", False):
        gathered = gather_from_sequence_parallel_region(
            hidden, tensor_parallel_output_grad=True, group=group
        )
        return _ContiguousGrad.apply(gathered)
    if getattr(output_layer, "allreduce_dgrad", False):
        return _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(hidden, group=group))
    return hidden
