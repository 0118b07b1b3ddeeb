"""The last stage hands over hidden states + output weight instead of logits (``fused``).

``--logprob-impl`` chooses how the forward step turns the last stage's output into
per-token log-probs:

* ``fused`` (default): while the model runs, :func:`hidden_states_instead_of_logits` makes
  megatron-core's output layer (``GPTModel.output_layer``, a ``ColumnParallelLinear``)
  return its input after the layer's own TP mapping (sequence-parallel all-gather, or the
  all-reduce of the input gradient under TP) instead of the logits, and records the weight
  ``GPTModel`` passed it (the shared embedding when tied, the layer's own otherwise).
  ``GPTModel`` then returns hidden states ``[B, S, H]`` where it returned logits
  ``[B, S, V/TP]``, and the loss applies
  :func:`adadpo_megatron.fused_logprobs.fused_vocab_parallel_logprobs` to them and the
  recorded weight: the ``[T, V/TP]`` logits never exist.
* ``chunked``: the model returns logits; ``vocab_parallel_logprobs`` (the reference).

Written against megatron-core 0.16's ``GPTModel._postprocess``, which calls
``self.output_layer(hidden_states, weight=output_weight, runtime_gather_output=...)`` once
(no MTP) and, with ``labels=None``, returns that output transposed to batch-first; later
releases keep this call (read in Megatron-LM's main branch: unchanged, plus a MuP scaling
of its result and a ``use_fused_lce`` branch that calls the layer differently; both are
refused here). Multi-token prediction calls the output layer more than once and is
refused; so is ``defer_embedding_wgrad_compute`` (its deferred weight gradient lives
inside ``ColumnParallelLinear``'s matmul, which the fused path replaces).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

__all__ = ["LOGPROB_IMPLS", "OutputWeight", "hidden_states_instead_of_logits", "unwrap_model"]

LOGPROB_IMPLS = ("fused", "chunked")


@dataclasses.dataclass
class OutputWeight:
    """The output weight ``[V/TP, H]`` the model's last stage used in one forward call.

    ``weight`` stays None on stages without an output layer (not the last pipeline stage).
    """

    weight: torch.Tensor | None = None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / Float16Module wrappers (each keeps it as ``.module``)."""
    while not hasattr(model, "output_layer") and isinstance(
        getattr(model, "module", None), torch.nn.Module
    ):
        model = model.module
    return model


def _check_supported(gpt: torch.nn.Module, layer: torch.nn.Module) -> None:
    config = getattr(gpt, "config", None)
    if getattr(config, "mtp_num_layers", None):
        raise ValueError(
            "--logprob-impl fused does not support multi-token prediction (--mtp-num-layers): "
            "use --logprob-impl chunked"
        )
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise ValueError(
            "--logprob-impl fused cannot defer the output layer's weight gradient "
            "(--defer-embedding-wgrad-compute): use --logprob-impl chunked"
        )
    if getattr(config, "use_mup", False):
        raise ValueError(
            "--logprob-impl fused: megatron-core scales the output layer's result under MuP "
            "(use_mup), which would scale the hidden states: use --logprob-impl chunked"
        )
    if getattr(gpt, "use_fused_lce", False):
        raise ValueError(
            "--logprob-impl fused replaces the output layer; megatron-core's own fused linear "
            "cross entropy is on (use_fused_lce): turn it off or use --logprob-impl chunked"
        )
    if getattr(layer, "bias", None) is not None:
        raise ValueError(
            "--logprob-impl fused needs an output layer without bias (GPTModel's has none): "
            "use --logprob-impl chunked"
        )


@contextlib.contextmanager
def hidden_states_instead_of_logits(model: torch.nn.Module) -> Iterator[OutputWeight]:
    """Within the block, ``model``'s output layer returns hidden states, not logits.

    Args:
        model: one model chunk (``GPTModel``, possibly wrapped in DDP / Float16Module).
            Chunks without ``output_layer`` (not the last pipeline stage) are left alone.

    Yields:
        an :class:`OutputWeight` filled in when the output layer is called: the weight
        ``[V/TP, H]`` it would have multiplied. The output layer then returns
        ``(hidden, None)`` with ``hidden`` the ``[s, b, H]`` states every TP rank needs
        (:func:`adadpo_megatron.fused_logprobs.output_layer_input`).
    """
    from adadpo_megatron.fused_logprobs import output_layer_input

    held = OutputWeight()
    gpt = unwrap_model(model)
    layer = getattr(gpt, "output_layer", None)
    if layer is None:
        yield held
        return
    _check_supported(gpt, layer)

    def hand_over(input_, weight=None, runtime_gather_output=None):
        if runtime_gather_output:
            raise ValueError("--logprob-impl fused needs vocabulary-parallel output "
                             "(runtime_gather_output=True was asked): use --logprob-impl chunked")
        if held.weight is not None:
            raise RuntimeError("--logprob-impl fused: the output layer ran twice in one "
                               "forward (multi-token prediction?): use --logprob-impl chunked")
        held.weight = layer.weight if weight is None else weight
        return output_layer_input(input_, layer), None

    previous = layer.__dict__.get("forward")
    layer.forward = hand_over  # an instance attribute: nn.Module.__call__ calls it
    try:
        yield held
    finally:
        if previous is None:
            del layer.forward
        else:
            layer.forward = previous
