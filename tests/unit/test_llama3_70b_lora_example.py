"""examples/llama3_70b_lora: its flags parse with the trainer's parser and validate for one
node of 8 GPUs, the reference is the base (no second model), and the planner says it fits
80 GB with gradients and Adam state for the adapters only."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from adadpo_megatron.planner.cli import plan_from_argv
from adadpo_megatron.trainer.arguments import build_parser
from adadpo_megatron.trainer.config import config_from_args

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama3_70b_lora"


def _bash_array(name: str, **env: str) -> list[str]:
    script = f'source "{EXAMPLE / "flags.sh"}"; printf "%s\\0" "${{{name}[@]}}"'
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True,
                         env={"PATH": "/usr/bin:/bin", **env}).stdout.decode()
    return out.split("\0")[:-1]


def test_flags_validate_for_one_node_with_reference_base(tmp_path) -> None:
    flags = _bash_array("LORA_70B_FLAGS", LORA_70B_SAVE=str(tmp_path / "s"))
    args = build_parser().parse_args([*flags, "--device", "cuda"])
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (8, 1)
    assert args.lora_rank == 16 and args.ref_logprobs is None and args.ref_load is None
    assert "--finetune" in flags  # a new run: fresh adapters on the converted base
    cfg = config_from_args(args, world_size=8)
    assert cfg.reference.mode == "base" and cfg.parallel.data_parallel_size == 1
    assert cfg.lora.target_modules == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def test_requeue_resumes_from_save_alone(tmp_path) -> None:
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("50\n")
    flags = _bash_array("LORA_70B_FLAGS", LORA_70B_SAVE=str(tmp_path))
    assert "--finetune" not in flags and flags[flags.index("--load") + 1] == str(tmp_path)


def test_planner_says_it_fits_one_node() -> None:
    result = plan_from_argv(_bash_array("LORA_70B_FLAGS") + _bash_array("PLAN_70B_FLAGS"))
    assert result["errors"] == [] and result["fits"], result["memory_gib_per_gpu"]
    mem = result["memory_gib_per_gpu"]
    assert mem["reference"] == 0  # the base is the reference: no second copy
    # 80 layers x r=16 x (qkv 8192+10240, proj 8192+8192, fc1 8192+57344, fc2 28672+8192)
    assert result["trainable_params"] == 80 * 16 * (18432 + 16384 + 65536 + 36864)
    # fp32 grads + Adam (master, m, v) for the adapters only: 16 bytes per local adapter
    # parameter, against 16 bytes per local base parameter (141 GiB) for full training.
    assert mem["gradients"] + mem["optimizer"] < 1.0
    assert mem["weights"] == pytest.approx(result["params_per_gpu"] * 2 / 2**30, rel=0.02)
    full = plan_from_argv([a for a in _bash_array("LORA_70B_FLAGS") if a != "--lora-rank"
                           and a != "16"] + _bash_array("PLAN_70B_FLAGS"))
    assert not full["fits"]  # the same layout with full-parameter training does not fit


def test_dry_run_command() -> None:
    out = subprocess.run(["bash", str(EXAMPLE / "train_lora_70b.sh"), "--seed", "7"],
                         check=True, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "SKIP_PLAN": "1"}).stdout
    tokens = shlex.split(out)
    assert tokens[:7] == ["torchrun", "--nnodes", "1", "--node-rank", "0", "--nproc-per-node", "8"]
    args = build_parser().parse_args(tokens[tokens.index("adadpo_megatron.train") + 1:])
    assert args.seed == 7 and args.lora_rank == 16
