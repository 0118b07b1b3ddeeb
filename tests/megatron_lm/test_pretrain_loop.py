"""``examples/megatron_lm/pretrain_adadpo.py`` under Megatron-LM's real ``pretrain()`` loop.

CPU, gloo, 2 processes (TP=2, and DP=2), Megatron-LM from ``MEGATRON_LM_PATH`` or the
archive (see conftest.py). One module fixture runs every launch once (a launch costs
10-30 s here); the tests check what the runs left behind:

1. ``sft``: a Megatron-LM run (simpo, TP=2) that saves a torch_dist checkpoint at step 3:
   a Megatron-LM user's SFT model, with no ``adadpo_meta.json``.
2. ``main``: ratio-space adadpo, TP=2, 10 steps from ``--load sft --finetune``, online
   reference ``--ref-load sft``, ``--train-data-path``/``--valid-data-path``, evaluation
   every 5 steps, checkpoints at 5 and 10, ``--log-dir``, ``--tensorboard-dir`` and
   Megatron-LM's ``--wandb-*`` flags (offline).
3. ``resumed``: ``main``'s step-5 checkpoint resumed to step 10 at DP=2 (TP=1), into the
   same W&B run.
4. ``precompute_ref_logprobs.py --ref-load sft`` (TP=2): side-cars for both splits.
5. ``adadpo-train`` with main's flags and those side-cars (TP=2).
6. ``dpo``: dpo, DP=2, 2 steps from sft with ``--ref-logprobs`` (the side-car).
7. ``bad``: Megatron-LM's default dropout (0.1): refused before any model is built.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from launch import ADADPO_TRAIN_MODEL, REPO, TOKENIZER, pretrain, run_tool

pytestmark = pytest.mark.distributed

LN2 = math.log(2.0)
# Same arithmetic in another process layout (TP=2 vs TP=1 and DP=2, Megatron-LM's loop vs
# adadpo-train's): fp32 round-off only; measured <= 3e-7 on losses and metrics.
TOL = 1e-5


def _close(a: float, b: float) -> bool:
    """Within TOL, relative above magnitude 1 (logps are sums over ~60 tokens, ~ -110)."""
    return abs(a - b) <= TOL * max(1.0, abs(b))

LOSS_FLAGS = ["--preference-loss", "adadpo", "--adadpo-space", "ratio"]
# Megatron-LM's own W&B flags (offline: launch.py sets WANDB_MODE); files in SAVE/wandb.
WANDB = ["--wandb-project", "adadpo-test", "--wandb-exp-name", "megatron-lm"]
# Wall-clock scalars: differ between any two runs.
TIMING = {"elapsed_s", "eta_s"}


def _pack(work: Path, name: str, n: int, seed: int) -> Path:
    import sys

    sys.path.insert(0, str(REPO / "tests" / "distributed"))
    from test_train import _pairs

    from adadpo_megatron.data.pack_tool import main as pack_main

    jsonl = work / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(n, seed)))
    out = work / name
    # Pack size 128 holds one pair per pack (each pair is 65-128 tokens).
    assert pack_main([str(jsonl), "--output", str(out), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) in (0, None)
    return out


def _records(log_dir: Path) -> tuple[dict[int, dict], list[dict]]:
    train, evals = {}, []
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if any(k.startswith("eval/") for k in rec):
            evals.append(rec)
        else:
            train[rec["step"]] = rec
    return train, evals


@pytest.fixture(scope="module")
def runs(megatron_lm_path, tmp_path_factory) -> dict:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    work = tmp_path_factory.mktemp("megatron_lm_runs")
    train, valid = _pack(work, "train", 24, 0), _pack(work, "valid", 8, 1)
    sft = work / "sft"
    data = ["--train-data-path", str(train), "--valid-data-path", str(valid)]
    no_eval = ["--eval-iters", "0", "--eval-interval", "1000"]
    out: dict = {"work": work, "train": train, "valid": valid, "sft": sft}

    out["sft_proc"] = pretrain(
        megatron_lm_path, 2, "--tensor-model-parallel-size", "2", "--train-iters", "3",
        "--data-path", str(train), "--preference-loss", "simpo", *no_eval,
        "--save", str(sft), "--save-interval", "3", "--log-dir", str(work / "sft_log"))

    main = work / "main"
    out["main_proc"] = pretrain(
        megatron_lm_path, 2, "--tensor-model-parallel-size", "2", "--train-iters", "10",
        *data, "--eval-interval", "5", "--eval-iters", "1", *LOSS_FLAGS,
        "--load", str(sft), "--finetune", "--ref-load", str(sft),
        "--save", str(main / "ckpt"), "--save-interval", "5",
        "--log-dir", str(main / "log"), "--tensorboard-dir", str(main / "tb"), *WANDB)

    resumed = work / "resumed"
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(main / "ckpt" / "iter_0000005", resumed / "ckpt" / "iter_0000005")
    (resumed / "ckpt" / "latest_checkpointed_iteration.txt").write_text("5\n")
    shutil.copy(main / "ckpt" / "wandb_run.json", resumed / "ckpt")  # the W&B run to continue
    out["resumed_proc"] = pretrain(
        megatron_lm_path, 2, "--tensor-model-parallel-size", "1", "--train-iters", "10",
        *data, "--eval-interval", "5", "--eval-iters", "1", *LOSS_FLAGS,
        "--load", str(resumed / "ckpt"), "--ref-load", str(sft),
        "--save", str(resumed / "ckpt"), "--save-interval", "5",
        "--log-dir", str(resumed / "log"), *WANDB)

    at_flags = [*ADADPO_TRAIN_MODEL, "--tensor-model-parallel-size", "2",
                "--data-path", str(train), "--eval-data-path", str(valid)]
    run_tool(megatron_lm_path, 2, [str(REPO / "tools" / "precompute_ref_logprobs.py"),
                                   *at_flags, *LOSS_FLAGS, "--ref-load", str(sft)])
    out["adadpo_train_proc"] = run_tool(megatron_lm_path, 2, [
        "-m", "adadpo_megatron.train", *at_flags, "--train-iters", "10", *LOSS_FLAGS,
        "--eval-interval", "5", "--eval-iters", "1", "--load", str(sft), "--finetune",
        "--ref-logprobs", str(train / "ref_logprobs.npz"),
        "--log-dir", str(work / "adadpo_train_log")])

    out["dpo_proc"] = pretrain(
        megatron_lm_path, 2, "--tensor-model-parallel-size", "1", "--train-iters", "2",
        *data, *no_eval, "--preference-loss", "dpo", "--load", str(sft), "--finetune",
        "--ref-logprobs", str(train / "ref_logprobs.npz"), "--log-dir", str(work / "dpo_log"))

    # Megatron-LM's own default dropout (0.1): the flag list without the two zeros.
    out["bad_proc"] = pretrain(
        megatron_lm_path, 1, "--train-iters", "2", "--data-path", str(train), *no_eval,
        "--preference-loss", "simpo", "--hidden-dropout", "0.1", check=False)
    return out


def test_step_one_loss_is_ln2_for_dpo_and_ratio_adadpo(runs) -> None:
    """Policy == reference at step 1: online reference (adadpo) and side-car (dpo)."""
    for name in ("main", "dpo"):
        train, _ = _records(runs["work"] / name / "log" if name == "main"
                            else runs["work"] / "dpo_log")
        first = train[1]
        assert abs(first["loss"] - LN2) < 1e-6, (name, first["loss"])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(first[key]) < 1e-6, (name, key, first[key])


def test_ten_steps_equal_adadpo_train(runs) -> None:
    """Same data, flags and initial weights: every logged metric, train and eval."""
    mine, mine_eval = _records(runs["work"] / "main" / "log")
    theirs, theirs_eval = _records(runs["work"] / "adadpo_train_log")
    assert sorted(mine) == sorted(theirs) == list(range(1, 11))
    for step in mine:
        shared = set(mine[step]) & set(theirs[step]) - {"step"} - TIMING
        assert {"loss", "logps/chosen", "adadpo/coef_max", "pairs"} <= shared
        for key in shared:
            assert _close(mine[step][key], theirs[step][key]), (step, key)
    assert [r["step"] for r in theirs_eval] == [5, 10]
    for a, b in zip(mine_eval[:2], theirs_eval, strict=True):
        assert set(a) == set(b)
        for key in set(a) - {"step"}:
            assert _close(a[key], b[key]), (a["step"], key)


def _weights(ckpt: Path, scratch: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / (ckpt.parent.parent.name + ".pt")
    dcp_to_torch_save(str(ckpt), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)
            and not k.startswith(("optimizer", "rng_state")) and "_extra_state" not in k}


def test_resume_at_another_dp_size_equals_uninterrupted(runs, tmp_path) -> None:
    """Saved at 5 (TP=2), resumed at DP=2 (TP=1) to 10: same losses and final weights."""
    full, _ = _records(runs["work"] / "main" / "log")
    resumed, _ = _records(runs["work"] / "resumed" / "log")
    assert sorted(resumed) == list(range(6, 11))  # steps 1-5 are not replayed
    for step in resumed:
        for key in ("loss", "rewards/margins", "logps/chosen", "adadpo/coef_max"):
            assert _close(resumed[step][key], full[step][key]), (step, key)
    a = _weights(runs["work"] / "main" / "ckpt" / "iter_0000010", tmp_path)
    b = _weights(runs["work"] / "resumed" / "ckpt" / "iter_0000010", tmp_path)
    assert a.keys() == b.keys() and len(a) > 10
    qkv_bias = "decoder.layers.self_attention.linear_qkv.bias"
    for key in a:
        diff = (a[key].float() - b[key].float()).abs()
        if key == qkv_bias:
            # The key bias has a zero gradient in exact arithmetic (softmax is shift
            # invariant), so Adam turns its round-off into steps of up to lr = 3e-3; the
            # rest of the tensor (query and value biases) must agree. Layout per query
            # group (4 groups of 16-wide heads): [query | key | value].
            diff = diff.reshape(diff.shape[0], 4, 3, 16)[:, :, [0, 2]]
        assert float(diff.max()) <= TOL, (key, float(diff.max()))


def test_validation_with_megatron_lm_flags_restarts_every_time(runs) -> None:
    """--train-data-path/--valid-data-path; the evaluations at step 10 (periodic, then
    Megatron-LM's final one) score the same packs: identical values."""
    _, evals = _records(runs["work"] / "main" / "log")
    assert [r["step"] for r in evals] == [5, 10, 10]
    assert evals[1] == evals[2]
    assert evals[0] != evals[1]  # the model moved between step 5 and step 10
    stdout = runs["main_proc"].stdout
    assert stdout.count("validation loss at iteration 10") == 2
    # The resumed run's evaluation at 10 equals the uninterrupted one's.
    _, resumed_evals = _records(runs["work"] / "resumed" / "log")
    for key in set(evals[1]) - {"step"}:
        assert _close(resumed_evals[0][key], evals[1][key]), key


def test_megatron_lm_checkpoint_serves_as_reference(runs) -> None:
    """A torch_dist checkpoint Megatron-LM wrote (no adadpo_meta.json) was accepted by
    precompute_ref_logprobs.py --ref-load and as the online reference (step-1 ln 2 above);
    the side-car and the online reference give the same training to TOL."""
    ckpt = runs["sft"] / "iter_0000003"
    assert (ckpt / "metadata.json").is_file() and not (ckpt / "adadpo_meta.json").exists()
    for split in ("train", "valid"):
        assert (runs[split] / "ref_logprobs.npz").is_file()
    online, _ = _records(runs["work"] / "main" / "log")
    sidecar, _ = _records(runs["work"] / "adadpo_train_log")
    assert _close(online[10]["rewards/margins"], sidecar[10]["rewards/margins"])


def _megatron_lm_line_values(stdout: str, key: str) -> dict[int, float]:
    out = {}
    for line in stdout.splitlines():
        if " iteration " in line and f"| {key}: " in line:
            step = int(line.split(" iteration ")[1].split("/")[0])
            out[step] = float(line.split(f"| {key}: ")[1].split(" |")[0])
    return out


def test_plugin_metrics_reach_console_tensorboard_and_jsonl(runs) -> None:
    """All of adadpo's metrics, zero and negative values included, with adadpo-train's
    names; adadpo/coef_max is the true maximum, also on Megatron-LM's own line."""
    from adadpo_megatron.losses import METRICS

    train, _ = _records(runs["work"] / "main" / "log")
    theirs, _ = _records(runs["work"] / "adadpo_train_log")
    names = set(theirs[1]) & set(METRICS)  # adadpo-train's loss metrics: all of METRICS
    assert names == set(METRICS)
    assert names <= set(train[1]), names - set(train[1])
    assert train[1]["adadpo/clip_frac"] == 0.0 and train[1]["logps/chosen"] < 0
    assert any(r["rewards/margins"] < 0 for r in train.values())
    assert max(r["adadpo/coef_max"] for r in theirs.values()) > 1.0
    # The plugin's console line: adadpo-train's format, every step, negatives shown.
    stdout = runs["main_proc"].stdout
    lines = [x for x in stdout.splitlines() if " step " in x and " | loss " in x]
    assert len(lines) == 10
    assert all(f"logps/chosen {train[i + 1]['logps/chosen']:.4f}" in line
               for i, line in enumerate(lines))
    assert all("adadpo/clip_frac 0.0000" in line or "adadpo/clip_frac 0.2500" in line
               for line in lines)
    # Megatron-LM's line: the true maximum (not a mean of per-micro-batch maxima).
    shown = _megatron_lm_line_values(stdout, "adadpo/coef_max")
    assert sorted(shown) == list(range(1, 11))
    # Megatron-LM's line at iteration 2 averages iterations 1 and 2 (training_log does not
    # reset its totals after logging the first iteration): that step is its own matter.
    shown[2] = (shown[2] * 2 - shown[1])
    for step, value in shown.items():
        assert abs(value - train[step]["adadpo/coef_max"]) <= 1e-5 * max(1.0, value), step
    # TensorBoard: the same names and values under --tensorboard-dir/adadpo.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["work"] / "main" / "tb" / "adadpo"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert names | {"eval/loss", "eval/adadpo/coef_max"} <= tags
    for name in ("logps/chosen", "rewards/margins", "adadpo/coef_max", "adadpo/clip_frac"):
        events = {e.step: e.value for e in acc.Scalars(name)}
        assert sorted(events) == list(range(1, 11))
        for step, value in events.items():
            assert abs(value - train[step][name]) <= 1e-5 * max(1.0, abs(value)), (name, step)


def test_dropout_is_refused_before_any_model_is_built(runs) -> None:
    proc = runs["bad_proc"]
    assert proc.returncode != 0
    assert "pretrain_adadpo.py: error: --hidden-dropout 0.1" in proc.stderr
    assert "--hidden-dropout 0 --attention-dropout 0" in proc.stderr
    assert "number of parameters" not in proc.stdout  # Megatron-LM prints it once built


def _wandb_rows(path: Path) -> dict[int, dict]:
    from wandb_offline import history

    rows: dict[int, dict] = {}
    for row in history(path):
        rows.setdefault(row.pop("_step"), {}).update(row)
    return rows


def test_wandb_run_holds_the_plugin_records_and_the_resume_continues_it(runs) -> None:
    """Megatron-LM's own W&B run (its --wandb-* flags) holds every metrics.jsonl record
    under the same names at the same steps, beside Megatron-LM's scalars; the resumed
    launch continues that run (same id, steps 6-10)."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "data"))
    from wandb_offline import offline_runs, run_id

    main = offline_runs(runs["work"] / "main" / "ckpt" / "wandb")
    resumed = offline_runs(runs["work"] / "resumed" / "ckpt" / "wandb")
    assert len(main) == len(resumed) == 1  # one W&B run per launch
    assert run_id(resumed[0]) == run_id(main[0])
    saved = json.loads((runs["work"] / "main" / "ckpt" / "wandb_run.json").read_text())
    assert saved["id"] == run_id(main[0]) and saved["project"] == "adadpo-test"
    for path, name, steps in ((main[0], "main", range(1, 11)), (resumed[0], "resumed",
                                                                 range(6, 11))):
        rows = _wandb_rows(path)
        train, evals = _records(runs["work"] / name / "log")
        assert sorted(train) == list(steps)
        for rec in [*train.values(), *evals]:
            got = rows[rec["step"]]
            for key, value in rec.items():
                if key == "step":
                    continue
                # Megatron-LM logs the loss-report names too (the same sum-over-sum means,
                # after the plugin, at the same step): equal to round-off.
                assert key in got and _close(got[key], value), (name, rec["step"], key)
        assert {"eta_s", "elapsed_s", "eval/loss", "pairs"} <= rows[10].keys()
    assert "learning-rate" in _wandb_rows(main[0])[1]  # Megatron-LM's own scalars, same run
