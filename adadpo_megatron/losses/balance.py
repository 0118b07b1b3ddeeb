"""The AdaDPO balance coefficient k and the balance/grad_ratio metric (LOSSES.md).

Everything here is detached: k is a stop-gradient coefficient, and the metrics
never carry gradient.  All quantities are computed in log space.

Symbols (per pair, tensors [N]): ``a = pol`` (space ``policy``) or ``a = rho``
(space ``ratio``); ``len`` the completion length; ``s`` the log balance score;
``C`` the clip bound (``balance_clip``).

    token granularity:    s = a_w/len_w - a_l/len_l     (log of p_w/p_l, p = exp(a/len))
    sequence granularity: s = a_w - a_l                 (log of pi_w/pi_l, pi = exp(a))
    ORPO (odds' P):       s = log(P_w(1-P_w)) - log(P_l(1-P_l)),  P = exp(pol/len)

    log k = min(s, log C)              (mode "upper")
    log k = clamp(s, -log C, log C)    (mode "both")

Beyond C, ``|log k|`` is always kept below :func:`log_limit` (22.2 in fp32, 177 in
fp64) so that ``k``, the loss and its gradient stay finite even with ``C = inf``;
this only binds when one side is more than ~4e9 times as likely as the other (fp32), and
it is not the clip: `adadpo/clip_frac` counts only the clip C (:func:`clip_binds`).
"""

from __future__ import annotations

import math

import torch

from adadpo_megatron.losses.registry import LossSpec, PairInputs

__all__ = [
    "log_limit", "log1mexp", "balance_score", "log_balance_coef", "clip_binds", "grad_ratio_log",
]


def log_limit(dtype: torch.dtype) -> float:
    """Largest ``|log k|`` (and ``|log grad_ratio|``) used for ``dtype``: ``log(finfo.max)/4``.

    A quarter of the exponent range leaves room for ``k * rho`` squared (IPO) and for
    gradients ``k * f'(m)`` with log-probs down to -1e5 without overflow.
    """
    return 0.25 * math.log(torch.finfo(dtype).max)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler's switch at -log 2).

    Args:
        x: tensor of any shape with ``x < 0``.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    near_zero = x > -math.log(2.0)
    # Each branch sees only inputs it is stable on, so the unused one cannot put
    # inf * 0 = NaN into the gradient (log1p(-exp(x)) has slope -inf as x -> 0).
    small = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    large = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, small, large)


def mean_logprob(pol: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``pol/len``, the log of the geometric-mean token probability, kept strictly below 0.

    Args:
        pol: summed completion log-probs [N] (float, <= 0).
        length: completion token counts [N].

    Returns:
        ``u = pol/len`` [N], same dtype.  Only where ``u`` is exactly 0 (every token of
        probability 1 to within rounding; or, impossible for a log-prob, above 0) it is
        replaced by ``-finfo.tiny``, which keeps ``log(1 - P)`` (ORPO's odds) finite; the
        gradient there is 0, since the odds are saturated.  Every representable negative
        ``u`` passes through unchanged, with its gradient (LOSSES.md).
    """
    u = pol / length
    return torch.where(u < 0, u, torch.full_like(u, -torch.finfo(u.dtype).tiny))


def clip_binds(s: torch.Tensor, clip: float, mode: str) -> torch.Tensor:
    """Where the clip bound ``C`` binds [N] bool: ``s > log C``, or also ``s < -log C`` (mode both).

    The numerical guard of :func:`log_balance_coef` (``|log k| <= log_limit``) is not the
    clip and is not counted, so the result is the same in every dtype; with ``C = inf``
    it is all False.
    """
    log_c = math.log(clip)
    binds = s > log_c
    if mode == "both":
        binds = binds | (s < -log_c)
    return binds


def orpo_balance_score(x: PairInputs) -> torch.Tensor:
    """``log(P_w(1-P_w)) - log(P_l(1-P_l))`` with ``P = exp(pol/len)``, [N].

    Called by :func:`balance_score` under ``torch.no_grad()``, which makes it detached.
    """
    u_w = mean_logprob(x.pol_w, x.len_w)
    u_l = mean_logprob(x.pol_l, x.len_l)
    return (u_w + log1mexp(u_w)) - (u_l + log1mexp(u_l))


def balance_score(spec: LossSpec, x: PairInputs, space: str, granularity: str) -> torch.Tensor:
    """The detached log balance score ``s`` [N] of LOSSES.md.

    Args:
        spec: the loss (its ``balance_score`` overrides the generic score).
        x: the pair inputs; ``ref_*`` are read only for space ``ratio``.
        space: ``"policy"`` (a = pol) or ``"ratio"`` (a = pol - ref).
        granularity: ``"token"`` (s = a_w/len_w - a_l/len_l) or ``"sequence"`` (s = a_w - a_l).

    Returns:
        ``s``, shape [N], compute dtype, no grad.
    """
    with torch.no_grad():
        if spec.balance_score is not None:
            return spec.balance_score(x)
        if space == "ratio":
            a_w, a_l = x.rho_w, x.rho_l
        else:
            a_w, a_l = x.pol_w, x.pol_l
        if granularity == "token":
            return a_w / x.len_w - a_l / x.len_l
        return a_w - a_l


def log_balance_coef(s: torch.Tensor, clip: float, mode: str) -> torch.Tensor:
    """``log k`` [N] from the score ``s``: clipped at ``log C`` (mode upper) or ``+-log C`` (both).

    Args:
        s: detached log balance score [N].
        clip: the bound ``C >= 1`` (``math.inf`` allowed).
        mode: ``"upper"`` or ``"both"``.

    Returns:
        ``log k`` [N], same dtype, additionally within ``+-log_limit(dtype)``.
    """
    limit = log_limit(s.dtype)
    upper = min(math.log(clip), limit)
    lower = -upper if mode == "both" else -limit
    return torch.clamp(s, min=lower, max=upper)


def grad_ratio_log(s: torch.Tensor, log_k: torch.Tensor | float) -> torch.Tensor:
    """``log(|dL/dq_l| / |dL/dq_w|)`` [N] for the preference term: ``s - log k``.

    ``q`` is the quantity balanced in the configured granularity and space: the
    sequence probability (or ratio) ``pi = exp(a)``, or the geometric-mean token
    probability (or ratio) ``p = exp(a/len)``.  Because every registered preference
    term is ``f(m)`` with the chosen term entering ``m`` multiplied by ``k``, the
    factor ``f'(m)`` cancels and the ratio is ``exp(s)/k`` exactly:
    sum-margin losses get ``g = dL/dpol`` on every token, so ``dL/dp = g/p`` (token)
    or ``dL/dpi = g/pi`` (sequence); length-normalised losses have ``dL/dp = g*len/p``;
    ORPO's ``P`` is ``p``.  Finite even where ``f'(m) = 0`` (e.g. hinge beyond its margin).
    """
    return s - log_k
