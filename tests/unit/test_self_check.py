"""The start-up self-check (step/self_check.py) passes on the CPU paths and refuses wrong ones.

Each refusal is provoked by a deliberately wrong path: an attention that drops the mask,
Flex with the old layer-scaled softmax scale, megatron-core's own attention under an
emulation of the fused causal softmax kernel (which ignores the mask it is handed), and
fused log-probs that lose a vocabulary block.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adadpo_megatron.step import self_check
from adadpo_megatron.step.self_check import SelfCheckError, check_paths

MODEL = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=48, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
             untie_embeddings=True, position_embedding_type="rope")


@pytest.fixture(scope="module")
def megatron_cpu():
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=1, pp=1, seed=5)


def _model(impl: str | None, *, bf16: bool = False, **overrides):
    from adadpo_megatron.step.cpu import seed_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    seed_cpu(3)
    config = build_transformer_config(**{**MODEL, **overrides}, bf16=bf16)
    config.adadpo_gpt_options = dataclasses.replace(config.adadpo_gpt_options,
                                                    prefix_attention=impl)
    model = build_gpt_model(config, 128, 256, use_te=False)
    return model.bfloat16() if bf16 else model


@pytest.mark.parametrize("impl", ["mask", None, "flex"])
@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_paths_pass(megatron_cpu, impl, bf16):
    model = _model(impl, bf16=bf16, apply_query_key_layer_scaling=True)
    out = check_paths([model], use_thd=False, logprob_impl="fused")
    # Its cost is measured by benchmarks/bench_self_check.py, never asserted here.
    assert out["seconds"] > 0


def test_attention_that_drops_the_mask_is_refused(megatron_cpu, monkeypatch):
    from adadpo_megatron.step.attention import MaskSharedAttention

    model = _model("mask")
    original = MaskSharedAttention.forward

    def causal_only(self, query, key, value, attention_mask, **kwargs):
        return original(self, query, key, value, None, **kwargs)  # the mask dropped

    monkeypatch.setattr(MaskSharedAttention, "forward", causal_only)
    with pytest.raises(SelfCheckError) as info:
        check_paths([model], use_thd=False, logprob_impl="chunked")
    message = str(info.value)
    assert "\n" not in message and "MaskSharedAttention" in message
    assert "--prefix-attention" in message and "output differs" in message


def test_flex_with_the_layer_scaled_softmax_scale_is_refused(megatron_cpu, monkeypatch):
    from adadpo_megatron.step import attention

    def old_scale(config, softmax_scale, layer_number):  # before the fix
        return config.kv_channels ** -0.5 / max(1, layer_number)

    monkeypatch.setattr(attention, "_softmax_scale", old_scale)
    model = _model("flex", apply_query_key_layer_scaling=True)
    with pytest.raises(SelfCheckError, match=r"FlexSharedAttention \(layer 3"):
        check_paths([model], use_thd=False, logprob_impl="chunked")


def _emulate_fused_softmax_kernels(monkeypatch):
    """The CUDA kernels' semantics on the CPU (megatron/core/fusions/fused_softmax.py)."""
    from megatron.core.fusions import fused_softmax as fs

    def causal(x, scale):  # ScaledUpperTriangMaskedSoftmax: causal, any mask ignored
        sq, sk = x.shape[-2:]
        upper = torch.ones(sq, sk, dtype=torch.bool).triu(1)
        return (x.float() * scale).masked_fill(upper, float("-inf")).softmax(-1).to(x.dtype)

    def masked(x, mask, scale):  # ScaledMaskedSoftmax
        return (x.float() * scale).masked_fill(mask, -10000.0).softmax(-1).to(x.dtype)

    monkeypatch.setattr(fs.FusedScaleMaskSoftmax, "is_kernel_available",
                        lambda self, mask, *shape: bool(self.scaled_masked_softmax_fusion
                                                        and self.input_in_float16))
    monkeypatch.setattr(fs, "ScaledUpperTriangMaskedSoftmax", type("K", (), {
        "apply": staticmethod(lambda x, scale: causal(x.view(-1, *x.shape[-2:]), scale))}))
    monkeypatch.setattr(fs, "ScaledMaskedSoftmax", type("K", (), {"apply": staticmethod(masked)}))


@pytest.mark.parametrize("impl", ["mask", None])
def test_masked_softmax_fusion_is_routed_around(megatron_cpu, monkeypatch, impl):
    """Under the fused kernels megatron-core's own attention (causal mask type) lets pairs
    see each other; the local spec's attention (padding mask type) does not."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    _emulate_fused_softmax_kernels(monkeypatch)
    model = _model(impl, bf16=True, masked_softmax_fusion=True)
    check_paths([model], use_thd=False, logprob_impl="chunked")
    # megatron-core's own local attention, as the spec had it before: refused.
    for layer in model.decoder.layers:
        attn = layer.self_attention.core_attention
        layer.self_attention.core_attention = DotProductAttention(
            attn.config, attn.layer_number, gpt_layer_specs.AttnMaskType.causal, "self")
    with pytest.raises(SelfCheckError, match="DotProductAttention .*output differs"):
        check_paths([model], use_thd=False, logprob_impl="chunked")


def test_fused_logprobs_that_lose_a_vocab_block_are_refused(megatron_cpu, monkeypatch):
    from adadpo_megatron import fused_logprobs

    original = fused_logprobs.fused_vocab_parallel_logprobs

    def broken(hidden, weight, targets, tp_group=None, chunk_tokens=1024, chunk_vocab=8192):
        return original(hidden, weight[:-chunk_vocab], targets, tp_group, chunk_tokens,
                        chunk_vocab)

    monkeypatch.setattr(fused_logprobs, "fused_vocab_parallel_logprobs", broken)
    with pytest.raises(SelfCheckError, match="fused log-probs .* --logprob-impl chunked"):
        check_paths([_model(None)], use_thd=False, logprob_impl="fused")
    check_paths([_model(None)], use_thd=False, logprob_impl="chunked")  # not probed


def test_probe_pack_is_prefix_shared_or_plain():
    cu, shared = self_check.probe_pack(True)
    assert cu.tolist() == [0, 13, 22, 30, 41, 55, 64] and shared.tolist() == [0, 4, 0, 0, 0, 6]
    assert self_check.probe_pack(False)[1] is None
