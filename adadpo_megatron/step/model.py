"""Build megatron-core GPT models from Megatron-LM style model-shape flags.

Three entry points, used by the trainer and the distributed tests:

- :func:`build_transformer_config`: model shape + parallel layout + precision ->
  ``TransformerConfig`` (argument names are Megatron-LM's flags, minus the dashes).
- :func:`build_gpt_model`: one ``GPTModel`` (one pipeline stage / virtual chunk), with
  Transformer Engine's layer spec when TE imports and CUDA is in use, the local
  (pure megatron-core) spec otherwise.
- :func:`build_model_chunks`: the list of model chunks of this rank for (virtual)
  pipeline parallelism, optionally wrapped in megatron-core DDP (what Megatron-LM's
  ``get_model`` does).

The GPT-level options that ``TransformerConfig`` does not hold (position embedding,
RoPE base, tied or untied output layer) are stored on the config object as the
attribute ``adadpo_gpt_options`` (a :class:`GPTOptions`), so that the config alone
describes the model; :func:`build_gpt_model` reads them from there.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "GPTOptions",
    "build_transformer_config",
    "build_gpt_model",
    "build_model_chunks",
    "default_prefix_attention",
    "transformer_engine_usable",
    "unwrap_ddp",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTOptions:
    """GPT-level model options that live on ``GPTModel`` rather than ``TransformerConfig``."""

    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    """--position-embedding-type: RoPE or learned absolute position embeddings."""
    rotary_base: int = 10000
    """--rotary-base: RoPE base period."""
    rotary_percent: float = 1.0
    """--rotary-percent: fraction of each head's dims that RoPE rotates."""
    untie_embeddings: bool = False
    """--untie-embeddings-and-output-weights: separate output layer (Llama) vs tied (GPT-2)."""
    rope_scaling: bool = False
    """--use-rope-scaling: Llama-3.1 RoPE frequency scaling (megatron-core ``rope_scaling``)."""
    rope_scaling_factor: float = 8.0
    """--rope-scaling-factor."""
    prefix_attention: Literal["mask", "flex", "te"] | None = None
    """Core attention for prefix-shared packs (step/attention.py); None: megatron's own.
    Set by the trainer when the data is packed with --prefix-sharing."""


@functools.cache
def transformer_engine_usable() -> bool:
    """True when CUDA is available and ``transformer_engine.pytorch`` imports.

    Every exception type is caught: a partial TE install fails with ImportError,
    OSError (missing .so) or RuntimeError (CUDA/driver mismatch) alike.
    """
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - see docstring
        logger.warning("transformer_engine is not usable (%s); using the local layer spec", exc)
        return False
    return True


def default_prefix_attention(on_cuda: bool) -> str:
    """Default prefix-sharing attention (``step/attention.py``): ``mask`` off CUDA, ``flex``
    (FlexAttention, PyTorch's own kernel) on a GPU, with or without Transformer Engine.

    ``te`` (our THD formulation over TE's attention) has not run on a GPU yet, so it is used
    only when named (``--prefix-attention te``); the start-up self-check
    (``step/self_check.py``) verifies whichever path runs."""
    return "flex" if on_cuda else "mask"


def build_transformer_config(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int | None = None,
    num_query_groups: int | None = None,
    kv_channels: int | None = None,
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm",
    norm_epsilon: float = 1e-5,
    swiglu: bool = False,
    position_embedding_type: Literal["rope", "learned_absolute"] = "learned_absolute",
    rotary_base: int = 10000,
    rotary_percent: float = 1.0,
    add_bias_linear: bool = True,
    untie_embeddings: bool = False,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    sequence_parallel: bool = False,
    bf16: bool = False,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    recompute_granularity: Literal["full", "selective"] | None = None,
    recompute_method: Literal["uniform", "block"] | None = None,
    recompute_num_layers: int | None = None,
    init_method_std: float = 0.02,
    use_cpu_initialization: bool | None = None,
    variable_seq_lengths: bool = False,
    calculate_per_token_loss: bool = False,
    **overrides: Any,
):
    """Maps Megatron-LM model-shape, layout and precision flags onto a ``TransformerConfig``.

    Argument names and defaults follow Megatron-LM's flags (``--num-layers`` -> ``num_layers``;
    ``--swiglu``; ``--untie-embeddings-and-output-weights`` -> ``untie_embeddings``;
    ``--tensor/pipeline-model-parallel-size`` -> ``tp``/``pp``; ``vpp`` is the number of
    model chunks per pipeline stage, i.e. ``--num-layers-per-virtual-pipeline-stage``
    expressed as a count). ``bf16`` selects bf16 parameters and pipeline buffers, fp32
    otherwise. ``use_cpu_initialization`` defaults to True exactly when CUDA is not
    available. ``variable_seq_lengths`` lets micro-batches differ in length under PP
    (megatron-core then also needs ``moe_token_dispatcher_type="alltoall"``, set here).
    ``overrides`` are passed to ``TransformerConfig`` verbatim (FP8 fields, fusions, ...)
    and win over everything above.

    Returns a ``megatron.core.transformer.TransformerConfig`` with a ``GPTOptions`` stored
    as its attribute ``adadpo_gpt_options``. Raises ValueError for inconsistent flags.
    """
    from megatron.core.transformer import TransformerConfig

    if normalization not in ("LayerNorm", "RMSNorm"):
        raise ValueError(
            f"normalization={normalization!r}: use 'LayerNorm' or 'RMSNorm' (--normalization)"
        )
    if position_embedding_type not in ("rope", "learned_absolute"):
        raise ValueError(
            f"position_embedding_type={position_embedding_type!r}: use 'rope' or 'learned_absolute' "
            "(--position-embedding-type)"
        )
    if vpp is not None and (pp < 2 or vpp < 2 or num_layers % (pp * vpp) != 0):
        raise ValueError(
            f"vpp={vpp} with pp={pp} and num_layers={num_layers}: virtual pipelining needs pp >= 2, "
            "vpp >= 2 and num_layers divisible by pp*vpp (--num-layers-per-virtual-pipeline-stage)"
        )
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size if ffn_hidden_size is not None else 4 * hidden_size,
        num_query_groups=num_query_groups,
        kv_channels=kv_channels,
        normalization=normalization,
        layernorm_epsilon=norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=add_bias_linear,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        init_method_std=init_method_std,
        use_cpu_initialization=use_cpu_initialization,
        variable_seq_lengths=variable_seq_lengths,
        calculate_per_token_loss=calculate_per_token_loss,
    )
    if variable_seq_lengths:
        kwargs["moe_token_dispatcher_type"] = "alltoall"
    if not torch.cuda.is_available():
        _cpu_pipeline_settings(kwargs, pp=pp, vpp=vpp, variable_seq_lengths=variable_seq_lengths)
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    config.adadpo_gpt_options = GPTOptions(
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        rotary_percent=rotary_percent,
        untie_embeddings=untie_embeddings,
    )
    return config


def _cpu_pipeline_settings(
    kwargs: dict[str, Any], *, pp: int, vpp: int | None, variable_seq_lengths: bool
) -> None:
    """Pipeline send/recv settings that keep gloo exact (CPU runs only).

    gloo matches a send to a receive by (peer, tag) in posting order. With PP=2 the
    previous and the next stage are the same rank, and megatron-core's batched p2p
    (``batch_isend_irecv``) posts [send_prev, recv_prev, send_next, recv_next] on both
    ranks, so when the interleaved schedule sends an activation and a gradient in one
    call the two are swapped (silently: same shapes). The unbatched path
    (``batch_p2p_comm=False``) sends the two directions over two different groups.
    The shape exchange of ``variable_seq_lengths`` is always batched, hence refused there.
    """
    kwargs["batch_p2p_comm"] = False
    if pp == 2 and vpp is not None and variable_seq_lengths:
        raise ValueError(
            "on CPU (gloo), virtual pipelining with pp=2 cannot use variable_seq_lengths: "
            "megatron-core exchanges tensor shapes with batch_isend_irecv, which gloo "
            "mis-matches when both neighbours are the same rank; pad micro-batches to one "
            "length (pack pad_to) instead"
        )


def _layer_spec(config, use_te: bool, prefix_attention: str | None = None):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    # Qwen3 (--qk-layernorm) and MoE (--num-experts) change the layer's submodules.
    family = dict(
        qk_layernorm=bool(config.qk_layernorm),
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=bool(config.moe_grouped_gemm),
    )
    if use_te:
        spec = specs.get_gpt_layer_with_transformer_engine_spec(**family)
    else:
        # 0.16 takes these by keyword; 0.19 forwards *args/**kwargs to
        # get_gpt_layer_local_submodules with the same keyword names. Never pass positionally:
        # the positional order changed between releases.
        spec = specs.get_gpt_layer_local_spec(**family, normalization=config.normalization)
    if prefix_attention is None and not use_te:
        # The local spec's packs carry a block-diagonal mask: megatron's own attention would
        # ignore it under masked-softmax fusion (step/attention.py, _mask_class).
        prefix_attention = "mask"
    if prefix_attention is not None:
        from adadpo_megatron.step.attention import core_attention_class

        # Only the core attention changes: linear layers (TE's and FP8 included) stay.
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = core_attention_class(
            prefix_attention
        )
    return spec


def build_gpt_model(
    config,
    vocab_size: int,
    max_sequence_length: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    use_te: bool | None = None,
):
    """Builds one ``GPTModel`` (this rank's stage, or one virtual chunk ``vp_stage``).

    ``config`` comes from :func:`build_transformer_config` (its ``adadpo_gpt_options`` give
    the position embedding and tying; a plain ``TransformerConfig`` gets ``GPTOptions()``).
    ``use_te=None`` picks Transformer Engine's spec when :func:`transformer_engine_usable`,
    the local spec otherwise; ``use_te=True`` without a usable TE raises RuntimeError.
    ``vocab_size`` must already be padded to a multiple of the TP size (Megatron-LM's
    ``--make-vocab-size-divisible-by``). The model returns logits ``[B, S, V/TP]`` when
    called with ``labels=None`` (0.16 and 0.19 alike). RoPE angles follow ``position_ids``
    (``step/rotary.py``); ``adadpo_gpt_options.prefix_attention`` swaps in the prefix-shared
    core attention (``step/attention.py``). Under sequence parallelism the local spec's
    norms are ``step/norms.py``'s (megatron-core's torch norms refuse SP).
    """
    from megatron.core.models.gpt import GPTModel

    from adadpo_megatron.step.rotary import positional_gpt_model

    if use_te is None:
        use_te = transformer_engine_usable()
    elif use_te and not transformer_engine_usable():
        raise RuntimeError(
            "use_te=True but transformer_engine is not usable here (needs CUDA + TE)"
        )
    tp = config.tensor_model_parallel_size
    if vocab_size % tp != 0:
        raise ValueError(
            f"vocab_size={vocab_size} is not divisible by the TP size {tp}: pad the vocabulary "
            "(Megatron-LM --make-vocab-size-divisible-by)"
        )
    opts = getattr(config, "adadpo_gpt_options", None) or GPTOptions()
    spec = _layer_spec(config, use_te, opts.prefix_attention)
    if not use_te and config.sequence_parallel:
        from adadpo_megatron.step.norms import sequence_parallel_norm_spec

        # megatron-core's torch norms refuse sequence parallelism: ours carry its attribute.
        spec = sequence_parallel_norm_spec(spec, config, vp_stage)
    kwargs: dict[str, Any] = dict(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not opts.untie_embeddings,
        position_embedding_type=opts.position_embedding_type,
        rotary_percent=opts.rotary_percent,
        rotary_base=opts.rotary_base,
    )
    if opts.rope_scaling:
        kwargs.update(rope_scaling=True, rope_scaling_factor=opts.rope_scaling_factor)
    if "vp_stage" in inspect.signature(GPTModel.__init__).parameters:
        kwargs["vp_stage"] = vp_stage
    elif vp_stage is not None:
        raise RuntimeError("this megatron-core's GPTModel has no vp_stage: upgrade to >= 0.14")
    return positional_gpt_model(**kwargs)


def build_model_chunks(
    config,
    vocab_size: int,
    max_sequence_length: int,
    *,
    wrap_ddp: bool = False,
    ddp_config=None,
    use_te: bool | None = None,
) -> list[torch.nn.Module]:
    """Builds this rank's model chunks for the current parallel state (Megatron-LM's get_model).

    Returns a list with one ``GPTModel`` per virtual pipeline chunk (one element without
    virtual PP), each on the current device, each with ``model_type`` set for the
    schedules. With ``wrap_ddp=True`` every chunk is wrapped in megatron-core's
    ``DistributedDataParallel`` (gradients then accumulate in ``param.main_grad`` and are
    averaged over the data(+context)-parallel group by ``finalize_model_grads``); bucketing
    is disabled for chunks after the first, as Megatron-LM does. ``ddp_config`` defaults to
    fp32 grad reduction, no overlap, and the distributed optimizer only when CUDA is
    available. ``parallel_state`` must be initialised for the layout of ``config``.
    """
    from megatron.core import parallel_state
    from megatron.core.enums import ModelType

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    if vpp != config.virtual_pipeline_model_parallel_size:
        raise ValueError(
            f"config vpp={config.virtual_pipeline_model_parallel_size} but parallel_state has "
            f"vpp={vpp}: initialise megatron-core's parallel state with the same layout"
        )
    stages = list(range(vpp)) if vpp is not None else [None]
    chunks = []
    for vp_stage in stages:
        model = build_gpt_model(
            config,
            vocab_size,
            max_sequence_length,
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            vp_stage=vp_stage,
            use_te=use_te,
        )
        model.model_type = ModelType.encoder_or_decoder
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if not wrap_ddp:
        return chunks
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=torch.cuda.is_available(),
        )
    return [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=m, disable_bucketing=(i > 0)
        )
        for i, m in enumerate(chunks)
    ]


def unwrap_ddp(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside megatron-core DDP wrappers (whose state dict keys gain 'module.')."""
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    while isinstance(chunk, _BaseDataParallel):
        chunk = chunk.module
    return chunk
