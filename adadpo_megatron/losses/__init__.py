"""Preference losses: AdaDPO and the DPO family (the contract is spec/LOSSES.md).

Pure torch on per-pair log-prob sums; no distributed code.  Public API::

    from adadpo_megatron.losses import LossConfig, compute_preference_loss, available_losses
    cfg = LossConfig(name="adadpo", beta=0.1)
    losses, metrics = compute_preference_loss(cfg, pol_w, pol_l, ref_w, ref_l, len_w, len_l)

Adding a loss: one function decorated with :func:`register_loss` in
``definitions.py`` (its ``ada*`` form comes with it).
"""

from adadpo_megatron.losses import definitions as _definitions  # noqa: F401  (fills the registry)
from adadpo_megatron.losses.compute import METRICS, compute_preference_loss, metric_reduction
from adadpo_megatron.losses.config import FIELD_FLAGS, LossConfig
from adadpo_megatron.losses.registry import (
    LossSpec,
    PairInputs,
    available_losses,
    get_loss_spec,
    register_loss,
    registered_losses,
)

__all__ = [
    "LossConfig",
    "compute_preference_loss",
    "available_losses",
    "get_loss_spec",
    "registered_losses",
    "register_loss",
    "LossSpec",
    "PairInputs",
    "METRICS",
    "metric_reduction",
    "FIELD_FLAGS",
]
