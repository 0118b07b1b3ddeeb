"""Preference loss and every gradient on TP / PP / DP / virtual-PP layouts vs one process.

Each test launches ``layouts_worker.py`` once under torchrun (gloo, CPU) and the worker
runs several layouts in turn, re-initialising megatron-core's parallel state in-process
(one launch costs 10-20 s here). For each layout the worker compares, against a
single-process run on the same global batch (each sequence alone, plain log_softmax):
the mean loss and metrics over all pairs, and the gradient of every parameter, through
megatron-core's own schedules and DDP, with micro-batches of unequal numbers of pairs,
packed (THD, block-diagonal mask) and padded ([B, S]) micro-batches. Every layout runs
with both ``--logprob-impl`` paths (``chunked``: logits then log-softmax; ``fused``: hidden
states + output weight), each checked against the single process and against each other
(loss and every gradient). Then the step-0
invariant: an online reference pass through the same chunks makes policy == reference,
and ``dpo`` / ratio-space ``adadpo`` must give log 2 with zero rewards.

Prefix sharing ("shared" cases): the same comparison with prefix-shared packs through the
prefix-sharing core attention (mask implementation), so per-pair log-probs, the loss and
every gradient equal the unshared single-process run's; the online reference pass (step 0)
uses the shared layout too.

Sequence parallelism ("sp": TP=2, with PP=2, virtual PP and DP=2) runs through the local
spec's SP-aware norms (adadpo_megatron/step/norms.py), segments padded to 2*TP; activation
recompute ("recompute") through megatron-core's checkpoint() with the CPU layer's RNG
stand-in (step/cpu.py), each case checking that checkpoint() actually ran.

Context parallelism: megatron-core's local attention refuses CP > 1 (CP attention needs
Transformer Engine on a GPU), so the CP cases use an attention-free stand-in with
GPTModel's interface ("tokenwise": per-token logits from the token and its position).
They check, end to end through the schedules and DDP, what the plugin adds under CP:
the THD token split, the CP all-reduce of the segment sums and the CP factor of the loss
normalisation. The CP reduction alone is also tested in test_logprobs_distributed.py.

Run one launch by hand:
``torchrun --nproc-per-node 2 tests/distributed/layouts_worker.py '[{"name": "tp2", "model": "llama", "fmt": "packed", "tp": 2, "mb_pairs": [3, 1, 2, 4]}]'``
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torchrun_launch import run_torchrun

HERE = Path(__file__).resolve().parent

# fp32 throughout. The layouts sum the same terms in another order (packing, TP
# all-reduces, DP averaging): observed differences are ~1e-6 relative; the bound:
GRAD_RTOL = 1e-5
METRIC_TOL = 1e-5
# Step 0 (policy == reference): the rewards are differences of bitwise-equal sums.
STEP0_TOL = 1e-6

# mb_pairs: pairs per micro-batch of the global batch (10 pairs), dealt round-robin to
# the DP ranks. pad_to: every pack padded to one length (PP needs equal shapes unless
# variable_seq_lengths). "gpt" ties the embeddings, "llama" does not.
TWO_RANKS = [
    dict(name="tp2-packed", model="llama", fmt="packed", tp=2, mb_pairs=[3, 1, 2, 4]),
    dict(name="tp2-padded", model="gpt", fmt="padded", tp=2, mb_pairs=[3, 1, 2, 4]),
    dict(name="pp2-packed", model="llama", fmt="packed", pp=2, mb_pairs=[3, 1, 2, 4], pad_to=96),
    dict(
        name="pp2-padded-varlen",
        model="gpt",
        fmt="padded",
        pp=2,
        mb_pairs=[3, 1, 2, 4],
        variable_seq_lengths=True,
    ),
    # DP: rank 0 gets micro-batches of 3, 2, 2 pairs, rank 1 of 1, 2: unequal counts.
    dict(name="dp2-packed", model="llama", fmt="packed", mb_pairs=[3, 1, 2, 2, 2]),
    dict(
        name="dp2-padded-per-token",
        model="gpt",
        fmt="padded",
        mb_pairs=[3, 1, 2, 2, 2],
        per_token=True,
    ),
    dict(
        name="vpp-packed",
        model="llama",
        fmt="packed",
        pp=2,
        vpp=2,
        mb_pairs=[3, 1, 2, 4],
        pad_to=96,
    ),
    dict(name="vpp-padded", model="gpt", fmt="padded", pp=2, vpp=2, mb_pairs=[5, 5]),
    # CP: tokens split over 2 ranks (THD path), attention-free stand-in model (see above).
    dict(name="cp2-tokenwise", model="tokenwise", fmt="packed", cp=2, mb_pairs=[3, 1, 2, 4]),
    # Prefix sharing (adadpo-pack --prefix-sharing): RoPE (llama) and learned positions
    # (gpt); a pair alone in a micro-batch and pairs at the end of a long pack.
    dict(name="tp2-shared", model="llama", fmt="shared", tp=2, mb_pairs=[1, 9]),
    dict(name="pp2-shared", model="gpt", fmt="shared", pp=2, mb_pairs=[3, 1, 6], pad_to=96),
    dict(name="dp2-shared", model="llama", fmt="shared", mb_pairs=[1, 3, 6]),
    dict(
        name="cp2-tokenwise-per-token",
        model="tokenwise",
        fmt="packed",
        cp=2,
        mb_pairs=[3, 1, 2, 4],
        per_token=True,
    ),
    # Sequence parallelism (step/norms.py on the CPU): RoPE (llama) and learned positions
    # (gpt), separate and prefix-shared packs, segments padded to 2*TP. Activation recompute
    # ("recompute": granularity, method, layers): selective and full (uniform and block),
    # each on both pack layouts; "recomputed" checks megatron-core's checkpoint() ran.
    dict(name="tp2sp-packed-selective", model="llama", fmt="packed", tp=2, sp=True,
         mb_pairs=[3, 1, 2, 4], recompute=["selective"]),
    dict(name="tp2sp-packed-block", model="gpt", fmt="packed", tp=2, sp=True,
         mb_pairs=[3, 1, 2, 4], recompute=["full", "block", 1]),
    dict(name="tp2sp-shared-uniform", model="gpt", fmt="shared", tp=2, sp=True,
         mb_pairs=[1, 9], recompute=["full", "uniform", 2]),
    dict(name="tp2sp-shared-selective", model="llama", fmt="shared", tp=2, sp=True,
         mb_pairs=[4, 1, 3, 2], recompute=["selective"]),
    dict(name="pp2-shared-block", model="llama", fmt="shared", pp=2, mb_pairs=[3, 1, 6],
         pad_to=96, recompute=["full", "block", 2]),
    dict(name="dp2-packed-uniform", model="gpt", fmt="packed", mb_pairs=[3, 1, 2, 2, 2],
         recompute=["full", "uniform", 1]),
]
FOUR_RANKS = [
    dict(
        name="tp2pp2-packed",
        model="llama",
        fmt="packed",
        tp=2,
        pp=2,
        mb_pairs=[3, 1, 2, 4],
        pad_to=96,
    ),
    dict(
        name="tp2pp2-padded-per-token",
        model="gpt",
        fmt="padded",
        tp=2,
        pp=2,
        mb_pairs=[3, 1, 2, 4],
        variable_seq_lengths=True,
        per_token=True,
    ),
    dict(name="tp2dp2-packed", model="llama", fmt="packed", tp=2, mb_pairs=[3, 1, 2, 2, 2]),
    dict(name="cp2dp2-tokenwise", model="tokenwise", fmt="packed", cp=2, mb_pairs=[3, 1, 2, 2, 2]),
    dict(name="tp2pp2-shared", model="llama", fmt="shared", tp=2, pp=2, mb_pairs=[1, 3, 6],
         pad_to=96),
    dict(name="tp2dp2-shared", model="gpt", fmt="shared", tp=2, mb_pairs=[4, 1, 3, 2]),
    # Sequence parallelism with PP, virtual PP and DP (see TWO_RANKS).
    dict(name="tp2sp-pp2-packed", model="llama", fmt="packed", tp=2, sp=True, pp=2,
         mb_pairs=[3, 1, 2, 4], pad_to=96, recompute=["selective"]),
    dict(name="tp2sp-pp2-shared", model="gpt", fmt="shared", tp=2, sp=True, pp=2,
         mb_pairs=[1, 3, 6], pad_to=96),
    dict(name="tp2sp-vpp-packed", model="gpt", fmt="packed", tp=2, sp=True, pp=2, vpp=2,
         mb_pairs=[3, 1, 2, 4], pad_to=96, recompute=["full", "uniform", 1]),
    dict(name="tp2sp-dp2-packed", model="gpt", fmt="packed", tp=2, sp=True,
         mb_pairs=[3, 1, 2, 2, 2]),
    dict(name="tp2sp-dp2-shared", model="llama", fmt="shared", tp=2, sp=True,
         mb_pairs=[1, 3, 2, 4], recompute=["full", "block", 1]),
]


def launch(nproc: int, cases: list[dict], timeout: int = 420) -> dict[str, dict]:
    """Runs the worker under torchrun; returns {case name: merged result} from rank 0."""
    proc = run_torchrun(nproc, HERE / "layouts_worker.py", json.dumps(cases), timeout=timeout)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT ") :])
            results[res["case"]] = res
    assert sorted(results) == sorted(c["name"] for c in cases), proc.stdout[-4000:]
    return results


def check(res: dict) -> None:
    name = res["case"]
    assert res["params_missing"] == [], f"{name}: no rank holds {res['params_missing']}"
    assert res["grad_rel_err"] <= GRAD_RTOL, (
        f"{name}: gradient rel. error {res['grad_rel_err']:.3g}"
    )
    assert res["impl_grad_err"] <= GRAD_RTOL, (
        f"{name}: fused vs chunked gradient rel. difference {res['impl_grad_err']:.3g}"
    )
    assert res["impl_loss_err"] <= METRIC_TOL * res["ref_loss"], (
        f"{name}: fused vs chunked loss difference {res['impl_loss_err']:.3g}"
    )
    assert res["metric_names"] == res["ref_metric_names"], name
    assert res["metric_err"] <= METRIC_TOL, f"{name}: metric error {res['metric_err']:.3g}"
    for loss in res["loss"]:  # one per last-stage rank
        assert abs(loss - res["ref_loss"]) <= METRIC_TOL * res["ref_loss"], (
            name,
            loss,
            res["ref_loss"],
        )
    if res.get("expect_recompute"):
        assert res["recomputed"] > 0, f"{name}: activation recompute never ran"
    assert res["step0"], f"{name}: no step-0 result"
    for per_rank in res["step0"]:
        for loss_name in ("dpo", "adadpo"):
            m = per_rank[loss_name]
            assert abs(m["loss"] - math.log(2)) <= STEP0_TOL, (name, loss_name, m)
            assert abs(m["rewards/chosen"]) <= STEP0_TOL, (name, loss_name, m)
            assert abs(m["rewards/rejected"]) <= STEP0_TOL, (name, loss_name, m)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("nproc", "cases"), [(2, TWO_RANKS), (4, FOUR_RANKS)], ids=["2-ranks", "4-ranks"]
)
def test_layouts_match_single_process(nproc: int, cases: list[dict]) -> None:
    results = launch(nproc, cases)
    failures = []
    for case in cases:
        try:
            check({**results[case["name"]], "expect_recompute": "recompute" in case})
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)
