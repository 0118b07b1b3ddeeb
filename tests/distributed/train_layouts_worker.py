"""torchrun worker for test_train_cpu_layouts.py: the trainer with the 70B recipe's
parallel and memory flags on 2 CPU processes (gloo).

Run by hand: ``torchrun --nproc-per-node 2 tests/distributed/train_layouts_worker.py DATA
WORK`` (DATA a packed dataset of 36 one-pair packs, DATA_shared the same lines packed with
--prefix-sharing). Rank 0 writes WORK/results.json. Cases:

* ``distributed_optimizer``: DP=2 with and without --use-distributed-optimizer (5 steps);
  a save at step 2 with it and a resume from there; then the resume refusals (without the
  flag; at another TP).
* ``sp_recompute``: TP=2 without and with --sequence-parallel plus
  --recompute-granularity selective (both pack layouts), full block (separate packs)
  and full uniform (prefix-shared packs).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from train_worker import base_args, finish, losses, start  # noqa: E402

from adadpo_megatron.trainer.checkpointing import CheckpointError  # noqa: E402


def _copy_step(src: str, dst: str, step: int) -> None:
    """A checkpoint directory holding only ``src``'s step ``step`` (what a resume sees)."""
    if torch.distributed.get_rank() == 0:
        os.makedirs(dst)
        name = f"iter_{step:07d}"
        shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
        with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(f"{step}\n")
    torch.distributed.barrier()


def _refusal(argv: list[str]) -> str | None:
    try:
        start(argv)
    except CheckpointError as e:
        return str(e)
    return None


def case_distributed_optimizer(data: str, work: str, out: dict) -> None:
    args = base_args(data) + ["--train-iters", "5", "--device", "cpu"]
    run, rec = start(args)
    finish(run)
    out["dp2_plain"] = losses(rec)
    ckpt = os.path.join(work, "ckpt_distopt")
    run, rec = start(args + ["--use-distributed-optimizer", "--save", ckpt,
                             "--save-interval", "2"])
    out["distopt_holds_a_shard"] = type(run.optimizer.chained_optimizers[0]).__name__
    finish(run)
    out["dp2_distopt"] = losses(rec)
    half = os.path.join(work, "ckpt_distopt_half")
    _copy_step(ckpt, half, 2)
    run, rec = start(args + ["--use-distributed-optimizer", "--load", half])
    out["distopt_resumed_start"] = run.iteration
    finish(run)
    out["dp2_distopt_resumed"] = losses(rec)
    out["refused_without_flag"] = _refusal(args + ["--load", half])
    out["refused_other_tp"] = _refusal(args + ["--use-distributed-optimizer", "--load", half,
                                               "--tensor-model-parallel-size", "2"])


def case_sp_recompute(data: str, work: str, out: dict) -> None:
    variants = {
        "plain": [],
        "sp_selective": ["--sequence-parallel", "--recompute-granularity", "selective"],
        "sp_uniform": ["--sequence-parallel", "--recompute-granularity", "full",
                       "--recompute-method", "uniform", "--recompute-num-layers", "1"],
        "sp_block": ["--sequence-parallel", "--recompute-granularity", "full",
                     "--recompute-method", "block", "--recompute-num-layers", "2"],
    }
    # Each full-recompute method on one layout (the layout tests cover the other pairs).
    runs = {"separate": ("plain", "sp_selective", "sp_block"),
            "shared": ("plain", "sp_selective", "sp_uniform")}
    for layout, path in (("separate", data), ("shared", f"{data}_shared")):
        for name in runs[layout]:
            extra = variants[name]
            # Segments padded to TP multiples under SP can outgrow 128-token packs.
            args = base_args(path) + ["--train-iters", "3", "--device", "cpu",
                                      "--seq-length", "256",
                                      "--tensor-model-parallel-size", "2", *extra]
            run, rec = start(args)
            finish(run)
            out[f"tp2_{layout}_{name}"] = losses(rec)


def main() -> None:
    data, work = sys.argv[1], sys.argv[2]
    cases = sys.argv[3].split(",") if len(sys.argv) > 3 else [
        "distributed_optimizer", "sp_recompute"]
    out: dict = {}
    from adadpo_megatron.step.cpu import init_distributed_cpu

    init_distributed_cpu()
    for name in cases:
        globals()[f"case_{name}"](data, work, out)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump(out, f, indent=1)
    from adadpo_megatron.train import _destroy

    _destroy()


if __name__ == "__main__":
    main()
