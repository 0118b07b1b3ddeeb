"""The planner for model families and MoE: parameter counts equal real GPTModels (q/k/v
bias, q/k norm, own head size, routed and shared experts), active parameters and FLOPs
with top-k, expert optimizer state under EP, the Qwen presets' published sizes, and the
layout checks. Per-rank counts under EP/PP/expert-TP are checked against real ranks in
tests/distributed/moe_worker.py."""

from __future__ import annotations

import dataclasses

import pytest

from adadpo_megatron.planner import moe
from adadpo_megatron.planner.cli import plan_from_argv
from adadpo_megatron.planner.estimate import (
    PRESETS,
    Layout,
    ModelShape,
    check_layout,
    flops_per_step,
    memory_per_gpu,
    params_total,
)

SHAPES = {
    "qwen2_bias": ModelShape(num_layers=2, hidden_size=64, ffn_hidden_size=96,
                             num_attention_heads=8, num_query_groups=2, vocab_size=300,
                             add_qkv_bias=True),
    "qwen3_qknorm_kv16": ModelShape(num_layers=2, hidden_size=64, ffn_hidden_size=96,
                                    num_attention_heads=8, num_query_groups=2, vocab_size=300,
                                    kv_channels=16, qk_layernorm=True),
    "moe_top2": ModelShape(num_layers=2, hidden_size=32, ffn_hidden_size=48,
                           num_attention_heads=4, num_query_groups=2, vocab_size=128,
                           qk_layernorm=True, num_experts=4, moe_router_topk=2,
                           moe_ffn_hidden_size=24),
    "moe_shared_gelu": ModelShape(num_layers=2, hidden_size=32, ffn_hidden_size=48,
                                  num_attention_heads=4, num_query_groups=4, vocab_size=128,
                                  swiglu=False, num_experts=8, moe_router_topk=2,
                                  moe_ffn_hidden_size=16,
                                  moe_shared_expert_intermediate_size=40),
}


@pytest.fixture(scope="module")
def cpu_megatron():
    from megatron.core import parallel_state

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=1, pp=1)
    yield
    parallel_state.destroy_model_parallel()


def _build(shape: ModelShape):
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    extra = {}
    if shape.num_experts:
        extra = dict(num_moe_experts=shape.num_experts, moe_router_topk=shape.moe_router_topk,
                     moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
                     moe_shared_expert_intermediate_size=shape.moe_shared_expert_intermediate_size)
    config = build_transformer_config(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups, kv_channels=shape.kv_channels,
        normalization=shape.normalization, swiglu=shape.swiglu,
        add_bias_linear=shape.add_bias_linear, position_embedding_type="rope",
        untie_embeddings=shape.untie_embeddings, add_qkv_bias=shape.add_qkv_bias,
        qk_layernorm=shape.qk_layernorm, **extra)
    return build_gpt_model(config, shape.padded_vocab(1), 64, use_te=False)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_params_total_and_active_equal_gpt_model(cpu_megatron, name: str) -> None:
    shape = SHAPES[name]
    model = _build(shape)
    total = sum(p.numel() for p in model.parameters())
    assert params_total(shape, tp=1) == total
    if shape.num_experts:
        one_expert = sum(p.numel() for n, p in model.named_parameters()
                         if ".local_experts.0." in n and "layers.0." in n)
        unused = shape.num_layers * (shape.num_experts - shape.moe_router_topk) * one_expert
        assert moe.inactive_params(shape) == unused
        result = plan_from_argv(_flags(shape) + ["--num-gpus", "1"])
        assert result["params_active"] == total - unused


def _flags(shape: ModelShape) -> list[str]:
    flags = ["--num-layers", str(shape.num_layers), "--hidden-size", str(shape.hidden_size),
             "--ffn-hidden-size", str(shape.ffn_hidden_size),
             "--num-attention-heads", str(shape.num_attention_heads), "--group-query-attention",
             "--num-query-groups", str(shape.num_query_groups), "--vocab-size",
             str(shape.vocab_size), "--normalization", "RMSNorm", "--disable-bias-linear",
             "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
             "--seq-length", "64"]
    flags += ["--swiglu"] if shape.swiglu else []
    flags += ["--qk-layernorm"] if shape.qk_layernorm else []
    if shape.num_experts:
        flags += ["--num-experts", str(shape.num_experts), "--moe-router-topk",
                  str(shape.moe_router_topk), "--moe-ffn-hidden-size",
                  str(shape.moe_ffn_hidden_size)]
    if shape.moe_shared_expert_intermediate_size:
        flags += ["--moe-shared-expert-intermediate-size",
                  str(shape.moe_shared_expert_intermediate_size)]
    return flags


def test_qwen_presets_published_sizes() -> None:
    # Qwen2.5-72B: 72.7 B parameters; Qwen3-30B-A3B: 30.5 B total, 3.3 B activated.
    assert params_total(PRESETS["qwen2.5-72b"], tp=1) == pytest.approx(72.7e9, abs=0.05e9)
    q3 = PRESETS["qwen3-30b-a3b"]
    assert params_total(q3, tp=1) == pytest.approx(30.53e9, abs=0.01e9)
    assert params_total(q3, tp=1) - moe.inactive_params(q3) == pytest.approx(3.35e9, abs=0.01e9)


def test_flops_count_k_experts_and_ep_shards_expert_state() -> None:
    shape = SHAPES["moe_top2"]
    lay = Layout(world_size=4, seq_length=64, global_batch_size=4, ep=2)
    dense_k = dataclasses.replace(shape, num_experts=None, ffn_hidden_size=2 * 24)
    # top-2 of 24-wide experts = one 48-wide dense MLP, plus the router's E*h GEMM.
    got = flops_per_step(shape, lay, 32)["model"]
    want = flops_per_step(dense_k, lay, 32)["model"]
    router = 3 * 2 * lay.global_batch_size * lay.seq_length * shape.num_layers * 4 * 32
    assert got == want + router
    one = memory_per_gpu(shape, Layout(world_size=4, ep=1, seq_length=64,
                                       global_batch_size=4), 0)
    two = memory_per_gpu(shape, lay, 0)
    per_expert = 32 * 2 * 24 + 24 * 32  # SwiGLU fc1 [2F_e, h] + fc2 [h, F_e]
    assert moe.expert_params(shape) == per_expert
    # EP=2: 2 of the 4 experts of each of the 2 layers leave this GPU (bf16 weights).
    assert one["weights"] - two["weights"] == 2 * 2 * per_expert * 2
    # Distributed optimizer: dense state over DP=4, expert state over expert DP = 4/EP = 2.
    dist = dataclasses.replace(lay, distributed_optimizer=True)
    local_experts = 2 * 2 * per_expert
    dense = params_total(shape) - 2 * 4 * per_expert  # everything but the 8 experts
    assert memory_per_gpu(shape, dist, 0)["optimizer"] == pytest.approx(
        (dense / 4 + local_experts / 2) * 12)


@pytest.mark.parametrize(("change", "flag"), [
    (dict(ep=3), "--expert-model-parallel-size 3"),
    (dict(ep=4, world_size=2), "EP 4 x expert TP 1 must divide"),
    (dict(tp=2, world_size=4), "--sequence-parallel"),
])
def test_moe_layout_errors_name_the_flag(change: dict, flag: str) -> None:
    lay = dataclasses.replace(Layout(world_size=4, seq_length=64, global_batch_size=4), **change)
    errors = check_layout(SHAPES["moe_top2"], lay)
    assert any(flag in e for e in errors), errors
