"""compute_preference_loss: per-pair losses and per-pair metrics for any registered loss."""

from __future__ import annotations

import torch

from adadpo_megatron.losses.balance import (
    balance_score,
    clip_binds,
    grad_ratio_log,
    log_balance_coef,
    log_limit,
)
from adadpo_megatron.losses.config import LossConfig
from adadpo_megatron.losses.registry import PairInputs, available_losses, get_loss_spec

__all__ = ["compute_preference_loss", "METRICS", "metric_reduction"]

METRICS: dict[str, str] = {
    "loss": "per-pair loss (the value that is averaged and back-propagated)",
    "rewards/chosen": "beta*rho_w (beta-scaled; rho = pol - ref, ref = 0 when a reference-free loss gets none)",
    "rewards/rejected": "beta*rho_l (beta-scaled)",
    "rewards/margins": "beta*(rho_w - rho_l) (beta-scaled)",
    "rewards/accuracies": "1 where rho_w > rho_l, else 0 (mean: fraction of pairs ranked right)",
    "logps/chosen": "pol_w, summed over the chosen completion's tokens",
    "logps/rejected": "pol_l, summed over the rejected completion's tokens",
    "balance/grad_ratio": "|dL/dq_l| / |dL/dq_w| of the preference term, q as balanced (1 = balanced)",
    "balance/log_grad_ratio": "log of balance/grad_ratio (robust to outliers in the mean)",
    "adadpo/coef_mean": "ada* only: the balance coefficient k",
    "adadpo/coef_max": "ada* only: k, to be reduced with max (see metric_reduction)",
    "adadpo/clip_frac": "ada* only: 1 where the clip C binds (s > log C, or |s| > log C in mode both), else 0",
}
"""Every metric name with its meaning; only the rewards/* ones are beta-scaled."""


def metric_reduction(name: str) -> str:
    """How the caller reduces a per-pair metric over the global batch: ``"max"`` or ``"mean"``."""
    return "max" if name.endswith("_max") else "mean"


def _prepare(
    cfg: LossConfig,
    tensors: dict[str, torch.Tensor | None],
) -> PairInputs:
    """Check shapes and reference presence; cast to the compute dtype (fp32 or wider)."""
    pol_w = tensors["pol_w"]
    if not isinstance(pol_w, torch.Tensor) or pol_w.dim() != 1:
        raise ValueError(
            f"pol_w must be a 1-D tensor [N] of per-pair log-prob sums, got {pol_w!r:.80}"
        )
    refs = (tensors["ref_w"], tensors["ref_l"])
    if (refs[0] is None) != (refs[1] is None):
        raise ValueError("pass both ref_w and ref_l, or neither")
    if cfg.needs_reference and refs[0] is None:
        free = [n for n in available_losses() if not get_loss_spec(n).needs_reference]
        raise ValueError(
            f"loss {cfg.name!r} needs reference log-probs but ref_w/ref_l are None; give "
            "--ref-logprobs (precomputed side-car) or --ref-load (online reference), or choose a "
            f"reference-free loss: {', '.join(free)}"
        )
    dtype = torch.promote_types(pol_w.dtype, torch.float32)
    out: dict[str, torch.Tensor | None] = {}
    for key, value in tensors.items():
        if value is None:
            out[key] = None
            continue
        if value.shape != pol_w.shape:
            raise ValueError(
                f"{key} has shape {tuple(value.shape)}, expected {tuple(pol_w.shape)} like pol_w"
            )
        out[key] = value.to(dtype)
    for key in ("ref_w", "ref_l", "len_w", "len_l"):  # stop-gradient inputs
        if out[key] is not None:
            out[key] = out[key].detach()
    return PairInputs(**out)


def compute_preference_loss(
    cfg: LossConfig,
    pol_w: torch.Tensor,
    pol_l: torch.Tensor,
    ref_w: torch.Tensor | None,
    ref_l: torch.Tensor | None,
    len_w: torch.Tensor,
    len_l: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair preference losses and metrics (LOSSES.md) for the loss ``cfg.name``.

    Args:
        cfg: the loss and its hyper-parameters.
        pol_w, pol_l: policy log-probs of the chosen / rejected completion, summed over
            completion tokens, shape [N], any float dtype; they carry the gradient.
        ref_w, ref_l: the same under the reference model [N] (treated as stop-gradient),
            or None for reference-free losses.
        len_w, len_l: completion token counts [N] (integer or float), each >= 1.

    Returns:
        ``(losses, metrics)``: ``losses`` [N] in fp32 (or the inputs' dtype if wider),
        with ``loss = preference_term + (nll_weight + sft_weight) * (-pol_w/len_w)``;
        ``metrics`` maps each name of :data:`METRICS` (``adadpo/*`` only for ``ada*``
        losses) to a detached per-pair tensor [N].  The caller averages them over
        the global batch, except ``adadpo/coef_max`` (see :func:`metric_reduction`).

    Raises:
        ValueError: a non-1-D ``pol_w``, mismatched shapes, only one of ``ref_w``/``ref_l``,
            or no reference log-probs for a loss that needs them.
    """
    x = _prepare(
        cfg, dict(pol_w=pol_w, pol_l=pol_l, ref_w=ref_w, ref_l=ref_l, len_w=len_w, len_l=len_l)
    )
    spec = cfg.spec
    s = balance_score(spec, x, cfg.balance_space, cfg.balance_granularity)
    if spec.balanced:
        log_k = log_balance_coef(s, cfg.balance_clip, cfg.balance_clip_mode)
        k: torch.Tensor | float = torch.exp(log_k)  # detached: s is computed under no_grad
    else:
        log_k, k = 0.0, 1.0
    losses = spec.fn(cfg, x, k)
    nll_coef = spec.nll_coef(cfg)
    if nll_coef != 0.0:
        losses = losses + nll_coef * (-x.pol_w / x.len_w)
    return losses, _metrics(cfg, x, losses, s, log_k, k)


def _metrics(
    cfg: LossConfig,
    x: PairInputs,
    losses: torch.Tensor,
    s: torch.Tensor,
    log_k: torch.Tensor | float,
    k: torch.Tensor | float,
) -> dict[str, torch.Tensor]:
    """The per-pair metric tensors [N] (detached) of :data:`METRICS`."""
    with torch.no_grad():
        pol_w, pol_l = x.pol_w.detach(), x.pol_l.detach()
        rho_w = pol_w if x.ref_w is None else pol_w - x.ref_w
        rho_l = pol_l if x.ref_l is None else pol_l - x.ref_l
        log_ratio = grad_ratio_log(s, log_k)
        limit = log_limit(s.dtype)
        metrics = {
            "loss": losses.detach(),
            "rewards/chosen": cfg.beta * rho_w,
            "rewards/rejected": cfg.beta * rho_l,
            "rewards/margins": cfg.beta * (rho_w - rho_l),
            "rewards/accuracies": (rho_w > rho_l).to(s.dtype),
            "logps/chosen": pol_w,
            "logps/rejected": pol_l,
            # Saturates at exp(log_limit) so a global-batch sum cannot overflow.
            "balance/grad_ratio": torch.exp(log_ratio.clamp(-limit, limit)),
            "balance/log_grad_ratio": log_ratio,
        }
        if isinstance(k, torch.Tensor):
            metrics["adadpo/coef_mean"] = k
            metrics["adadpo/coef_max"] = k
            metrics["adadpo/clip_frac"] = clip_binds(s, cfg.balance_clip, cfg.balance_clip_mode).to(s.dtype)
    return metrics
