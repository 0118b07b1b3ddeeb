"""Elastic restart across two "nodes": two torchrun agents (``--nnodes 2``, c10d rendezvous
on localhost, one process each) run tests/distributed/elastic_worker.py (TP=2 across the
nodes). Rank 1 kills itself at step 5; rank 0 stays out of collectives meanwhile, so its
agent restarts it *without* counting a failure: the two nodes' TORCHELASTIC_RESTART_COUNT
then differ (0 and 1), which split the store-key prefix before the attempt came from the
store. The job must resume by itself and equal an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_elastic_restart import _losses
from test_train import TOKENIZER, _pairs
from torchrun_launch import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def test_two_agents_restart_together_and_match_an_uninterrupted_run(tmp_path) -> None:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(36)))
    data = tmp_path / "data"
    assert pack_main([str(jsonl), "--output", str(data), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) == 0
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "ELASTIC_RANK0_PAUSE": "20"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--max-restarts=1", "--monitor-interval=0.5", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=adadpo-two-nodes",
           str(REPO / "tests" / "distributed" / "elastic_worker.py"), str(data), str(tmp_path)]
    nodes = [subprocess.Popen(cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outs = [node.communicate(timeout=900) for node in nodes]
    for node, (out, err) in zip(nodes, outs, strict=True):
        assert node.returncode == 0, f"{out[-2000:]}\n{err[-6000:]}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["attempt"] == 1 and results["elastic_start"] == 4, results
    # The scenario that split the prefix: the agents' own restart counts disagree.
    assert sorted(results["restart_counts"]) == ["0", "1"], results
    elastic = _losses(tmp_path / "logs" / "metrics.jsonl")
    ref = _losses(tmp_path / "logs_ref" / "metrics.jsonl")
    assert list(elastic) == list(ref) == [1, 2, 3, 4, 5, 6]
    for step in ref:
        assert abs(elastic[step] - ref[step]) <= 1e-6, (step, elastic[step], ref[step])
    for rank in (0, 1):
        a = torch.load(tmp_path / f"weights_elastic_rank{rank}.pt")
        b = torch.load(tmp_path / f"weights_ref_rank{rank}.pt")
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (rank, name)
