"""RoPE by each token's own position id.

megatron-core 0.16.1's ``GPTModel`` builds the rotary table for positions ``0..S-1`` and
rotates token ``t`` of the sequence by angle ``t``, ignoring ``position_ids``. In a packed
micro-batch that is harmless while each segment is contiguous (attention scores depend only
on differences of angles), but in the prefix-shared layout the rejected tokens sit after the
chosen ones while their positions continue from the prompt's end: their distance to the
prompt would be wrong. :func:`positional_gpt_model` builds a ``GPTModel`` that gathers the table by ``position_ids``
(``freqs[position_ids]``, shape ``[S, B, 1, D]``), which megatron-core's non-fused
``apply_rotary_pos_emb`` broadcasts per token, so every attention path that receives
megatron's rotated ``query``/``key`` (local, mask, FlexAttention, the TE shared-prefix
module) sees the right angles.

Left to megatron-core: Transformer Engine's THD path (``packed_seq_params`` with
``qkv_format="thd"``), which restarts the angle at each ``cu_seqlens`` boundary itself;
fused RoPE (``apply_rope_fusion``, which expects ``[S, 1, 1, D]``) with ``B > 1``; and
inference. Positions must be below the sequence length ``S`` (true for every pack: a
segment never extends past the pack).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["per_token_rotary", "positional_gpt_model"]


def per_token_rotary(freqs: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Gather a rotary table by position.

    Args:
        freqs: float ``[L, 1, 1, D]`` megatron-core rotary angles for positions ``0..L-1``.
        position_ids: int64 ``[B, S]`` with values in ``[0, L)``, on ``freqs``' device.

    Returns:
        float ``[S, B, 1, D]``: the angles of each token (sequence-first, as megatron's
        attention expects).
    """
    table = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    return table[position_ids.t()].unsqueeze(2)


@functools.cache
def _model_class() -> type:
    from megatron.core.models.gpt import GPTModel

    class _PositionalGPTModel(GPTModel):
        """``GPTModel`` whose RoPE angles follow ``position_ids`` (module docstring)."""

        def _preprocess(self, *args, **kwargs):
            out = super()._preprocess(*args, **kwargs)
            position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            packed = kwargs.get("packed_seq_params", args[4] if len(args) > 4 else None)
            inference = kwargs.get("inference_context", args[3] if len(args) > 3 else None)
            rotary = out[1]
            if (
                rotary is None
                or not isinstance(rotary, torch.Tensor)
                or position_ids is None
                or inference is not None
                or (packed is not None and packed.qkv_format == "thd")
                or (self.config.apply_rope_fusion and position_ids.shape[0] > 1)
            ):
                return out
            return (out[0], per_token_rotary(rotary, position_ids), *out[2:])

    _PositionalGPTModel.__name__ = "PositionalGPTModel"
    _PositionalGPTModel.__qualname__ = "PositionalGPTModel"
    return _PositionalGPTModel


def positional_gpt_model(**kwargs):
    """A ``GPTModel(**kwargs)`` whose RoPE angles follow ``position_ids`` (module docstring)."""
    return _model_class()(**kwargs)
