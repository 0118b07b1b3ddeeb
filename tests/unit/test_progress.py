"""Never destroy progress: --save holding a checkpoint resumes or refuses; metrics are kept.

The decisions read only files (trackers, metrics.jsonl, config.json), so they are tested
here without a process group; tests/distributed/test_train.py runs a real resume.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adadpo_megatron.trainer.arguments import parse_config
from adadpo_megatron.trainer.config import ConfigError
from adadpo_megatron.trainer.metrics import MetricsWriter
from adadpo_megatron.trainer.progress import TRACKER, resolve_resume, truncate_metrics


def cfg_of(tmp_path: Path, *flags: str):
    return parse_config(["--data-path", str(tmp_path), "--train-iters", "10", *flags], world_size=1)


def ckpt(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / TRACKER).write_text(f"{step}\n")
    return root


def test_save_holding_a_checkpoint_resumes_or_refuses(tmp_path) -> None:
    save = ckpt(tmp_path / "save", 6)
    notes: list[str] = []
    cfg = resolve_resume(cfg_of(tmp_path, "--save", str(save)), note=notes.append)
    assert cfg.io.load == str(save) and "resuming from it" in notes[0] and "step 6" in notes[0]
    same = resolve_resume(cfg_of(tmp_path, "--save", str(save), "--load", str(save)), note=notes.append)
    assert same.io.load == str(save) and len(notes) == 1
    other = ckpt(tmp_path / "other", 2)
    for flags in (["--load", str(other)], ["--load", str(other), "--finetune"]):
        with pytest.raises(ConfigError) as info:
            resolve_resume(cfg_of(tmp_path, "--save", str(save), *flags))
        msg = str(info.value)
        assert f"--save {save} already holds checkpoint step 6" in msg and f"--load {save}" in msg
        assert "\n" not in msg
    fresh = resolve_resume(cfg_of(tmp_path, "--save", str(tmp_path / "empty")))
    assert fresh.io.load is None
    (save / TRACKER).write_text("garbage")
    with pytest.raises(ConfigError, match="expected an iteration number"):
        resolve_resume(cfg_of(tmp_path, "--save", str(save)))


def test_metrics_of_another_run_are_not_overwritten(tmp_path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    cfg = cfg_of(tmp_path, "--log-dir", str(logs))
    with pytest.raises(ConfigError, match="holds metrics.jsonl of another run"):
        resolve_resume(cfg)
    (logs / "config.json").write_text(json.dumps(cfg.to_dict()))  # the same run, restarted
    resolve_resume(cfg)
    save = ckpt(tmp_path / "save", 1)  # a resume from step 1 keeps step 1
    resolve_resume(cfg_of(tmp_path, "--log-dir", str(logs), "--save", str(save), "--lr", "1e-3"))


def test_partial_last_metrics_line_is_dropped_with_a_note(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 0.5}\nnot json\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    notes: list[str] = []
    truncate_metrics(str(path), 2, note=notes.append)
    assert path.read_bytes() == b'{"step": 1, "loss": 0.5}\nnot json\n{"step": 2, "loss": 0.4}\n'
    assert len(notes) == 1 and "dropped a partial last line" in notes[0]
    w = MetricsWriter(enabled=True, log_dir=str(tmp_path), tensorboard_dir=None, start_step=1,
                      print_fn=lambda s, **k: notes.append(s))
    w.log(2, 3, {"loss": 0.3})
    w.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines() if x != "not json"] == [1, 2]
    assert not any("partial" in n for n in notes[1:])  # a complete file: no new note
