"""torchrun worker for tests/distributed/test_elastic_restart.py (run with --max-restarts 1).

Attempt 0 trains (TP=2, checkpoints every 2 steps) and, at step 5, rank 1 records the
pids of every process it and rank 0 started and kills itself with SIGKILL, as ``kill -9``
would. torchrun then stops rank 0 and starts attempt 1 with the same command: the run
resumes from its ``--save`` by itself (no ``--load``) and finishes. Attempt 1 then runs
the same training uninterrupted into other directories, for comparison. Each rank saves
its final weights; rank 0 writes WORK_DIR/results.json.

Run by hand: ``torchrun --nproc-per-node 2 --max-restarts 1 tests/distributed/elastic_worker.py
DATA_DIR WORK_DIR`` (DATA_DIR: the 36-pack dataset of test_train.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from adadpo_megatron.train import build_run, init_distributed  # noqa: E402
from adadpo_megatron.trainer.arguments import parse_config  # noqa: E402
from adadpo_megatron.trainer.checkpointing import _unwrap  # noqa: E402
from adadpo_megatron.trainer.hygiene import install  # noqa: E402
from adadpo_megatron.trainer.loop import train  # noqa: E402
from adadpo_megatron.trainer.progress import resolve_resume  # noqa: E402

KILL_STEP = 5


def flags(data: str, save: str, logs: str) -> list[str]:
    return ["--data-path", data, "--seq-length", "128", "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "4", "--global-batch-size", "4",
            "--lr", "1e-3", "--lr-warmup-fraction", "0", "--seed", "1234",
            "--preference-loss", "adadpo", "--dpo-beta", "0.5",
            "--tensor-model-parallel-size", "2", "--train-iters", "6",
            "--save", save, "--save-interval", "2", "--log-dir", logs]


def run_job(argv: list[str], work: str, tag: str, kill: bool) -> int:
    """What ``adadpo-train`` does (resume rule included); returns the step it started at."""
    cfg = resolve_resume(parse_config(argv), note=lambda text: None)
    init_distributed(cfg)
    run = build_run(cfg)
    start, rank = run.iteration, torch.distributed.get_rank()

    def on_step(step: int, metrics: dict) -> None:
        if kill and step == KILL_STEP:
            pids = [p.pid for p in psutil.Process().children(recursive=True)]
            with open(os.path.join(work, f"children_rank{rank}.json"), "w") as f:
                json.dump(pids, f)
            if rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            # Two nodes: rank 0 stays out of collectives while its agent notices the other
            # node rejoining, so it restarts without counting a failure of its own.
            time.sleep(float(os.environ.get("ELASTIC_RANK0_PAUSE", "0")))

    run.on_step = on_step
    try:
        train(run)
    finally:
        run.writer.close()
    weights = {k: v.detach().clone() for k, v in _unwrap(run.model[0]).state_dict().items()
               if isinstance(v, torch.Tensor)}
    torch.save(weights, os.path.join(work, f"weights_{tag}_rank{rank}.pt"))
    return start


def main() -> None:
    data, work = sys.argv[1], sys.argv[2]
    install()  # as adadpo-train does: no child outlives its rank
    from adadpo_megatron.step.cpu import init_distributed_cpu

    init_distributed_cpu()
    # The attempt every node agrees on (step/elastic_store.py), from 0; each node's own
    # restart count is recorded too (on two nodes they differ: see test_elastic_multinode).
    attempt = int(os.environ["ADADPO_ELASTIC_ATTEMPT"]) - 1
    counts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(counts, os.environ.get("TORCHELASTIC_RESTART_COUNT"))
    start = run_job(flags(data, os.path.join(work, "ckpt"), os.path.join(work, "logs")),
                    work, "elastic", kill=attempt == 0)
    run_job(flags(data, os.path.join(work, "ckpt_ref"), os.path.join(work, "logs_ref")),
            work, "ref", kill=False)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump({"attempt": attempt, "elastic_start": start, "restart_counts": counts}, f)
    from adadpo_megatron.train import _destroy

    _destroy()


if __name__ == "__main__":
    main()
