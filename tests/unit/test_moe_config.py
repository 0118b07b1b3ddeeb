"""The trainer's family and MoE flags (trainer/moe_config.py): validation in one line naming
the flag, the TransformerConfig / parallel-state fields they map to, the frozen reference's
settings, and what the checkpoint fingerprint covers."""

from __future__ import annotations

import argparse

import pytest

from adadpo_megatron.trainer.arguments import parse_config
from adadpo_megatron.trainer.config import ConfigError

BASE = ["--data-path", "d", "--train-iters", "1", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--device", "cpu"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "16"]


def test_dense_defaults_map_to_nothing_new() -> None:
    cfg = parse_config(BASE, world_size=1)
    assert cfg.arch.is_default and cfg.arch.parallel_kwargs() == {}
    assert cfg.arch.transformer_kwargs() == {"add_qkv_bias": False, "qk_layernorm": False}


def test_moe_maps_to_megatron_fields_and_reference_has_no_aux_loss() -> None:
    cfg = parse_config(BASE + MOE + ["--moe-aux-loss-coeff", "0.01",
                                     "--expert-model-parallel-size", "2",
                                     "--moe-token-dispatcher-type", "alltoall"], world_size=2)
    kw = cfg.arch.transformer_kwargs()
    assert (kw["num_moe_experts"], kw["moe_router_topk"], kw["moe_ffn_hidden_size"]) == (4, 2, 16)
    assert (kw["moe_aux_loss_coeff"], kw["moe_router_load_balancing_type"]) == (0.01, "aux_loss")
    assert kw["expert_model_parallel_size"] == 2 and kw["expert_tensor_parallel_size"] == 1
    ref = cfg.arch.transformer_kwargs(reference=True)
    assert (ref["moe_aux_loss_coeff"], ref["moe_router_load_balancing_type"]) == (0.0, "none")
    assert cfg.arch.parallel_kwargs() == {"expert_model_parallel_size": 2,
                                          "expert_tensor_parallel_size": 1}
    assert not cfg.arch.fixed_length_packs  # alltoall takes any token count
    allgather = parse_config(BASE + MOE + ["--expert-model-parallel-size", "2"], world_size=2)
    assert allgather.arch.fixed_length_packs


def test_fingerprint_covers_the_model_not_the_expert_layout() -> None:
    ep1 = parse_config(BASE + MOE, world_size=2)
    ep2 = parse_config(BASE + MOE + ["--expert-model-parallel-size", "2"], world_size=2)
    assert ep1.fingerprint() == ep2.fingerprint()
    top1 = parse_config(BASE + MOE[:4] + ["--moe-router-topk", "3", *MOE[4:]], world_size=2)
    assert top1.fingerprint() != ep1.fingerprint()
    # A dense run's fingerprint is what it was before the family/MoE group existed, so
    # older checkpoints still resume.
    import hashlib
    import json

    dense = parse_config(BASE, world_size=1)
    d = dense.to_dict()
    blob = json.dumps({"model": d["model"], "loss": d["loss"]}, sort_keys=True)
    assert dense.fingerprint() == hashlib.sha256(blob.encode()).hexdigest()[:16]


@pytest.mark.parametrize(("flags", "world", "message"), [
    (["--moe-ffn-hidden-size", "16"], 1, "--moe-ffn-hidden-size 16 needs --num-experts"),
    (["--expert-model-parallel-size", "2"], 2, "--expert-model-parallel-size 2 needs --num-experts"),
    (MOE[:2] + ["--moe-router-topk", "5"], 1, "--moe-router-topk 5 must be in [1, --num-experts 4]"),
    (MOE + ["--expert-model-parallel-size", "3"], 3, "not divisible by --expert-model-parallel-size 3"),
    (MOE + ["--expert-model-parallel-size", "4"], 2, "must divide the 2 ranks"),
    (MOE + ["--moe-grouped-gemm"], 1, "--moe-grouped-gemm needs a CUDA GPU"),
    (MOE + ["--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
    (MOE + ["--expert-model-parallel-size", "1", "--expert-tensor-parallel-size", "2",
            "--moe-token-dispatcher-type", "alltoall"], 2, "does not run on the CPU"),
    (MOE[:2] + ["--moe-router-topk", "1"], 1, "--moe-router-topk 1 needs --moe-router-pre-softmax"),
    (["--kv-channels", "0"], 1, "--kv-channels must be positive"),
])
def test_bad_moe_flags_are_refused_naming_the_flag(flags, world, message) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(BASE + flags, world_size=world)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_megatron_lm_entry_refuses_an_aux_loss_it_would_scale_wrong() -> None:
    from adadpo_megatron.integrations.megatron_lm import _check_megatron_flags

    args = argparse.Namespace(dataloader_type="external", calculate_per_token_loss=True,
                              pipeline_model_parallel_size=1, micro_batch_size=1,
                              num_experts=8, moe_aux_loss_coeff=0.01)
    with pytest.raises(ValueError, match="--moe-aux-loss-coeff > 0 with the AdaDPO entry"):
        _check_megatron_flags(args)
    args.moe_aux_loss_coeff = 0.0
    _check_megatron_flags(args)
