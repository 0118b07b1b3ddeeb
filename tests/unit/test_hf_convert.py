"""HF Llama <-> megatron-core conversion: lossless there and back at several TP/PP/VPP
splits, exact layouts of the fused QKV and fc1, and a converted random Llama's logits
equal to transformers' (when transformers is installed)."""

from __future__ import annotations

import os

import pytest
import torch

from adadpo_megatron.conversion.weights import (
    LlamaShape,
    hf_to_megatron,
    load_into_model,
    megatron_to_hf,
    merge,
    split,
)


def _shape(tied: bool, vocab: int = 300) -> LlamaShape:
    return LlamaShape(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
                      num_query_groups=4, head_dim=8, vocab_size=vocab, tie_embeddings=tied)


def _random_hf(shape: LlamaShape, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, d, F = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (shape.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (F, h), p + "mlp.up_proj.weight": (F, h),
            p + "mlp.down_proj.weight": (h, F), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    if not shape.tie_embeddings:
        shapes["lm_head.weight"] = (shape.vocab_size, h)
    return {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("tp", "pp", "vpp"), [(1, 1, 1), (2, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_there_and_back_is_lossless(tied: bool, tp: int, pp: int, vpp: int) -> None:
    shape = _shape(tied)
    hf = _random_hf(shape)
    full = hf_to_megatron(hf, shape, tp=tp)
    assert full["embedding.word_embeddings.weight"].shape[0] % (128 * tp) == 0
    shards = split(full, shape, tp=tp, pp=pp, vpp=vpp)
    assert len(shards) == tp * pp and all(len(v) == vpp for v in shards.values())
    back = megatron_to_hf(merge(shards, shape), shape)
    assert back.keys() == hf.keys()
    for key, tensor in hf.items():
        assert torch.equal(back[key], tensor), key


def test_fused_qkv_and_fc1_layouts() -> None:
    # a=8 heads, g=4 groups, d=8: per group 2 query heads, then K, then V.
    shape = _shape(tied=False)
    hf = _random_hf(shape)
    full = hf_to_megatron(hf, shape)
    qkv = full["decoder.layers.1.self_attention.linear_qkv.weight"].reshape(4, 4, 8, 64)
    q = hf["model.layers.1.self_attn.q_proj.weight"].reshape(8, 8, 64)
    k = hf["model.layers.1.self_attn.k_proj.weight"].reshape(4, 8, 64)
    v = hf["model.layers.1.self_attn.v_proj.weight"].reshape(4, 8, 64)
    for group in range(4):
        assert torch.equal(qkv[group, 0], q[2 * group]) and torch.equal(qkv[group, 1], q[2 * group + 1])
        assert torch.equal(qkv[group, 2], k[group]) and torch.equal(qkv[group, 3], v[group])
    # TP=2: rank 1 holds groups 2, 3 and [gate_1; up_1].
    shards = split(full, shape, tp=2, pp=1)
    rank1 = shards[(1, 0)][0]
    assert torch.equal(rank1["decoder.layers.1.self_attention.linear_qkv.weight"],
                       qkv[2:].reshape(-1, 64))
    gate = hf["model.layers.1.mlp.gate_proj.weight"]
    up = hf["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(rank1["decoder.layers.1.mlp.linear_fc1.weight"],
                       torch.cat([gate[48:], up[48:]]))
    assert torch.equal(rank1["decoder.layers.1.mlp.linear_fc2.weight"],
                       hf["model.layers.1.mlp.down_proj.weight"][:, 48:])


def test_pipeline_chunks_hold_interleaved_layers() -> None:
    shape = _shape(tied=True)
    full = hf_to_megatron(_random_hf(shape), shape)
    shards = split(full, shape, tp=1, pp=2, vpp=2)  # 4 layers, 1 per chunk
    # chunk c of rank p holds global layer c*PP + p, renumbered 0.
    for (p, c), layer in {(0, 0): 0, (1, 0): 1, (0, 1): 2, (1, 1): 3}.items():
        got = shards[(0, p)][c]["decoder.layers.0.input_layernorm.weight"]
        assert torch.equal(got, full[f"decoder.layers.{layer}.input_layernorm.weight"])
    assert "embedding.word_embeddings.weight" in shards[(0, 0)][0]
    last = shards[(0, 1)][1]
    assert torch.equal(last["output_layer.weight"], full["embedding.word_embeddings.weight"])
    assert "decoder.final_layernorm.weight" in last


def test_indivisible_split_is_refused() -> None:
    shape = _shape(tied=False)
    full = hf_to_megatron(_random_hf(shape), shape)
    with pytest.raises(ValueError, match="TP=3"):
        split(full, shape, tp=3, pp=1)
    with pytest.raises(ValueError, match="PP\\*VPP=6"):
        split(full, shape, tp=1, pp=3, vpp=2)


def test_shape_from_hf_config_and_trainer_flags() -> None:
    cfg = {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
           "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
           "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
    shape = LlamaShape.from_hf_config(cfg)
    assert shape.head_dim == 128 and shape.num_query_groups == 8
    from adadpo_megatron.trainer.arguments import build_parser

    args = build_parser().parse_args(shape.trainer_flags())
    assert (args.num_query_groups, args.rotary_base) == (8, 500000)
    assert args.untie_embeddings_and_output_weights and args.swiglu
    with pytest.raises(ValueError, match="rope scaling"):
        LlamaShape.from_hf_config({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("tied", [False, True])
def test_converted_logits_match_transformers(tied: bool) -> None:
    transformers = pytest.importorskip("transformers", reason="pip install transformers")
    from megatron.core import parallel_state

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_theta=10000.0)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    shape = LlamaShape.from_hf_config(config)
    initialize_model_parallel_cpu(tp=1, pp=1)
    try:
        mc_config = build_transformer_config(
            num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
            num_query_groups=2, normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
            add_bias_linear=False, position_embedding_type="rope", rotary_base=10000,
            untie_embeddings=not tied)
        full = hf_to_megatron(hf_model.state_dict(), shape)
        model = build_gpt_model(mc_config, full["embedding.word_embeddings.weight"].shape[0], 64,
                                use_te=False).eval()
        load_into_model(model, full)
        tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ours = model(tokens, torch.arange(24)[None], None)[..., :300]
            theirs = hf_model(tokens).logits
    finally:
        parallel_state.destroy_model_parallel()
    # fp32 round-off: same math, different op order (fused QKV GEMM, softmax kernels).
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _write_hf_dir(path, shape: LlamaShape, hf: dict[str, torch.Tensor]) -> None:
    from adadpo_megatron.conversion.files import write_hf

    write_hf(hf, shape, str(path), dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_cli_round_trip_through_files(tmp_path, fmt: str) -> None:
    pytest.importorskip("safetensors", reason="pip install safetensors")
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_megatron",
        pathlib.Path(__file__).resolve().parents[2] / "tools" / "convert_hf_to_megatron.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shape = _shape(tied=fmt == "torch")
    hf = _random_hf(shape, seed=3)
    _write_hf_dir(tmp_path / "hf", shape, hf)
    layout = ["--tp", "2", "--pp", "2", "--vpp", "2"] if fmt == "torch" else []
    common = ["--format", fmt, "--dtype", "fp32"]
    assert tool.main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "mc"),
                      *common, *layout]) == 0
    assert tool.main(["--to-hf", "--megatron", str(tmp_path / "mc"), "--hf-config",
                      str(tmp_path / "hf" / "config.json"), "--output", str(tmp_path / "back"),
                      *common]) == 0
    from adadpo_megatron.conversion.files import read_hf

    back, back_shape = read_hf(str(tmp_path / "back"))
    assert back_shape == shape and back.keys() == hf.keys()
    for key, tensor in hf.items():
        assert torch.equal(back[key], tensor), key
    if fmt == "torch_dist":  # the converter writes a checksum manifest; --to-hf verifies it
        shard = next((tmp_path / "mc" / "iter_0000000").glob("*.distcp"))
        os.truncate(shard, shard.stat().st_size - 1)
        with pytest.raises(SystemExit) as info:
            tool.main(["--to-hf", "--megatron", str(tmp_path / "mc"), "--hf-config",
                       str(tmp_path / "hf" / "config.json"), "--output", str(tmp_path / "b2"),
                       *common])
        assert f"damaged checkpoint: {shard} is truncated" in str(info.value)
