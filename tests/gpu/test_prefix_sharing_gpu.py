"""Prefix-sharing attention on a GPU: FlexAttention (compiled) and Transformer Engine's THD
formulation against the mask path, log-probs and every gradient, on a tiny GPTModel.

Not run yet: no GPU was available to this project. On the CPU these tests are skipped
(FlexAttention's CPU forward and the TE formulation's arithmetic are checked in
tests/unit/test_prefix_attention.py).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_prefix_attention import MODEL, _pack_spec, shared_batch  # noqa: E402

pytestmark = pytest.mark.gpu

# fp32 on the GPU: FlexAttention and TE accumulate in another order than the mask path;
# TE's fused kernels may run TF32 matmuls, hence the looser TE bound.
FLEX_TOL, TE_TOL = 1e-4, 2e-3


@pytest.fixture(scope="module")
def parallel_state():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29519")
    torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield ps
    ps.destroy_model_parallel()


def _model(impl: str, use_te: bool):
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    torch.manual_seed(3)
    config = build_transformer_config(**MODEL, position_embedding_type="rope")
    config.adadpo_gpt_options = dataclasses.replace(
        config.adadpo_gpt_options, prefix_attention=impl)
    return build_gpt_model(config, 128, 1024, use_te=use_te).cuda()


def _logps_and_grads(model, batch, impl):
    from adadpo_megatron.logprobs import segment_logprob_sums
    from adadpo_megatron.step.batch import prepare_model_inputs

    inputs = prepare_model_inputs(batch, device="cuda", use_thd=False, shared_attention=impl)
    logits = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=None)
    logp = F.log_softmax(logits[0].float(), -1).gather(-1, inputs.labels[0, :, None])[:, 0]
    sums, _ = segment_logprob_sums(logp, inputs.loss_mask[0], inputs.cu_seqlens.cuda())
    model.zero_grad()
    (sums[0::2] - sums[1::2]).sigmoid().log().sum().backward()
    return sums.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _compare(impl: str, use_te: bool, tol: float) -> None:
    # Same layer spec (TE's or local) on both sides, same weights: only the core attention
    # differs (the mask implementation wraps megatron-core's local attention in either spec).
    batch = shared_batch(_pack_spec(16, seed=12), seg_multiple=2)
    ref, model = _model("mask", use_te=use_te), _model(impl, use_te=use_te)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    want, want_g = _logps_and_grads(ref, batch, "mask")
    got, got_g = _logps_and_grads(model, batch, impl)
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()
    for name, g in want_g.items():
        err = (got_g[name] - g).abs().max() / g.abs().max().clamp(min=1e-8)
        assert err <= tol, (name, float(err))


def test_flex_attention_matches_the_mask_path(parallel_state):
    _compare("flex", use_te=False, tol=FLEX_TOL)


def test_te_thd_attention_matches_the_mask_path(parallel_state):
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any broken install means "no TE here"
        pytest.skip(f"Transformer Engine not usable: {exc!r}")
    _compare("te", use_te=True, tol=TE_TOL)
