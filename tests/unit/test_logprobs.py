"""adadpo_megatron.logprobs against plain references (single process, no TP/CP)."""

import pytest
import torch

from adadpo_megatron.logprobs import (
    segment_logprob_sums,
    split_thd_for_cp,
    thd_cp_partition_indices,
    vocab_parallel_logprobs,
)


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def make(shape, vocab, dtype=torch.float64, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=gen)
    return logits.requires_grad_(), targets


# T=37 is prime: every chunk size below except 4096 leaves a ragged last chunk.
@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 4096])
def test_matches_naive_float64_values_and_grads(chunk):
    logits, targets = make((37,), 50)
    ours = vocab_parallel_logprobs(logits, targets, chunk_tokens=chunk)
    ref = naive_logprobs(logits, targets)
    assert ours.dtype == torch.float64
    # fp64 on both sides: agreement to a few ulps of the log-prob magnitude.
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    weights = torch.randn(37, dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    logits, targets = make((11,), 13)
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprobs(x, targets, chunk_tokens=4), (logits,)
    )


def test_float32_matches_naive_and_is_stable_for_large_logits():
    logits64, targets = make((29,), 64, scale=200.0)  # |logits| ~ 600: exp() would overflow
    logits = logits64.detach().float().requires_grad_()
    ours = vocab_parallel_logprobs(logits, targets, chunk_tokens=6)
    exact = logits.detach().double().requires_grad_()  # fp64 reference on the same values
    ref = naive_logprobs(exact, targets)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    # fp32 rounding of (logit - max) ~ 600 * 2^-24 ~ 4e-5 absolute.
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-4)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), exact)
    # softmax = exp(x - lse): the same 4e-5 absolute error in the exponent, made relative.
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_sbv_shape_noncontiguous_and_no_in_place():
    base, targets_bs = make((4, 3), 20, dtype=torch.float32)
    logits = base.detach().transpose(0, 1).contiguous().transpose(0, 1)  # [S, B, V], strided
    assert not logits.is_contiguous()
    logits.requires_grad_()
    before, version = logits.detach().clone(), logits._version
    ours = vocab_parallel_logprobs(logits, targets_bs, chunk_tokens=5)
    assert ours.shape == (4, 3)
    weights = torch.randn(4, 3)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    assert logits._version == version and torch.equal(logits.detach(), before)
    ref_logits = before.double().requires_grad_()
    ref = naive_logprobs(ref_logits, targets_bs)
    (g_ref,) = torch.autograd.grad((ref * weights.double()).sum(), ref_logits)
    # fp32 vs fp64 reference, logits ~3: round-off ~1e-6.
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-5, atol=1e-6)


def test_bf16_input_gives_fp32_logprobs_and_bf16_grad():
    logits64, targets = make((33,), 40)
    logits = logits64.detach().bfloat16().requires_grad_()
    before = logits.detach().clone()
    ours = vocab_parallel_logprobs(logits, targets, chunk_tokens=8)
    assert ours.dtype == torch.float32
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    assert grad.dtype == torch.bfloat16 and torch.equal(logits.detach(), before)
    # Reference on the exact bf16 values in fp64: ours computes in fp32 internally.
    exact = logits.detach().double().requires_grad_()
    ref = naive_logprobs(exact, targets)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    (g_ref,) = torch.autograd.grad(ref.sum(), exact)
    # The gradient is rounded to bf16 (8 mantissa bits): relative 2^-8 plus a floor.
    torch.testing.assert_close(grad.double(), g_ref, rtol=2**-7, atol=1e-3)


def test_no_grad_and_empty_and_errors():
    logits, targets = make((6,), 9)
    with torch.no_grad():
        out = vocab_parallel_logprobs(logits, targets)
    assert not out.requires_grad
    torch.testing.assert_close(out, naive_logprobs(logits.detach(), targets))
    empty = vocab_parallel_logprobs(torch.zeros(0, 9), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="leading shape"):
        vocab_parallel_logprobs(logits, targets[:5])
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_logprobs(logits, targets.float())
    with pytest.raises(ValueError, match="chunk_tokens"):
        vocab_parallel_logprobs(logits, targets, chunk_tokens=0)


def loop_segment_sums(token_logps, loss_mask, cu_seqlens):
    sums, counts = [], []
    for s in range(len(cu_seqlens) - 1):
        lo, hi = int(cu_seqlens[s]), int(cu_seqlens[s + 1])
        sums.append((token_logps[lo:hi] * loss_mask[lo:hi]).sum())
        counts.append(loss_mask[lo:hi].sum())
    return torch.stack(sums), torch.stack(counts)


@pytest.mark.parametrize("lengths", [[5, 3, 4, 4], [1, 1, 7, 1, 2, 1], [1]])
def test_segment_sums_match_python_loop(lengths):
    gen = torch.Generator().manual_seed(len(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    num_tokens = int(cu[-1])
    token_logps = (-torch.rand(num_tokens, generator=gen, dtype=torch.float64)).requires_grad_()
    loss_mask = (torch.rand(num_tokens, generator=gen) > 0.3).double()
    loss_mask[-1] = 1.0  # the single-token case must count its one token
    sums, counts = segment_logprob_sums(token_logps, loss_mask, cu)
    ref_sums, ref_counts = loop_segment_sums(token_logps, loss_mask, cu)
    torch.testing.assert_close(sums, ref_sums, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(counts, ref_counts)
    weights = torch.randn(len(lengths), generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((sums * weights).sum(), token_logps)
    (g_ref,) = torch.autograd.grad((ref_sums * weights).sum(), token_logps)
    torch.testing.assert_close(g, g_ref)


def test_segment_sums_ignore_masked_nonfinite_and_check_layout():
    token_logps = torch.tensor([-1.0, float("-inf"), -2.0, float("nan")])
    loss_mask = torch.tensor([True, False, True, False])
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    sums, counts = segment_logprob_sums(token_logps, loss_mask, cu)
    assert sums.tolist() == [-1.0, -2.0] and counts.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\]=6"):
        segment_logprob_sums(token_logps, loss_mask, torch.tensor([0, 2, 6], dtype=torch.int32))


def test_cp_partition_worked_example_and_permutation():
    cu = torch.tensor([0, 8, 12], dtype=torch.int32)
    assert thd_cp_partition_indices(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert thd_cp_partition_indices(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    cu = torch.tensor([0, 12, 24, 60], dtype=torch.int32)
    parts = [thd_cp_partition_indices(cu, 3, r) for r in range(3)]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(60))
    # Rank 1 of 3, segment [24, 60): chunks of 6, takes chunk 1 then chunk 4.
    assert parts[1][8:20].tolist() == [*range(30, 36), *range(48, 54)]
    assert torch.equal(thd_cp_partition_indices(cu, 1, 0), torch.arange(60))


def test_split_thd_for_cp_splits_token_tensors_and_cu_seqlens():
    cu = torch.tensor([0, 8, 12], dtype=torch.int32)
    batch = {"tokens": torch.arange(100, 112), "loss_mask": torch.ones(1, 12)}
    local, local_cu = split_thd_for_cp({"tokens": batch["tokens"]}, cu, 2, 1)
    assert local["tokens"].tolist() == [102, 103, 104, 105, 109, 110]
    assert local_cu.tolist() == [0, 4, 6] and local_cu.dtype == torch.int32
    local, _ = split_thd_for_cp({"loss_mask": batch["loss_mask"]}, cu, 2, 0, dim=1)
    assert local["loss_mask"].shape == (1, 6)
    with pytest.raises(ValueError, match="segment 1 has 6 tokens"):
        split_thd_for_cp(batch, torch.tensor([0, 8, 14], dtype=torch.int32), 2, 0)
    with pytest.raises(ValueError, match="token-level"):
        split_thd_for_cp({"pair_index": torch.arange(2)}, cu, 2, 0)


def test_saves_only_a_reference_to_the_logits_and_per_token_vectors():
    logits, targets = make((64,), 300, dtype=torch.bfloat16)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        vocab_parallel_logprobs(logits, targets, chunk_tokens=16)
    big = [t for t in saved if t.numel() >= 64 * 300]
    # The one [T, V] tensor kept for backward is the input itself, not an fp32 copy.
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()
    assert big[0].dtype == torch.bfloat16
    assert all(t.numel() <= 64 for t in saved if t is not big[0])
