"""W&B logging of adadpo-train, offline: flags, the records, the resumed run, the refusals.

The offline run files are read back with tests/data/wandb_offline.py (wandb 0.31 has no
Python reader of its own). The whole-trainer run (2 ranks, resume) is in
tests/distributed/test_train_wandb.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from wandb_offline import history, offline_runs, run_id  # noqa: E402

from adadpo_megatron.trainer.metrics import MetricsWriter  # noqa: E402
from adadpo_megatron.trainer.wandb_logging import (  # noqa: E402
    RUN_ID_FILE,
    WandbConfig,
    open_wandb,
    wandb_config_from_args,
)

BASE = ["--data-path", "/nonexistent", "--train-iters", "2", "--preference-loss", "simpo"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "stray"))  # nothing may land here
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)


def _parse(argv):
    from adadpo_megatron.trainer.arguments import parse_args

    return parse_args(BASE + argv)


def test_flags_are_megatron_lms_and_parse_into_the_config() -> None:
    from adadpo_megatron.trainer.config import config_from_args

    a = _parse(["--wandb-project", "p", "--wandb-exp-name", "e", "--wandb-save-dir", "/w",
                "--wandb-entity", "t"])
    cfg = config_from_args(a, world_size=1)
    assert cfg.wandb == WandbConfig(project="p", exp_name="e", save_dir="/w", entity="t")
    assert cfg.to_dict()["wandb"]["project"] == "p"
    assert config_from_args(_parse([]), world_size=1).wandb is None
    with pytest.raises(ValueError, match=r"^--wandb-exp-name needs --wandb-project NAME"):
        wandb_config_from_args(_parse(["--wandb-exp-name", "e"]))


def test_missing_wandb_is_refused_at_start_in_one_line(monkeypatch, capsys) -> None:
    from adadpo_megatron.train import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(BASE + ["--wandb-project", "p"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["adadpo-train: error: --wandb-project needs the wandb package, which is not "
                   "installed: pip install 'adadpo-megatron[wandb]' (or pip install wandb), "
                   "or drop the flag"]


def _records(n_from: int, n_to: int) -> list[tuple[int, dict]]:
    out = []
    for step in range(n_from, n_to + 1):
        rec = {"loss": 0.69 - step * 1e-3, "rewards/margins": -0.5 + step, "lr": 1e-4 * step,
               "grad_norm": float("nan") if step == 3 else 0.25, "pairs": 4.0,
               "skipped_steps": 0, "tokens_per_s": 123.5, "elapsed_s": 2.0 * step,
               "eta_s": 2.0 * (n_to - step)}
        rec.update({f"adadpo/extra_{i}": step + i / 7 for i in range(12)})
        out.append((step, rec))
        if step % 50 == 0:
            out.append((step, {"eval/loss": 0.6 + step, "eval/rewards/accuracies": 0.75}))
    return out


def _same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == b


def _check(wandb_file: Path, jsonl: Path, after: int = 0) -> None:
    """Every metrics.jsonl record past step ``after`` is in the W&B history at its step,
    same names and values, and nothing else."""
    rows: dict[int, dict] = {}
    for row in history(wandb_file):
        rows.setdefault(row["_step"], {}).update(row)
    steps = set()
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        step = rec.pop("step")
        if step <= after:
            continue
        steps.add(step)
        for key, value in rec.items():
            value = float(value) if value in ("nan", "inf") else value
            assert key in rows[step], (step, key)
            assert _same(value, rows[step][key]), (step, key, value, rows[step][key])
    assert set(rows) == steps  # nothing else was logged


def test_records_reach_the_offline_run_and_a_resume_continues_it(offline, tmp_path) -> None:
    save, log_dir = tmp_path / "ckpt", tmp_path / "log"
    cfg = WandbConfig(project="adadpo-test", exp_name="unit")
    me = psutil.Process()

    sink = open_wandb(cfg, enabled=True, save=str(save), log_dir=str(log_dir), resume_from=None,
                      config={"a": 1})
    writer = MetricsWriter(enabled=True, log_dir=str(log_dir), tensorboard_dir=None,
                           print_fn=lambda *a, **k: None, wandb=sink)
    for step, rec in _records(1, 150):  # ~19 scalars x 150 steps: the file spans blocks
        writer.log(step, 200, rec)
    writer.close()
    assert not [p for p in me.children(recursive=True) if "wandb" in p.name()], \
        "a W&B service process outlived close()"
    first = offline_runs(save / "wandb")  # Megatron-LM's default place: SAVE/wandb
    assert len(first) == 1 and first[0].stat().st_size > 32 * 1024
    saved = json.loads((save / RUN_ID_FILE).read_text())
    assert saved == {"id": run_id(first[0]), "project": "adadpo-test", "entity": None}
    _check(first[0], log_dir / "metrics.jsonl")

    # Resumed from the step-150 checkpoint in SAVE: the same W&B run continues at step 151.
    sink = open_wandb(cfg, enabled=True, save=str(save), log_dir=str(log_dir),
                      resume_from=str(save))
    writer = MetricsWriter(enabled=True, log_dir=str(log_dir), tensorboard_dir=None,
                           start_step=150, print_fn=lambda *a, **k: None, wandb=sink)
    for step, rec in _records(151, 160):
        writer.log(step, 200, rec)
    writer.close()
    runs = offline_runs(save / "wandb")
    assert len(runs) == 2 and run_id(runs[1]) == saved["id"]
    _check(runs[1], log_dir / "metrics.jsonl", after=150)
    # Another project does not take the id over; --finetune (no resume_from) starts anew.
    for project, resume_from in (("other", str(save)), ("adadpo-test", None)):
        sink = open_wandb(WandbConfig(project=project), enabled=True, save=None,
                          log_dir=str(log_dir), resume_from=resume_from)
        try:
            assert sink.run.id != saved["id"]
        finally:
            sink.close()
    assert len(offline_runs(log_dir / "wandb")) == 2  # no --save: LOG_DIR/wandb
    assert not (tmp_path / "stray").exists()


def test_only_the_logging_rank_opens_a_run(offline, tmp_path) -> None:
    cfg = WandbConfig(project="p", save_dir=str(tmp_path / "w"))
    assert open_wandb(cfg, enabled=False, save=str(tmp_path / "s"), log_dir=None,
                      resume_from=None) is None
    assert open_wandb(None, enabled=True, save=str(tmp_path / "s"), log_dir=None,
                      resume_from=None) is None
    assert not (tmp_path / "w").exists() and not (tmp_path / "s").exists()


def test_megatron_lm_entry_checks_its_wandb_flags_and_sets_up_the_resume(
        monkeypatch, tmp_path) -> None:
    """Megatron-LM's --wandb-* flags, before pretrain(): one-line refusals, and the W&B run
    of the checkpoint being resumed (WANDB_RUN_ID/WANDB_RESUME for Megatron-LM's init)."""
    from adadpo_megatron.integrations.megatron_lm_wandb import check_wandb_flags
    from adadpo_megatron.trainer.wandb_logging import write_run_id

    env: dict = {}
    assert check_wandb_flags(["--save", str(tmp_path)], env) is None and env == {}
    assert check_wandb_flags(["--wandb-project", "p"], env) == (
        "--wandb-project needs --wandb-save-dir DIR or --save DIR (Megatron-LM keeps W&B's "
        "files in SAVE/wandb by default)")
    write_run_id(str(tmp_path), "abc123", "p", None)
    resume = ["--wandb-project", "p", "--save", str(tmp_path), "--load", str(tmp_path)]
    assert check_wandb_flags(resume + ["--finetune"], env) is None and env == {}
    assert check_wandb_flags(resume + ["--wandb-entity", "team"], env) is None and env == {}
    assert check_wandb_flags(resume, env) is None
    assert env == {"WANDB_RUN_ID": "abc123", "WANDB_RESUME": "allow"}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    assert check_wandb_flags(resume, {}).startswith("--wandb-project needs the wandb package")


def test_a_run_that_cannot_start_is_one_line(offline, monkeypatch, tmp_path) -> None:
    import wandb

    from adadpo_megatron.trainer.wandb_logging import WandbStartError

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty).\ncall wandb.login()")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(WandbStartError) as info:
        open_wandb(WandbConfig(project="p"), enabled=True, save=str(tmp_path), log_dir=None,
                   resume_from=None)
    text = str(info.value)
    assert "\n" not in text and text.startswith("--wandb-project p: W&B could not start the run "
                                                "(UsageError: api_key not configured")
    assert not (tmp_path / RUN_ID_FILE).exists()
