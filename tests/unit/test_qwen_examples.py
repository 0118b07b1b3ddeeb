"""examples/qwen2_5_72b and examples/qwen3_30b_a3b: every flag parses with the trainer's
parser and validates (as on a GPU job of the recipe's size), the model flags are exactly
what the converter prints for the model's published config.json, the launcher builds the
torchrun command, and the planner says the layout fits 80 GB H100s."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from adadpo_megatron.conversion.weights import LlamaShape
from adadpo_megatron.planner.cli import plan_from_argv
from adadpo_megatron.trainer.arguments import build_parser

REPO = Path(__file__).resolve().parents[2]

# The published config.json of each model (the fields the converter reads).
QWEN25_72B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
    "hidden_size": 8192, "intermediate_size": 29568, "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
    "max_window_layers": 70, "tie_word_embeddings": False, "vocab_size": 152064,
    "max_position_embeddings": 32768,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 151936,
    "max_position_embeddings": 40960, "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "use_sliding_window": False,
}
RECIPES = {
    # dir, flags variable, GPUs, published config, published parameters (total, active)
    "qwen2_5_72b": ("QWEN72", 64, QWEN25_72B, (72.7e9, 72.7e9)),
    "qwen3_30b_a3b": ("QWEN3MOE", 16, QWEN3_30B_A3B, (30.5e9, 3.3e9)),
}
_LAUNCH_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE",
                "WORLD_SIZE", "RANK", "LOCAL_RANK")


def _env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}, **extra}


def _array(recipe: str, name: str) -> list[str]:
    script = f'source "{REPO / "examples" / recipe / "flags.sh"}"; printf "%s\\0" "${{{name}[@]}}"'
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True,
                         env=_env()).stdout.decode()
    return out.split("\0")[:-1]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_flags_parse_and_match_the_converter(recipe: str) -> None:
    var, gpus, hf_config, _ = RECIPES[recipe]
    flags = _array(recipe, f"{var}_FLAGS")
    parser = build_parser()
    args = parser.parse_args(flags)
    printed = parser.parse_args(LlamaShape.from_hf_config(hf_config).trainer_flags())
    defaults = parser.parse_args([])
    for dest, value in vars(printed).items():  # every model flag the converter sets
        if value != getattr(defaults, dest):
            assert getattr(args, dest) == value, (recipe, dest)
    assert args.bf16 and args.use_distributed_optimizer and args.ref_logprobs
    if recipe == "qwen3_30b_a3b":
        assert (args.expert_model_parallel_size, args.moe_token_dispatcher_type) == (8, "alltoall")
        assert args.moe_grouped_gemm and args.num_experts == 128 and args.moe_router_topk == 8
    # Validates as the GPU job would (world size of the recipe; --device cuda: no CPU refusals).
    from adadpo_megatron.trainer.config import config_from_args

    args.device = "cuda"
    args.fp8 = None  # TE is not installed on the test machine; FP8 is checked by its own tests
    cfg = config_from_args(args, world_size=gpus)
    assert cfg.arch.add_qkv_bias == (recipe == "qwen2_5_72b")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_planner_says_it_fits_80gb(recipe: str) -> None:
    var, gpus, _, (total, active) = RECIPES[recipe]
    flags = _array(recipe, f"{var}_FLAGS") + _array(recipe, f"{var}_PLAN_FLAGS")
    result = plan_from_argv([*flags, "--num-gpus", str(gpus)])
    assert result["errors"] == []
    assert result["fits"], result["memory_gib_per_gpu"]
    assert result["params_total"] == pytest.approx(total, rel=0.01)
    assert result["params_active"] == pytest.approx(active, rel=0.02)
    assert result["memory_gib_per_gpu"]["reference"] == 0


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_launcher_builds_the_torchrun_command(recipe: str) -> None:
    env = _env(DRY_RUN="1", SKIP_PLAN="1", NNODES="2", NODE_RANK="1", MASTER_ADDR="node-a",
               GPUS_PER_NODE="8")
    out = subprocess.run(["bash", str(REPO / "examples" / recipe / "train_adadpo.sh"),
                          "--dpo-beta", "0.05"], check=True, capture_output=True, text=True,
                         env=env).stdout
    tokens = shlex.split(out)
    assert tokens[:3] == ["torchrun", "--nnodes", "2"]
    args = build_parser().parse_args(tokens[tokens.index("adadpo_megatron.train") + 1:])
    assert args.dpo_beta == 0.05
