"""TP=2 and CP=2 reductions of adadpo_megatron.logprobs and .fused_logprobs vs one process (gloo, CPU).

One torchrun launch (2 ranks) runs every case; pytest only launches it and checks the
exit code. Run by hand: ``torchrun --nproc_per_node=2 tests/distributed/test_logprobs_distributed.py``.
(CP attention itself needs Transformer Engine on a GPU; here only the log-prob reduction
of tokens split across a CP group is tested, which is all this module does under CP.)
"""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrun_launch import run_torchrun

# Single-process reference: plain log_softmax + gather in fp64 on the same values. Ours
# runs in fp32; logits ~4-12 in magnitude give round-off ~1e-6 absolute, well inside the
# tolerance below (the issue allows 1e-5 relative).
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _full_reference(logits, targets, weights):
    """Single-process log-probs and the gradient of sum(weights * logps) w.r.t. logits."""
    full = logits.detach().double().requires_grad_()
    logps = F.log_softmax(full, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (grad,) = torch.autograd.grad((logps * weights.double()).sum(), full)
    return logps.detach(), grad


def check_tp(rank, group, shape, vocab, chunk, dtype=torch.float32, group_arg="explicit"):
    from adadpo_megatron.logprobs import vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(1234)  # same full tensors on every rank
    logits = (torch.randn(*shape, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    weights = torch.randn(shape, generator=gen)
    ref_logps, ref_grad = _full_reference(logits, targets, weights)
    per_rank = vocab // 2
    shard = logits[..., rank * per_rank : (rank + 1) * per_rank].clone().requires_grad_()
    tp_group = group if group_arg == "explicit" else None
    logps = vocab_parallel_logprobs(shard, targets, tp_group=tp_group, chunk_tokens=chunk)
    (grad,) = torch.autograd.grad((logps * weights).sum(), shard)
    assert grad.dtype == dtype
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), ref_logps, **TOL)
    ref_shard = ref_grad[..., rank * per_rank : (rank + 1) * per_rank]
    # A bf16 gradient carries bf16 rounding (2^-8 relative) on top.
    tol = TOL if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-5}
    torch.testing.assert_close(grad.double(), ref_shard, **tol)


def _pair_loss(sums, counts):
    """A nonlinear loss of the per-segment sums, like the preference losses."""
    chosen, rejected = sums[0::2], sums[1::2]
    return -F.logsigmoid(0.3 * (chosen - rejected)).sum() + 0.05 * (sums / counts).sum()


def check_cp(rank, group):
    from adadpo_megatron.logprobs import (
        segment_logprob_sums,
        split_thd_for_cp,
        vocab_parallel_logprobs,
    )

    gen = torch.Generator().manual_seed(99)
    cu = torch.tensor([0, 8, 12, 24, 28, 32, 44], dtype=torch.int32)  # multiples of 2*CP
    num_tokens, vocab = int(cu[-1]), 24
    logits = torch.randn(num_tokens, vocab, generator=gen) * 3
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    loss_mask = (torch.rand(num_tokens, generator=gen) > 0.4).float()
    loss_mask[28] = 1.0  # every segment keeps at least one completion token
    loss_mask[12:24] = 0.0
    loss_mask[23] = 1.0  # a single-token completion, falling on one rank only

    full = logits.double().requires_grad_()  # fp64 single-process reference
    ref_sums, ref_counts = segment_logprob_sums(
        vocab_parallel_logprobs(full, labels), loss_mask, cu
    )
    (ref_grad,) = torch.autograd.grad(_pair_loss(ref_sums, ref_counts), full)

    local, local_cu = split_thd_for_cp(
        {"logits": logits, "labels": labels, "loss_mask": loss_mask, "index": torch.arange(44)},
        cu,
        cp_size=2,
        cp_rank=rank,
    )
    mine = local["logits"].clone().requires_grad_()
    token_logps = vocab_parallel_logprobs(mine, local["labels"], chunk_tokens=5)
    sums, counts = segment_logprob_sums(token_logps, local["loss_mask"], local_cu, cp_group=group)
    torch.testing.assert_close(sums.double(), ref_sums, **TOL)
    torch.testing.assert_close(counts.double(), ref_counts)
    (grad,) = torch.autograd.grad(_pair_loss(sums, counts), mine)
    torch.testing.assert_close(grad.double(), ref_grad[local["index"]], **TOL)


def check_megatron_default_groups(rank):
    """tp_group=None / cp_group=None read megatron-core's groups once initialised."""
    from megatron.core import parallel_state

    from adadpo_megatron.logprobs import segment_logprob_sums

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        check_tp(rank, None, (13,), 10, chunk=4, group_arg="megatron")
        # CP size is 1 here: no CP reduction, each rank keeps its own sums.
        sums, _ = segment_logprob_sums(
            torch.full((4,), float(rank + 1)), torch.ones(4), torch.tensor([0, 4])
        )
        assert sums.tolist() == [4.0 * (rank + 1)]
    finally:
        parallel_state.destroy_model_parallel()


def check_fused_tp(rank, group, tokens, vocab, hidden_size, chunks, dtype=torch.float32):
    """Fused output layer + log-probs on a vocabulary shard vs one process (and vs chunked)."""
    from adadpo_megatron.fused_logprobs import fused_vocab_parallel_logprobs
    from adadpo_megatron.logprobs import vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(4321)  # same full tensors on every rank
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.6).to(dtype)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    weights = torch.randn(tokens, generator=gen)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = F.log_softmax(h64 @ w64.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    ref_h, ref_w = torch.autograd.grad((ref * weights.double()).sum(), [h64, w64])
    per_rank = vocab // 2
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    outs = {}
    for impl in ("fused", "chunked"):
        h = hidden.clone().requires_grad_()
        w = weight[rows].clone().requires_grad_()
        if impl == "fused":
            logps = fused_vocab_parallel_logprobs(h, w, targets, group, *chunks)
        else:
            logps = vocab_parallel_logprobs(h @ w.T, targets, group, chunk_tokens=chunks[0])
        g_h, g_w = torch.autograd.grad((logps * weights).sum(), [h, w])
        dist.all_reduce(g_h, group=group)  # each rank's part of the hidden gradient
        outs[impl] = (logps.detach(), g_h, g_w)
    tol = TOL if dtype == torch.float32 else {"rtol": 0, "atol": 0.05}
    torch.testing.assert_close(outs["fused"][0].double(), ref.detach(), **tol)
    for got, want in zip(outs["fused"][1:], (ref_h, ref_w[rows]), strict=True):
        assert got.dtype == dtype
        scale = want.abs().max()
        gtol = {"rtol": 0, "atol": 1e-5 if dtype == torch.float32 else 2**-5}
        torch.testing.assert_close(got.double() / scale, want / scale, **gtol)
    if dtype == torch.float32:  # fused == chunked to fp32 round-off, values and gradients
        for got, want in zip(outs["fused"], outs["chunked"], strict=True):
            torch.testing.assert_close(got, want, **TOL)


def check_output_layer_mapping(rank, group):
    """output_layer_input under TP (no SP): the hidden gradient is all-reduced in backward."""
    from types import SimpleNamespace

    from adadpo_megatron.fused_logprobs import fused_vocab_parallel_logprobs, output_layer_input

    gen = torch.Generator().manual_seed(77)
    hidden = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64)  # [s, b, H]
    weight = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 20, (6, 2), generator=gen)
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.log_softmax(h64 @ w64.T, -1).gather(-1, targets[..., None]).squeeze(-1)
    ref_h, _ = torch.autograd.grad((ref * ref).sum(), [h64, w64])
    shard = weight[rank * 10 : (rank + 1) * 10]
    tp_layer = SimpleNamespace(tp_group=group, sequence_parallel=False, allreduce_dgrad=True)
    h = hidden.clone().requires_grad_()
    logps = fused_vocab_parallel_logprobs(output_layer_input(h, tp_layer), shard, targets, group)
    (g_h,) = torch.autograd.grad((logps * logps).sum(), h)
    torch.testing.assert_close(g_h, ref_h, rtol=1e-10, atol=1e-10)  # all-reduced in backward
    # As in GPTModel: the output is made batch-first, so the gradient arrives transposed
    # (non-contiguous); megatron-core's all-reduce would drop it without _ContiguousGrad.
    h = hidden.clone().requires_grad_()
    batch_first = output_layer_input(h, tp_layer).transpose(0, 1).contiguous()
    logps = fused_vocab_parallel_logprobs(batch_first, shard, targets.T, group).T
    (g_h,) = torch.autograd.grad((logps * logps).sum(), h)
    torch.testing.assert_close(g_h, ref_h, rtol=1e-10, atol=1e-10)
    # Sequence parallelism (gather_from_sequence_parallel_region) allocates on the current
    # CUDA device in megatron-core: it cannot run here and is not tested on CPU.


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2, "run with torchrun --nproc_per_node=2"
    torch.set_num_threads(1)
    group = dist.group.WORLD
    check_tp(rank, group, (37,), 64, chunk=8)  # ragged last chunk
    check_tp(rank, group, (5, 3), 40, chunk=4)  # [S, B, V/TP]
    check_tp(rank, group, (9,), 30, chunk=4096)  # one chunk
    check_tp(rank, group, (21,), 32, chunk=6, dtype=torch.bfloat16)
    check_fused_tp(rank, group, 37, 66, 12, (8, 7))  # odd T, V/TP=33 odd, ragged tiles
    check_fused_tp(rank, group, 9, 30, 5, (4096, 4096))  # one tile
    check_fused_tp(rank, group, 21, 34, 8, (6, 5), dtype=torch.bfloat16)
    check_output_layer_mapping(rank, group)
    check_cp(rank, group)
    check_megatron_default_groups(rank)
    dist.barrier()
    if rank == 0:
        print("logprobs distributed: all cases passed")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_tp2_and_cp2_match_single_process():
    proc = run_torchrun(2, __file__, timeout=300)
    assert "all cases passed" in proc.stdout


if __name__ == "__main__":
    main()
