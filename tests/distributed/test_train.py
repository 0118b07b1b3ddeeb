"""The trainer end to end on 2 CPU processes (gloo): TP=2 training, resume, resharding,
precomputed vs online reference, DP=2 data coverage, NaN skip, checkpoint refusals.

One torchrun launch (tests/distributed/train_worker.py) runs every case on a tiny GPT and
a 36-pack dataset made here with adadpo-pack; the tests below check its results.json.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from torchrun_launch import run_torchrun

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "data" / "tokenizer.model"

# Same computation in the same process layout: a resumed run and a precomputed reference
# repeat the uninterrupted run's arithmetic exactly, so 1e-6 (the bound) is loose.
EXACT = 1e-6
# TP=2 -> TP=1 changes the order of the TP reductions: fp32 round-off only.
RESHARD = 1e-5

WORDS = ("the of and a to in is you that it he was for on are as with his they at be this "
         "have from or one had by word but not what all were we when your can said there use "
         "an each which she do how their if will up other about out many then them these so "
         "some her would make like him into time has look two more write go see number no way "
         "could people my than first water been call who oil its now find long down day did get "
         "come made may part").split()


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(18))
        chosen = rng.sample(WORDS, 12)
        rejected = list(reversed(chosen))
        rows.append({"prompt": prompt, "chosen": " ".join(chosen),
                     "rejected": " ".join(rejected)})
    return rows


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main
    from adadpo_megatron.data.packed_dataset import PackedPairDataset

    work = tmp_path_factory.mktemp("train")
    jsonl = work / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(36)))
    data = work / "data"
    # Pack size 128 holds one pair per pack (each pair is 65-128 tokens): 36 packs.
    assert pack_main([str(jsonl), "--output", str(data), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) in (0, None)
    ds = PackedPairDataset(data)
    assert (len(ds), ds.num_pairs) == (36, 36), "the fixture needs 36 one-pair packs"
    # The same lines in the prefix-shared layout (several pairs per pack).
    assert pack_main([str(jsonl), "--output", f"{data}_shared", "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--prefix-sharing", "--strict"]) in (0, None)

    run_torchrun(2, REPO / "tests" / "distributed" / "train_worker.py", str(data), str(work),
                 timeout=600)
    out = json.loads((work / "results.json").read_text())
    out["work"] = str(work)
    return out


def _close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= tol, f"step {k}: {a[k]} vs {b[k]}"


pytestmark = pytest.mark.distributed


def test_tp2_training_runs_and_logs(results):
    full = results["full"]
    assert list(full) == ["1", "2", "3", "4", "5", "6"]
    # Policy == reference at step 1: every reward is 0 and the DPO-family loss is log 2.
    assert abs(full["1"] - 0.6931471805599453) < 1e-6
    assert len(set(full.values())) > 1  # the model learns something
    records = [json.loads(line) for line in
               open(os.path.join(results["work"], "full", "metrics.jsonl"))]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    for name in ("rewards/accuracies", "rewards/margins", "adadpo/coef_mean", "adadpo/clip_frac",
                 "balance/grad_ratio", "lr", "grad_norm", "tokens_per_s", "pairs_per_s",
                 "packing_efficiency"):
        assert name in train[-1], name
    assert "eval/rewards/accuracies" in evals[-1]
    assert os.path.isfile(os.path.join(results["work"], "ckpt_full", "iter_0000006",
                                       "adadpo_meta.json"))


def test_resume_repeats_the_uninterrupted_losses(results):
    assert results["resumed_start"] == 3
    _close(results["resumed"], {k: results["full"][k] for k in ("4", "5", "6")}, EXACT)


def test_tp2_checkpoint_loads_at_tp1_dp2(results):
    _close(results["resharded"], {"4": results["full"]["4"]}, RESHARD)


def test_precomputed_reference_matches_online(results):
    assert results["precomputed_holds_model"] is False
    _close(results["precomputed"], results["full"], EXACT)


def test_dp2_loader_covers_each_pair_once_per_epoch(results):
    packs, pairs = results["dp_packs"], results["dp_pairs"]
    assert len(packs[0]) == len(packs[1]) == 18
    assert sorted(packs[0] + packs[1]) == list(range(36))
    assert sorted(pairs[0] + pairs[1]) == list(range(results["num_pairs"]))
    assert list(results["dp_losses"]) == ["1", "2", "3"]


def test_nan_steps_are_skipped_then_training_stops(results):
    # NaN injected at steps 2, 4 and 5 with --max-skipped-steps 2.
    assert results["nan_skipped"] == {"1": 0, "2": 1, "3": 0, "4": 1, "5": 2}
    assert "stopping at step 5" in results["nan_stopped"]
    assert results["nan_param_equal"] == {"1-2": True, "2-3": False, "3-4": True, "4-5": True}


def test_mismatched_or_corrupt_checkpoints_are_refused(results):
    msgs = results["refusals"]
    assert "model.hidden_size: checkpoint 32 vs now 64" in msgs["shape"]
    assert "loss.beta: checkpoint 0.5 vs now 0.1" in msgs["loss"]
    assert "damaged checkpoint:" in msgs["corrupt"] and ".distcp is missing" in msgs["corrupt"]
    # The checksum manifest names the file, in one line; flipped bytes no longer load silently.
    assert f"{results['truncated_file']} is truncated" in msgs["truncated"]
    assert f"{results['flipped_file']} was changed" in msgs["flipped"]
    for msg in msgs.values():
        assert "\n" not in msg and "Traceback" not in msg, msg


def test_save_holding_a_checkpoint_resumes_without_load(results):
    assert results["auto_start"] == 3 and results["auto_tracker"] == 6
    _close(results["auto"], {k: results["full"][k] for k in ("4", "5", "6")}, EXACT)


def test_prefix_shared_dataset_reference_training_and_cp_refusal(results):
    # Precomputed reference sums (TP=2, micro-batches of 2 packs) equal the unshared
    # dataset's: the tool builds the model with the prefix-sharing attention from meta.json.
    assert results["shared_attention"] == "mask"
    assert results["shared_ref_rel_err"] <= RESHARD, results["shared_ref_rel_err"]
    losses = results["shared_losses"]
    assert list(losses) == ["1", "2", "3"]
    assert abs(losses["1"] - 0.6931471805599453) < 1e-6  # online reference, shared layout
    assert "--context-parallel-size 2 -> 1" in results["shared_cp_refusal"]
    assert "--context-parallel-size 2 needs Transformer Engine" in results["cpu_cp_refusal"]
