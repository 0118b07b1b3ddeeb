"""Micro-batch -> GPTModel inputs (adadpo_megatron.step.batch) and config mapping checks.

No process group here: the model-level checks against a single process are in
tests/distributed/test_parallel_layouts.py.
"""

from __future__ import annotations

import pytest
import torch

from adadpo_megatron.logprobs import split_thd_for_cp
from adadpo_megatron.step.batch import (
    block_causal_mask,
    prepare_model_inputs,
    schedule_shape,
)


def packed(lens=(5, 3, 4, 4)) -> dict:
    """The worked example of interfaces.md: pairs (5, 3) and (4, 4), no padding."""
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        tokens=torch.arange(1, total + 1),
        position_ids=torch.cat([torch.arange(n) for n in lens]),
        labels=torch.arange(2, total + 2),
        loss_mask=torch.ones(total),
        cu_seqlens=cu,
        max_seqlen=max(lens),
        pair_index=torch.tensor([7, 7, 9, 9]),
        is_chosen=torch.tensor([True, False, True, False]),
    )


def test_block_causal_mask_matches_brute_force():
    cu = torch.tensor([0, 5, 8, 12, 16], dtype=torch.int32)
    mask = block_causal_mask(cu, "cpu")
    assert mask.shape == (1, 1, 16, 16) and mask.dtype == torch.bool
    seg = [next(i for i in range(4) if cu[i] <= t < cu[i + 1]) for t in range(16)]
    for q in range(16):
        for k in range(16):
            allowed = seg[q] == seg[k] and k <= q
            assert bool(mask[0, 0, q, k]) == (not allowed), (q, k)  # True = masked out


def test_packed_without_te_uses_a_mask():
    inputs = prepare_model_inputs(packed(), device="cpu", use_thd=False)
    assert inputs.input_ids.shape == (1, 16) and inputs.labels.shape == (1, 16)
    assert inputs.packed_seq_params is None
    assert inputs.attention_mask.shape == (1, 1, 16, 16)
    assert inputs.cu_seqlens.tolist() == [0, 5, 8, 12, 16]
    assert inputs.cu_seqlens.dtype == torch.int32 and inputs.cu_seqlens.device.type == "cpu"
    assert schedule_shape(packed()) == (16, 1)


def test_packed_with_te_uses_thd_params():
    inputs = prepare_model_inputs(packed(), device="cpu", use_thd=True)
    params = inputs.packed_seq_params
    assert inputs.attention_mask is None
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 5, 8, 12, 16]
    assert params.max_seqlen_q == 5 and params.max_seqlen_kv == 5


def test_packed_cp2_keeps_this_ranks_tokens_and_global_boundaries():
    batch = packed(lens=(8, 4, 4, 8))
    for rank in range(2):
        inputs = prepare_model_inputs(batch, device="cpu", use_thd=True, cp_size=2, cp_rank=rank)
        want, local_cu = split_thd_for_cp({"tokens": batch["tokens"]}, batch["cu_seqlens"], 2, rank)
        assert torch.equal(inputs.input_ids[0], want["tokens"])
        assert torch.equal(inputs.cu_seqlens, local_cu)
        assert inputs.packed_seq_params.cu_seqlens_q.tolist() == [0, 8, 12, 16, 24]


def test_padded_batch():
    rows, length = 4, 6
    batch = dict(
        tokens=torch.randint(0, 50, (rows, length)),
        labels=torch.randint(0, 50, (rows, length)),
        loss_mask=torch.ones(rows, length),
        pair_index=torch.tensor([3, 3, 4, 4]),
        is_chosen=torch.tensor([True, False, True, False]),
    )
    inputs = prepare_model_inputs(batch, device="cpu", use_thd=True)
    assert inputs.attention_mask is None and inputs.packed_seq_params is None
    assert inputs.position_ids.tolist() == [list(range(length))] * rows
    assert inputs.cu_seqlens.tolist() == [0, 6, 12, 18, 24]
    assert schedule_shape(batch) == (length, rows)


@pytest.mark.parametrize(
    ("is_chosen", "pair_index"),
    [
        ([False, True, True, False], [7, 7, 9, 9]),  # rejected first
        ([True, False, True, False], [7, 8, 9, 9]),  # pair split
        ([True, False, True], [7, 7, 9]),  # odd count
    ],
)
def test_segments_must_come_in_pairs(is_chosen, pair_index):
    batch = packed()
    batch["is_chosen"] = torch.tensor(is_chosen)
    batch["pair_index"] = torch.tensor(pair_index)
    with pytest.raises(ValueError, match="pairs, chosen first"):
        prepare_model_inputs(batch, device="cpu", use_thd=False)


def test_cp_needs_thd():
    with pytest.raises(ValueError, match="Transformer Engine"):
        prepare_model_inputs(packed(lens=(4, 4, 4, 4)), device="cpu", use_thd=False, cp_size=2)


def test_transformer_config_mapping_and_errors():
    from adadpo_megatron.step.model import GPTOptions, build_transformer_config

    cfg = build_transformer_config(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        untie_embeddings=True,
        variable_seq_lengths=True,
        fp8=None,
    )
    assert cfg.gated_linear_unit and cfg.normalization == "RMSNorm" and cfg.num_query_groups == 2
    assert cfg.ffn_hidden_size == 128 and cfg.moe_token_dispatcher_type == "alltoall"
    assert cfg.adadpo_gpt_options == GPTOptions(
        position_embedding_type="rope", untie_embeddings=True
    )
    with pytest.raises(ValueError, match="--normalization"):
        build_transformer_config(
            num_layers=2, hidden_size=8, num_attention_heads=2, normalization="BatchNorm"
        )
    with pytest.raises(ValueError, match="virtual"):
        build_transformer_config(num_layers=3, hidden_size=8, num_attention_heads=2, pp=2, vpp=2)
