"""adadpo-train with W&B (offline), 2 ranks (DP=2): the records, rank 0 only, resume, ETA.

Two launches: steps 1-2 (``--exit-interval 2`` saves and stops), then the resume from
``--save`` to step 4, both with ``--wandb-project`` under ``WANDB_MODE=offline``. The
offline run files (read back with tests/data/wandb_offline.py) must hold every
metrics.jsonl record, training and evaluation, under the same names and values; one W&B
run per launch (one logging rank of two), and the second continues the first's run id.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
from test_train import TOKENIZER, _pairs
from torchrun_launch import run_torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from wandb_offline import history, offline_runs, run_id  # noqa: E402

pytestmark = pytest.mark.distributed


def _flags(data: Path, out: Path) -> list[str]:
    return ["-m", "adadpo_megatron.train", "--device", "cpu", "--num-layers", "2",
            "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "128",
            "--global-batch-size", "2", "--train-iters", "4", "--lr", "3e-3",
            "--preference-loss", "simpo", "--data-path", str(data),
            "--eval-data-path", str(data), "--eval-interval", "2", "--eval-iters", "1",
            "--log-dir", str(out / "log"), "--save", str(out / "ckpt"), "--exit-interval", "2",
            "--wandb-project", "adadpo-test", "--wandb-exp-name", "dp2"]


def _jsonl(out: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for line in (out / "log" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.setdefault(rec.pop("step"), {}).update(rec)
    return rows


def _logged(wandb_file: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for row in history(wandb_file):
        rows.setdefault(row.pop("_step"), {}).update(row)
    return rows


def test_offline_wandb_run_holds_the_records_and_resumes(tmp_path) -> None:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(8)))
    data = tmp_path / "data"
    assert pack_main([str(jsonl), "--output", str(data), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) in (0, None)
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "stray")}
    flags = _flags(data, out)
    first = run_torchrun(2, flags[0], *flags[1:], timeout=300, extra_env=env)
    assert "exiting after step 2" in first.stdout
    second = run_torchrun(2, flags[0], *flags[1:], timeout=300, extra_env=env)

    runs = offline_runs(out / "ckpt" / "wandb")  # Megatron-LM's default: SAVE/wandb
    assert len(runs) == 2, runs  # one W&B run per launch: the logging rank only
    assert run_id(runs[0]) == run_id(runs[1])  # the resume continued the same run
    assert not (tmp_path / "stray").exists()
    records = _jsonl(out)
    assert sorted(records) == [1, 2, 3, 4]
    for wandb_file, steps in zip(runs, ([1, 2], [3, 4]), strict=True):
        logged = _logged(wandb_file)
        assert sorted(logged) == steps
        for step in steps:
            mine = {k: v for k, v in logged[step].items() if not k.startswith("_")}
            assert mine.keys() == records[step].keys(), step
            for key, value in records[step].items():
                got = mine[key]
                assert got == value or (math.isnan(got) and value == "nan"), (step, key)
        assert {"loss", "rewards/margins", "lr", "grad_norm", "eval/loss", "elapsed_s",
                "eta_s"} <= logged[steps[-1]].keys()  # training and evaluation
    # The log line: elapsed time and the estimate to the end, eta 0 at the last step.
    lines = [x for x in second.stdout.splitlines() if "] step " in x and "| loss " in x]
    assert re.search(r"\] step 4/4 \| elapsed \d+:\d\d:\d\d \| eta 0:00:00 \| loss ", lines[-1])
