"""examples/llama3_70b: every flag parses with the trainer's parser, the launchers pass the
environment's node layout to torchrun, and the planner says the layout fits 80 GB."""

from __future__ import annotations

import importlib.util
import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from adadpo_megatron.planner.cli import plan_from_argv
from adadpo_megatron.trainer.arguments import build_parser
from adadpo_megatron.trainer.config import loss_config_from_args

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "llama3_70b"


# Variables the launchers read; earlier in-process tests may have set some (torch.distributed).
_LAUNCH_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE",
                "WORLD_SIZE", "RANK", "LOCAL_RANK")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    return {**env, **extra}


def _bash_array(name: str, env: dict[str, str] | None = None) -> list[str]:
    script = f'source "{EXAMPLE / "flags.sh"}"; printf "%s\\0" "${{{name}[@]}}"'
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True,
                         env=_clean_env(**(env or {}))).stdout.decode()
    return out.split("\0")[:-1]


def _trainer_argv(printed: str) -> list[str]:
    tokens = shlex.split(printed)
    return tokens[tokens.index("adadpo_megatron.train") + 1:]


def test_flags_parse_with_the_trainer_parser() -> None:
    flags = _bash_array("ADADPO_70B_FLAGS", {"ADADPO_70B_DATA": "/d", "ADADPO_70B_SAVE": "/s"})
    args = build_parser().parse_args(flags)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (8, 4)
    assert args.num_layers_per_virtual_pipeline_stage == 5 and args.sequence_parallel
    assert args.use_distributed_optimizer and args.bf16
    assert (args.fp8, args.fp8_recipe) == ("hybrid", "delayed")
    assert args.recompute_granularity is not None
    assert args.seq_length == 8192 and args.global_batch_size == 128
    assert (args.lr_decay_style, args.lr_warmup_fraction) == ("cosine", 0.1)
    assert args.ref_logprobs == "/d/ref_logprobs.npz" and args.data_path == "/d"
    assert args.log_dir == "/s/logs"
    assert loss_config_from_args(args).name == "adadpo"


def test_planner_says_the_layout_fits_80gb() -> None:
    flags = _bash_array("ADADPO_70B_FLAGS") + _bash_array("PLAN_70B_FLAGS")
    result = plan_from_argv([*flags, "--num-gpus", "64"])
    assert result["errors"] == []
    assert result["fits"], result["memory_gib_per_gpu"]
    assert result["layout"]["dp"] == 2 and result["layout"]["vpp"] == 4
    assert result["params_total"] == pytest.approx(70.57e9, abs=0.01e9)
    assert result["memory_gib_per_gpu"]["reference"] == 0  # precomputed reference


def test_torchrun_script_takes_the_node_layout_from_the_environment() -> None:
    env = _clean_env(DRY_RUN="1", SKIP_PLAN="1", NNODES="2", NODE_RANK="1",
                     MASTER_ADDR="node-a", MASTER_PORT="29555", GPUS_PER_NODE="4")
    out = subprocess.run(["bash", str(EXAMPLE / "train_adadpo_70b.sh"), "--dpo-beta", "0.05"],
                         check=True, capture_output=True, text=True, env=env).stdout
    tokens = shlex.split(out)
    launcher = " ".join(tokens[: tokens.index("-m")])
    assert launcher == ("torchrun --nnodes 2 --node-rank 1 --nproc-per-node 4 "
                        "--master-addr node-a --master-port 29555")
    args = build_parser().parse_args(_trainer_argv(out))
    assert args.dpo_beta == 0.05  # extra flags come last and win


def test_sbatch_wrapper_runs_one_torchrun_per_node(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "scontrol": 'printf "gpu-node-07\\ngpu-node-08\\n"\n',
        # srun: drop its own options, run the command as the task of node 0.
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n',
    }
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN="1", SKIP_PLAN="1",
                     SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NNODES="2",
                     SLURM_GPUS_ON_NODE="8", ADADPO_REPO=str(REPO))
    out = subprocess.run(["bash", str(EXAMPLE / "slurm_adadpo_70b.sbatch"), "--seed", "7"],
                         check=True, capture_output=True, text=True, env=env).stdout
    tokens = shlex.split(out)
    assert tokens[:11] == ["torchrun", "--nnodes", "2", "--node-rank", "0", "--nproc-per-node",
                           "8", "--master-addr", "gpu-node-07", "--master-port", "6000"]
    assert build_parser().parse_args(_trainer_argv(out)).seed == 7


def test_scripts_are_valid_bash() -> None:
    for name in ("flags.sh", "train_adadpo_70b.sh", "slurm_adadpo_70b.sbatch"):
        subprocess.run(["bash", "-n", str(EXAMPLE / name)], check=True)


def test_trainer_validates_the_layout_for_64_gpus() -> None:
    from adadpo_megatron.trainer.config import config_from_args

    flags = _bash_array("ADADPO_70B_FLAGS")
    args = build_parser().parse_args([*flags, "--device", "cuda"])
    if importlib.util.find_spec("transformer_engine") is None:
        # Start-up refuses FP8 without Transformer Engine, naming the cause and the fix.
        with pytest.raises((RuntimeError, ValueError), match="Transformer Engine"):
            config_from_args(args, world_size=64)
    args.fp8 = None  # the rest of the validation does not need a GPU
    cfg = config_from_args(args, world_size=64)
    assert cfg.parallel.data_parallel_size == 2
    assert cfg.parallel.virtual_pipeline_model_parallel_size == 4
    assert cfg.training.num_microbatches == 64


def _source_flags(env: dict[str, str]) -> subprocess.CompletedProcess:
    script = f'source "{EXAMPLE / "flags.sh"}" && printf "%s\\0" "${{ADADPO_70B_FLAGS[@]}}"'
    return subprocess.run(["bash", "-c", script], capture_output=True, env=_clean_env(**env))


def test_flags_sh_takes_size_overrides_and_prints_each() -> None:
    original = _bash_array("ADADPO_70B_FLAGS")
    done = _source_flags({"ADADPO_70B_SET": "--num-layers=4 --hidden-size=64",
                          "ADADPO_70B_DROP": "--bf16 --fp8-format"})
    assert done.returncode == 0, done.stderr
    flags = done.stdout.decode().split("\0")[:-1]
    args = build_parser().parse_args(flags)
    assert (args.num_layers, args.hidden_size, args.bf16, args.fp8) == (4, 64, False, None)
    # Everything else is the recipe's, in the recipe's order.
    assert len(flags) == len(original) - 3
    assert flags[flags.index("--ffn-hidden-size") + 1] == "28672"
    printed = done.stderr.decode().splitlines()
    assert printed == ["flags.sh: drop --bf16", "flags.sh: drop --fp8-format hybrid",
                       "flags.sh: set --num-layers 80 -> 4", "flags.sh: set --hidden-size 8192 -> 64"]


@pytest.mark.parametrize("env, message", [
    ({"ADADPO_70B_SET": "--num-layer=4"}, "names --num-layer, which the flag list does not hold"),
    ({"ADADPO_70B_SET": "--num-layers 4"}, "is not --flag=value"),
    ({"ADADPO_70B_DROP": "--fp9"}, "names --fp9, which the flag list does not hold"),
    ({"ADADPO_70B_SET": "--sequence-parallel=1"}, "takes 0 values here, not one"),
])
def test_flags_sh_refuses_a_bad_override(env: dict[str, str], message: str) -> None:
    done = _source_flags(env)
    assert done.returncode != 0 and message in done.stderr.decode()


def test_launcher_stops_on_a_bad_override() -> None:
    env = _clean_env(DRY_RUN="1", SKIP_PLAN="1", ADADPO_70B_SET="--no-such-flag=1")
    done = subprocess.run(["bash", str(EXAMPLE / "train_adadpo_70b.sh")], capture_output=True,
                          text=True, env=env)
    assert done.returncode != 0 and "torchrun" not in done.stdout
