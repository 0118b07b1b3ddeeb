"""fused_vocab_parallel_logprobs on a GPU (bf16 with the fp32-output matmul; never run yet)."""

from __future__ import annotations

import pytest
import torch

from adadpo_megatron.fused_logprobs import fused_vocab_parallel_logprobs
from adadpo_megatron.logprobs import vocab_parallel_logprobs

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_matches_chunked_and_float64(dtype):
    gen = torch.Generator().manual_seed(0)
    tokens, vocab, hidden_size = 1031, 5003, 256  # odd: ragged tiles
    hidden = torch.randn(tokens, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5 * 3
    targets = torch.randint(0, vocab, (tokens,), generator=gen).cuda()
    weights = torch.randn(tokens, generator=gen).cuda()
    h = hidden.to("cuda", dtype).requires_grad_()
    w = weight.to("cuda", dtype).requires_grad_()
    fused = fused_vocab_parallel_logprobs(h, w, targets, None, 256, 1024)
    g_h, g_w = torch.autograd.grad((fused * weights).sum(), [h, w])
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.T, -1).gather(-1, targets[:, None]).squeeze(-1)
    r_h, r_w = torch.autograd.grad((ref * weights.double()).sum(), [h64, w64])
    atol = 1e-4 if dtype == torch.float32 else 0.1  # bf16 logits tile: 2^-8 of ~|10|
    torch.testing.assert_close(fused.double(), ref, rtol=0, atol=atol)
    gtol = 1e-4 if dtype == torch.float32 else 2**-5  # relative to the largest entry
    for got, want in ((g_h, r_h), (g_w, r_w)):
        assert got.dtype == dtype
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=gtol)
    chunked = vocab_parallel_logprobs(h @ w.T, targets)
    torch.testing.assert_close(fused, chunked, rtol=0, atol=atol)
