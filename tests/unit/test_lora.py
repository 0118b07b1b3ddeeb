"""step/lora.py on one process: step 0 is the base exactly, adapters off is the base,
merging gives the adapted model, the base is frozen, the flags' checks."""

from __future__ import annotations

import pytest
import torch

from adadpo_megatron.step.lora import (
    LoRASettings,
    adapter_modules,
    adapters_detached,
    adapters_disabled,
    add_lora,
    merge_lora,
)


@pytest.fixture
def parallel_state():
    from megatron.core import parallel_state as ps

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=1, pp=1)
    yield ps
    ps.destroy_model_parallel()


def _llama():
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    config = build_transformer_config(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=48, normalization="RMSNorm", swiglu=True,
        position_embedding_type="rope", add_bias_linear=False, untie_embeddings=True)
    return build_gpt_model(config, 64, 32, use_te=False)


def _logits(model, tokens):
    return model(tokens, torch.arange(tokens.shape[1])[None], None)


def test_step0_is_base_and_disabled_is_base(parallel_state):
    torch.manual_seed(0)
    model = _llama()
    tokens = torch.randint(1, 64, (1, 11))
    base = _logits(model, tokens)
    n = add_lora([model], LoRASettings(rank=4, alpha=8), seed=1)
    trainable = {k: p.numel() for k, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == n
    assert all(".adapter.lora_" in k for k in trainable)
    assert len(trainable) == 2 * 4 * 2  # 4 targets x 2 layers x (A, B)
    assert torch.equal(_logits(model, tokens), base)  # B = 0: bitwise the base
    with torch.no_grad():
        for _, _, a in adapter_modules(model):
            a.lora_B.normal_(0, 0.1)
    adapted = _logits(model, tokens)
    assert not torch.allclose(adapted, base)
    with adapters_disabled([model]):
        assert torch.equal(_logits(model, tokens), base)
    assert torch.equal(_logits(model, tokens), adapted)
    merge_lora([model])
    merged = _logits(model, tokens)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5 * adapted.abs().max().item())


def test_targets_scaling_and_detach(parallel_state):
    model = _llama()
    full = set(model.state_dict())
    add_lora([model], LoRASettings(rank=2, alpha=3, target_modules=("linear_proj",)), seed=1)
    names = [n for n, _, _ in adapter_modules(model)]
    assert names == ["decoder.layers.0.self_attention.linear_proj",
                     "decoder.layers.1.self_attention.linear_proj"]
    a = next(adapter_modules(model))[2]
    assert a.scaling == 1.5 and a.lora_A.shape == (2, 32) and a.lora_B.shape == (32, 2)
    # A: Kaiming-uniform bound 1/sqrt(in), as PEFT; the same draw for the same seed and name.
    assert a.lora_A.abs().max() <= 32 ** -0.5 and a.lora_A.abs().max() > 0
    with adapters_detached([model]):
        assert set(model.state_dict()) == full
    assert set(model.state_dict()) - full == {
        f"decoder.layers.{i}.self_attention.linear_proj.adapter.lora_{x}"
        for i in (0, 1) for x in "AB"}


def test_same_init_for_the_same_seed(parallel_state):
    m1, m2 = _llama(), _llama()
    add_lora([m1], LoRASettings(rank=2, alpha=2), seed=7)
    add_lora([m2], LoRASettings(rank=2, alpha=2), seed=7)
    for (_, _, a1), (_, _, a2) in zip(adapter_modules(m1), adapter_modules(m2), strict=True):
        assert torch.equal(a1.lora_A, a2.lora_A)


@pytest.mark.parametrize(("kw", "flag"), [
    (dict(rank=0, alpha=1), "--lora-rank"),
    (dict(rank=2, alpha=0), "--lora-alpha"),
    (dict(rank=2, alpha=1, dropout=1.0), "--lora-dropout"),
    (dict(rank=2, alpha=1, target_modules=("q_proj",)), "--lora-target-modules"),
])
def test_settings_errors_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=flag):
        LoRASettings(**kw)


def test_te_classes_are_recognised_by_name():
    from adadpo_megatron.step.lora import _kind

    for name, kind in (("TEColumnParallelLinear", "column"), ("TERowParallelLinear", "row"),
                       ("TELayerNormColumnParallelLinear", "column")):
        assert _kind(type(name, (torch.nn.Module,), {})()) == kind
    te_linear = type("TELinear", (torch.nn.Module,), {})()
    te_linear.parallel_mode = "row"
    assert _kind(te_linear) == "row"
    with pytest.raises(TypeError, match="LoRA cannot wrap Linear"):
        _kind(torch.nn.Linear(2, 2))


def test_flags_reference_mode_and_fingerprint():
    from test_train_config import cfg_of, error_of

    plain = cfg_of()
    assert plain.lora is None and plain.reference.mode == "online"
    cfg = cfg_of("--lora-rank", "8", "--lora-alpha", "16", "--lora-dropout", "0.05",
                 "--lora-target-modules", "linear_qkv", "linear_proj")
    assert cfg.lora == LoRASettings(rank=8, alpha=16, dropout=0.05,
                                    target_modules=("linear_qkv", "linear_proj"))
    assert cfg.lora.scaling == 2.0
    assert cfg.reference.mode == "base"  # no second model
    assert cfg_of("--lora-rank", "8", "--ref-load", "/x").reference.mode == "online"
    assert cfg_of("--lora-rank", "8", "--ref-logprobs", "/x.npz").reference.mode == "precomputed"
    assert cfg.fingerprint() != plain.fingerprint()  # adapters of another shape: refused
    assert cfg_of("--lora-rank", "4").fingerprint() != cfg_of("--lora-rank", "8").fingerprint()
    assert "--lora-rank" in error_of("--lora-rank", "0")
    assert "--lora-target-modules" in error_of("--lora-rank", "2", "--lora-target-modules", "q")


def test_embedding_output_requires_grad_for_recompute(parallel_state):
    # Full recompute (megatron-core's CheckpointFunction) drops the graph when no input
    # requires grad: the frozen embedding's output must, or recomputed adapters get none.
    model = _llama()
    add_lora([model], LoRASettings(rank=2, alpha=2), seed=1)
    out = model.embedding(torch.randint(1, 64, (1, 5)), torch.arange(5)[None])
    assert out.requires_grad and not model.embedding.word_embeddings.weight.requires_grad
    with torch.no_grad():
        assert not model.embedding(torch.randint(1, 64, (1, 5)), torch.arange(5)[None]).requires_grad


def test_full_recompute_gives_the_same_adapter_gradients(parallel_state):
    grads = {}
    for recompute in (False, True):
        extra = dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1) if recompute else {}
        from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

        torch.manual_seed(0)
        config = build_transformer_config(
            num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
            ffn_hidden_size=48, normalization="RMSNorm", swiglu=True,
            position_embedding_type="rope", add_bias_linear=False, untie_embeddings=True,
            **extra)
        model = build_gpt_model(config, 64, 32, use_te=False)
        add_lora([model], LoRASettings(rank=2, alpha=2), seed=1)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for _, _, a in adapter_modules(model):
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.1)
        tokens = torch.randint(1, 64, (1, 9), generator=torch.Generator().manual_seed(2))
        mask = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)[None, None]
        # Recompute runs on the CPU (step/cpu.py stands in for the CUDA RNG state): no skip.
        model(tokens, torch.arange(9)[None], mask).float().pow(2).mean().backward()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(v is not None and v.abs().max() > 0 for v in grads[True].values())
    for name, want in grads[False].items():
        torch.testing.assert_close(grads[True][name], want, rtol=1e-6, atol=0)
