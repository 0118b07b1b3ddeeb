"""adadpo_megatron.fused_logprobs against the chunked path and plain autograd (one process)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adadpo_megatron.fused_logprobs import fused_vocab_parallel_logprobs
from adadpo_megatron.logprobs import vocab_parallel_logprobs

# T=37 and V=51 are odd (prime / 3*17): every chunk pair below leaves ragged tiles.
T, V, H = 37, 51, 16


def make(dtype, seed=0, shape=(T,)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    targets = torch.randint(0, V, shape, generator=gen)
    weights = torch.randn(shape, generator=gen, dtype=torch.float64)
    return hidden.requires_grad_(), weight.requires_grad_(), targets, weights


def naive(hidden, weight, targets):
    logits = hidden @ weight.T
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def value_and_grads(logps, weights, hidden, weight):
    loss = (logps * weights.to(logps.dtype)).sum()
    return (logps.detach(), *torch.autograd.grad(loss, [hidden, weight]))


@pytest.mark.parametrize("chunks", [(1, 1), (5, 7), (8, 51), (36, 50), (4096, 4096)])
def test_float64_matches_naive_autograd(chunks):
    hidden, weight, targets, weights = make(torch.float64)
    ours = fused_vocab_parallel_logprobs(hidden, weight, targets, None, *chunks)
    assert ours.dtype == torch.float64
    got = value_and_grads(ours, weights, hidden, weight)
    ref = value_and_grads(naive(hidden, weight, targets), weights, hidden, weight)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64():
    hidden, weight, targets, _ = make(torch.float64)
    hidden, weight = hidden[:7].detach().requires_grad_(), weight[:9].detach().requires_grad_()
    targets = targets[:7] % 9

    def fn(h, w):
        return fused_vocab_parallel_logprobs(h, w, targets, None, 3, 4)

    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("chunks", [(5, 7), (1024, 8192)])
def test_float32_equals_chunked_path_to_round_off(chunks):
    hidden, weight, targets, weights = make(torch.float32, seed=1)
    fused = fused_vocab_parallel_logprobs(hidden, weight, targets, None, *chunks)
    got = value_and_grads(fused, weights, hidden, weight)
    chunked = vocab_parallel_logprobs(hidden @ weight.T, targets, chunk_tokens=5)
    ref = value_and_grads(chunked, weights, hidden, weight)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_matches_float64_reference_to_bf16_rounding():
    hidden, weight, targets, weights = make(torch.bfloat16, seed=2, shape=(5, 7))  # [S, B]
    fused = fused_vocab_parallel_logprobs(hidden, weight, targets, None, 4, 9)
    assert fused.dtype == torch.float32 and fused.shape == (5, 7)
    logps, g_h, g_w = value_and_grads(fused, weights, hidden, weight)
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = value_and_grads(naive(h64, w64, targets), weights, h64, w64)
    # The logits tile is rounded to bf16 (as the output layer rounds them): 2^-8 relative
    # of logits ~5 in size; the gradients carry bf16 rounding of the logits' gradient too.
    torch.testing.assert_close(logps.double(), ref[0], rtol=0, atol=0.1)
    for a, b in zip((g_h, g_w), ref[1:], strict=True):
        scale = b.abs().max()
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=0, atol=2**-5)
    chunked = vocab_parallel_logprobs(hidden @ weight.T, targets)
    torch.testing.assert_close(logps, chunked.detach(), rtol=0, atol=2e-2)


def test_frozen_weight_and_frozen_hidden():
    hidden, weight, targets, weights = make(torch.float64, seed=3)
    _, ref_h, ref_w = value_and_grads(
        fused_vocab_parallel_logprobs(hidden, weight, targets), weights, hidden, weight
    )
    frozen_w = weight.detach()
    out = fused_vocab_parallel_logprobs(hidden, frozen_w, targets, None, 5, 7)
    (g_h,) = torch.autograd.grad((out * weights).sum(), hidden)
    torch.testing.assert_close(g_h, ref_h, rtol=1e-12, atol=1e-12)
    out = fused_vocab_parallel_logprobs(hidden.detach(), weight, targets, None, 5, 7)
    (g_w,) = torch.autograd.grad((out * weights).sum(), weight)
    torch.testing.assert_close(g_w, ref_w, rtol=1e-12, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest element count of any tensor an op returns (factories included)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_materialises_the_logits():
    """Forward and backward never create a tensor as large as the [T, V] logits."""
    tokens, vocab, hidden_size = 64, 200, 8
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(tokens, hidden_size, generator=gen).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    with _LargestTensor() as mode:
        out = fused_vocab_parallel_logprobs(hidden, weight, targets, None, 16, 32)
        out.sum().backward()
    # Largest: the weight gradient [V, H] = 1,600 elements; a logits tile is 16 x 32 = 512.
    assert mode.largest <= vocab * hidden_size < tokens * vocab
    with _LargestTensor() as mode:  # the detector sees the chunked path's full logits
        vocab_parallel_logprobs(hidden @ weight.T, targets).sum().backward()
    assert mode.largest >= tokens * vocab


def test_empty_and_bad_inputs():
    hidden, weight, targets, _ = make(torch.float32)
    empty = fused_vocab_parallel_logprobs(hidden[:0], weight, targets[:0])
    assert empty.shape == (0,) and empty.requires_grad
    with pytest.raises(ValueError, match="leading shape"):
        fused_vocab_parallel_logprobs(hidden, weight, targets[:5])
    with pytest.raises(ValueError, match=r"\[V/TP, H\]"):
        fused_vocab_parallel_logprobs(hidden, weight[:, :3], targets)
    with pytest.raises(TypeError, match="share one float dtype"):
        fused_vocab_parallel_logprobs(hidden, weight.double(), targets)
    with pytest.raises(TypeError, match="integer vocabulary ids"):
        fused_vocab_parallel_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="chunk_tokens and chunk_vocab"):
        fused_vocab_parallel_logprobs(hidden, weight, targets, None, 0)
