"""The DPO family: one decorated function per base loss; each also registers its ``ada*`` form.

Shared legend (every tensor has shape [N], one entry per preference pair):

- ``pol_w``, ``pol_l``: policy log-probs of the chosen / rejected completion, summed
  over completion tokens (carry gradient).
- ``ref_w``, ``ref_l``: reference log-probs (stop-gradient).  ``rho = pol - ref``.
- ``len_w``, ``len_l``: completion token counts (>= 1, stop-gradient).
- ``k``: the AdaDPO balance coefficient, **stop-gradient**; ``1.0`` for the base loss.
- ``beta``, ``eps`` (``label_smoothing``), ``gamma``, ``alpha``, ``lam``: LossConfig fields.
- ``logsig`` = ``F.logsigmoid`` (stable for any finite input).

Each function returns only the preference term; ``compute_preference_loss`` adds the
chosen-side NLL ``(nll_weight + sft_weight) * (-pol_w/len_w)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from adadpo_megatron.losses.balance import log1mexp, mean_logprob, orpo_balance_score
from adadpo_megatron.losses.registry import PairInputs, register_loss

if TYPE_CHECKING:
    from adadpo_megatron.losses.config import LossConfig


def _smoothed_logistic(z: torch.Tensor, eps: float, robust: bool) -> torch.Tensor:
    """cDPO (``robust=False``) or rDPO (``robust=True``) logistic loss of the logit ``z`` [N]."""
    loss = -(1.0 - eps) * F.logsigmoid(z)
    if eps == 0.0:
        return loss
    if robust:
        return (loss + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return loss - eps * F.logsigmoid(-z)


@register_loss(
    "dpo",
    formula="`-(1-eps)*logsig(beta*h) - eps*logsig(-beta*h)`, `h = rho_w - rho_l`",
    needs_reference=True,
    length_normalised=False,
    hparams=("beta", "label_smoothing"),
    balanced="adadpo",
    balanced_formula="`dpo` with `h = k*rho_w - rho_l`",
)
def dpo(cfg: LossConfig, x: PairInputs, k: torch.Tensor | float) -> torch.Tensor:
    """Sigmoid DPO with cDPO label smoothing on the (k-scaled) log-ratio margin.

    ``L = -(1-eps)*logsig(beta*h) - eps*logsig(-beta*h)``, ``h = k*rho_w - rho_l``.
    Shapes: x's tensors [N], k [N] or 1.0 -> [N].  Stop-gradient: ref_*, k.
    """
    h = k * x.rho_w - x.rho_l
    return _smoothed_logistic(cfg.beta * h, cfg.label_smoothing, robust=False)


@register_loss(
    "ipo",
    formula="`(h_n - 1/(2*beta))^2`, `h_n = rho_w/len_w - rho_l/len_l`",
    needs_reference=True,
    length_normalised=True,
    hparams=("beta",),
    balanced="adaipo",
    balanced_formula="`ipo` with `h_n = k*rho_w/len_w - rho_l/len_l`",
)
def ipo(cfg: LossConfig, x: PairInputs, k: torch.Tensor | float) -> torch.Tensor:
    """IPO's squared loss on the length-normalised log-ratio margin (TRL's normalisation).

    ``L = (h_n - 1/(2*beta))^2``, ``h_n = k*rho_w/len_w - rho_l/len_l``.
    Shapes: [N] -> [N].  Stop-gradient: ref_*, len_*, k.
    """
    h_n = k * x.rho_w / x.len_w - x.rho_l / x.len_l
    return (h_n - 0.5 / cfg.beta) ** 2


@register_loss(
    "hinge",
    formula="`relu(1 - beta*h)`",
    needs_reference=True,
    length_normalised=False,
    hparams=("beta",),
    balanced="adahinge",
    balanced_formula="`hinge` with `h = k*rho_w - rho_l`",
)
def hinge(cfg: LossConfig, x: PairInputs, k: torch.Tensor | float) -> torch.Tensor:
    """SLiC hinge loss on the log-ratio margin.

    ``L = relu(1 - beta*h)``, ``h = k*rho_w - rho_l``.
    Shapes: [N] -> [N].  Stop-gradient: ref_*, k.
    """
    return torch.relu(1.0 - cfg.beta * (k * x.rho_w - x.rho_l))


@register_loss(
    "robust",
    formula="`(-(1-eps)*logsig(beta*h) + eps*logsig(-beta*h)) / (1-2*eps)`",
    needs_reference=True,
    length_normalised=False,
    hparams=("beta", "label_smoothing"),
    balanced="adarobust",
    balanced_formula="`robust` with `h = k*rho_w - rho_l`",
)
def robust(cfg: LossConfig, x: PairInputs, k: torch.Tensor | float) -> torch.Tensor:
    """rDPO: the unbiased estimate of the clean DPO loss under label-flip rate eps < 0.5.

    ``L = (-(1-eps)*logsig(beta*h) + eps*logsig(-beta*h)) / (1-2*eps)``, ``h = k*rho_w - rho_l``.
    Shapes: [N] -> [N].  Stop-gradient: ref_*, k.
    """
    h = k * x.rho_w - x.rho_l
    return _smoothed_logistic(cfg.beta * h, cfg.label_smoothing, robust=True)


@register_loss(
    "rdpo",
    formula="`-logsig(beta*h - alpha*(len_w - len_l))`",
    needs_reference=True,
    length_normalised=False,
    hparams=("beta", "alpha"),
    balanced="adardpo",
    balanced_formula="`rdpo` with `h = k*rho_w - rho_l`",
)
def rdpo(cfg: LossConfig, x: PairInputs, k: torch.Tensor | float) -> torch.Tensor:
    """R-DPO: DPO with a length penalty alpha on the token-count difference.

    ``L = -logsig(beta*h - alpha*(len_w - len_l))``, ``h = k*rho_w - rho_l``.
    Shapes: [N] -> [N].  Stop-gradient: ref_*, len_*, k.
    """
    h = k * x.rho_w - x.rho_l
    return -F.logsigmoid(cfg.beta * h - cfg.alpha * (x.len_w - x.len_l))


@register_loss(
    "simpo",
    formula="`-logsig(beta*(pol_w/len_w - pol_l/len_l) - gamma)`",
    needs_reference=False,
    length_normalised=True,
    hparams=("beta", "gamma"),
    balanced="adasimpo",
    balanced_formula="`-logsig(beta*(k*pol_w/len_w - pol_l/len_l) - gamma)`",
)
def simpo(cfg: LossConfig, x: PairInputs, k: torch.Tensor | float) -> torch.Tensor:
    """SimPO: reference-free logistic loss on mean token log-probs with a target margin gamma.

    ``L = -logsig(beta*(k*pol_w/len_w - pol_l/len_l) - gamma)``.
    Shapes: [N] -> [N].  Stop-gradient: len_*, k.
    """
    return -F.logsigmoid(cfg.beta * (k * x.pol_w / x.len_w - x.pol_l / x.len_l) - cfg.gamma)


@register_loss(
    "cpo",
    formula="`-logsig(beta*(pol_w - pol_l)) + lam*(-pol_w/len_w)`",
    needs_reference=False,
    length_normalised=False,
    hparams=("beta", "lam"),
    nll_weight="lam",
    balanced="adacpo",
    balanced_formula="`-logsig(beta*(k*pol_w - pol_l)) + lam*(-pol_w/len_w)` (NLL not scaled by `k`)",
)
def cpo(cfg: LossConfig, x: PairInputs, k: torch.Tensor | float) -> torch.Tensor:
    """CPO: reference-free logistic loss on summed log-probs plus lam times the chosen NLL.

    Preference term ``-logsig(beta*(k*pol_w - pol_l))``; the NLL term
    ``lam*(-pol_w/len_w)`` is added (never scaled by k) by compute_preference_loss.
    Shapes: [N] -> [N].  Stop-gradient: k.
    """
    return -F.logsigmoid(cfg.beta * (k * x.pol_w - x.pol_l))


@register_loss(
    "orpo",
    formula="`(-pol_w/len_w) - lam*logsig(lo_w - lo_l)`, `lo = log(P/(1-P))`, `P = exp(pol/len)`",
    needs_reference=False,
    length_normalised=True,
    hparams=("lam",),
    nll_weight=1.0,
    balanced="adaorpo",
    balanced_formula="`orpo` with `k*lo_w - lo_l`, `k = sg(P_w(1-P_w) / (P_l(1-P_l)))` clipped",
    balance_score=orpo_balance_score,
)
def orpo(cfg: LossConfig, x: PairInputs, k: torch.Tensor | float) -> torch.Tensor:
    """ORPO: the chosen NLL plus lam times a logistic loss on the log odds-ratio.

    Preference term ``-lam*logsig(k*lo_w - lo_l)``, ``lo = u - log(1-exp(u))``,
    ``u = pol/len`` (so ``P = exp(u)``, the geometric-mean token probability);
    ``log(1-exp(u))`` is computed stably (log1p/expm1).  The NLL term ``-pol_w/len_w``
    (weight 1) is added by compute_preference_loss.  For ``adaorpo``,
    ``k = sg(P_w(1-P_w)/(P_l(1-P_l)))`` balances d/dP of the log-odds.
    Shapes: [N] -> [N].  Stop-gradient: len_*, k.
    """
    u_w = mean_logprob(x.pol_w, x.len_w)
    u_l = mean_logprob(x.pol_l, x.len_l)
    lo_w = u_w - log1mexp(u_w)
    lo_l = u_l - log1mexp(u_l)
    return -cfg.lam * F.logsigmoid(k * lo_w - lo_l)
