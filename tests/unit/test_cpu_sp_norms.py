"""step/norms.py (SP-aware local norms) and the CPU layer's patches 4 and 5 (step/cpu.py).

The distributed behaviour (gradients equal to one process under TP=2+SP, recompute, the
distributed optimizer) is tested in tests/distributed/test_parallel_layouts.py and
test_train_cpu_layouts.py; these check the pieces alone.
"""

from __future__ import annotations

import types

import pytest
import torch

from adadpo_megatron.step.norms import SequenceParallelNorm, sequence_parallel_norm_spec


def _config(normalization: str):
    """The TransformerConfig fields the norm reads."""
    return types.SimpleNamespace(normalization=normalization, sequence_parallel=True,
                                 layernorm_zero_centered_gamma=False)


@pytest.mark.parametrize("kind, reference", [("LayerNorm", torch.nn.LayerNorm),
                                             ("RMSNorm", torch.nn.RMSNorm)])
def test_norm_equals_torch_and_carries_the_sp_attribute(kind, reference):
    torch.manual_seed(0)
    ours = SequenceParallelNorm(_config(kind), 8, eps=1e-5)
    ref = reference(8, eps=1e-5)
    with torch.no_grad():
        for p in ref.parameters():
            p.uniform_(0.5, 1.5)
        ours.load_state_dict(ref.state_dict())  # same parameter names as torch's
    assert sorted(dict(ours.named_parameters())) == sorted(dict(ref.named_parameters()))
    assert all(p.sequence_parallel is True for p in ours.parameters())
    x = torch.randn(5, 2, 8, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ours(x).pow(2).sum().backward()
    ref(x2).pow(2).sum().backward()
    assert torch.equal(ours(x), ref(x2))  # the same torch functional: bitwise
    assert torch.equal(x.grad, x2.grad)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), n


def test_norm_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="--normalization"):
        SequenceParallelNorm(_config("L2Norm"), 8)
    cfg = _config("LayerNorm")
    cfg.layernorm_zero_centered_gamma = True
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        SequenceParallelNorm(cfg, 8)


def test_spec_replaces_every_torch_norm_and_the_final_norm():
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.model import build_transformer_config

    initialize_model_parallel_cpu(tp=1, pp=1)
    config = build_transformer_config(num_layers=3, hidden_size=8, num_attention_heads=2,
                                      normalization="RMSNorm")
    layer = specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    assert layer.submodules.input_layernorm is WrappedTorchNorm  # what megatron-core gives
    block = sequence_parallel_norm_spec(layer, config)
    assert len(block.layer_specs) == 3 and block.layer_norm is SequenceParallelNorm
    for spec in block.layer_specs:
        sub = spec.submodules
        assert sub.input_layernorm is SequenceParallelNorm
        assert sub.pre_mlp_layernorm is SequenceParallelNorm
        attn = sub.self_attention.submodules
        assert attn.q_layernorm is SequenceParallelNorm
        assert attn.k_layernorm is SequenceParallelNorm
    assert layer.submodules.input_layernorm is WrappedTorchNorm  # the input is not changed


def test_cuda_type_name_only_for_megatron_optimizer_code():
    from adadpo_megatron.step.cpu import _type_name

    def frame(module):
        return types.SimpleNamespace(f_globals={"__name__": module})

    assert _type_name("torch.FloatTensor", frame("megatron.core.optimizer.distrib_optimizer")) \
        == "torch.cuda.FloatTensor"
    assert _type_name("torch.BFloat16Tensor", frame("megatron.core.optimizer.optimizer")) \
        == "torch.cuda.BFloat16Tensor"
    assert _type_name("torch.FloatTensor", frame("torch._utils")) == "torch.FloatTensor"
    assert _type_name("torch.FloatTensor", frame("megatron.core.tensor_parallel.layers")) \
        == "torch.FloatTensor"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is off on a GPU")
def test_recompute_replays_dropout_on_the_cpu():
    """megatron-core's CheckpointFunction on the CPU: no CUDA RNG asked for, and the
    recomputed forward draws the same dropout mask (the CPU generator is restored)."""
    from megatron.core import tensor_parallel

    from adadpo_megatron.step.cpu import enable_cpu_megatron

    enable_cpu_megatron()
    torch.manual_seed(3)
    w = torch.randn(6, 6, requires_grad=True)
    x = torch.randn(4, 6, requires_grad=True)

    def f(inp):
        return torch.nn.functional.dropout(inp @ w, p=0.5, training=True)

    state = torch.get_rng_state()
    tensor_parallel.checkpoint(f, False, x).sum().backward()
    recomputed = (w.grad.clone(), x.grad.clone())
    w.grad = x.grad = None
    torch.set_rng_state(state)
    f(x).sum().backward()
    assert torch.equal(recomputed[0], w.grad) and torch.equal(recomputed[1], x.grad)
    w.grad = None
    f(x).sum().backward()  # another dropout mask: the test would see a wrong replay
    assert not torch.equal(recomputed[0], w.grad)
