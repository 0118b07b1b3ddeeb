"""Mixture-of-experts arithmetic of the planner (``estimate.py`` calls it for MoE shapes).

Counted as megatron-core's ``MoELayer`` allocates (local spec ``SequentialMLP`` and TE's
grouped MLP alike): a router ``[E, h]`` replicated on every rank (no TP split); each of
the ``E / EP`` local experts a SwiGLU (or plain) MLP of width ``F_e`` split over the expert
tensor-parallel size ETP (``fc1`` column-, ``fc2`` row-parallel, so an expert fc2 bias,
if any, is replicated); an optional shared expert of width ``F_s`` split over TP like a
dense MLP. Per token only the router, ``k`` experts and the shared expert do work, hence
*active* parameters and FLOPs use ``k`` experts.

Optimizer state: with ``--use-distributed-optimizer`` expert parameters are sharded over
the expert data-parallel group (``world / (PP * EP * ETP)`` ranks), dense ones over DP x CP.
Activations of an MoE MLP per token (no recompute): the ``k`` dispatched copies of the
token (``2hk`` bytes) plus, per copy, the fc1 input, fc1 output and fc2 input of the
expert, and the shared expert's, as for a dense MLP of width ``k F_e + F_s``.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def is_moe(shape: Any) -> bool:
    """True when ``shape`` (planner ModelShape) has MoE layers."""
    return bool(getattr(shape, "num_experts", None))


def expert_params(shape: Any, etp: int = 1) -> int:
    """Parameters of one expert on one expert-TP rank."""
    h, f = shape.hidden_size, shape.moe_ffn_hidden_size
    fc1_out = f * (2 if shape.swiglu else 1)
    bias = int(shape.add_bias_linear)
    return (h * fc1_out + bias * fc1_out) // etp + f * h // etp + bias * h


def shared_params(shape: Any, tp: int = 1) -> int:
    """Parameters of the shared expert on one TP rank (0 without one)."""
    f = shape.moe_shared_expert_intermediate_size or 0
    h, bias = shape.hidden_size, int(shape.add_bias_linear)
    fc1_out = f * (2 if shape.swiglu else 1)
    return (h * fc1_out + bias * fc1_out) // tp + f * h // tp + bias * h if f else 0


def moe_mlp_params(shape: Any, tp: int = 1, ep: int = 1, etp: int | None = None) -> dict[str, int]:
    """The MLP part of one MoE layer on one rank: router, local experts, shared expert."""
    etp = etp or tp
    return {
        "router": shape.num_experts * shape.hidden_size,
        "experts": shape.num_experts // ep * expert_params(shape, etp),
        "shared_expert": shared_params(shape, tp),
    }


def expert_params_on_gpu(shape: Any, lay: Any, pp_rank: int) -> int:
    """Expert parameters one GPU of ``pp_rank`` holds (sharded over expert-DP by the
    distributed optimizer; 0 for a dense model)."""
    if not is_moe(shape):
        return 0
    layers = shape.num_layers // lay.pp
    return layers * moe_mlp_params(shape, lay.tp, lay.ep, lay.etp)["experts"]


def inactive_params(shape: Any) -> int:
    """Parameters a token does not use: ``E - k`` experts in every layer (0 for dense)."""
    if not is_moe(shape):
        return 0
    return shape.num_layers * (shape.num_experts - shape.moe_router_topk) * expert_params(shape)


def active_gemm_mlp_params(shape: Any) -> int:
    """MLP GEMM weights one token goes through in one layer: router, k experts, shared."""
    view = dataclasses.replace(shape, add_bias_linear=False)
    return (shape.num_experts * shape.hidden_size
            + shape.moe_router_topk * expert_params(view) + shared_params(view))


def effective_ffn(shape: Any) -> int:
    """Width of the dense MLP with the same per-token activations (``k F_e + F_s``)."""
    return (shape.moe_router_topk * shape.moe_ffn_hidden_size
            + (shape.moe_shared_expert_intermediate_size or 0))


def expert_data_parallel(lay: Any) -> int:
    """Ranks over which the distributed optimizer shards expert state."""
    return max(lay.world_size // (lay.pp * lay.ep * (lay.etp or lay.tp)), 1)


def check_moe_layout(shape: Any, lay: Any, need) -> None:
    """megatron-core's rules for the expert layout; messages name the flags."""
    if not is_moe(shape):
        need(lay.ep == 1, "--expert-model-parallel-size needs --num-experts")
        return
    etp = lay.etp or lay.tp
    need(shape.num_experts % lay.ep == 0, f"--num-experts {shape.num_experts} is not divisible "
         f"by --expert-model-parallel-size {lay.ep}")
    need(1 <= shape.moe_router_topk <= shape.num_experts,
         f"--moe-router-topk {shape.moe_router_topk} must be in [1, {shape.num_experts}]")
    need(shape.moe_ffn_hidden_size % etp == 0, f"--moe-ffn-hidden-size "
         f"{shape.moe_ffn_hidden_size} is not divisible by expert TP {etp}")
    per_stage = lay.world_size // lay.pp
    need(per_stage % (lay.ep * etp) == 0, f"EP {lay.ep} x expert TP {etp} must divide the "
         f"{per_stage} GPUs of a pipeline stage")
    need(lay.tp == 1 or lay.sequence_parallel,
         "MoE with TP > 1 needs --sequence-parallel (megatron-core)")


def adam_state_bytes(shape: Any, lay: Any, pp_rank: int, params: float, shard: int) -> float:
    """Adam state bytes on one GPU of ``pp_rank`` holding ``params`` parameters: fp32 master
    (bf16 runs only), m and v; dense parameters sharded ``shard`` ways by the distributed
    optimizer, expert parameters over the expert-data-parallel group."""
    experts = expert_params_on_gpu(shape, lay, pp_rank)
    e_shard = expert_data_parallel(lay) if lay.distributed_optimizer else 1
    return ((params - experts) / shard + experts / e_shard) * (12 if lay.bf16 else 8)
