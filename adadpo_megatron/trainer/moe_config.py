"""Model-family and mixture-of-experts flags of the trainer (Megatron-LM's names).

``add_arch_args(parser)`` adds them; ``ArchSettings.from_args(namespace, ...)`` validates
them into the ``TrainConfig.arch`` field (``trainer/config.py``); ``transformer_kwargs()``
gives the ``TransformerConfig`` fields (``train.py``), ``parallel_kwargs()`` the
``initialize_model_parallel`` arguments. Families (``conversion/families.py``): Qwen2/2.5
``--add-qkv-bias``, Qwen3 ``--qk-layernorm`` (and ``--kv-channels`` for its head size),
Mixtral / Qwen3-MoE ``--num-experts`` and the ``--moe-*`` flags.

Routing is dropless (no capacity factor: every token reaches its top-k experts), so a
run's result does not depend on how the tokens are split over EP ranks. The router's
load-balancing loss (``--moe-aux-loss-coeff`` > 0) is megatron-core's: computed per MoE
layer and micro-batch, attached to the router output by ``MoEAuxLossAutoScaler``, and
scaled by the schedule (``CP / num_microbatches``) and DDP (``1 / (DP*CP)``), so its
gradient is that of the mean over the step's micro-batches (all DP ranks) of each
micro-batch's loss: what one process running the same micro-batches computes, whatever
DP, EP, CP and the micro-batch count. It is independent of the preference loss's pair
normalisation (``step/forward_step.py``), which scales only the preference term.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

__all__ = ["ArchSettings", "add_arch_args", "arch_from_args"]

LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
DISPATCHERS = ("allgather", "alltoall")


def add_arch_args(p: argparse.ArgumentParser) -> None:
    """Add the family and MoE flags (Megatron-LM's names and defaults) to ``p``."""
    g = p.add_argument_group("model families and mixture of experts")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="head size (default hidden / heads; Qwen3 sets its own)")
    g.add_argument("--add-qkv-bias", action="store_true", help="bias on q/k/v only (Qwen2)")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="Llama-3.1 RoPE frequency scaling (low 1, high 4, original 8192)")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0,
                   help="its factor (Llama-3.1: 8, Llama-3.2: 32)")
    g.add_argument("--qk-layernorm", action="store_true", help="per-head q/k norm (Qwen3)")
    g.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer")
    g.add_argument("--moe-router-topk", type=int, default=2, help="experts per token")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="expert MLP width (default --ffn-hidden-size)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="width of the shared expert(s) every token also goes through")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax over all experts before top-k (Qwen3-MoE norm_topk_prob false)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                   help="weight of the router's load-balancing loss (0: none)")
    g.add_argument("--moe-router-load-balancing-type", choices=LOAD_BALANCING,
                   default="aux_loss",
                   help="aux_loss (per micro-batch) or seq_aux_loss (per pack: a pack is "
                        "megatron's sequence here)")
    g.add_argument("--moe-token-dispatcher-type", choices=DISPATCHERS, default="allgather")
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="EP")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="TP inside each expert (default: --tensor-model-parallel-size)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="one grouped GEMM over the local experts (GPU with Transformer Engine)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArchSettings:
    """Family and MoE settings; all defaults: a dense Llama-style model."""

    kv_channels: int | None = None
    """--kv-channels: head size; None = hidden / heads."""
    add_qkv_bias: bool = False
    """--add-qkv-bias."""
    qk_layernorm: bool = False
    """--qk-layernorm."""
    rope_scaling_factor: float | None = None
    """--rope-scaling-factor under --use-rope-scaling; None: no RoPE scaling."""
    num_experts: int | None = None
    """--num-experts; None = dense MLPs."""
    moe_router_topk: int = 2
    """--moe-router-topk."""
    moe_ffn_hidden_size: int | None = None
    """--moe-ffn-hidden-size (resolved: --ffn-hidden-size when not given)."""
    moe_shared_expert_intermediate_size: int | None = None
    """--moe-shared-expert-intermediate-size."""
    moe_router_pre_softmax: bool = False
    """--moe-router-pre-softmax."""
    moe_aux_loss_coeff: float = 0.0
    """--moe-aux-loss-coeff."""
    moe_router_load_balancing_type: str = "aux_loss"
    """--moe-router-load-balancing-type."""
    moe_token_dispatcher_type: str = "allgather"
    """--moe-token-dispatcher-type."""
    expert_model_parallel_size: int = 1
    """--expert-model-parallel-size (EP)."""
    expert_tensor_parallel_size: int | None = None
    """--expert-tensor-parallel-size (resolved: TP when not given; MoE only)."""
    moe_grouped_gemm: bool = False
    """--moe-grouped-gemm (GPU only)."""

    @classmethod
    def from_args(cls, a: argparse.Namespace, *, tp: int, pp: int, cp: int, world_size: int,
                  ffn_hidden_size: int, device: str) -> ArchSettings:
        """Validate; raises ValueError naming the flag (``config.py`` makes it a ConfigError)."""
        get = lambda name, default=None: getattr(a, name, default)  # noqa: E731
        experts = get("num_experts")
        kv = get("kv_channels")
        rope = get("rope_scaling_factor", 8.0) if get("use_rope_scaling", False) else None
        if rope is not None and rope <= 0:
            raise ValueError(f"--rope-scaling-factor must be positive, got {rope}")
        if kv is not None and kv <= 0:
            raise ValueError(f"--kv-channels must be positive, got {kv}")
        if experts is None:
            for flag, value, default in (
                    ("--moe-ffn-hidden-size", get("moe_ffn_hidden_size"), None),
                    ("--moe-shared-expert-intermediate-size",
                     get("moe_shared_expert_intermediate_size"), None),
                    ("--moe-aux-loss-coeff", get("moe_aux_loss_coeff", 0.0), 0.0),
                    ("--expert-model-parallel-size", get("expert_model_parallel_size", 1), 1),
                    ("--expert-tensor-parallel-size", get("expert_tensor_parallel_size"), None),
                    ("--moe-grouped-gemm", get("moe_grouped_gemm", False), False),
                    ("--moe-router-pre-softmax", get("moe_router_pre_softmax", False), False)):
                if value != default:
                    raise ValueError(f"{flag} {value} needs --num-experts N (a MoE model)")
            return cls(kv_channels=kv, add_qkv_bias=bool(get("add_qkv_bias", False)),
                       qk_layernorm=bool(get("qk_layernorm", False)), rope_scaling_factor=rope)
        ep = get("expert_model_parallel_size", 1)
        etp = get("expert_tensor_parallel_size") or tp
        topk = get("moe_router_topk", 2)
        moe_ffn = get("moe_ffn_hidden_size") or ffn_hidden_size
        if topk == 1 and not get("moe_router_pre_softmax", False):
            raise ValueError("--moe-router-topk 1 needs --moe-router-pre-softmax (a softmax "
                             "over one selected logit has zero gradient)")
        _checks(experts=experts, topk=topk, ep=ep, etp=etp, tp=tp, pp=pp, cp=cp,
                world_size=world_size, moe_ffn=moe_ffn, device=device,
                coeff=get("moe_aux_loss_coeff", 0.0), grouped=get("moe_grouped_gemm", False),
                shared=get("moe_shared_expert_intermediate_size"),
                sequence_parallel=bool(get("sequence_parallel", False)),
                dispatcher=get("moe_token_dispatcher_type", "allgather"))
        return cls(
            kv_channels=kv, add_qkv_bias=bool(get("add_qkv_bias", False)),
            qk_layernorm=bool(get("qk_layernorm", False)), num_experts=experts,
            rope_scaling_factor=rope,
            moe_router_topk=topk, moe_ffn_hidden_size=moe_ffn,
            moe_shared_expert_intermediate_size=get("moe_shared_expert_intermediate_size"),
            moe_router_pre_softmax=bool(get("moe_router_pre_softmax", False)),
            moe_aux_loss_coeff=get("moe_aux_loss_coeff", 0.0),
            moe_router_load_balancing_type=get("moe_router_load_balancing_type", "aux_loss"),
            moe_token_dispatcher_type=get("moe_token_dispatcher_type", "allgather"),
            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
            moe_grouped_gemm=bool(get("moe_grouped_gemm", False)))

    @property
    def is_default(self) -> bool:
        """True for a plain dense model (then the checkpoint fingerprint ignores this group)."""
        return self == ArchSettings()

    def shape_dict(self) -> dict[str, Any]:
        """The fields that define the model (what a checkpoint must agree on to resume);
        the expert layout and dispatcher are left out, so a run can resume at another EP."""
        layout = ("moe_token_dispatcher_type", "expert_model_parallel_size",
                  "expert_tensor_parallel_size", "moe_grouped_gemm")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in layout}

    @property
    def fixed_length_packs(self) -> bool:
        """True when every pack must have one length: the ``allgather`` dispatcher gathers
        the tokens of the EP x expert-TP ranks, which must hold equal counts (``train.py``
        then pads packs to --seq-length; padding tokens are routed too)."""
        return (self.num_experts is not None and self.moe_token_dispatcher_type == "allgather"
                and self.expert_model_parallel_size * (self.expert_tensor_parallel_size or 1) > 1)

    def transformer_kwargs(self, *, reference: bool = False) -> dict[str, Any]:
        """``TransformerConfig`` fields. ``reference``: the frozen reference's (no aux loss:
        it routes in eval mode and adds nothing to the loss)."""
        kw: dict[str, Any] = {"add_qkv_bias": self.add_qkv_bias,
                              "qk_layernorm": self.qk_layernorm}
        if self.kv_channels is not None:
            kw["kv_channels"] = self.kv_channels
        if self.num_experts is None:
            return kw
        coeff = 0.0 if reference else self.moe_aux_loss_coeff
        kw.update(
            num_moe_experts=self.num_experts, moe_router_topk=self.moe_router_topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_aux_loss_coeff=coeff,
            moe_router_load_balancing_type=(
                self.moe_router_load_balancing_type if coeff > 0 else "none"),
            moe_token_dispatcher_type=self.moe_token_dispatcher_type,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=self.expert_tensor_parallel_size,
            moe_grouped_gemm=self.moe_grouped_gemm,
        )
        return kw

    def gpt_options(self, opts: Any) -> Any:
        """``GPTOptions`` (``step/model.py``) with this run's RoPE scaling."""
        if self.rope_scaling_factor is None:
            return opts
        return dataclasses.replace(opts, rope_scaling=True,
                                   rope_scaling_factor=self.rope_scaling_factor)

    def parallel_kwargs(self) -> dict[str, Any]:
        """``parallel_state.initialize_model_parallel`` arguments for the expert layout."""
        if self.num_experts is None:
            return {}
        return {"expert_model_parallel_size": self.expert_model_parallel_size,
                "expert_tensor_parallel_size": self.expert_tensor_parallel_size}


def arch_from_args(a: argparse.Namespace, parallel: Any, model: Any) -> ArchSettings:
    """``ArchSettings`` for ``config_from_args`` (``parallel``: ParallelArgs, ``model``:
    ModelArgs); raises ValueError naming the flag."""
    return ArchSettings.from_args(
        a, tp=parallel.tensor_model_parallel_size, pp=parallel.pipeline_model_parallel_size,
        cp=parallel.context_parallel_size, world_size=parallel.world_size,
        ffn_hidden_size=model.ffn_hidden_size, device=parallel.device)


def _checks(*, experts: int, topk: int, ep: int, etp: int, tp: int, pp: int, cp: int,
            world_size: int, moe_ffn: int, device: str, coeff: float, grouped: bool,
            shared: int | None, sequence_parallel: bool, dispatcher: str) -> None:
    if experts < 1:
        raise ValueError(f"--num-experts must be >= 1, got {experts}")
    if not 1 <= topk <= experts:
        raise ValueError(f"--moe-router-topk {topk} must be in [1, --num-experts {experts}]")
    if ep < 1 or experts % ep:
        raise ValueError(f"--num-experts {experts} is not divisible by "
                         f"--expert-model-parallel-size {ep}")
    if etp < 1 or moe_ffn % etp:
        raise ValueError(f"--moe-ffn-hidden-size {moe_ffn} is not divisible by "
                         f"--expert-tensor-parallel-size {etp}")
    dense_ranks = world_size // pp  # TP x CP x DP ranks of one pipeline stage
    if dense_ranks % (ep * etp):
        raise ValueError(f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size "
                         f"{etp} must divide the {dense_ranks} ranks of a pipeline stage "
                         f"(world {world_size} / PP {pp})")
    if coeff < 0:
        raise ValueError(f"--moe-aux-loss-coeff must be >= 0, got {coeff}")
    if shared is not None and (shared <= 0 or shared % tp):
        raise ValueError(f"--moe-shared-expert-intermediate-size {shared} must be positive "
                         f"and divisible by --tensor-model-parallel-size {tp}")
    if tp > 1 and not sequence_parallel:
        raise ValueError(f"--num-experts with --tensor-model-parallel-size {tp} needs "
                         "--sequence-parallel (megatron-core's rule for MoE under TP); or keep "
                         "TP=1 and shard the experts with --expert-tensor-parallel-size")
    if device == "cpu" and etp > 1 and dispatcher == "alltoall":
        raise ValueError("--moe-token-dispatcher-type alltoall with --expert-tensor-parallel-size "
                         f"{etp} does not run on the CPU (gloo cannot all-gather uneven "
                         "splits): use allgather there")
    if grouped and device == "cpu":
        raise ValueError("--moe-grouped-gemm needs a CUDA GPU (grouped GEMM kernels): drop "
                         "it for CPU runs (the experts then run one after another)")
