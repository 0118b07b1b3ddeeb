"""LayerNorm / RMSNorm that megatron-core's sequence parallelism accepts, for the local spec.

Under sequence parallelism (``--sequence-parallel``) each TP rank normalises its own
``S/TP`` slice of the sequence, so a norm's weight (and bias) gradient on one rank covers
only its tokens. megatron-core sums these partial gradients over the TP group in
``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``: an all-reduce SUM
of every parameter whose attribute ``sequence_parallel`` is True). Transformer Engine's
norms and apex's ``FusedLayerNorm`` set that attribute; megatron-core's torch fallback
(``WrappedTorchNorm``, what the local spec uses without TE/apex, and always for RMSNorm)
asserts that sequence parallelism is off instead.

:class:`SequenceParallelNorm` is that torch fallback with the attribute: the same
parameters (``weight``, and ``bias`` for LayerNorm, so checkpoints and the Hugging Face
converters see the same names), the same arithmetic (``F.layer_norm`` / ``F.rms_norm``,
what ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` call), plus ``sequence_parallel`` set
on its parameters from the config. :func:`sequence_parallel_norm_spec` puts it in place
of every ``WrappedTorchNorm`` of a layer spec, and of the transformer block's final norm
(``TransformerBlock`` takes the final norm from the block spec, so the layer spec is
wrapped in ``TransformerBlockSubmodules`` with the layer count megatron-core would build).
``step/model.py`` applies it to the local spec when sequence parallelism is on.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SequenceParallelNorm", "sequence_parallel_norm_spec"]


class SequenceParallelNorm(torch.nn.Module):
    """``config.normalization`` (LayerNorm or RMSNorm) over the last dim, SP-aware.

    Same constructor as megatron-core's norms (``config, hidden_size, eps, ...``). Input
    ``[s, b, H]`` (``[s/TP, b, H]`` under sequence parallelism), any float dtype; output
    the same shape and dtype. Parameters ``weight [H]`` (ones) and, for LayerNorm,
    ``bias [H]`` (zeros), each with ``sequence_parallel = config.sequence_parallel`` so
    that ``finalize_model_grads`` all-reduces their gradients over TP (module doc).
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str | None = None) -> None:
        super().__init__()
        kind = config.normalization
        if kind not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={kind!r}: the local spec's norms support "
                             "LayerNorm and RMSNorm (--normalization)")
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is not supported by the torch "
                             "norms of the local spec (--apply-layernorm-1p needs TE or apex)")
        self.kind = kind
        self.eps = eps
        self.normalized_shape = (hidden_size,)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size)) if kind == "LayerNorm"
                     else None)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "LayerNorm":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.normalized_shape[0]}, eps={self.eps}"


def _is_torch_norm(module: Any) -> bool:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return module is WrappedTorchNorm


def _replace_norms(node: Any) -> Any:
    """Replaces ``WrappedTorchNorm`` (as a class or as a ModuleSpec's module) in place."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, ModuleSpec):
        if _is_torch_norm(node.module):
            node.module = SequenceParallelNorm
        _replace_norms(node.submodules)
        return node
    if isinstance(node, list | tuple):
        return type(node)(SequenceParallelNorm if _is_torch_norm(n) else _replace_norms(n)
                          for n in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            if _is_torch_norm(value):
                setattr(node, field.name, SequenceParallelNorm)
            else:
                setattr(node, field.name, _replace_norms(value))
    return node


def sequence_parallel_norm_spec(spec: Any, config: Any, vp_stage: int | None = None) -> Any:
    """A copy of a local (non-TE) spec whose torch norms accept sequence parallelism.

    Args:
        spec: a layer ``ModuleSpec`` (``TransformerLayer``), a block ``ModuleSpec`` or a
            ``TransformerBlockSubmodules``, as ``GPTModel(transformer_layer_spec=...)`` takes.
        config: the model's ``TransformerConfig``.
        vp_stage: the virtual pipeline chunk being built (None without virtual PP).

    Returns:
        the same kind of spec, except that a layer spec becomes a
        ``TransformerBlockSubmodules`` (this stage's layers, plus the final norm), with
        every ``WrappedTorchNorm`` replaced by :class:`SequenceParallelNorm`. The final
        norm is replaced too where megatron-core would use its torch norm.
    """
    from megatron.core.transformer import transformer_block as tb
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import BaseTransformerLayer

    spec = copy.deepcopy(spec)
    if isinstance(spec, ModuleSpec) and issubclass(spec.module, BaseTransformerLayer):
        num_layers = tb.get_num_layers_to_build(config, vp_stage=vp_stage)
        final_norm = SequenceParallelNorm if _is_torch_norm(tb.LayerNormImpl) else tb.LayerNormImpl
        return tb.TransformerBlockSubmodules(
            layer_specs=[_replace_norms(copy.deepcopy(spec)) for _ in range(num_layers)],
            layer_norm=final_norm)
    return _replace_norms(spec)
