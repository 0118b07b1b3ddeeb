"""LoRA in the trainer on 2 CPU processes (TP=2): reference = base, adapter-only checkpoints,
requeue with --save alone, refusals, and --ref-load / --ref-logprobs still working.

One torchrun launch (lora_train_worker.py) on the 36-pack fixture of test_train.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_train import TOKENIZER, _pairs
from torchrun_launch import run_torchrun

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed
# Same layout and arithmetic (a resume; the same reference sums from another route).
EXACT = 1e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main

    work = tmp_path_factory.mktemp("lora_train")
    jsonl = work / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(36)))
    data = work / "data"
    assert pack_main([str(jsonl), "--output", str(data), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) in (0, None)
    run_torchrun(2, REPO / "tests" / "distributed" / "lora_train_worker.py", str(data),
                 str(work), timeout=600)
    return json.loads((work / "results.json").read_text())


def _close(a: dict, b: dict, tol: float = EXACT) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= tol, f"step {k}: {a[k]} vs {b[k]}"


def test_reference_is_the_base_without_a_second_model(results):
    assert results["reference_mode"] == "base"
    assert results["holds_reference_model"] is False
    assert results["trainable"] == ["lora_A", "lora_B"]  # the base is frozen
    # Step 1: policy == base exactly (B = 0): dpo is ln 2, rewards exactly 0.
    assert abs(results["dpo"]["1"] - math.log(2)) <= 1e-7
    assert results["dpo_rewards1"] == [0.0, 0.0]
    assert results["dpo"]["6"] != results["dpo"]["1"]  # and the adapters do train


def test_ref_load_and_precomputed_give_the_same_reference(results):
    assert results["ref_load_holds_model"] is True
    _close(results["adadpo_ref_load"], results["adadpo_base"])
    _close(results["adadpo_precomputed"], results["adadpo_base"])


def test_adapter_checkpoint_records_its_base_and_is_small(results):
    meta = results["meta_lora"]
    assert meta["base"]["source"] == "checkpoint" and meta["base"]["iteration"] == 2
    assert meta["settings"]["rank"] == 4
    # r=4, 2 layers, hidden 32, ffn 128: r*(in+out) for qkv (32+96), proj (32+32),
    # fc1 (32+128), fc2 (128+32); TP shards counted once.
    assert meta["adapter_params"] == 2 * 4 * (128 + 64 + 160 + 160) == 4096
    sizes = results["sizes"]
    assert sizes["adapters"] < sizes["base"] / 4, sizes


def test_requeue_with_save_alone_resumes_exactly(results):
    assert results["resumed_start"] == 3
    _close(results["resumed"], {k: v for k, v in results["dpo"].items() if int(k) > 3})


def test_adapter_checkpoint_reshards(results):
    # TP=2 -> TP=1 (DP=2) changes the order of the TP reductions: fp32 round-off only.
    # (Non-gated MLP: a SwiGLU base saved at TP=2 failed to load at TP=1 in this worker,
    # a base-checkpoint matter not investigated here; the gated fc1's adapters reshard
    # TP=2 -> TP=1 in test_lora_export.py.)
    assert results["resharded_start"] == 3
    assert abs(results["resharded_step4"] - results["dpo"]["4"]) <= 1e-5


def test_refusals(results):
    assert "is a LoRA adapter checkpoint" in results["refuse_full"]
    assert "--finetune" in results["refuse_not_adapter"]
    assert "has changed" in results["refuse_changed_base"]
