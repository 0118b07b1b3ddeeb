"""The loss registry: one decorated function per loss, its AdaDPO form derived from it.

A loss is registered with :func:`register_loss` on a function that computes its
*preference term* for a given balance coefficient ``k`` (a detached tensor [N], or
the float 1.0 for the base loss).  The decorator registers two names: the base
loss (``k = 1``) and, unless ``balanced=None``, its AdaDPO form (``k`` from
:mod:`adadpo_megatron.losses.balance`).  The chosen completion's NLL term, the
SFT term and the metrics are added by :func:`compute_preference_loss`, so a loss
function holds only its own margin.

Contract every registered function must meet (the tests check it for every name):
its preference term is ``f(m)`` of a single margin ``m`` in which the chosen
side's term enters multiplied by ``k`` and nothing else depends on ``k``; this is
what makes the balance exact and ``balance/grad_ratio`` analytic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import MappingProxyType
from typing import Protocol

import torch

__all__ = [
    "PairInputs",
    "LossSpec",
    "register_loss",
    "get_loss_spec",
    "available_losses",
    "registered_losses",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairInputs:
    """Per-pair inputs in the compute dtype (fp32, or the input's dtype if wider).

    All tensors have shape [N] (one entry per preference pair).
    """

    pol_w: torch.Tensor
    """Policy log-prob of the chosen completion, summed over its tokens (has grad)."""
    pol_l: torch.Tensor
    """Policy log-prob of the rejected completion, summed over its tokens (has grad)."""
    ref_w: torch.Tensor | None
    """Reference log-prob of the chosen completion (no grad), or None."""
    ref_l: torch.Tensor | None
    """Reference log-prob of the rejected completion (no grad), or None."""
    len_w: torch.Tensor
    """Number of completion tokens of the chosen side (>= 1), as a float tensor."""
    len_l: torch.Tensor
    """Number of completion tokens of the rejected side (>= 1), as a float tensor."""

    @property
    def rho_w(self) -> torch.Tensor:
        """Chosen log-ratio ``pol_w - ref_w`` [N]."""
        if self.ref_w is None:
            raise ValueError("this loss needs reference log-probs (ref_w is None)")
        return self.pol_w - self.ref_w

    @property
    def rho_l(self) -> torch.Tensor:
        """Rejected log-ratio ``pol_l - ref_l`` [N]."""
        if self.ref_l is None:
            raise ValueError("this loss needs reference log-probs (ref_l is None)")
        return self.pol_l - self.ref_l


class LossHyperParams(Protocol):
    """What the registry reads of a loss configuration (``LossConfig`` satisfies it).

    A protocol, so that this module never imports ``config.py`` (which imports it). Loss
    functions read their own fields (``beta``, ``gamma``, ...) by name; ``LossSpec.hparams``
    lists them.
    """

    sft_weight: float


LossFn = Callable[[LossHyperParams, PairInputs, "torch.Tensor | float"], torch.Tensor]
ScoreFn = Callable[[PairInputs], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSpec:
    """A registered loss: what it computes and which options it reads."""

    name: str
    """Registered name (``--preference-loss`` value)."""
    base: str
    """Name of the base loss (equal to ``name`` unless ``balanced``)."""
    balanced: bool
    """True for the AdaDPO form: the chosen term is scaled by the balance coefficient k."""
    fn: LossFn
    """``fn(cfg, x, k) -> [N]`` preference term; k is 1.0 for the base loss."""
    contract: str
    """One-sentence contract (the first line of the function's docstring)."""
    formula: str
    """This loss as one line of Markdown (README table)."""
    needs_reference: bool
    """True when the loss reads ``ref_w``/``ref_l``."""
    length_normalised: bool
    """True when the margin is built on ``pol/len`` (only ``token`` granularity applies)."""
    hparams: tuple[str, ...]
    """LossConfig fields the loss reads, besides ``sft_weight`` and the balance options."""
    nll_weight: str | float
    """Weight of the built-in chosen-side NLL term: a LossConfig field name, or a constant."""
    balance_score: ScoreFn | None
    """Loss-specific log balance score (detached), or None for the generic one."""

    def nll_coef(self, cfg: LossHyperParams) -> float:
        """Total weight of ``-pol_w/len_w`` in the loss: built-in NLL weight plus ``sft_weight``."""
        own = getattr(cfg, self.nll_weight) if isinstance(self.nll_weight, str) else self.nll_weight
        return float(own) + float(cfg.sft_weight)


# Filled by @register_loss when adadpo_megatron.losses.definitions is imported (the
# package __init__ does that); read through available_losses()/get_loss_spec().
_REGISTRY: dict[str, LossSpec] = {}


def register_loss(
    name: str,
    *,
    formula: str,
    needs_reference: bool,
    length_normalised: bool,
    hparams: tuple[str, ...] = (),
    nll_weight: str | float = 0.0,
    balanced: str | None = None,
    balanced_formula: str = "",
    balance_score: ScoreFn | None = None,
) -> Callable[[LossFn], LossFn]:
    """Register a loss function under ``name`` and (if ``balanced``) its AdaDPO form.

    Args:
        name: base loss name, e.g. ``"dpo"``.
        formula: the loss as one line of Markdown, for the README table.
        needs_reference: whether the loss reads reference log-probs.
        length_normalised: whether its margin is built on ``pol/len`` (sequence
            granularity is then a configuration error).
        hparams: LossConfig fields the loss reads (``sft_weight`` and the balance
            options are implied).
        nll_weight: weight of a built-in ``-pol_w/len_w`` term: a field name or a constant.
        balanced: name of the AdaDPO form to register as well, e.g. ``"adadpo"``.
        balanced_formula: the AdaDPO form as one line of Markdown.
        balance_score: ``score(x) -> [N]`` replacing the generic log balance score
            (a loss whose chosen term is not ``a_w`` or ``a_w/len_w``, e.g. ORPO's log-odds).

    Returns:
        The decorator; it returns the function unchanged.
    """

    def decorator(fn: LossFn) -> LossFn:
        doc = (fn.__doc__ or "").strip()
        if not doc:
            raise TypeError(f"loss {name!r}: the function needs a docstring (contract, formula)")
        common = dict(
            fn=fn,
            contract=doc.splitlines()[0].strip(),
            needs_reference=needs_reference,
            length_normalised=length_normalised,
            hparams=tuple(hparams),
            nll_weight=nll_weight,
            balance_score=balance_score,
            base=name,
        )
        specs = [LossSpec(name=name, balanced=False, formula=formula, **common)]
        if balanced is not None:
            if not balanced_formula:
                raise TypeError(f"loss {name!r}: give balanced_formula for {balanced!r}")
            specs.append(LossSpec(name=balanced, balanced=True, formula=balanced_formula, **common))
        for spec in specs:
            if spec.name in _REGISTRY:
                raise ValueError(f"loss name {spec.name!r} is registered twice")
            _REGISTRY[spec.name] = spec
        return fn

    return decorator


def available_losses() -> tuple[str, ...]:
    """Every registered loss name: base losses in registration order, then the ``ada*`` forms.

    Returns:
        A tuple of names (the valid ``LossConfig.name`` / ``--preference-loss`` values).
    """
    names = list(_REGISTRY)
    return tuple(
        [n for n in names if not _REGISTRY[n].balanced]
        + [n for n in names if _REGISTRY[n].balanced]
    )


def registered_losses() -> MappingProxyType[str, LossSpec]:
    """A read-only view of the registry: name -> :class:`LossSpec`."""
    return MappingProxyType(_REGISTRY)


def get_loss_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown preference loss {name!r} (LossConfig.name, flag --preference-loss); "
            f"valid names: {', '.join(available_losses())}"
        ) from None
