"""The trainer with the 70B recipe's parallel and memory flags on 2 CPU processes (gloo):
--use-distributed-optimizer (DP=2, save and exact resume, refusals), --sequence-parallel
and --recompute-granularity selective (both pack layouts) / full (uniform, block).

One torchrun launch (tests/distributed/train_layouts_worker.py) on the 36-pair dataset of
test_train.py (separate and prefix-shared packs); the tests below check its results.json.
Gradients of each layout against one process are in test_parallel_layouts.py; here the
whole trainer (config, data padding, optimizer, checkpoints) runs with the flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import EXACT, TOKENIZER, _close, _pairs
from torchrun_launch import run_torchrun

REPO = Path(__file__).resolve().parents[2]
# Another reduction order (reduce-scatter + all-gather vs all-reduce; SP's reduce-scatters
# and the norms' TP all-reduce; SP's padding of segments to TP multiples): fp32 round-off.
SAME_MATH = 1e-5

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main

    work = tmp_path_factory.mktemp("train_cpu_layouts")
    jsonl = work / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(36)))
    data = work / "data"
    for extra, out in (([], data), (["--prefix-sharing"], f"{data}_shared")):
        assert pack_main([str(jsonl), "--output", str(out), "--tokenizer", str(TOKENIZER),
                          "--pack-size", "128", "--strict", *extra]) in (0, None)
    run_torchrun(2, REPO / "tests" / "distributed" / "train_layouts_worker.py", str(data),
                 str(work), timeout=600)
    return json.loads((work / "results.json").read_text())


def test_distributed_optimizer_equals_the_plain_one(results):
    assert results["distopt_holds_a_shard"] == "DistributedOptimizer"
    assert len(results["dp2_plain"]) == 5
    _close(results["dp2_distopt"], results["dp2_plain"], SAME_MATH)


def test_distributed_optimizer_resumes_exactly(results):
    assert results["distopt_resumed_start"] == 2
    uninterrupted = {k: v for k, v in results["dp2_distopt"].items() if int(k) > 2}
    _close(results["dp2_distopt_resumed"], uninterrupted, EXACT)


def test_distributed_optimizer_checkpoint_refusals_name_the_way_out(results):
    assert "saved with --use-distributed-optimizer" in results["refused_without_flag"]
    assert "--finetune" in results["refused_without_flag"]
    other = results["refused_other_tp"]
    assert "TP=1" in other and "TP=2" in other and "reshards over data parallelism" in other


@pytest.mark.parametrize(("layout", "variant"), [
    ("separate", "sp_selective"), ("separate", "sp_block"),
    ("shared", "sp_selective"), ("shared", "sp_uniform")])
def test_sequence_parallel_and_recompute_equal_plain_tp2(results, layout, variant):
    plain = results[f"tp2_{layout}_plain"]
    assert len(plain) == 3
    _close(results[f"tp2_{layout}_{variant}"], plain, SAME_MATH)
