"""torchrun worker for tests/distributed/test_train.py: several trainer runs in one launch.

Run by hand: ``torchrun --nproc-per-node 2 tests/distributed/train_worker.py DATA_DIR WORK_DIR``
(DATA_DIR a packed dataset of 36 packs). Rank 0 writes WORK_DIR/results.json; the test
file checks it. Each case re-initialises megatron-core's parallel state in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

from adadpo_megatron.train import build_run, init_distributed  # noqa: E402
from adadpo_megatron.trainer.arguments import parse_config  # noqa: E402
from adadpo_megatron.trainer.checkpointing import CheckpointError  # noqa: E402
from adadpo_megatron.trainer.loop import TrainingStopped, train  # noqa: E402


def base_args(data: str) -> list[str]:
    return ["--data-path", data, "--seq-length", "128", "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "4", "--global-batch-size", "4",
            "--lr", "1e-3", "--lr-warmup-fraction", "0", "--seed", "1234",
            "--preference-loss", "adadpo", "--dpo-beta", "0.5"]


def start(argv: list[str]):
    cfg = parse_config(argv)
    init_distributed(cfg)
    run = build_run(cfg)
    record: dict[int, dict] = {}
    run.on_step = lambda step, metrics: record.__setitem__(step, dict(metrics))
    return run, record


def finish(run) -> None:
    try:
        train(run)
    finally:
        run.writer.close()


def losses(record: dict[int, dict]) -> dict[str, float]:
    return {str(k): v["loss"] for k, v in sorted(record.items())}


def case_train_and_resume(data: str, work: str, out: dict) -> None:
    tp2 = base_args(data) + ["--tensor-model-parallel-size", "2"]
    full, ckpt_full = os.path.join(work, "full"), os.path.join(work, "ckpt_full")
    run, rec = start(tp2 + ["--train-iters", "6", "--save", ckpt_full, "--save-interval", "3",
                            "--log-dir", full, "--eval-data-path", data, "--eval-interval", "3",
                            "--eval-iters", "2"])
    finish(run)
    out["full"] = losses(rec)
    # Resume from the step-3 checkpoint in a directory of its own.
    ckpt_half = os.path.join(work, "ckpt_half")
    if torch.distributed.get_rank() == 0:
        os.makedirs(ckpt_half)
        shutil.copytree(os.path.join(ckpt_full, "iter_0000003"),
                        os.path.join(ckpt_half, "iter_0000003"))
        with open(os.path.join(ckpt_half, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("3\n")
    torch.distributed.barrier()
    run, rec = start(tp2 + ["--train-iters", "6", "--load", ckpt_half,
                            "--log-dir", os.path.join(work, "resumed")])
    out["resumed_start"] = run.iteration
    finish(run)
    out["resumed"] = losses(rec)
    # Another layout (TP=1, DP=2) loads the TP=2 checkpoint: step 4 is the same batch.
    run, rec = start(base_args(data) + ["--train-iters", "4", "--load", ckpt_half])
    finish(run)
    out["resharded"] = losses(rec)


def case_refusals(data: str, work: str, out: dict) -> None:
    ckpt = os.path.join(work, "ckpt_half")
    msgs = {}
    for name, extra, load in (
            ("shape", ["--hidden-size", "64"], ckpt),
            ("loss", ["--dpo-beta", "0.1"], ckpt),
            ("corrupt", [], os.path.join(work, "ckpt_corrupt")),
            ("truncated", [], os.path.join(work, "ckpt_truncated")),
            ("flipped", [], os.path.join(work, "ckpt_flipped"))):
        if name in ("corrupt", "truncated", "flipped") and torch.distributed.get_rank() == 0:
            shutil.copytree(ckpt, load)
            it = os.path.join(load, "iter_0000003")
            shards = sorted(f for f in os.listdir(it) if f.endswith(".distcp"))
            if name == "corrupt":
                for f in shards:
                    os.remove(os.path.join(it, f))
            elif name == "truncated":
                path = os.path.join(it, shards[0])
                os.truncate(path, os.path.getsize(path) // 2)
            else:  # 1 KB of flipped bytes in the middle of a shard (tensor payload)
                path = os.path.join(it, shards[-1])
                with open(path, "r+b") as f:
                    f.seek(os.path.getsize(path) // 2)
                    block = f.read(1024)
                    f.seek(os.path.getsize(path) // 2)
                    f.write(bytes(b ^ 0xFF for b in block))
            out[f"{name}_file"] = os.path.join(it, shards[0] if name == "truncated" else shards[-1])
        torch.distributed.barrier()
        try:
            start(base_args(data) + ["--tensor-model-parallel-size", "2", "--train-iters", "6",
                          "--load", load] + extra)
            msgs[name] = None
        except CheckpointError as e:
            msgs[name] = str(e)
    out["refusals"] = msgs


def case_autoresume(data: str, work: str, out: dict) -> None:
    """Rerunning with the same --save and no --load resumes from it (never restarts at 0)."""
    from adadpo_megatron.trainer.progress import read_tracker, resolve_resume

    save = os.path.join(work, "ckpt_auto")
    if torch.distributed.get_rank() == 0:
        shutil.copytree(os.path.join(work, "ckpt_half"), save)
    torch.distributed.barrier()
    tp2 = base_args(data) + ["--tensor-model-parallel-size", "2"]
    cfg = resolve_resume(parse_config(tp2 + ["--train-iters", "6", "--save", save]),
                         note=lambda s: None)
    init_distributed(cfg)
    run = build_run(cfg)
    record: dict[int, dict] = {}
    run.on_step = lambda step, metrics: record.__setitem__(step, dict(metrics))
    out["auto_start"] = run.iteration
    finish(run)
    out["auto"] = losses(record)
    out["auto_tracker"] = read_tracker(save)


def case_precomputed(data: str, work: str, out: dict) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    from precompute_ref_logprobs import precompute

    # Same --train-iters as case_train_and_resume: the LR schedule depends on it.
    tp2 = base_args(data) + ["--tensor-model-parallel-size", "2", "--train-iters", "6"]
    cfg = parse_config(tp2)
    init_distributed(cfg)
    sidecar = os.path.join(work, "ref.npz")
    precompute(cfg, None, sidecar)
    run, rec = start(tp2 + ["--ref-logprobs", sidecar])
    out["precomputed_holds_model"] = run.reference is not None
    finish(run)
    out["precomputed"] = losses(rec)


def case_prefix_sharing(data: str, work: str, out: dict) -> None:
    """DATA_shared (the same lines packed with --prefix-sharing): precomputed reference sums
    equal the unshared dataset's, online-reference training starts at log 2, CP refused."""
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    from precompute_ref_logprobs import precompute

    from adadpo_megatron.trainer.config import ConfigError

    shared = data + "_shared"
    sums = {}
    for name, path in (("plain", data), ("shared", shared)):
        cfg = parse_config(base_args(path) + ["--tensor-model-parallel-size", "2",
                                              "--train-iters", "3", "--micro-batch-size", "2"])
        init_distributed(cfg)
        sidecar = os.path.join(work, f"ref_{name}.npz")
        precompute(cfg, None, sidecar)
        with np.load(sidecar) as z:
            sums[name] = z["seq_logps"].astype(np.float64)
    out["shared_ref_rel_err"] = float(
        np.abs(sums["shared"] - sums["plain"]).max() / np.abs(sums["plain"]).max())
    run, rec = start(base_args(shared) + ["--tensor-model-parallel-size", "2",
                                          "--train-iters", "3"])
    out["shared_attention"] = run.model[0].module.config.adadpo_gpt_options.prefix_attention
    finish(run)
    out["shared_losses"] = losses(rec)
    try:
        start(base_args(shared) + ["--context-parallel-size", "2", "--train-iters", "1"])
        out["shared_cp_refusal"] = None
    except ConfigError as e:
        out["shared_cp_refusal"] = str(e)
    try:  # unshared data: CP needs TE attention, which a CPU run has not
        start(base_args(data) + ["--context-parallel-size", "2", "--train-iters", "1"])
        out["cpu_cp_refusal"] = None
    except ConfigError as e:
        out["cpu_cp_refusal"] = str(e)


def case_dp_coverage(data: str, work: str, out: dict) -> None:
    # DP=2: 3 steps of 12 packs = one epoch of the 36-pack dataset.
    run, rec = start(base_args(data) + ["--global-batch-size", "12", "--train-iters", "3"])
    seen: list[int] = []
    next_step = run.position.next_step

    def recording_next_step():
        ids = next_step()
        seen.extend(ids)
        return ids

    run.position.next_step = recording_next_step
    finish(run)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, seen)
    pairs = [[int(p) for i in ids for p in run.train_data.pairs_in_pack(i)] for ids in gathered]
    out["dp_packs"] = gathered
    out["dp_pairs"] = pairs
    out["num_pairs"] = run.train_data.num_pairs
    out["dp_losses"] = losses(rec)


def case_nan_skip(data: str, work: str, out: dict) -> None:
    run, rec = start(base_args(data) + ["--tensor-model-parallel-size", "2",
                                        "--train-iters", "6", "--max-skipped-steps", "2"])
    bad = {2, 4, 5}
    forward = run.forward_step

    def poisoned(data_iterator, model):
        output, loss_func = forward(data_iterator, model)
        if run.iteration + 1 in bad:
            output = output * float("nan")
        return output, loss_func

    run.forward_step = poisoned
    snapshots = {}
    param = next(run.model[0].parameters())
    on_step = run.on_step

    def snap(step, metrics):
        on_step(step, metrics)
        snapshots[step] = param.detach().clone()

    run.on_step = snap
    try:
        finish(run)
        out["nan_stopped"] = None
    except TrainingStopped as e:
        out["nan_stopped"] = str(e)
    out["nan_skipped"] = {str(k): v["skipped_steps"] for k, v in rec.items()}
    out["nan_param_equal"] = {f"{a}-{b}": bool(torch.equal(snapshots[a], snapshots[b]))
                              for a, b in ((1, 2), (2, 3), (3, 4), (4, 5))}


def main() -> None:
    data, work = sys.argv[1], sys.argv[2]
    cases = sys.argv[3].split(",") if len(sys.argv) > 3 else [
        "train_and_resume", "refusals", "autoresume", "precomputed", "dp_coverage", "nan_skip",
        "prefix_sharing"]
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
