"""torchrun worker for tests/distributed/test_lora_train.py: LoRA trainer runs in one launch.

Run by hand: ``torchrun --nproc-per-node 2 tests/distributed/lora_train_worker.py DATA WORK``.
TP=2 throughout. A short full-parameter run makes the base checkpoint (BASE); then
LoRA AdaDPO runs start from it (--load BASE --finetune) with reference = base, save
adapter-only checkpoints, resume from --save alone, are refused onto a changed base, and
are compared against --ref-load BASE (a separate reference model) and --ref-logprobs
(precomputed from the adapter checkpoint, i.e. from its base). Rank 0 writes
WORK/results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from train_worker import base_args, finish, losses  # noqa: E402

from adadpo_megatron.train import build_run, init_distributed  # noqa: E402
from adadpo_megatron.trainer.arguments import parse_config  # noqa: E402
from adadpo_megatron.trainer.progress import resolve_resume  # noqa: E402

LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--tensor-model-parallel-size", "2"]
SWIGLU: list[str] = []  # ["--swiglu"]: loading the base at TP=1 fails (see test file)


def start(argv: list[str]):
    cfg = resolve_resume(parse_config(argv), note=lambda s: None)
    init_distributed(cfg)
    run = build_run(cfg)
    record: dict[int, dict] = {}
    run.on_step = lambda step, metrics: record.__setitem__(step, dict(metrics))
    return run, record


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _error(argv: list[str]) -> str | None:
    from adadpo_megatron.step.reference import SidecarError
    from adadpo_megatron.trainer.checkpointing import CheckpointError
    from adadpo_megatron.trainer.config import ConfigError

    try:
        start(argv)
    except (CheckpointError, ConfigError, SidecarError) as e:
        return str(e)
    return None


def main() -> None:
    from adadpo_megatron.step.cpu import init_distributed_cpu

    data, work = sys.argv[1], sys.argv[2]
    init_distributed_cpu()
    rank0 = torch.distributed.get_rank() == 0
    out: dict = {}
    base = os.path.join(work, "base")
    run, _ = start(base_args(data) + SWIGLU + ["--tensor-model-parallel-size", "2",
                                               "--train-iters", "2", "--save", base])
    finish(run)
    # LoRA from the base; reference = base (no second model).
    lora = base_args(data) + SWIGLU + LORA + ["--train-iters", "6", "--load", base,
                                              "--finetune"]
    s1 = os.path.join(work, "lora1")
    run, rec = start(lora + ["--save", s1, "--save-interval", "3", "--preference-loss", "dpo"])
    out["reference_mode"] = run.cfg.reference.mode
    out["holds_reference_model"] = run.reference is not None
    out["trainable"] = sorted({n.split(".adapter.")[-1] for c in run.model
                               for n, p in c.named_parameters() if p.requires_grad})
    out["optimizer_params"] = sum(p.numel() for g in run.optimizer.param_groups
                                  for p in g["params"])
    finish(run)
    out["dpo"] = losses(rec)
    out["dpo_rewards1"] = [rec[1]["rewards/chosen"], rec[1]["rewards/rejected"]]
    with open(os.path.join(s1, "iter_0000006", "adadpo_meta.json")) as f:
        out["meta_lora"] = json.load(f)["lora"]
    out["sizes"] = {"base": _size(os.path.join(base, "iter_0000002")),
                    "adapters": _size(os.path.join(s1, "iter_0000006"))}
    # Requeue: the same flags with --save alone resume at step 3 (copy of the step-3 ckpt).
    s2 = os.path.join(work, "lora2")
    if rank0:
        os.makedirs(s2)
        shutil.copytree(os.path.join(s1, "iter_0000003"), os.path.join(s2, "iter_0000003"))
        with open(os.path.join(s2, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3\n")
    torch.distributed.barrier()
    resume = base_args(data) + SWIGLU + LORA + ["--train-iters", "6", "--preference-loss", "dpo"]
    run, rec = start(resume + ["--save", s2])
    out["resumed_start"] = run.iteration
    finish(run)
    out["resumed"] = losses(rec)
    # Another layout (TP=1, DP=2) loads the TP=2 adapter checkpoint of step 3: step 4 is
    # the same batch (the adapters reshard).
    s3 = os.path.join(work, "lora_tp1")
    if rank0:
        os.makedirs(s3)
        shutil.copytree(os.path.join(s1, "iter_0000003"), os.path.join(s3, "iter_0000003"))
        with open(os.path.join(s3, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3\n")
    torch.distributed.barrier()
    tp1 = base_args(data) + SWIGLU + LORA[:4] + ["--train-iters", "6", "--preference-loss",
                                                 "dpo", "--load", s3]
    run, _ = start(tp1)  # the same schedule (--train-iters 6); one step is enough
    from adadpo_megatron.trainer.loop import run_step

    out["resharded_start"] = run.iteration
    out["resharded_step4"] = run_step(run)[0]["loss"]
    run.writer.close()
    # adadpo: reference = base vs a separate reference model (--ref-load BASE) vs
    # precomputed from the adapter checkpoint (whose reference is its base).
    run, rec = start(lora)
    finish(run)
    out["adadpo_base"] = losses(rec)
    run, rec = start(lora + ["--ref-load", base])
    out["ref_load_holds_model"] = run.reference is not None
    finish(run)
    out["adadpo_ref_load"] = losses(rec)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    from precompute_ref_logprobs import precompute

    cfg = parse_config(base_args(data) + LORA + ["--train-iters", "6"])
    init_distributed(cfg)
    sidecar = os.path.join(work, "ref.npz")
    precompute(cfg, s1, sidecar)
    run, rec = start(lora + ["--ref-logprobs", sidecar])
    finish(run)
    out["adadpo_precomputed"] = losses(rec)
    # Refusals: a full run given the adapter checkpoint; --load SAVE without --finetune onto
    # a base checkpoint; the base changed under the adapters.
    out["refuse_full"] = _error(base_args(data) + ["--tensor-model-parallel-size", "2",
                                                   "--train-iters", "6", "--load", s1])
    out["refuse_not_adapter"] = _error(base_args(data) + LORA + ["--train-iters", "6",
                                                                 "--load", base])
    if rank0:
        manifest = os.path.join(base, "iter_0000002", "adadpo_manifest.json")
        with open(manifest, "a") as f:
            f.write(" ")
    torch.distributed.barrier()
    out["refuse_changed_base"] = _error(resume + ["--load", s1])
    if rank0:
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump(out, f, indent=1)
    from adadpo_megatron.train import _destroy

    _destroy()


if __name__ == "__main__":
    main()
