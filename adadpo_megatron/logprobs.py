"""Per-token and per-segment log-probs from vocabulary-sharded logits.

Every collective of the log-prob path lives here (STYLE.md item 1); the losses only
ever see per-segment sums. Process groups are arguments: ``None`` reads megatron-core's
group once, at the public entry point, and means "no parallelism" when megatron-core's
parallel state is not initialised (single-process tools and unit tests).

Layout conventions (Megatron's):

* Vocabulary sharding: rank ``r`` of a TP group of size ``P`` holds the logits of the
  global vocabulary ids ``[r * V/P, (r + 1) * V/P)``; ``targets`` are global ids.
* THD packing: tokens of all segments are concatenated, ``cu_seqlens`` (int32 ``[S+1]``)
  gives segment boundaries, padding included. Worked example: ``cu_seqlens=[0, 8, 12]``
  is a segment of 8 tokens then one of 4.
* Context parallel (TE's ``thd_get_partitioned_indices``): each segment is cut into
  ``2*CP`` equal chunks, rank ``r`` keeps chunks ``r`` and ``2*CP-1-r`` (in that order),
  which balances causal-attention work. With ``CP=2`` the example above gives rank 0
  tokens ``[0, 1, 6, 7, 8, 11]`` and rank 1 tokens ``[2, 3, 4, 5, 9, 10]``; both have the
  local ``cu_seqlens=[0, 4, 6]`` (global ``cu_seqlens // CP``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

__all__ = [
    "segment_logprob_sums",
    "split_thd_for_cp",
    "thd_cp_partition_indices",
    "vocab_parallel_logprobs",
]

ProcessGroup = dist.ProcessGroup


def _megatron_group(kind: str) -> ProcessGroup | None:
    """megatron-core's TP or CP group, or None when its parallel state is not set up."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if kind == "tp":
        return parallel_state.get_tensor_model_parallel_group()
    return parallel_state.get_context_parallel_group()


def _group_rank_size(group: ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _block_buffer(logits_2d: torch.Tensor, chunk_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The one ``[min(chunk, T), V/TP]`` work block, reused by every chunk of a pass."""
    rows = min(chunk_tokens, logits_2d.shape[0])
    return torch.empty((rows, logits_2d.shape[1]), dtype=dtype, device=logits_2d.device)


class _VocabParallelLogprobs(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits), the vocabulary split over TP.

    Saved for backward: the logits (a reference, no copy), the local target column, the
    ownership mask and the fp32 per-token logsumexp ``[T]``. Backward recomputes the
    softmax chunk by chunk, so at most one ``[chunk, V/TP]`` fp32 block exists at a time.
    """

    @staticmethod
    def forward(ctx, logits, targets, group, chunk_tokens):  # noqa: D102
        vocab_local = logits.shape[-1]
        logits_2d = logits.reshape(-1, vocab_local)  # a view for contiguous logits
        num_tokens = logits_2d.shape[0]
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        rank, size = _group_rank_size(group)

        local_target = targets.reshape(-1) - rank * vocab_local
        owned = (local_target >= 0) & (local_target < vocab_local)
        local_target = torch.where(owned, local_target, torch.zeros_like(local_target))

        # The max is exact in the logits' own dtype: no fp32 copy needed for it.
        token_max = logits_2d.amax(dim=-1).to(compute_dtype)
        if size > 1:
            # Collective 1 (TP group, all-reduce MAX, forward): the global max over the
            # whole vocabulary, so every rank shifts its exponentials by the same value.
            # One all-reduce for all tokens, before the chunk loop, rather than one per chunk.
            dist.all_reduce(token_max, op=dist.ReduceOp.MAX, group=group)

        sums = torch.empty((2, num_tokens), dtype=compute_dtype, device=logits.device)
        buffer = _block_buffer(logits_2d, chunk_tokens, compute_dtype)
        for start in range(0, num_tokens, chunk_tokens):
            end = min(start + chunk_tokens, num_tokens)
            block = buffer[: end - start]
            # Upcast by copying into the reused buffer: the input is only read, and no
            # fresh [chunk, V/TP] tensor is allocated (a mixed-dtype op would make one).
            block.copy_(logits_2d[start:end]).sub_(token_max[start:end, None]).exp_()
            torch.sum(block, dim=-1, out=sums[0, start:end])
        del buffer
        target_logit = logits_2d.gather(1, local_target[:, None]).squeeze(1)
        sums[1] = torch.where(owned, target_logit.to(compute_dtype) - token_max, 0.0)
        if size > 1:
            # Collective 2 (TP group, all-reduce SUM, forward): row 0 adds the partial
            # sum-exp of every vocabulary shard; row 1 brings each token's target logit from
            # the one rank that owns it (the others contribute 0). Stacked: one collective.
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)

        logsumexp = token_max + sums[0].log()
        ctx.save_for_backward(logits, local_target, owned, logsumexp)
        ctx.chunk_tokens = chunk_tokens
        # target - logsumexp, both relative to the max: (x_t - m) - log(sum exp(x - m)).
        return (sums[1] - sums[0].log()).view(targets.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):  # noqa: D102
        logits, local_target, owned, logsumexp = ctx.saved_tensors
        chunk_tokens = ctx.chunk_tokens
        logits_2d = logits.reshape(-1, logits.shape[-1])
        grad_out = grad_output.reshape(-1).to(logsumexp.dtype)
        # d logp_t / d logit_{t,v} = 1[v == target_t] - softmax_{t,v}. The softmax uses the
        # global logsumexp from forward, so backward needs no collective: each TP rank
        # writes the gradient of its own vocabulary shard.
        grad = torch.empty(logits_2d.shape, dtype=logits.dtype, device=logits.device)
        target_grad = torch.where(owned, grad_out, 0.0)
        buffer = _block_buffer(logits_2d, chunk_tokens, logsumexp.dtype)
        for start in range(0, logits_2d.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, logits_2d.shape[0])
            block = buffer[: end - start]
            block.copy_(logits_2d[start:end]).sub_(logsumexp[start:end, None]).exp_()
            block.mul_(grad_out[start:end, None].neg())
            block.scatter_add_(1, local_target[start:end, None], target_grad[start:end, None])
            grad[start:end].copy_(block)
        return grad.view(logits.shape), None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: ProcessGroup | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Per-token ``log p(target)`` from logits sharded over the vocabulary.

    Args:
        logits: ``[T, V/TP]`` or ``[S, B, V/TP]``, any float dtype (bf16 in training);
            this rank's vocabulary shard, Megatron's layout (see the module docstring).
            Never modified.
        targets: integer ``[T]`` or ``[S, B]`` (the leading shape of ``logits``), global
            vocabulary ids in ``[0, V)``. An id outside every shard silently yields
            ``-logsumexp`` (no host sync is spent checking it).
        tp_group: the tensor-parallel group over which the vocabulary is split. ``None``
            means megatron-core's TP group, or no TP when megatron-core's parallel state
            is not initialised.
        chunk_tokens: tokens per block in forward and backward. Peak extra memory is one
            fp32 ``[chunk_tokens, V/TP]`` block on top of the logits-sized gradient; the
            default keeps that block at a quarter of the bf16 logits of 8,192 tokens
            (525 MB at V=128,256, TP=1), 1.25x the logits in all, vs ~6x for a plain
            ``log_softmax`` (benchmarks/bench_logprobs.py).

    Returns:
        fp32 log-probs with the shape of ``targets`` (fp64 when the logits are fp64),
        identical on every rank of the TP group. Differentiable w.r.t. ``logits``; the
        gradient has the logits' dtype.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal the logits' leading shape "
            f"{tuple(logits.shape[:-1])} (logits {tuple(logits.shape)}); pass the labels "
            "aligned with the logits, e.g. both [T] / [T, V/TP] or [S, B] / [S, B, V/TP]"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer vocabulary ids, got dtype {targets.dtype}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a float tensor, got dtype {logits.dtype}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if tp_group is None:
        tp_group = _megatron_group("tp")
    if targets.numel() == 0:
        compute_dtype = torch.promote_types(logits.dtype, torch.float32)
        return logits.sum(dim=-1).to(compute_dtype)  # empty, still attached to the graph
    return _VocabParallelLogprobs.apply(logits, targets, tp_group, chunk_tokens)


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """y = sum over the group of x_r, with dL/dx_r = dL/dy.

    Every rank of the group holds the same y afterwards and computes the same loss L(y)
    from it: that loss counts once, not once per rank. Since y = x_0 + ... + x_{P-1},
    dL/dx_r = dL/dy, which is exactly the gradient each rank already has: backward is the
    identity. (Summing the gradients over the group, as for an all-reduce whose per-rank
    losses add up, would count L P times.)
    """

    @staticmethod
    def forward(ctx, partial, group):  # noqa: D102
        total = partial.clone()
        # Collective (CP group, all-reduce SUM, forward): adds the per-segment partial
        # (sum, count) of the tokens each CP rank holds; no collective in backward.
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # noqa: D102
        return grad_total, None


def segment_logprob_sums(
    token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cp_group: ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment sum of masked token log-probs and masked token count.

    Args:
        token_logps: fp32 ``[T]``, log-probs of this rank's tokens (THD order).
        loss_mask: ``[T]`` float or bool, 1 where the token counts.
        cu_seqlens: int ``[S+1]``, segment boundaries of this rank's local layout
            (under CP: the local ``cu_seqlens`` returned by :func:`split_thd_for_cp`).
            Best kept on the CPU; on a GPU it is used without a host sync.
        cp_group: context-parallel group whose ranks each hold part of every segment.
            ``None`` means megatron-core's CP group, or none when megatron-core's parallel
            state is not initialised.

    Returns:
        ``(sums, counts)``, both ``[S]`` in ``token_logps``' dtype, summed over the CP group
        when it has more than one rank. ``sums`` is differentiable w.r.t. ``token_logps``.
    """
    if token_logps.dim() != 1 or loss_mask.shape != token_logps.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and loss_mask {tuple(loss_mask.shape)} "
            "must both be [T] (flatten [S, B] inputs first)"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be [S+1], got shape {tuple(cu_seqlens.shape)}")
    num_tokens = token_logps.shape[0]
    if cu_seqlens.device.type == "cpu" and int(cu_seqlens[-1]) != num_tokens:
        raise ValueError(
            f"cu_seqlens[-1]={int(cu_seqlens[-1])} but token_logps has {num_tokens} tokens; "
            "under CP pass the local cu_seqlens of split_thd_for_cp, not the global one"
        )
    if cp_group is None:
        cp_group = _megatron_group("cp")
    device = token_logps.device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    num_segments = cu.numel() - 1
    segment_ids = torch.repeat_interleave(
        torch.arange(num_segments, device=device), cu[1:] - cu[:-1], output_size=num_tokens
    )
    mask = loss_mask.to(token_logps.dtype)
    # where(), not a product: a masked-out token with a -inf/NaN log-prob must contribute 0.
    masked = torch.where(mask != 0, token_logps * mask, 0.0)
    zeros = torch.zeros(2, num_segments, dtype=token_logps.dtype, device=device)
    both = zeros.index_add(1, segment_ids, torch.stack([masked, mask]))
    if _group_rank_size(cp_group)[1] > 1:
        both = _AllReduceSumIdentityGrad.apply(both, cp_group)
    return both[0], both[1].detach()


def thd_cp_partition_indices(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global token indices that CP rank ``cp_rank`` holds, in local order (TE's convention).

    Args:
        cu_seqlens: int ``[S+1]`` global segment boundaries (padding included); each
            segment length must be a multiple of ``2 * cp_size``.
        cp_size, cp_rank: the context-parallel size and this rank's index in it.

    Returns:
        int64 ``[T / cp_size]`` on ``cu_seqlens``' device: for each segment, chunk
        ``cp_rank`` then chunk ``2*cp_size-1-cp_rank`` of its ``2*cp_size`` equal chunks.
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"need cp_size >= 1 and 0 <= cp_rank < cp_size, got {cp_size}, {cp_rank}")
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    bad = torch.nonzero(lengths % (2 * cp_size)).flatten()
    if bad.numel() > 0:
        seg = int(bad[0])
        raise ValueError(
            f"segment {seg} has {int(lengths[seg])} tokens, not a multiple of 2*CP="
            f"{2 * cp_size}; pack with segment_multiple a multiple of {2 * cp_size}"
        )
    num_local = int(cu[-1]) // cp_size
    chunk = lengths // (2 * cp_size)
    seg_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), 2 * chunk)
    local_start = cu[:-1] // cp_size
    pos = torch.arange(num_local, device=cu.device) - local_start[seg_ids]
    seg_chunk = chunk[seg_ids]
    in_first = pos < seg_chunk
    offset = torch.where(
        in_first,
        cp_rank * seg_chunk + pos,
        (2 * cp_size - 1 - cp_rank) * seg_chunk + pos - seg_chunk,
    )
    return cu[:-1][seg_ids] + offset


def split_thd_for_cp(
    batch_tensors: Mapping[str, torch.Tensor],
    cu_seqlens: torch.Tensor,
    cp_size: int,
    cp_rank: int,
    dim: int = 0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Keep this CP rank's tokens of a packed THD micro-batch, as TE's CP attention expects.

    Args:
        batch_tensors: token-level tensors to split, each with the ``T`` tokens along
            ``dim`` (e.g. tokens, position_ids, labels, loss_mask). Per-segment entries
            (pair_index, is_chosen, ref_logps) and ``cu_seqlens`` must not be passed.
        cu_seqlens: int ``[S+1]`` global segment boundaries, lengths multiples of ``2*cp_size``.
        cp_size, cp_rank: context-parallel size and rank.
        dim: the token dimension (0 for ``[T]``, 1 for Megatron's ``[1, T]``).

    Returns:
        ``(local_tensors, local_cu_seqlens)``: each tensor reduced to ``T / cp_size`` tokens
        along ``dim`` (see :func:`thd_cp_partition_indices`), and ``cu_seqlens // cp_size``
        (int32), the boundaries of the local layout for :func:`segment_logprob_sums`.
    """
    num_tokens = int(cu_seqlens[-1])
    index = thd_cp_partition_indices(cu_seqlens, cp_size, cp_rank)
    local = {}
    for key, value in batch_tensors.items():
        if value.shape[dim] != num_tokens:
            raise ValueError(
                f"batch_tensors[{key!r}] has {value.shape[dim]} entries along dim {dim}, "
                f"but cu_seqlens[-1]={num_tokens}; pass only token-level tensors"
            )
        local[key] = value.index_select(dim, index.to(value.device))
    return local, (cu_seqlens // cp_size).to(torch.int32)
