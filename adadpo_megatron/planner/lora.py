"""LoRA terms of the planner (``estimate.memory_per_gpu`` with ``Layout.lora_rank``).

With LoRA the base weights stay (bf16, or FP8 caches as without LoRA) but have no fp32
gradient buffer and no Adam state: megatron-core's DDP and optimizer see only the
adapters. Adapter parameters on one GPU, per adapted linear of a layer (``step/lora.py``):
column-parallel (``linear_qkv``, ``linear_fc1``) ``r * in + r * out / TP`` (A replicated,
B sharded), row-parallel (``linear_proj``, ``linear_fc2``) ``r * in / TP + r * out``.
Activations add each adapter's rank-r intermediate ``h`` (bf16) per token; the adapters'
inputs are the base GEMMs' inputs, already counted. With no ``--ref-*`` flag the
reference is the base itself (no second copy): ``Layout.online_reference`` is False.
"""

from __future__ import annotations

from typing import Any

# ``shape`` arguments are estimate.ModelShape, ``lay`` estimate.Layout (not imported here:
# estimate.py imports this module).
ModelShape = Any

__all__ = ["lora_activation_bytes", "lora_layer_params", "lora_params_total",
           "lora_stage_params"]


def _dims(shape: ModelShape) -> dict[str, tuple[int, int, str]]:
    h, d, F = shape.hidden_size, shape.head_dim, shape.ffn_hidden_size
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    return {"linear_qkv": (h, q + 2 * kv, "column"), "linear_proj": (q, h, "row"),
            "linear_fc1": (h, F * (2 if shape.swiglu else 1), "column"),
            "linear_fc2": (F, h, "row")}


def lora_layer_params(shape: ModelShape, rank: int, targets: tuple[str, ...],
                      tp: int = 1) -> int:
    """Adapter parameters of one layer on one TP rank."""
    total = 0
    for name, (fan_in, fan_out, kind) in _dims(shape).items():
        if name in targets:
            total += rank * (fan_in + fan_out // tp if kind == "column" else fan_in // tp + fan_out)
    return total


def lora_params_total(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters of the whole model (the trainable count)."""
    return shape.num_layers * lora_layer_params(shape, rank, targets)


def lora_stage_params(shape: ModelShape, lay: Any) -> int:
    """Adapter parameters on one GPU (its pipeline stage's layers, its TP shard)."""
    per_layer = lora_layer_params(shape, lay.lora_rank, lay.lora_targets, lay.tp)
    return per_layer * (shape.num_layers // lay.pp)


def lora_activation_bytes(lay: Any, live_layers: float) -> float:
    """Peak bytes of the adapters' rank-r intermediates kept for backward on one GPU
    (``live_layers``: layer-micro-batches in flight, ``estimate.in_flight_layer_microbatches``)."""
    tokens = lay.seq_length * lay.micro_batch_size / lay.cp
    return 2 * lay.lora_rank * len(lay.lora_targets) * tokens * live_layers
