"""Property 6: dpo, ipo, hinge, robust, simpo against TRL 1.16.0's own loss code.

tests/data/trl_golden.json holds per-pair losses and gradients computed by TRL
(``DPOTrainer._compute_loss``; ``CPOTrainer.cpo_loss`` for SimPO) on seeded float64
inputs; ``tools/make_trl_golden.py`` regenerates it in a venv with TRL.  No TRL here.

Where TRL's conventions differ from LOSSES.md (checked in TRL 1.16.0's source):

- TRL's ``sigmoid`` loss ignores ``label_smoothing`` (it is plain ``-logsig(beta*h)``;
  only ``robust``, ``exo_pair``, ``aot*`` read it).  Our ``dpo`` applies cDPO smoothing,
  so TRL's sigmoid with smoothing eps equals our ``dpo`` with ``label_smoothing=0``.
- TRL's ``ipo`` divides each side's log-ratio by its completion length (``h_n``), as
  LOSSES.md does; so the raw sums of the IPO paper are not what either computes.
- TRL's ``robust`` is ours; TRL only warns for eps outside [0, 0.5), we raise.
- SimPO lives in TRL's CPOTrainer (``loss_type="simpo"``), on length-averaged log-probs,
  with ``gamma`` as ``simpo_gamma``; its label smoothing is left at 0 (ours has none).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adadpo_megatron.losses import LossConfig, compute_preference_loss

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "data" / "trl_golden.json").read_text())


def _config(case: dict, smoothing: float | None = None) -> LossConfig:
    hp = dict(case["trl_hparams"])
    kwargs = {"name": case["loss"], "beta": hp["beta"]}
    if case["loss"] == "robust":
        kwargs["label_smoothing"] = hp["label_smoothing"]
    if case["loss"] == "simpo":
        kwargs["gamma"] = hp["simpo_gamma"]
    if smoothing is not None:
        kwargs["label_smoothing"] = smoothing
    return LossConfig(**kwargs)


def _ours(cfg: LossConfig, case: dict):
    t = {
        k: torch.tensor(case[k], dtype=torch.float64) for k in ("pol_w", "pol_l", "ref_w", "ref_l")
    }
    pw, pl = t["pol_w"].requires_grad_(), t["pol_l"].requires_grad_()
    lw, ll = torch.tensor(case["len_w"]), torch.tensor(case["len_l"])
    loss, _ = compute_preference_loss(cfg, pw, pl, t["ref_w"], t["ref_l"], lw, ll)
    g_w, g_l = torch.autograd.grad(loss.sum(), (pw, pl))
    return loss.detach(), g_w, g_l


def test_golden_file_is_from_trl_1_16() -> None:
    assert GOLDEN["trl_version"] == "1.16.0"
    assert {c["loss"] for c in GOLDEN["cases"]} == {"dpo", "ipo", "hinge", "robust", "simpo"}


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: f"{c['loss']}-{c['trl_hparams']}")
def test_matches_trl_values_and_gradients(case: dict) -> None:
    loss, g_w, g_l = _ours(_config(case, smoothing=0.0 if case["loss"] == "dpo" else None), case)
    expected = {
        k: torch.tensor(case[f"expected_{k}"], dtype=torch.float64)
        for k in ("loss", "grad_w", "grad_l")
    }
    # Both sides compute in float64 from the same inputs; 1e-10 leaves room for TRL
    # summing over (zero-padded) token positions and its different operation order.
    torch.testing.assert_close(loss, expected["loss"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, expected["grad_w"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_l, expected["grad_l"], rtol=1e-10, atol=1e-12)


def test_trl_sigmoid_ignores_label_smoothing() -> None:
    """The documented difference: TRL's sigmoid with eps = 0.2 equals our dpo with eps = 0, not 0.2."""
    case = next(
        c for c in GOLDEN["cases"] if c["loss"] == "dpo" and c["trl_hparams"]["label_smoothing"] > 0
    )
    expected = torch.tensor(case["expected_loss"], dtype=torch.float64)
    smoothed, _, _ = _ours(_config(case, smoothing=case["trl_hparams"]["label_smoothing"]), case)
    plain, _, _ = _ours(_config(case, smoothing=0.0), case)
    torch.testing.assert_close(plain, expected, rtol=1e-10, atol=1e-12)
    assert (smoothed - expected).abs().min() > 1e-3
