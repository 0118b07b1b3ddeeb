"""Requeue with an online reference from --ref-load: the relaunch needs only --load SAVE.

A run fine-tunes from INIT (``--load INIT --finetune --ref-load INIT``) and stops at step 2
(``--exit-interval``); its checkpoint records where the reference came from. Relaunched
with ``--load SAVE`` alone (no --finetune, no --ref-load, as a requeue re-runs the resume
command), it finds INIT, checks INIT's fingerprint, and ends with the uninterrupted run's
losses. Once INIT changes, the relaunch is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_faults import _error_lines, _run
from test_train import TOKENIZER, _pairs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main

    work = tmp_path_factory.mktemp("requeue")
    jsonl = work / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(40)))
    assert pack_main([str(jsonl), "--output", str(work / "data"), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) == 0
    return work / "data"


def _base(data: Path, iters: int) -> list[str]:
    return ["--device", "cpu", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "128", "--global-batch-size", "2",
            "--train-iters", str(iters), "--lr", "1e-3", "--lr-decay-style", "cosine",
            "--preference-loss", "dpo", "--data-path", str(data)]


def _losses(log: Path) -> dict[int, float]:
    lines = (log / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_a_bare_load_finds_and_verifies_the_recorded_reference(packed, tmp_path) -> None:
    data = packed
    init = tmp_path / "init"
    done = _run(2, [*_base(data, 2), "--save", str(init), "--save-interval", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    start = ["--load", str(init), "--finetune", "--ref-load", str(init)]

    def job(name: str, *extra: str):
        return _run(2, [*_base(data, 4), "--save", str(tmp_path / name), "--save-interval", "2",
                        "--log-dir", str(tmp_path / f"{name}.log"), *extra])

    full = job("full", *start)
    assert full.returncode == 0, full.stderr[-3000:]
    cut = job("cut", *start, "--exit-interval", "2")
    assert cut.returncode == 0, cut.stderr[-3000:]
    meta = json.loads((tmp_path / "cut" / "iter_0000002" / "adadpo_meta.json").read_text())
    assert meta["has_reference"] is False  # not copied: recorded
    assert meta["reference_source"]["source"] == str(init)
    assert meta["reference_source"]["iteration"] == 2

    requeued = job("cut", "--load", str(tmp_path / "cut"))  # the bare resume command
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    a, b = _losses(tmp_path / "full.log"), _losses(tmp_path / "cut.log")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])

    manifest = init / "iter_0000002" / "adadpo_manifest.json"  # the reference changes
    record = json.loads(manifest.read_text())
    record["note"] = "re-saved"
    manifest.write_text(json.dumps(record))
    refused = job("cut", "--load", str(tmp_path / "cut"), "--train-iters", "6")
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = _error_lines(refused.stderr)
    assert f"its online reference came from {init} (iteration 2), but it changed since" in line
