"""Save, resume and compare on every layout of the layout tests, virtual pipelining included.

One torchrun launch per process count (tests/distributed/resume_layouts_worker.py; the
worker re-initialises megatron-core's parallel state per case). Each "resume" case trains
4 steps (checkpoints at 2 and 4, evaluation at 2 and 4), then resumes from the step-2
checkpoint alone and must repeat steps 3-4 exactly: losses, evaluation metrics after the
resume, and every weight on every rank (bitwise). The evaluation split has 7 packs, so
under PP=2 x VPP=2 every evaluation pads its schedule call with a filler micro-batch; the
"eval_from" cases evaluate the same step-4 weights at a layout without virtual stages
(another schedule, another micro-batch count) and must give the same metrics, i.e. the
means over the 7 real pairs (one of them loads weights only, with ``--finetune``, into
virtual chunks at another TP). The "precomputed_from" case precomputes the reference under
PP=2 x VPP=2 (tools/precompute_ref_logprobs.py: 36 and 7 packs, in calls of a step's 4
micro-batches, the eval split's last call padded) and trains with it: losses and eval
metrics equal the online reference's run.

Context parallelism is absent: the trainer builds megatron-core's local attention on the
CPU, which refuses CP > 1 (it needs Transformer Engine); CP checkpoints are not tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import TOKENIZER, _pairs
from torchrun_launch import run_torchrun

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# The resumed run repeats the uninterrupted run's arithmetic on the same layout.
EXACT = 1e-6
# Another layout sums in another order (TP reductions, DP means): fp32 round-off.
LAYOUT = 1e-5

PP2 = ["--pipeline-model-parallel-size", "2"]
VPP2 = [*PP2, "--num-layers-per-virtual-pipeline-stage", "1"]  # 4 layers: 2 chunks per stage
TP2 = ["--tensor-model-parallel-size", "2"]
ADADPO = ["--preference-loss", "adadpo", "--dpo-beta", "0.5"]  # online reference, saved too

TWO_RANKS = [
    dict(name="tp2", args=[*TP2, *ADADPO]),
    dict(name="pp2", args=[*PP2, *ADADPO]),
    dict(name="dp2", args=["--preference-loss", "dpo", "--dpo-beta", "0.5", "--logprob-impl",
                          "chunked"]),
    dict(name="pp2-vpp2", args=[*VPP2, *ADADPO]),
    dict(name="dp2-eval-of-pp2-vpp2", eval_from="pp2-vpp2", args=ADADPO),
    dict(name="pp2-vpp2-precomputed", precomputed_from="pp2-vpp2", args=[*VPP2, *ADADPO]),
]
FOUR_RANKS = [
    dict(name="tp2-pp2", args=[*TP2, *PP2, *ADADPO]),
    # The case: TP=2, PP=2, VPP=2, simpo (no reference).
    dict(name="tp2-pp2-vpp2", args=[*TP2, *VPP2, "--preference-loss", "simpo"]),
    # DP=2 x PP=2 x VPP=2: 2 micro-batches per step; eval 4 + 3 packs (one DP rank pads).
    dict(name="dp2-pp2-vpp2", args=[*VPP2, *ADADPO]),
    dict(name="tp2-dp2-eval-of-tp2-pp2-vpp2", eval_from="tp2-pp2-vpp2",
         args=[*TP2, "--preference-loss", "simpo"]),
    # Weights only (--finetune: load_model_weights, as --ref-load and precompute use it)
    # into virtual chunks at another TP: iteration 0, the same eval metrics.
    dict(name="dp2-pp2-vpp2-finetune-of-tp2-pp2-vpp2", eval_from="tp2-pp2-vpp2",
         args=[*VPP2, "--preference-loss", "simpo", "--finetune"]),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main
    from adadpo_megatron.data.packed_dataset import PackedPairDataset

    work = tmp_path_factory.mktemp("resume_layouts")
    out = []
    for name, n, seed in (("data", 36, 0), ("eval", 7, 1)):
        jsonl = work / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(n, seed)))
        assert pack_main([str(jsonl), "--output", str(work / name), "--tokenizer",
                          str(TOKENIZER), "--pack-size", "128", "--strict"]) in (0, None)
        assert len(PackedPairDataset(work / name)) == n  # one pair per pack
        out.append(work / name)
    return out[0], out[1], work


def _launch(data, nproc: int, cases: list[dict]) -> dict:
    train, evals, work = data
    run_torchrun(nproc, HERE / "resume_layouts_worker.py", str(train), str(evals), str(work),
                 json.dumps(cases), timeout=900)
    return json.loads((work / f"results_{nproc}.json").read_text())


def _close(a: dict, b: dict, tol: float, what: str) -> None:
    assert a.keys() == b.keys(), (what, a.keys(), b.keys())
    for k in a:
        assert abs(a[k] - b[k]) <= tol * max(1.0, abs(b[k])), f"{what} {k}: {a[k]} vs {b[k]}"


def _check(res: dict, cases: list[dict]) -> None:
    for case in cases:
        name, r = case["name"], res[case["name"]]
        if "eval_from" in case:  # same weights, another schedule: the same means
            src = res[case["eval_from"]]["eval_full"]["4"]
            assert r["iteration"] == (0 if "--finetune" in case["args"] else 4)
            _close(r["eval"][str(r["iteration"])], src, LAYOUT, name)
            continue
        if "precomputed_from" in case:  # side-car under VPP == the online reference
            src = res[case["precomputed_from"]]
            # Every log-prob the online reference computed (16 train packs, 7 eval packs)
            # equals the side-cars' entry.
            assert r["sidecar_compared"] >= 2 * (16 + 7), r["sidecar_compared"]
            assert r["sidecar_vs_online_rel"] <= EXACT, r["sidecar_vs_online_rel"]
            _close(r["losses"], src["full"], EXACT, name)
            for step in ("2", "4"):
                _close(r["eval"][step], src["eval_full"][step], EXACT, f"{name} eval {step}")
            continue
        assert list(r["full"]) == ["1", "2", "3", "4"], name
        assert abs(r["full"]["1"] - 0.6931471805599453) < 1e-6 or "simpo" in case["args"]
        assert r["resumed_start"] == 2, name
        _close(r["resumed"], {k: r["full"][k] for k in ("3", "4")}, EXACT, name)
        assert list(r["eval_full"]) == ["2", "4"] and list(r["eval_resumed"]) == ["4"], name
        _close(r["eval_resumed"]["4"], r["eval_full"]["4"], EXACT, f"{name} eval after resume")
        # 7 eval pairs: accuracy is k/7, never k/8 (a filler counted).
        acc = r["eval_full"]["4"]["eval/rewards/accuracies"] * 7
        assert abs(acc - round(acc)) < 1e-5, (name, acc)
        assert r["weights_max_diff"] == 0.0, (name, r["weights_max_diff"])


pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(("nproc", "cases"), [(2, TWO_RANKS), (4, FOUR_RANKS)],
                         ids=["2-ranks", "4-ranks"])
def test_save_resume_compare_on_every_layout(data, nproc: int, cases: list[dict]) -> None:
    _check(_launch(data, nproc, cases), cases)
