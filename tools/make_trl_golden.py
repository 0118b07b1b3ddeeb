"""Regenerate tests/data/trl_golden.json: per-pair losses and gradients computed by TRL's own code.

Run by hand, in a separate virtual environment (TRL pulls transformers/accelerate,
which the project does not need)::

    python -m venv /tmp/trlenv && /tmp/trlenv/bin/pip install torch==2.13.0 trl==1.16.0
    /tmp/trlenv/bin/python tools/make_trl_golden.py --out tests/data/trl_golden.json

What runs is TRL's code, not a re-implementation:

- ``dpo``, ``ipo``, ``hinge``, ``robust``: ``trl.DPOTrainer._compute_loss`` (the whole
  method: log-prob sums, log-ratios, the loss switch, metric bookkeeping) called with
  a minimal stand-in for the trainer's attributes and a stand-in model whose
  ``log_probs`` output puts each completion's summed log-prob on its first completion
  token (zeros elsewhere, so TRL's sum over positions reproduces it exactly).  The
  reference log-probs go in as precomputed (``precompute_ref_log_probs``).  TRL
  returns the batch mean, so each pair is run on its own to get per-pair values;
  gradients come from autograd through TRL's code into the stand-in ``log_probs``.
- ``simpo``: ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="simpo"``,
  fed the length-averaged log-probs that CPOTrainer computes for SimPO.

The unit test tests/unit/test_losses_trl_golden.py compares against the JSON without TRL.
"""

from __future__ import annotations

import argparse
import json
import types
from collections import defaultdict
from pathlib import Path

import torch

SEED = 20260527
N_PAIRS = 12
# (our loss name, TRL loss_type, TRL hyper-parameters)
CASES = [
    ("dpo", "sigmoid", {"beta": 0.1, "label_smoothing": 0.0}),
    ("dpo", "sigmoid", {"beta": 0.5, "label_smoothing": 0.0}),
    # TRL 1.16.0's sigmoid ignores label_smoothing: recorded to document the difference.
    ("dpo", "sigmoid", {"beta": 0.1, "label_smoothing": 0.2}),
    ("ipo", "ipo", {"beta": 0.1, "label_smoothing": 0.0}),
    ("ipo", "ipo", {"beta": 1.0, "label_smoothing": 0.0}),
    ("hinge", "hinge", {"beta": 0.1, "label_smoothing": 0.0}),
    ("hinge", "hinge", {"beta": 2.0, "label_smoothing": 0.0}),
    ("robust", "robust", {"beta": 0.1, "label_smoothing": 0.1}),
    ("robust", "robust", {"beta": 0.3, "label_smoothing": 0.4}),
    ("simpo", "simpo", {"beta": 2.0, "simpo_gamma": 0.5}),
    ("simpo", "simpo", {"beta": 0.1, "simpo_gamma": 0.0}),
]


def random_pairs(seed: int, n: int) -> dict[str, torch.Tensor]:
    """Pairs with completion lengths in [1, 40] and mean token log-probs in (-3, 0)."""
    g = torch.Generator().manual_seed(seed)
    len_w = torch.randint(1, 41, (n,), generator=g)
    len_l = torch.randint(1, 41, (n,), generator=g)
    len_w[0] = len_l[1] = 1
    dt = torch.float64
    pol_w = -len_w * 3 * torch.rand(n, generator=g, dtype=dt)
    pol_l = -len_l * 3 * torch.rand(n, generator=g, dtype=dt)
    ref_w = pol_w + 4 * torch.randn(n, generator=g, dtype=dt)
    ref_l = pol_l + 4 * torch.randn(n, generator=g, dtype=dt)
    return dict(pol_w=pol_w, pol_l=pol_l, ref_w=ref_w, ref_l=ref_l, len_w=len_w, len_l=len_l)


class _StandInModel:
    """Returns TRL's fused-LM-head output fields; ``log_probs`` is a leaf with grad."""

    training = True

    def __init__(self, log_probs: torch.Tensor) -> None:
        self.log_probs = log_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.log_probs.detach())
        return types.SimpleNamespace(
            log_probs=self.log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def trl_dpo_pair(loss_type: str, hp: dict, pw, pl, rw, rl, lw: int, ll: int):
    """One pair through ``DPOTrainer._compute_loss``: (loss, dL/dpol_w, dL/dpol_l)."""
    from trl import DPOTrainer

    seq = 1 + max(lw, ll)  # one prompt token, then the completion
    completion_mask = torch.zeros(2, seq, dtype=torch.long)
    completion_mask[0, 1 : 1 + lw] = 1
    completion_mask[1, 1 : 1 + ll] = 1
    log_probs = torch.zeros(2, seq - 1, dtype=torch.float64)
    log_probs[0, 0], log_probs[1, 0] = pw, pl  # first completion token (shifted position 0)
    log_probs.requires_grad_()
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t
    )
    stub = types.SimpleNamespace(
        model=_StandInModel(log_probs),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=hp["beta"],
        label_smoothing=hp["label_smoothing"],
        use_weighting=False,
        _tp_size=1,
        _total_train_tokens=0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "input_ids": torch.ones(2, seq, dtype=torch.long),
        "attention_mask": torch.ones(2, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor([rw], dtype=torch.float64),
        "ref_rejected_logps": torch.tensor([rl], dtype=torch.float64),
    }
    loss = DPOTrainer._compute_loss(stub, stub.model, inputs, return_outputs=False)
    loss.backward()
    return loss.item(), log_probs.grad[0, 0].item(), log_probs.grad[1, 0].item()


def trl_simpo(hp: dict, pairs: dict[str, torch.Tensor]):
    """All pairs through ``CPOTrainer.cpo_loss`` (SimPO): per-pair losses and gradients."""
    from trl.experimental.cpo import CPOTrainer

    pol_w = pairs["pol_w"].clone().requires_grad_()
    pol_l = pairs["pol_l"].clone().requires_grad_()
    stub = types.SimpleNamespace(
        alpha=0.0,
        accelerator=types.SimpleNamespace(device=torch.device("cpu")),
        loss_type="simpo",
        simpo_gamma=hp["simpo_gamma"],
        beta=hp["beta"],
        label_smoothing=0.0,
    )
    # CPOTrainer feeds SimPO the per-token average (get_batch_logps(average_log_prob=True)).
    losses, _, _ = CPOTrainer.cpo_loss(stub, pol_w / pairs["len_w"], pol_l / pairs["len_l"])
    g_w, g_l = torch.autograd.grad(losses.sum(), (pol_w, pol_l))
    return losses.tolist(), g_w.tolist(), g_l.tolist()


def main(argv: list[str] | None = None) -> int:
    """Write the golden JSON (see the module docstring)."""
    import trl

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/data/trl_golden.json"))
    args = parser.parse_args(argv)
    cases = []
    for i, (name, loss_type, hp) in enumerate(CASES):
        pairs = random_pairs(SEED + i, N_PAIRS)
        if loss_type == "simpo":
            loss, g_w, g_l = trl_simpo(hp, pairs)
        else:
            rows = [
                trl_dpo_pair(
                    loss_type,
                    hp,
                    *(
                        pairs[k][j].item()
                        for k in ("pol_w", "pol_l", "ref_w", "ref_l", "len_w", "len_l")
                    ),
                )
                for j in range(N_PAIRS)
            ]
            loss, g_w, g_l = (list(col) for col in zip(*rows, strict=True))
        cases.append(
            {
                "loss": name,
                "trl": f"{'CPOTrainer.cpo_loss' if loss_type == 'simpo' else 'DPOTrainer._compute_loss'} loss_type={loss_type}",
                "trl_hparams": hp,
                **{k: v.tolist() for k, v in pairs.items()},
                "expected_loss": loss,
                "expected_grad_w": g_w,
                "expected_grad_l": g_l,
            }
        )
    out = {
        "generated_by": "tools/make_trl_golden.py",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "dtype": "float64",
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases x {N_PAIRS} pairs from TRL {trl.__version__} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
