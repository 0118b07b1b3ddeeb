"""LoRA: loss and every adapter gradient on TP / PP / DP / TP x PP / CP / TP+SP vs one process.

One torchrun launch per process count runs ``lora_worker.py`` over many layouts (it
re-initialises megatron-core's parallel state in-process). For each layout and both pack
layouts (separate segments and prefix-shared), against a single process with the same
base and adapter weights: the mean loss and metrics (fused and chunked log-probs), every
adapter gradient (relative to the parameter's largest), every base parameter frozen (no
requires_grad, no DDP grad buffer), and reference = base: a forward-only pass with the
adapters off gives the reference log-probs, and with B = 0 (step 0) ``dpo`` is ln 2.

CP and SP use the worker's attention-free "mlp" stand-in (fc1 column-parallel, fc2
row-parallel): megatron-core's local attention refuses CP, its local norms refuse SP.
Under SP the stand-in runs megatron-core's own SP linears (input all-gather inside fc1,
reduce-scatter out of fc2), so the adapters' SP collectives are exercised end to end.
Real GPTModels run TP=2+SP too (the CPU layer's SP-aware norms, ``step/norms.py``), in both
pack layouts.

Run by hand:
``torchrun --nproc-per-node 2 tests/distributed/lora_worker.py '[{"name": "tp2", "model": "llama", "fmt": "packed", "tp": 2, "mb_pairs": [3, 1, 2, 4]}]'``
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torchrun_launch import run_torchrun

HERE = Path(__file__).resolve().parent
# fp32; layouts sum the same terms in another order: observed <= 2e-6 relative.
GRAD_RTOL = 1e-5
METRIC_TOL = 1e-5
# Step 0 with reference = base: rewards are differences of bitwise-equal sums.
STEP0_TOL = 1e-7

TWO_RANKS = [
    dict(name="tp2-packed", model="llama", fmt="packed", tp=2, mb_pairs=[3, 1, 2, 4]),
    dict(name="tp2-shared", model="gpt", fmt="shared", tp=2, mb_pairs=[1, 9]),
    dict(name="pp2-packed", model="llama", fmt="packed", pp=2, mb_pairs=[3, 1, 2, 4], pad_to=96),
    dict(name="pp2-shared", model="gpt", fmt="shared", pp=2, mb_pairs=[3, 1, 6], pad_to=96),
    dict(name="dp2-packed", model="llama", fmt="packed", mb_pairs=[3, 1, 2, 2, 2]),
    dict(name="dp2-shared", model="llama", fmt="shared", mb_pairs=[1, 3, 6]),
    dict(name="cp2-packed", model="mlp", fmt="packed", cp=2, mb_pairs=[3, 1, 2, 4]),
    dict(name="tp2sp-packed", model="mlp", fmt="packed", tp=2, sp=True, mb_pairs=[3, 1, 2, 4]),
    # Real GPTModels under SP (the CPU layer's SP-aware norms, step/norms.py).
    dict(name="tp2sp-llama-packed", model="llama", fmt="packed", tp=2, sp=True,
         mb_pairs=[3, 1, 2, 4]),
    dict(name="tp2sp-gpt-shared", model="gpt", fmt="shared", tp=2, sp=True, mb_pairs=[1, 9]),
]
FOUR_RANKS = [
    dict(name="tp2pp2-packed", model="llama", fmt="packed", tp=2, pp=2, mb_pairs=[3, 1, 2, 4],
         pad_to=96),
    dict(name="tp2pp2-shared", model="gpt", fmt="shared", tp=2, pp=2, mb_pairs=[1, 3, 6],
         pad_to=96),
    dict(name="tp2dp2-packed", model="llama", fmt="packed", tp=2, mb_pairs=[3, 1, 2, 2, 2]),
    dict(name="tp2sp-dp2-packed", model="mlp", fmt="packed", tp=2, sp=True,
         mb_pairs=[3, 1, 2, 2, 2]),
]


def check(res: dict) -> None:
    name = res["case"]
    assert res["params_missing"] == [], f"{name}: no rank holds {res['params_missing']}"
    assert res["frozen_ok"], f"{name}: a base parameter requires grad or has a grad buffer"
    assert res["grad_rel_err"] <= GRAD_RTOL, (name, res["grad_rel_err"], res["worst"])
    assert res["metric_err"] <= METRIC_TOL, (name, res["metric_err"])
    for loss in res["loss"]:
        assert abs(loss - res["ref_loss"]) <= METRIC_TOL * res["ref_loss"], (name, loss)
    assert res["step0"], f"{name}: no step-0 result"
    for m in res["step0"]:
        assert abs(m["loss"] - math.log(2)) <= STEP0_TOL, (name, m)
        assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0, (name, m)


@pytest.mark.distributed
@pytest.mark.parametrize(("nproc", "cases"), [(2, TWO_RANKS), (4, FOUR_RANKS)],
                         ids=["2-ranks", "4-ranks"])
def test_lora_layouts_match_single_process(nproc: int, cases: list[dict]) -> None:
    proc = run_torchrun(nproc, HERE / "lora_worker.py", json.dumps(cases), timeout=420)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            results[res["case"]] = res
    assert sorted(results) == sorted(c["name"] for c in cases), proc.stdout[-4000:]
    failures = []
    for case in cases:
        try:
            check(results[case["name"]])
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)
