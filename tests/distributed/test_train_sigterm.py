"""adadpo-train's exits: SIGTERM a running torchrun job (--exit-signal-handler), then resume.

Three launches (TP=2, gloo): an uninterrupted 12-step run; the same run SIGTERMed once it
has logged step 2 (it must finish the step, save and exit 0); its resume to step 12. The
resumed run must log the uninterrupted run's losses and end with its weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TOKENIZER, _pairs
from torchrun_launch import free_port, run_torchrun

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed

# Same layout, same arithmetic: the resumed run repeats the uninterrupted one exactly.
EXACT = 1e-6


def _flags(data: Path, out: Path) -> list[str]:
    return ["-m", "adadpo_megatron.train", "--device", "cpu", "--num-layers", "2",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128",
            "--tensor-model-parallel-size", "2", "--global-batch-size", "2",
            "--train-iters", "12", "--lr", "3e-3", "--lr-decay-style", "cosine",
            "--preference-loss", "simpo", "--data-path", str(data),
            "--log-dir", str(out / "log"), "--save", str(out / "ckpt")]


def _losses(out: Path) -> dict[int, float]:
    lines = (out / "log" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _env() -> dict[str, str]:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def _sigterm_after_step(flags: list[str], out: Path, step: int) -> subprocess.CompletedProcess:
    """Start torchrun, SIGTERM the launcher once ``step`` is logged, wait for the end."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *flags]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "log" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= step:
            proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker
            break
        time.sleep(0.02)
    stdout, stderr = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _weights(ckpt: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.with_suffix(".pt")
    dcp_to_torch_save(str(ckpt), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)
            and not k.startswith(("optimizer", "rng_state")) and "_extra_state" not in k}


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(tmp_path) -> None:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(24)))
    data = tmp_path / "data"
    assert pack_main([str(jsonl), "--output", str(data), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) in (0, None)

    full, cut = tmp_path / "full", tmp_path / "cut"
    run_torchrun(2, _flags(data, full)[0], *_flags(data, full)[1:], timeout=300)

    stopped = _sigterm_after_step([*_flags(data, cut), "--exit-signal-handler",
                                   "--save-interval", "100"], cut, step=2)
    tracker = cut / "ckpt" / "latest_checkpointed_iteration.txt"
    assert tracker.is_file(), f"no checkpoint after SIGTERM:\n{stopped.stderr[-3000:]}"
    k = int(tracker.read_text())
    assert 2 <= k < 12, k
    assert f"exiting after step {k}: signal SIGTERM" in stopped.stdout
    assert sorted(_losses(cut)) == list(range(1, k + 1))  # the step in progress finished

    run_torchrun(2, _flags(data, cut)[0], *_flags(data, cut)[1:], "--load", str(cut / "ckpt"),
                 timeout=300)
    uninterrupted, resumed = _losses(full), _losses(cut)
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 13))
    for step in range(k + 1, 13):
        assert abs(resumed[step] - uninterrupted[step]) <= EXACT, step
    a = _weights(full / "ckpt" / "iter_0000012")
    b = _weights(cut / "ckpt" / "iter_0000012")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert float((a[key] - b[key]).abs().max()) <= EXACT, key
