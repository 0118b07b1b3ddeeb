"""TP=2 on 2 gloo processes: (1) the planner's per-GPU parameter count equals what a TP=2
GPTModel rank really holds (column-parallel split, row-parallel biases and norms
replicated); (2) a random HF Llama converted and split for TP=2 gives transformers'
logits (skipped without transformers).

One torchrun launch runs both. By hand: ``torchrun --nproc-per-node 2 THIS_FILE``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torchrun_launch import run_torchrun


def _check_planner_counts(rank: int) -> None:
    from adadpo_megatron.planner.estimate import Layout, ModelShape, stage_params
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    for norm, bias, swiglu, groups in (("LayerNorm", True, False, 4), ("RMSNorm", False, True, 2)):
        shape = ModelShape(num_layers=2, hidden_size=64, ffn_hidden_size=96,
                           num_attention_heads=4, num_query_groups=groups, vocab_size=300,
                           swiglu=swiglu, normalization=norm, add_bias_linear=bias)
        config = build_transformer_config(
            num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            num_query_groups=groups, normalization=norm, swiglu=swiglu, add_bias_linear=bias,
            position_embedding_type="rope", untie_embeddings=True, tp=2)
        model = build_gpt_model(config, shape.padded_vocab(2), 32, use_te=False)
        real = sum(p.numel() for p in model.parameters())
        planned = sum(stage_params(shape, Layout(tp=2, world_size=2), 0).values())
        assert real == planned, (rank, norm, real, planned)


def _check_conversion(rank: int) -> None:
    import torch.distributed as dist
    import transformers
    from megatron.core import parallel_state

    from adadpo_megatron.conversion.weights import (
        LlamaShape,
        hf_to_megatron,
        load_into_model,
        split,
    )
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    for tied in (False, True):
        config = transformers.LlamaConfig(
            vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, tie_word_embeddings=tied)
        torch.manual_seed(0)  # the same HF model on both ranks
        hf_model = transformers.LlamaForCausalLM(config).eval()
        shape = LlamaShape.from_hf_config(config)
        shard = split(hf_to_megatron(hf_model.state_dict(), shape, tp=2), shape, tp=2, pp=1)
        mc_config = build_transformer_config(
            num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=8,
            num_query_groups=2, normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True,
            add_bias_linear=False, position_embedding_type="rope", untie_embeddings=not tied, tp=2)
        mine = shard[(rank, 0)][0]
        padded = mine["embedding.word_embeddings.weight"].shape[0] * 2  # 300 -> 512 (256s)
        model = build_gpt_model(mc_config, padded, 64, use_te=False).eval()
        load_into_model(model, mine)
        tokens = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            local = model(tokens, torch.arange(20)[None], None)
            expected = hf_model(tokens).logits
        parts = [torch.empty_like(local) for _ in range(2)]
        dist.all_gather(parts, local.contiguous(),
                        group=parallel_state.get_tensor_model_parallel_group())
        # fp32 round-off: same math in another op order.
        torch.testing.assert_close(torch.cat(parts, -1)[..., :300], expected,
                                   rtol=1e-4, atol=1e-4)


def _worker() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    initialize_model_parallel_cpu(tp=2)
    rank = dist.get_rank()
    _check_planner_counts(rank)
    if importlib.util.find_spec("transformers") is not None:
        _check_conversion(rank)
        if rank == 0:
            print("conversion checked at TP=2", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_tp2_planner_counts_and_conversion() -> None:
    run_torchrun(2, __file__, timeout=600)


if __name__ == "__main__":
    _worker()
