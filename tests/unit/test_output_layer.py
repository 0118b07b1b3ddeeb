"""step/output_layer.py: GPTModel hands over hidden states + output weight (``fused``)."""

from __future__ import annotations

import pytest
import torch

from adadpo_megatron.step.output_layer import hidden_states_instead_of_logits

VOCAB, HIDDEN = 64, 32


@pytest.fixture
def parallel_state():
    from megatron.core import parallel_state as ps

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=1, pp=1)
    yield ps
    ps.destroy_model_parallel()


def _model(untie: bool, **extra):
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    config = build_transformer_config(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64,
        untie_embeddings=untie, calculate_per_token_loss=True, **extra,
    )  # fmt: skip
    return build_gpt_model(config, VOCAB, 32, use_te=False)


def _call(model, tokens):
    positions = torch.arange(tokens.shape[1])[None]
    return model(tokens, positions, None, labels=None)


@pytest.mark.parametrize("untie", [False, True])
def test_hands_over_hidden_and_the_weight_then_restores(parallel_state, untie):
    model = _model(untie)
    tokens = torch.randint(0, VOCAB, (2, 9))
    logits = _call(model, tokens)
    assert logits.shape == (2, 9, VOCAB)
    with hidden_states_instead_of_logits(model) as held:
        hidden = _call(model, tokens)
    assert hidden.shape == (2, 9, HIDDEN)
    want = model.output_layer.weight if untie else model.embedding.word_embeddings.weight
    assert held.weight is want
    torch.testing.assert_close(hidden @ held.weight.T, logits)
    assert "forward" not in model.output_layer.__dict__  # restored: logits again
    torch.testing.assert_close(_call(model, tokens), logits)


def test_unwraps_ddp_and_skips_stages_without_output_layer(parallel_state):
    model = _model(True)
    wrapper = torch.nn.Module()
    wrapper.module = model  # DDP / Float16Module keep the model as .module
    with hidden_states_instead_of_logits(wrapper) as held:
        _call(model, torch.randint(0, VOCAB, (1, 5)))
    assert held.weight is model.output_layer.weight
    with hidden_states_instead_of_logits(torch.nn.Linear(2, 2)) as held:
        pass
    assert held.weight is None


def test_bf16_float16module_output_matches_chunked(parallel_state):
    """Float16Module upcasts the last stage's output to fp32; fused casts it back exactly."""
    from megatron.core.transformer.module import Float16Module

    from adadpo_megatron.step import forward_step as fs

    model = _model(True, bf16=True)
    wrapped = Float16Module(model.config, model)
    tokens = torch.randint(0, VOCAB, (1, 11))
    batch = {
        "tokens": tokens[0], "position_ids": torch.arange(11), "labels": torch.roll(tokens[0], -1),
        "loss_mask": torch.ones(11), "cu_seqlens": torch.tensor([0, 5, 11], dtype=torch.int32),
        "max_seqlen": 6, "pair_index": torch.tensor([0, 0]),
        "is_chosen": torch.tensor([True, False]),
    }  # fmt: skip
    groups = fs._groups_from_megatron()
    out = {}
    for impl in ("fused", "chunked"):
        inputs, output, held = fs._run_model(batch, wrapped, False, groups, impl)
        assert output.dtype == torch.float32  # Float16Module's upcast
        logps = fs._token_logps(inputs, output, groups, held)
        (grad,) = torch.autograd.grad(logps.sum(), model.output_layer.weight)
        out[impl] = (logps.detach(), grad)
    assert out["fused"][1].dtype == torch.bfloat16
    torch.testing.assert_close(out["fused"][0], out["chunked"][0], rtol=0, atol=2e-2)
    scale = out["chunked"][1].abs().max()
    torch.testing.assert_close(out["fused"][1] / scale, out["chunked"][1] / scale,
                               rtol=0, atol=2**-6)


@pytest.mark.parametrize("setting", ["defer_embedding_wgrad_compute", "use_mup", "mtp_num_layers",
                                     "use_fused_lce"])
def test_refuses_what_it_cannot_replace(parallel_state, setting):
    model = _model(True)
    if setting == "use_fused_lce":
        model.use_fused_lce = True
    else:
        setattr(model.config, setting, 1)
    with pytest.raises(ValueError, match="--logprob-impl"):
        with hidden_states_instead_of_logits(model):
            pass
    assert "forward" not in model.output_layer.__dict__
