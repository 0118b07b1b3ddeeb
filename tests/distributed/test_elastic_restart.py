"""Elastic restart: a rank killed mid-run, torchrun --max-restarts 1 restarts the job, which
resumes from its last checkpoint by itself and ends exactly where an uninterrupted run does.

One torchrun launch (tests/distributed/elastic_worker.py): rank 1 kills itself with SIGKILL
at step 5 of 6 (checkpoints at steps 2 and 4); attempt 1 resumes from step 4 with the same
command (no --load), then runs the same training uninterrupted for comparison. Also: no
process started by the killed job outlives it (megatron-core's save helper included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from test_train import TOKENIZER, _pairs
from torchrun_launch import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main

    work = tmp_path_factory.mktemp("elastic")
    jsonl = work / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(36)))
    data = work / "data"
    assert pack_main([str(jsonl), "--output", str(data), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) == 0
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--max-restarts=1", "--monitor-interval=0.5", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(REPO / "tests" / "distributed" / "elastic_worker.py"),
           str(data), str(work)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return work


def _losses(path: Path) -> dict[int, float]:
    records = [json.loads(x) for x in path.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_the_job_restarts_from_its_last_checkpoint_and_matches(job: Path) -> None:
    results = json.loads((job / "results.json").read_text())
    assert results == {"attempt": 1, "elastic_start": 4, "restart_counts": ["1", "1"]}
    elastic, ref = _losses(job / "logs" / "metrics.jsonl"), _losses(job / "logs_ref" / "metrics.jsonl")
    assert list(elastic) == list(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert abs(elastic[step] - ref[step]) <= 1e-6, (step, elastic[step], ref[step])
    for rank in (0, 1):
        a = torch.load(job / f"weights_elastic_rank{rank}.pt")
        b = torch.load(job / f"weights_ref_rank{rank}.pt")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (rank, name)


def test_no_process_of_the_killed_job_survives(job: Path) -> None:
    pids = json.loads((job / "children_rank1.json").read_text())
    if (job / "children_rank0.json").is_file():
        pids += json.loads((job / "children_rank0.json").read_text())
    assert pids, "the ranks had started helper processes (megatron-core's save helper)"
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"orphaned: {alive}"
