"""AdaDPO vs DPO on a tiny bigram language model (CPU, seconds).

Two copies of the same randomly initialised bigram LM are trained on the same
synthetic preference pairs, one with ``dpo`` and one with ``adadpo``, each against
its own frozen copy of the initial model as reference.  Every few steps it prints
the batch-mean metrics of both (LOSSES.md names).  What to look for:

- ``grad_ratio`` (``balance/grad_ratio``, |dL/dp_l| / |dL/dp_w| at the token level):
  under ``dpo`` it drifts above 1 as the chosen side becomes more likely than the
  rejected one, so the push down on the rejected side dominates;
- under ``adadpo`` it is exactly 1 on every pair where the clip does not bind
  (``ratio|free``), and above 1 only on the clipped pairs (``clip_frac``).

    python examples/loss_demo.py --steps 60
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
import torch.nn.functional as F

from adadpo_megatron.losses import LossConfig, compute_preference_loss, metric_reduction

VOCAB = 16
PROMPT_LEN = 3


def _markov_chain(gen: torch.Generator, sharpness: float) -> torch.Tensor:
    """A random row-stochastic transition matrix [V, V]."""
    return torch.softmax(sharpness * torch.randn(VOCAB, VOCAB, generator=gen), dim=-1)


def make_pairs(n: int, seed: int, mix: float) -> dict[str, torch.Tensor]:
    """``n`` synthetic preference pairs sharing a prompt per pair, right-padded.

    Chosen completions follow one random Markov chain; rejected ones a mixture
    ``mix * chosen_chain + (1 - mix) * other_chain`` (closer to 1: harder to tell apart).

    Returns:
        ``tokens_w``, ``tokens_l`` int64 [n, L]; ``mask_w``, ``mask_l`` float32 [n, L-1],
        1.0 where the predicted next token is a completion token.
    """
    gen = torch.Generator().manual_seed(seed)
    good = _markov_chain(gen, 2.0)
    bad = mix * good + (1 - mix) * _markov_chain(gen, 2.0)
    max_len = PROMPT_LEN + 12
    out = {}
    prompts = torch.randint(VOCAB, (n, PROMPT_LEN), generator=gen)
    for side, chain in (("w", good), ("l", bad)):
        tokens = torch.zeros(n, max_len, dtype=torch.long)
        mask = torch.zeros(n, max_len - 1)
        tokens[:, :PROMPT_LEN] = prompts
        lengths = torch.randint(2, max_len - PROMPT_LEN + 1, (n,), generator=gen)
        for t in range(PROMPT_LEN, max_len):
            tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=gen)[:, 0]
        positions = torch.arange(max_len - 1)
        mask[(positions >= PROMPT_LEN - 1) & (positions < PROMPT_LEN - 1 + lengths[:, None])] = 1.0
        out[f"tokens_{side}"], out[f"mask_{side}"] = tokens, mask
    return out


class BigramLM(torch.nn.Module):
    """``log p(next | prev)`` from a learned [V, V] logit table."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(0.5 * torch.randn(VOCAB, VOCAB, generator=gen))

    def completion_logprobs(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Summed log-prob [B] of the tokens ``mask`` selects (tokens [B, L], mask [B, L-1])."""
        logp = F.log_softmax(self.logits[tokens[:, :-1]], dim=-1)
        return (logp.gather(2, tokens[:, 1:, None])[..., 0] * mask).sum(dim=1)


def run(
    steps: int,
    beta: float = 0.1,
    clip: float = 2.0,
    batch_size: int = 64,
    lr: float = 6.0,
    seed: int = 0,
):
    """Train dpo and adadpo side by side; returns ``{loss_name: [per-step metric dict]}``.

    Each step's dict holds the batch reduction (mean, or max for ``*_max``) of every
    metric, plus ``ratio|free``: the mean grad_ratio over pairs where the clip did not bind.
    """
    data = make_pairs(1024, seed, mix=0.7)
    gen = torch.Generator().manual_seed(seed + 1)
    reference = BigramLM(seed + 2).requires_grad_(False)
    runs = {}
    for cfg in (
        LossConfig(name="dpo", beta=beta),
        LossConfig(name="adadpo", beta=beta, balance_clip=clip),
    ):
        model = copy.deepcopy(reference).requires_grad_(True)
        runs[cfg.name] = (cfg, model)
    history = {name: [] for name in runs}
    for _ in range(steps):
        idx = torch.randint(len(data["tokens_w"]), (batch_size,), generator=gen)
        batch = {k: v[idx] for k, v in data.items()}
        len_w, len_l = batch["mask_w"].sum(1).long(), batch["mask_l"].sum(1).long()
        with torch.no_grad():
            ref_w = reference.completion_logprobs(batch["tokens_w"], batch["mask_w"])
            ref_l = reference.completion_logprobs(batch["tokens_l"], batch["mask_l"])
        for name, (cfg, model) in runs.items():
            pol_w = model.completion_logprobs(batch["tokens_w"], batch["mask_w"])
            pol_l = model.completion_logprobs(batch["tokens_l"], batch["mask_l"])
            losses, metrics = compute_preference_loss(cfg, pol_w, pol_l, ref_w, ref_l, len_w, len_l)
            losses.mean().backward()  # the batch loss is the mean over pairs
            with torch.no_grad():  # plain SGD (torch.optim's first use costs ~10 s of imports)
                model.logits -= lr * model.logits.grad
                model.logits.grad = None
            row = {
                k: (v.max() if metric_reduction(k) == "max" else v.mean()).item()
                for k, v in metrics.items()
            }
            free = metrics.get("adadpo/clip_frac", torch.zeros_like(losses)) == 0
            row["ratio|free"] = (
                metrics["balance/grad_ratio"][free].mean().item() if free.any() else math.nan
            )
            history[name].append(row)
    return history


def main(argv: list[str] | None = None) -> int:
    """Parse ``--steps`` etc., train both losses and print one line per logged step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--beta", type=float, default=0.1, help="--dpo-beta (default 0.1)")
    parser.add_argument("--clip", type=float, default=2.0, help="--adadpo-clip C (default 2.0)")
    parser.add_argument("--log-every", type=int, default=5, help="print every N steps (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tensors of a few hundred elements: threads only add wake-up cost
    history = run(args.steps, beta=args.beta, clip=args.clip, seed=args.seed)
    print(
        f"{'step':>4} | {'dpo: loss':>9} {'acc':>5} {'grad_ratio':>10} | "
        f"{'adadpo: loss':>12} {'acc':>5} {'grad_ratio':>10} {'ratio|free':>10} {'coef_mean':>9} {'coef_max':>8} {'clip_frac':>9}"
    )
    for step in range(args.log_every - 1, args.steps, args.log_every):
        d, a = history["dpo"][step], history["adadpo"][step]
        print(
            f"{step + 1:>4} | {d['loss']:>9.4f} {d['rewards/accuracies']:>5.2f} {d['balance/grad_ratio']:>10.4f} | "
            f"{a['loss']:>12.4f} {a['rewards/accuracies']:>5.2f} {a['balance/grad_ratio']:>10.4f} "
            f"{a['ratio|free']:>10.6f} {a['adadpo/coef_mean']:>9.4f} {a['adadpo/coef_max']:>8.4f} "
            f"{a['adadpo/clip_frac']:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
