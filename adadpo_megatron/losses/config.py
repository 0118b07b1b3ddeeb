"""LossConfig: the preference loss and its hyper-parameters, validated at construction."""

from __future__ import annotations

import dataclasses
import math

from adadpo_megatron.losses.registry import LossSpec, available_losses, get_loss_spec

__all__ = ["LossConfig", "FIELD_FLAGS", "BALANCE_SPACES", "BALANCE_GRANULARITIES", "CLIP_MODES"]

BALANCE_SPACES = ("policy", "ratio")
BALANCE_GRANULARITIES = ("token", "sequence")
CLIP_MODES = ("upper", "both")

FIELD_FLAGS: dict[str, str] = {
    "name": "--preference-loss",
    "beta": "--dpo-beta",
    "label_smoothing": "--dpo-label-smoothing",
    "gamma": "--simpo-gamma",
    "alpha": "--rdpo-alpha",
    "lam": "--cpo-lambda",
    "sft_weight": "--sft-weight",
    "balance_space": "--adadpo-space",
    "balance_granularity": "--adadpo-granularity",
    "balance_clip": "--adadpo-clip",
    "balance_clip_mode": "--adadpo-clip-mode",
}
"""The trainer flag that sets each LossConfig field (named in every error message)."""

# Read by every loss: beta scales the logged rewards even where the loss ignores it,
# and the balance space/granularity also choose where balance/grad_ratio is measured.
_UNIVERSAL = ("name", "beta", "sft_weight", "balance_space", "balance_granularity")
_BALANCED_ONLY = ("balance_clip", "balance_clip_mode")


def _where(field: str) -> str:
    return f"LossConfig.{field} (flag {FIELD_FLAGS[field]})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which preference loss to compute and with which hyper-parameters (LOSSES.md).

    Validated at construction: a value the chosen loss cannot use raises ValueError
    naming the field, its flag, the value and the allowed values.
    """

    name: str = "adadpo"
    """Registered loss name; see ``available_losses()``."""
    beta: float = 0.1
    """Inverse temperature on the margin (> 0); also scales the logged rewards."""
    label_smoothing: float = 0.0
    """Label-flip rate eps in [0, 0.5) of dpo (cDPO) and robust (rDPO) and their ada forms."""
    gamma: float = 0.5
    """SimPO target reward margin (in units of the beta-scaled mean log-prob)."""
    alpha: float = 0.0
    """R-DPO length penalty per token of ``len_w - len_l``; 0 reduces rdpo to dpo."""
    lam: float = 1.0
    """Weight >= 0 of CPO's chosen NLL term, or of ORPO's odds-ratio term."""
    sft_weight: float = 0.0
    """Weight >= 0 of an extra chosen-side NLL term ``-pol_w/len_w`` (RPO-style), any loss."""
    balance_space: str = "policy"
    """``policy`` (balance pol) or ``ratio`` (balance pol - ref); also the grad_ratio metric's space."""
    balance_granularity: str = "token"
    """``token`` (geometric-mean token probability) or ``sequence`` (sequence probability)."""
    balance_clip: float = 2.0
    """Clip bound C >= 1 on the balance coefficient k (``math.inf`` for none); ada* only."""
    balance_clip_mode: str = "upper"
    """``upper``: k <= C; ``both``: 1/C <= k <= C; ada* only."""

    def __post_init__(self) -> None:
        spec = get_loss_spec(self.name)  # raises for an unknown name
        self._check_scalars(spec)
        self._check_unused(spec)
        self._check_balance(spec)

    @property
    def spec(self) -> LossSpec:
        """The registry entry of ``name``."""
        return get_loss_spec(self.name)

    @property
    def needs_reference(self) -> bool:
        """True when the loss needs reference log-probs (the trainer can skip them otherwise)."""
        return self.spec.needs_reference

    def _check_scalars(self, spec: LossSpec) -> None:
        """Ranges of the numeric hyper-parameters."""
        for field in ("beta", "label_smoothing", "gamma", "alpha", "lam", "sft_weight"):
            value = getattr(self, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise ValueError(f"{_where(field)} = {value!r}: must be a finite number")
        if self.beta <= 0:
            raise ValueError(f"{_where('beta')} = {self.beta!r}: must be > 0 (typical 0.01-0.5)")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"{_where('label_smoothing')} = {self.label_smoothing!r}: must lie in [0, 0.5) "
                f"(a label-flip rate; {spec.base!r} divides by or weighs with 1 - 2*eps)"
            )
        for field in ("lam", "sft_weight"):
            if getattr(self, field) < 0:
                raise ValueError(f"{_where(field)} = {getattr(self, field)!r}: must be >= 0")

    def _check_unused(self, spec: LossSpec) -> None:
        """A field the chosen loss ignores must keep its default, so no setting is silently dropped."""
        used = (
            set(_UNIVERSAL) | set(spec.hparams) | (set(_BALANCED_ONLY) if spec.balanced else set())
        )
        for field in dataclasses.fields(self):
            if field.name in used or getattr(self, field.name) == field.default:
                continue
            users = [
                n
                for n in available_losses()
                if field.name in get_loss_spec(n).hparams
                or (field.name in _BALANCED_ONLY and get_loss_spec(n).balanced)
            ]
            raise ValueError(
                f"{_where(field.name)} = {getattr(self, field.name)!r} is not used by loss "
                f"{self.name!r}; leave it at its default {field.default!r}, or choose a loss "
                f"that uses it: {', '.join(users)}"
            )

    def _check_balance(self, spec: LossSpec) -> None:
        """Choices of the balance options and their compatibility with the loss."""
        for field, allowed in (
            ("balance_space", BALANCE_SPACES),
            ("balance_granularity", BALANCE_GRANULARITIES),
            ("balance_clip_mode", CLIP_MODES),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"{_where(field)} = {getattr(self, field)!r}: allowed values are {', '.join(allowed)}"
                )
        clip = self.balance_clip
        if (
            isinstance(clip, bool)
            or not isinstance(clip, int | float)
            or math.isnan(clip)
            or clip < 1
        ):
            raise ValueError(f"{_where('balance_clip')} = {clip!r}: must be a number >= 1, or inf")
        if self.balance_space == "ratio" and not spec.needs_reference:
            with_ref = [n for n in available_losses() if get_loss_spec(n).needs_reference]
            raise ValueError(
                f"{_where('balance_space')} = 'ratio' needs reference log-probs, but loss "
                f"{self.name!r} is reference-free; use 'policy', or a loss with a reference: "
                f"{', '.join(with_ref)}"
            )
        if self.balance_granularity == "sequence" and spec.length_normalised:
            sum_margin = [n for n in available_losses() if not get_loss_spec(n).length_normalised]
            raise ValueError(
                f"{_where('balance_granularity')} = 'sequence' is undefined for the length-normalised "
                f"loss {self.name!r} (its margin is built on pol/len); use 'token', or a sum-margin "
                f"loss: {', '.join(sum_margin)}"
            )
