"""A mixture-of-experts model on expert-parallel layouts vs one process (gloo, CPU, fp32).

Each launch runs ``moe_worker.py`` (its doc says how): the single-process reference, then
each layout in turn, comparing the preference loss, the router load-balancing loss
(``moe/aux_loss``) and every gradient (attention, norms, router, every expert), then the
step-0 invariant (the eval-mode online reference of the same chunks: ``dpo`` gives log 2,
and no aux loss is recorded in eval mode), and the planner's parameter count of each rank. The model has a shared expert too. Routing is dropless, micro-batches carry
unequal numbers of pairs (3, 2, 3, 2) dealt round-robin to the DP ranks.

Layouts: EP=2 on 2 ranks (so DP=2 too: the EP ranks hold different data) with the
``allgather`` and ``alltoall`` dispatchers; on 4 ranks EP=2 x PP=2, EP=2 x DP=2 (dense
DP=4, expert DP=2), EP=2 x expert-TP=2 (dense TP=1) and EP=2 x TP=2 with sequence
parallelism (megatron-core's rule for MoE at TP > 1; expert TP = TP = 2).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torchrun_launch import run_torchrun

HERE = Path(__file__).resolve().parent
# fp32: the layouts sum the same terms in another order (DP/EP all-reduces, expert
# all-gathers); observed <= 6e-7 relative. The bound:
TOL = 1e-5


def _results(nproc: int, cases: list[dict]) -> dict[str, dict]:
    proc = run_torchrun(nproc, HERE / "moe_worker.py", json.dumps(cases), timeout=900)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            out[r["case"]] = r
    assert sorted(out) == sorted(c["name"] for c in cases), proc.stdout[-3000:]
    return out


def _check(r: dict) -> None:
    name = r["case"]
    assert r["missing"] == [], (name, r["missing"])
    assert r["grad_rel_err"] <= TOL, (name, r["grad_rel_err"])
    assert r["ref_aux"] > 0.1  # the aux loss is on (coefficient 0.5) and compared
    for aux in r["aux"]:  # every rank logs the same value
        assert abs(aux - r["ref_aux"]) <= TOL * r["ref_aux"], (name, aux, r["ref_aux"])
    for loss in r["loss"]:
        assert abs(loss - r["ref_loss"]) <= TOL, (name, loss, r["ref_loss"])
    for loss in r["step0"]:
        assert abs(loss - math.log(2)) <= 1e-6, (name, loss)
    assert r["aux_in_eval"] == 0.0, name
    assert r["ref_imbalance"] > 1.0  # 4 experts, 2 layers: some imbalance to compare
    for imbalance in r["imbalance"]:  # moe/load_imbalance: integer counts, exact
        assert abs(imbalance - r["ref_imbalance"]) <= 1e-12, (name, imbalance)
    for planned, real in r["params"]:  # the planner's count of each rank's parameters
        assert planned == real, (name, planned, real)


@pytest.mark.distributed
def test_moe_ep2_two_ranks() -> None:
    for r in _results(2, [dict(name="ep2", ep=2),
                          dict(name="ep2-alltoall", ep=2, dispatcher="alltoall")]).values():
        _check(r)


@pytest.mark.distributed
def test_moe_ep2_with_pp_dp_and_expert_tp_four_ranks() -> None:
    for r in _results(4, [dict(name="ep2-pp2", ep=2, pp=2), dict(name="ep2-dp2", ep=2),
                          dict(name="ep2-etp2", ep=2, etp=2),
                          dict(name="ep2-tp2-sp", ep=2, tp=2, sp=True)]).values():
        _check(r)
