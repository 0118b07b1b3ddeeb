"""torchrun worker for tests/distributed/test_resume_layouts.py: save, resume, compare, per layout.

Run by hand: ``torchrun --nproc-per-node N tests/distributed/resume_layouts_worker.py DATA EVAL
WORK CASES_JSON`` (DATA a 36-pack dataset, EVAL a 7-pack one). For each case of CASES_JSON,
in one process group, re-initialising megatron-core's parallel state each time:

* ``"resume"``: an uninterrupted run of 4 steps (checkpoints at steps 2 and 4, evaluation
  on EVAL at steps 2 and 4), then a run resumed from the step-2 checkpoint alone. Records
  both runs' losses, evaluation metrics, and the largest difference between their final
  weights on any rank (0.0 when bitwise equal).
* ``"eval_from"``: loads the step-4 checkpoint of another case at this layout and evaluates
  on EVAL (the same weights evaluated under another schedule).
* ``"precomputed_from"``: precomputes the reference log-probs (initial weights, this layout,
  tools/precompute_ref_logprobs.py) of DATA and EVAL, then trains like the named case with
  ``--ref-logprobs``.

Rank 0 writes WORK/results.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

import adadpo_megatron.trainer.loop as loop  # noqa: E402
from adadpo_megatron.train import build_run, init_distributed  # noqa: E402
from adadpo_megatron.trainer.arguments import parse_config  # noqa: E402

_EVALS: dict[int, dict] = {}
_evaluate = loop.evaluate
_with_reference = loop._with_reference
# Online reference log-probs seen on this rank: {"train"|"eval": {sequence id: value}}.
_ONLINE_REF: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
_split = ["train"]
_ONLINE_BY_CASE: dict[str, dict] = {}


def _recording_evaluate(run):
    _split[0] = "eval"
    try:
        metrics = _evaluate(run)
    finally:
        _split[0] = "train"
    _EVALS[run.iteration] = dict(metrics)
    return metrics


def _recording_with_reference(run, microbatches, precomputed):
    out = _with_reference(run, microbatches, precomputed)
    if precomputed is None and run.reference is not None:
        for mb in out:
            if "ref_logps" in mb:  # last pipeline stage
                seq = 2 * mb["pair_index"] + (~mb["is_chosen"]).long()
                _ONLINE_REF[_split[0]].update(zip(seq.tolist(), mb["ref_logps"].tolist(),
                                                  strict=True))
    return out


loop.evaluate = _recording_evaluate  # train() and run_step() call the module's functions
loop._with_reference = _recording_with_reference


def base_args(data: str, evals: str) -> list[str]:
    return ["--data-path", data, "--eval-data-path", evals, "--seq-length", "128",
            "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-fraction", "0",
            "--seed", "1234", "--train-iters", "4"]


def _gather_last_stage(record: dict[int, dict], key: str) -> dict[str, dict]:
    """Every rank's {step: metrics}, keeping the entries that hold ``key`` (last stage)."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, record)
    out: dict[str, dict] = {}
    for rec in gathered:
        for step, metrics in rec.items():
            if key in metrics:
                out.setdefault(str(step), metrics)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _train(argv: list[str]):
    """Build and train; returns (run, {step: train metrics}, {step: eval metrics}) gathered."""
    cfg = parse_config(argv)
    init_distributed(cfg)
    run = build_run(cfg)
    record: dict[int, dict] = {}
    run.on_step = lambda step, metrics: record.__setitem__(step, dict(metrics))
    start = run.iteration
    _EVALS.clear()
    try:
        loop.train(run)
    finally:
        run.writer.close()
    return (run, start, _gather_last_stage(record, "loss"),
            _gather_last_stage(dict(_EVALS), "eval/loss"))


def _weights(run) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in run.model for p in chunk.parameters()]


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    local = max((float((x - y).abs().max()) for x, y in zip(a, b, strict=True)), default=0.0)
    t = torch.tensor([local], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t)


def _keep_first_checkpoint(src: str, dst: str, iteration: int) -> None:
    """``dst``: a --save directory holding only ``src``'s checkpoint ``iteration``."""
    if torch.distributed.get_rank() == 0:
        name = f"iter_{iteration:07d}"
        os.makedirs(dst)
        shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
        with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(f"{iteration}\n")
    torch.distributed.barrier()


def case_resume(case: dict, data: str, evals: str, work: str) -> dict:
    args = base_args(data, evals) + case["args"]
    for split in _ONLINE_REF.values():
        split.clear()
    full = os.path.join(work, case["name"], "full")
    run, _, losses, eval_full = _train(args + ["--save", full, "--save-interval", "2",
                                               "--eval-interval", "2"])
    w_full = _weights(run)
    half = os.path.join(work, case["name"], "half")
    _keep_first_checkpoint(full, half, 2)
    run, start, resumed, eval_resumed = _train(args + ["--load", half, "--eval-interval", "2"])
    _ONLINE_BY_CASE[case["name"]] = {k: dict(v) for k, v in _ONLINE_REF.items()}
    return {"full": {k: v["loss"] for k, v in losses.items()},
            "resumed": {k: v["loss"] for k, v in resumed.items()},
            "resumed_start": start, "eval_full": eval_full, "eval_resumed": eval_resumed,
            "tokens": {k: v["tokens"] for k, v in losses.items()},
            "weights_max_diff": _max_diff(w_full, _weights(run))}


def case_eval_from(case: dict, data: str, evals: str, work: str) -> dict:
    ckpt = os.path.join(work, case["eval_from"], "full")
    cfg = parse_config(base_args(data, evals) + case["args"] + ["--load", ckpt])
    init_distributed(cfg)
    run = build_run(cfg)
    record = {run.iteration: loop.evaluate(run)}
    run.writer.close()
    return {"iteration": run.iteration, "eval": _gather_last_stage(record, "eval/loss")}


def case_precomputed_from(case: dict, data: str, evals: str, work: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    from precompute_ref_logprobs import precompute

    args = base_args(data, evals) + case["args"]
    cfg = parse_config(args)
    init_distributed(cfg)
    sidecar = os.path.join(work, case["name"], "ref.npz")
    if torch.distributed.get_rank() == 0:
        os.makedirs(os.path.dirname(sidecar), exist_ok=True)
    torch.distributed.barrier()
    paths = precompute(cfg, None, sidecar)
    # The side-cars against the online reference's log-probs of the named case's run.
    import numpy as np

    online: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(online, _ONLINE_BY_CASE[case["precomputed_from"]])
    diff, compared = 0.0, 0
    for split, path in zip(("train", "eval"), paths, strict=True):
        with np.load(path) as z:
            side = z["seq_logps"].astype(np.float64)
        for rank_ref in online:
            for seq, value in rank_ref[split].items():
                diff = max(diff, abs(float(side[seq]) - value) / max(1.0, abs(value)))
                compared += 1
    _, _, losses, eval_metrics = _train(args + ["--ref-logprobs", sidecar, "--eval-interval", "2"])
    return {"losses": {k: v["loss"] for k, v in losses.items()}, "eval": eval_metrics,
            "sidecar_vs_online_rel": diff, "sidecar_compared": compared}


def main() -> None:
    data, evals, work, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    from adadpo_megatron.step.cpu import init_distributed_cpu

    init_distributed_cpu()
    out: dict = {}
    for case in cases:
        kind = next(k for k in ("eval_from", "precomputed_from") if k in case) \
            if ("eval_from" in case or "precomputed_from" in case) else "resume"
        out[case["name"]] = globals()[f"case_{kind}"](case, data, evals, work)
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(work, f"results_{torch.distributed.get_world_size()}.json"),
                  "w") as f:
            json.dump(out, f, indent=1)
    from adadpo_megatron.train import _destroy

    _destroy()


if __name__ == "__main__":
    main()
