"""The layout planner: exact parameter counts against real GPTModels built on CPU, the
published Llama 3 sizes, Korthikanti's activation formulas, pipeline in-flight counts,
layout checks and the command line."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from adadpo_megatron.planner.cli import main, plan_from_argv
from adadpo_megatron.planner.estimate import (
    PRESETS,
    Layout,
    ModelShape,
    activation_bytes,
    activation_bytes_per_layer,
    check_layout,
    in_flight_layer_microbatches,
    logits_bytes,
    memory_per_gpu,
    params_total,
    stage_params,
)

SHAPES = {
    "gqa_swiglu_rms_untied": ModelShape(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=8,
        num_query_groups=2, vocab_size=1000, untie_embeddings=True),
    "mha_gelu_layernorm_tied_bias": ModelShape(
        num_layers=3, hidden_size=48, ffn_hidden_size=192, num_attention_heads=4,
        num_query_groups=4, vocab_size=300, swiglu=False, normalization="LayerNorm",
        add_bias_linear=True, untie_embeddings=False),
    "gqa_swiglu_layernorm_bias_untied": ModelShape(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        num_query_groups=2, vocab_size=256, normalization="LayerNorm", add_bias_linear=True),
    "learned_pos_tied_rms": ModelShape(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=1, vocab_size=129, untie_embeddings=False,
        position_embedding_type="learned_absolute", max_position_embeddings=40),
}


@pytest.fixture(scope="module")
def cpu_megatron():
    from megatron.core import parallel_state

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=1, pp=1)
    yield
    parallel_state.destroy_model_parallel()


def _build(shape: ModelShape, num_layers: int, pre: bool = True, post: bool = True):
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    config = build_transformer_config(
        num_layers=num_layers, hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups, normalization=shape.normalization,
        swiglu=shape.swiglu, add_bias_linear=shape.add_bias_linear,
        position_embedding_type=shape.position_embedding_type,
        untie_embeddings=shape.untie_embeddings,
    )
    return build_gpt_model(config, shape.padded_vocab(1), max(shape.max_position_embeddings, 8),
                           pre_process=pre, post_process=post, use_te=False)


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_params_total_equals_gpt_model(cpu_megatron, name: str) -> None:
    shape = SHAPES[name]
    model = _build(shape, shape.num_layers)
    assert params_total(shape, tp=1) == _numel(model)
    assert sum(stage_params(shape, Layout(), 0).values()) == _numel(model)


@pytest.mark.parametrize("name", ["gqa_swiglu_rms_untied", "mha_gelu_layernorm_tied_bias"])
def test_stage_params_equal_gpt_model_stages(cpu_megatron, name: str) -> None:
    # A pipeline stage is a GPTModel with its share of layers and pre/post_process flags;
    # with tied embeddings the last stage allocates its own copy of the output weight.
    shape = dataclasses.replace(SHAPES[name], num_layers=6)
    pp = 3
    layout = Layout(pp=pp, world_size=pp)
    for rank in range(pp):
        stage = _build(shape, shape.num_layers // pp, pre=rank == 0, post=rank == pp - 1)
        assert sum(stage_params(shape, layout, rank).values()) == _numel(stage), rank


def test_llama3_published_sizes() -> None:
    # Meta: Llama 3 70B has 70.6B parameters, 8B has 8.03B (vocabulary 128256 = 128 * 1002).
    assert params_total(PRESETS["llama3-70b"]) == pytest.approx(70.6e9, abs=0.05e9)
    assert params_total(PRESETS["llama3-8b"]) == pytest.approx(8.03e9, abs=0.005e9)
    # TP=8 pads the vocabulary to a multiple of 1024: 129024 rows.
    assert PRESETS["llama3-70b"].padded_vocab(8) == 129024


def _gpt3_like(h: int = 1024, a: int = 16) -> ModelShape:
    return ModelShape(num_layers=4, hidden_size=h, ffn_hidden_size=4 * h, num_attention_heads=a,
                      num_query_groups=a, vocab_size=50257, swiglu=False)


@pytest.mark.parametrize("tp", [1, 2, 8])
def test_activations_reproduce_korthikanti(tp: int) -> None:
    # Korthikanti et al. 2022, Table 2 (flash attention drops the 5as^2 term), b = 1,
    # plus flash attention's fp32 log-sum-exp (4a bytes per token, sharded over TP).
    shape, s = _gpt3_like(), 2048
    h, a = shape.hidden_size, shape.num_attention_heads
    sp = Layout(tp=tp, world_size=tp, seq_length=s, sequence_parallel=tp > 1, dropout=True)
    assert activation_bytes_per_layer(shape, sp) == pytest.approx(s * (34 * h + 4 * a) / tp)
    no_sp = dataclasses.replace(sp, sequence_parallel=False)
    expected = s * (10 * h + (24 * h + 4 * a) / tp)
    assert activation_bytes_per_layer(shape, no_sp) == pytest.approx(expected)


def test_context_parallel_and_fp8_shrink_activations() -> None:
    shape = PRESETS["llama3-8b"]
    base = Layout(tp=2, world_size=2, seq_length=8192, sequence_parallel=True)
    full = activation_bytes_per_layer(shape, base)
    cp2 = dataclasses.replace(base, cp=2, world_size=4)
    assert activation_bytes_per_layer(shape, cp2) == pytest.approx(full / 2)
    fp8 = activation_bytes_per_layer(shape, dataclasses.replace(base, fp8=True))
    h, d, F = 4096, 128, 14336
    assert full - fp8 == pytest.approx(8192 * (h + 32 * d + h + F) / 2)  # GEMM inputs: 1 byte


def test_logits_memory_follows_the_logprob_impl() -> None:
    shape = PRESETS["llama3-8b"]  # V = 128,256
    chunked = Layout(tp=1, world_size=1, seq_length=8192, logprob_impl="chunked")
    fused = dataclasses.replace(chunked, logprob_impl="fused")
    bf16_logits = 8192 * shape.padded_vocab(1) * 2
    assert logits_bytes(shape, chunked) > 2 * bf16_logits  # logits and their gradient
    # fused: one tile (bf16 + fp32 + fp32 grad), fp32 grad of hidden [T, H], fp32 weight block
    expected = 1024 * 8192 * 10 + 8192 * 4096 * 4 + 8192 * 4096 * 4
    assert logits_bytes(shape, fused) == pytest.approx(expected)
    assert logits_bytes(shape, fused) < bf16_logits / 4
    for impl, lay in (("chunked", chunked), ("fused", fused)):  # the flag reaches the plan
        argv = ["--model", "llama3-8b", "--seq-length", "8192", "--logprob-impl", impl]
        logits_gib = plan_from_argv(argv)["memory_gib_per_gpu"]["logits"]
        assert logits_gib * 2**30 == pytest.approx(logits_bytes(shape, lay))


@pytest.mark.parametrize(("pp", "vpp", "m"), [(4, None, 32), (4, 5, 32), (8, 2, 16), (4, None, 2)])
def test_in_flight_matches_megatron_lm_formula(pp: int, vpp: int | None, m: int) -> None:
    # Megatron-LM theoretical_memory_usage: the first stage holds L layers' worth of
    # activations (x min(1, m/PP) without interleaving), x (1 + (PP-1)/(PP*VPP)) with it.
    shape = dataclasses.replace(PRESETS["llama3-70b"], num_layers=80)
    layout = Layout(pp=pp, vpp=vpp, world_size=pp, global_batch_size=m)
    live = in_flight_layer_microbatches(shape, layout, 0)
    if vpp is None:
        assert live == pytest.approx(80 * min(1, m / pp))
    else:
        assert live == pytest.approx(80 * (1 + (pp - 1) / (pp * vpp)))
    assert in_flight_layer_microbatches(shape, layout, pp - 1) < live or pp == 1


def test_recompute_and_distributed_optimizer() -> None:
    shape = PRESETS["llama3-8b"]
    base = Layout(tp=4, pp=2, world_size=32, seq_length=4096, sequence_parallel=True,
                  global_batch_size=32)
    uniform = dataclasses.replace(base, recompute_granularity="full", recompute_method="uniform",
                                  recompute_num_layers=1)
    per_layer = activation_bytes_per_layer(shape, base)
    live = in_flight_layer_microbatches(shape, base, 0)
    checkpoint = 2 * 4096 * 4096 / 4
    assert activation_bytes(shape, base, 0) == pytest.approx(per_layer * live)
    assert activation_bytes(shape, uniform, 0) == pytest.approx(live * checkpoint + per_layer)
    dist = dataclasses.replace(base, distributed_optimizer=True)
    n = sum(stage_params(shape, base, 0).values())
    assert memory_per_gpu(shape, base, 0)["optimizer"] == 12 * n
    assert memory_per_gpu(shape, dist, 0)["optimizer"] == pytest.approx(12 * n / base.dp)
    # megatron-core shards the distributed optimizer over the DP x CP group.
    dist_cp = dataclasses.replace(dist, cp=2)
    assert memory_per_gpu(shape, dist_cp, 0)["optimizer"] == pytest.approx(12 * n / base.dp)
    assert dist_cp.dp == base.dp // 2


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        ({"tp": 3, "world_size": 3}, "--num-query-groups"),
        ({"pp": 3, "world_size": 3}, "--num-layers"),
        ({"world_size": 12, "tp": 8}, "not divisible by TP*PP*CP"),
        ({"sequence_parallel": True}, "--sequence-parallel"),
        ({"global_batch_size": 3, "world_size": 2}, "--global-batch-size"),
        ({"pp": 2, "vpp": 2, "world_size": 2, "global_batch_size": 3}, "interleaved"),
        ({"cp": 2, "world_size": 2, "seq_length": 4094}, "2*CP"),
        ({"pack_multiple": 128, "seq_length": 4160}, "--fp8-recipe"),
        ({"recompute_granularity": "full"}, "--recompute-method"),
    ],
)
def test_layout_errors_name_the_flag(change: dict, flag: str) -> None:
    errors = check_layout(PRESETS["llama3-8b"], Layout(**{"global_batch_size": 8, **change}))
    assert any(flag in e for e in errors), errors


LAUNCH_70B = [
    "--model", "llama3-70b", "--num-gpus", "64", "--bf16",
    "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
    "--num-layers-per-virtual-pipeline-stage", "5", "--sequence-parallel",
    "--use-distributed-optimizer", "--fp8-format", "hybrid", "--seq-length", "8192",
    "--global-batch-size", "128", "--ref-logprobs", "refs",
]


def test_cli_json(capsys) -> None:
    assert main([*LAUNCH_70B, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_per_gpu", "memory_gib_per_gpu", "flops_per_step", "fits"):
        assert key in out
    mem = out["memory_gib_per_gpu"]
    assert {"weights", "gradients", "optimizer", "activations", "logits", "total"} <= set(mem)
    assert mem["total"] == pytest.approx(sum(v for k, v in mem.items() if k != "total"))
    assert out["layout"]["vpp"] == 4 and out["layout"]["dp"] == 2
    # 6 N D plus causal attention within 4096-token segments.
    n_gemm = out["params_total"] - 129024 * 8192 - 8192 * (2 * 80 + 1)
    tokens = 128 * 8192
    assert out["flops_per_step"] == pytest.approx(
        tokens * (6 * n_gemm + 3 * 2 * 8192 * 80 * 4096))
    assert math.isclose(out["params_total"] / 1e9, 70.57, abs_tol=0.01)


def test_cli_flags_override_preset_and_reject_bad_layouts() -> None:
    gqa16 = plan_from_argv([*LAUNCH_70B, "--group-query-attention", "--num-query-groups", "16"])
    assert gqa16["model"]["num_query_groups"] == 16
    with pytest.raises(SystemExit, match="--group-query-attention"):
        plan_from_argv([*LAUNCH_70B, "--num-query-groups", "16"])
    small = plan_from_argv([*LAUNCH_70B, "--num-layers", "40"])
    full = plan_from_argv(LAUNCH_70B)
    assert small["model"]["num_layers"] == 40 and small["params_total"] < full["params_total"]
    # 70B on 8 GPUs with TP=8 and no PP: ~17.6B parameters x 16+ bytes per GPU.
    too_big = plan_from_argv(["--model", "llama3-70b", "--num-gpus", "8", "--bf16",
                              "--tensor-model-parallel-size", "8", "--seq-length", "8192"])
    assert too_big["fits"] is False and not too_big["errors"]
    assert main(["--model", "llama3-70b", "--num-gpus", "8", "--bf16",
                 "--tensor-model-parallel-size", "3"]) == 1
