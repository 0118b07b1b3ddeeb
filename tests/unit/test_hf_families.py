"""Every model family of the converter (conversion/families.py), on tiny random-init
transformers models built from a config (no download): HF -> megatron -> HF is bit-identical
at TP/PP(/EP) splits and through the files; megatron-core's logits equal transformers' (fp64
to 1e-6, fp32 to 1e-4 of the logits' scale); the printed trainer flags build the same
model; unsupported options are refused naming the config.json field."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install transformers")
pytest.importorskip("safetensors", reason="pip install safetensors")

from adadpo_megatron.conversion.files import read_hf  # noqa: E402
from adadpo_megatron.conversion.weights import (  # noqa: E402
    LlamaShape,
    hf_to_megatron,
    load_into_model,
    megatron_to_hf,
    merge,
    split,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"]
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6)


def tiny_config(family: str, *, tied: bool = False, **extra):
    """A tiny transformers config of ``family`` (experts: 4, top-2)."""
    kw = dict(COMMON, tie_word_embeddings=tied, **extra)
    if family == "llama":
        return transformers.LlamaConfig(**kw)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, head_dim=8, **kw)
    if family == "qwen2":
        return transformers.Qwen2Config(**kw)
    if family == "qwen3":  # head_dim 16 != hidden / heads: needs --kv-channels
        return transformers.Qwen3Config(head_dim=16, **kw)
    if family == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=None, head_dim=8, **kw)
    kw.setdefault("norm_topk_prob", True)
    return transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=48, head_dim=16, **kw)


def random_model(config, seed: int = 0):
    """The transformers model of ``config`` with every tensor random (biases, norms too)."""
    torch.manual_seed(seed)
    # eager experts: transformers' grouped-mm MoE kernel has no fp64
    model = transformers.AutoModelForCausalLM.from_config(
        config, experts_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)
    return model


def save_hf(tmp_path: pathlib.Path, family: str, **kw) -> tuple[pathlib.Path, object]:
    model = random_model(tiny_config(family, **kw))
    out = tmp_path / f"hf_{family}"
    model.save_pretrained(out)
    return out, model


def _disk_state(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_there_and_back_is_bit_identical(tmp_path, family: str) -> None:
    path, _ = save_hf(tmp_path, family)
    hf, shape = read_hf(str(path))
    assert shape.family == family
    assert hf.keys() == _disk_state(path).keys()
    full = hf_to_megatron(hf, shape, tp=2)
    ep = 2 if shape.num_experts else 1
    shards = split(full, shape, tp=2, pp=2, ep=ep)
    assert len(shards) == 4 * ep
    back = megatron_to_hf(merge(shards, shape), shape)
    assert back.keys() == hf.keys()
    for key, tensor in hf.items():
        assert torch.equal(back[key], tensor), key


def test_moe_and_bias_layouts(tmp_path) -> None:
    path, _ = save_hf(tmp_path, "qwen3_moe")
    hf, shape = read_hf(str(path))
    full = hf_to_megatron(hf, shape, tp=2)
    shards = split(full, shape, tp=2, pp=1, ep=2)
    # EP rank 1 holds global experts 2, 3 as local 0, 1; TP rank 1 holds [gate_1; up_1].
    mine = shards[(1, 0, 1)][0]
    gate = hf["model.layers.1.mlp.experts.3.gate_proj.weight"]
    up = hf["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert torch.equal(mine["decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"],
                       torch.cat([gate[24:], up[24:]]))
    assert torch.equal(mine["decoder.layers.1.mlp.router.weight"],
                       hf["model.layers.1.mlp.gate.weight"])
    assert torch.equal(mine["decoder.layers.0.self_attention.q_layernorm.weight"],
                       hf["model.layers.0.self_attn.q_norm.weight"])
    path, _ = save_hf(tmp_path, "qwen2")
    hf, shape = read_hf(str(path))
    bias = hf_to_megatron(hf, shape)["decoder.layers.0.self_attention.linear_qkv.bias"]
    q = hf["model.layers.0.self_attn.q_proj.bias"].reshape(2, 32)  # 2 groups of 4 heads x 8
    k = hf["model.layers.0.self_attn.k_proj.bias"].reshape(2, 8)
    v = hf["model.layers.0.self_attn.v_proj.bias"].reshape(2, 8)
    assert torch.equal(bias.reshape(2, 48), torch.cat([q, k, v], 1))


def _megatron_logits(shape: LlamaShape, full, tokens, dtype) -> torch.Tensor:
    from megatron.core import parallel_state

    from adadpo_megatron.conversion.files import _build_tp1_model

    model = _build_tp1_model(shape, full["embedding.word_embeddings.weight"].shape[0],
                             torch.float32)
    try:
        load_into_model(model, full)
        model = model.to(dtype).eval()
        with torch.no_grad():
            return model(tokens, torch.arange(tokens.shape[1])[None], None)[..., :300]
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, family: str) -> None:
    path, model = save_hf(tmp_path, family, tied=family == "qwen2")
    hf, shape = read_hf(str(path))
    full = hf_to_megatron(hf, shape)
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        ours = _megatron_logits(shape, full, tokens, dtype)
        with torch.no_grad():
            theirs = model.to(dtype)(tokens).logits
        scale = float(theirs.abs().max())
        assert scale > 1.0  # random weights: logits of order 1, not ~0
        # fp64: the conversion itself; fp32: round-off of another op order (fused QKV/fc1).
        err = float((ours - theirs).abs().max())
        assert err <= tol * (1.0 if dtype == torch.float64 else scale), (family, dtype, err)


def _tool():
    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_megatron",
        pathlib.Path(__file__).resolve().parents[2] / "tools" / "convert_hf_to_megatron.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_round_trip_and_transformers_loads_the_result(tmp_path, family: str) -> None:
    tool = _tool()
    path, model = save_hf(tmp_path, family)
    original = _disk_state(path)
    moe = family in ("mixtral", "qwen3_moe")
    for fmt, layout in (("torch", ["--tp", "2", "--pp", "2"] + (["--ep", "2"] if moe else [])),
                        ("torch_dist", [])):
        mc, back = tmp_path / f"mc_{fmt}", tmp_path / f"back_{fmt}"
        common = ["--format", fmt, "--dtype", "fp32"]
        assert tool.main(["--hf", str(path), "--output", str(mc), *common, *layout]) == 0
        assert tool.main(["--to-hf", "--megatron", str(mc), "--hf-config",
                          str(path / "config.json"), "--output", str(back), *common]) == 0
        got = _disk_state(back)
        assert got.keys() == original.keys()
        for key, tensor in original.items():
            assert torch.equal(got[key], tensor), (fmt, key)
    if moe:  # the per-rank files are named as Megatron-LM names them at EP > 1
        assert (tmp_path / "mc_torch" / "release" / "mp_rank_01_001_001").is_dir()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back)).eval()
    assert type(reloaded) is type(model)
    tokens = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_flags_build_the_converted_model(family: str) -> None:
    from adadpo_megatron.trainer.arguments import build_parser
    from adadpo_megatron.trainer.config import config_from_args

    shape = LlamaShape.from_hf_config(tiny_config(family))
    args = build_parser().parse_args([*shape.trainer_flags(), "--data-path", "x",
                                      "--train-iters", "1", "--device", "cpu"])
    cfg = config_from_args(args, world_size=1)
    kw = cfg.arch.transformer_kwargs()
    assert kw["add_qkv_bias"] == (family == "qwen2")
    assert kw["qk_layernorm"] == family.startswith("qwen3")
    assert kw.get("kv_channels", 8) == shape.head_dim
    assert kw.get("num_moe_experts") == shape.num_experts
    if shape.num_experts:
        assert kw["moe_ffn_hidden_size"] == shape.moe_ffn_hidden_size
        assert kw["moe_router_topk"] == 2


def test_qwen3_moe_without_topk_renormalisation_is_pre_softmax(tmp_path) -> None:
    path, model = save_hf(tmp_path, "qwen3_moe", norm_topk_prob=False)
    hf, shape = read_hf(str(path))
    assert shape.moe_router_pre_softmax and "--moe-router-pre-softmax" in shape.trainer_flags()
    tokens = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    ours = _megatron_logits(shape, hf_to_megatron(hf, shape), tokens, torch.float64)
    with torch.no_grad():
        theirs = model.double()(tokens).logits
    assert float((ours - theirs).abs().max()) <= 1e-6


@pytest.mark.parametrize(("family", "extra", "field"), [
    ("mistral", {"sliding_window": 16}, "sliding_window=16"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}},
     "high_freq_factor=2.0"),
    ("llama", {"attention_bias": True}, "attention_bias=true"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_options_are_refused_naming_the_field(tmp_path, family, extra, field):
    cfg = tiny_config(family).to_dict()
    cfg.update(extra)
    if "rope_scaling" in extra:
        cfg["rope_parameters"] = {"rope_theta": 10000.0, **extra["rope_scaling"]}
    with pytest.raises(ValueError, match="config.json") as info:
        LlamaShape.from_hf_config(cfg)
    assert field in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as info:
        _tool().main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "o")])
    assert field in str(info.value)


def test_llama31_rope_scaling(tmp_path) -> None:
    """Llama-3.1's llama3 RoPE scaling (megatron-core rope_scaling): logits and round trip."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    model = random_model(tiny_config("llama", rope_parameters=rope,
                                     max_position_embeddings=16384))
    path = tmp_path / "hf"
    model.save_pretrained(path)
    hf, shape = read_hf(str(path))
    assert shape.rope_scaling_factor == 8.0 and shape.rope_theta == 500000.0
    flags = shape.trainer_flags()
    assert flags[flags.index("--use-rope-scaling"):][:3] == [
        "--use-rope-scaling", "--rope-scaling-factor", "8.0"]
    from adadpo_megatron.step.model import GPTOptions
    from adadpo_megatron.trainer.arguments import build_parser
    from adadpo_megatron.trainer.config import config_from_args

    cfg = config_from_args(build_parser().parse_args(
        [*flags, "--data-path", "x", "--train-iters", "1", "--device", "cpu"]), world_size=1)
    opts = cfg.arch.gpt_options(GPTOptions())
    assert (opts.rope_scaling, opts.rope_scaling_factor) == (True, 8.0)
    tokens = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    ours = _megatron_logits(shape, hf_to_megatron(hf, shape), tokens, torch.float64)
    with torch.no_grad():
        theirs = model.double()(tokens).logits
    assert float((ours - theirs).abs().max()) <= 1e-6
    # Without the scaling the logits differ: the test sees it.
    plain = dataclasses.replace(shape, rope_scaling_factor=None)
    assert float((_megatron_logits(plain, hf_to_megatron(hf, plain), tokens, torch.float64)
                  - theirs).abs().max()) > 1e-3
    tool = _tool()
    assert tool.main(["--hf", str(path), "--output", str(tmp_path / "mc"), "--dtype", "fp32"]) == 0
    assert tool.main(["--to-hf", "--megatron", str(tmp_path / "mc"), "--hf-config",
                      str(path / "config.json"), "--output", str(tmp_path / "back"),
                      "--dtype", "fp32"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back.double()(tokens).logits, theirs, rtol=0, atol=0)


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="model_type='gemma2' is not supported"):
        LlamaShape.from_hf_config({**COMMON, "model_type": "gemma2"})
    # A Mistral whose window covers every position is plain causal attention: accepted.
    shape = LlamaShape.from_hf_config({**tiny_config("mistral").to_dict(), "sliding_window": 64})
    assert shape.family == "mistral"
