"""FP8 through Transformer Engine on a real GPU: a tiny GPTModel's FP8 forward agrees with
its bf16 forward, and an online reference never touches the policy's amax history."""

from __future__ import annotations

import os

import pytest
import torch

from adadpo_megatron.step.fp8 import (
    FP8Settings,
    amax_histories,
    reference_config_kwargs,
    require_transformer_engine,
    transformer_config_kwargs,
)

pytestmark = pytest.mark.gpu

VOCAB, SEQ = 256, 64  # SEQ is a multiple of 16, as FP8 GEMMs need


def _te_or_skip() -> None:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any broken install means "no TE here"
        pytest.skip(f"Transformer Engine not usable: {exc!r}")


@pytest.fixture(scope="module")
def parallel_state():
    _te_or_skip()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.cuda.set_device(0)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield ps
    ps.destroy_model_parallel()


def _model(fp8_kwargs: dict):
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    config = build_transformer_config(
        num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=256, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
        position_embedding_type="rope", untie_embeddings=True, bf16=True, **fp8_kwargs,
    )
    return build_gpt_model(config, VOCAB, SEQ, use_te=True).cuda()


def _forward(model, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (1, SEQ), device="cuda", generator=gen)
    positions = torch.arange(SEQ, device="cuda").unsqueeze(0)
    return model(tokens, positions, None).float()


def test_fp8_forward_matches_bf16(parallel_state) -> None:
    settings = FP8Settings(format="hybrid", amax_history_len=16, amax_compute_algo="max")
    assert require_transformer_engine(settings) is not None
    fp8_model = _model(transformer_config_kwargs(settings))
    bf16_model = _model(transformer_config_kwargs(FP8Settings()))
    bf16_model.load_state_dict(fp8_model.state_dict(), strict=False)
    with torch.no_grad():
        for _ in range(3):  # delayed scaling needs a few steps of amax history
            fp8_logits = _forward(fp8_model, 0)
        bf16_logits = _forward(bf16_model, 0)
    assert amax_histories(fp8_model), "no TE module ran in FP8"
    assert torch.isfinite(fp8_logits).all()
    # FP8 (3 mantissa bits) vs bf16 through two layers: a few percent relative error.
    rel = (fp8_logits - bf16_logits).norm() / bf16_logits.norm()
    assert rel < 0.1, f"FP8 logits differ from bf16 by {rel:.3f} (relative L2)"


def test_reference_keeps_its_own_fp8_state(parallel_state) -> None:
    settings = FP8Settings(format="hybrid", amax_history_len=8, amax_compute_algo="max")
    policy = _model(transformer_config_kwargs(settings))
    reference = _model(reference_config_kwargs(settings))
    reference.load_state_dict(policy.state_dict())
    reference.requires_grad_(False)
    logits = _forward(policy, 0)
    logits.sum().backward()
    before = amax_histories(policy)
    assert before
    with torch.no_grad():
        _forward(reference, 1)  # TE allocates a module's FP8 state on its first FP8 forward
        ref_start = amax_histories(reference)
        _forward(reference, 2)
        _forward(reference, 3)
    after = amax_histories(policy)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    ref_end = amax_histories(reference)
    assert any(not torch.equal(ref_start[k], ref_end[k]) for k in ref_end if k in ref_start), (
        "the reference's own FP8 state did not advance: did it run in FP8?"
    )
