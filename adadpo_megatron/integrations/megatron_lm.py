"""Glue for Megatron-LM's ``pretrain()``: switch a Megatron-LM recipe to AdaDPO by flags.

``examples/megatron_lm/pretrain_adadpo.py`` is the entry point; this module holds its
testable parts (``megatron.training`` is not on PyPI, so nothing here imports it):

* :func:`add_args`: the plugin's flags (``--preference-loss``, ``--dpo-beta``, ...,
  ``--ref-logprobs``, ``--ref-load``, ``--log-dir``) for
  ``pretrain(..., extra_args_provider=add_args)``. Megatron-LM defines the FP8 flags
  itself (same names and dests as ``fp8.add_fp8_args``), so they are not added again.
* :func:`check_args`: what the entry needs from Megatron-LM's flags, checked once, before
  any model is built (the entry calls it first thing in ``model_provider``).
* :func:`gpt_options_from_args`, :func:`open_packed_dataset`, :func:`make_forward_step`;
  the data iterators are in ``megatron_lm_data``, the plugin's own metrics output in
  ``megatron_lm_metrics``.

Contract with Megatron-LM's loop (``megatron/training/training.py``):

* ``--dataloader-type external``: the datasets provider returns iterators that yield
  finished micro-batches (one THD dict per ``next``), built here from the packed
  dataset with our DP-sharded sampler; it is marked ``is_distributed`` so every rank
  (every TP and PP rank: each pipeline stage pulls its own copy) builds it. The training
  iterator starts at ``args.consumed_train_samples`` (exact resume); the validation
  iterator restarts at every evaluation.
* ``--calculate-per-token-loss``: ``loss_func`` returns ``(CP * sum of pair losses,
  pairs, report)``, and megatron-core's ``finalize_model_grads`` divides the gradients by
  the pairs of the whole global batch; so the loss is the mean over pairs however they
  fell into packs, as in ``adadpo-train``.
* Reference log-probs: precomputed (``--ref-logprobs``), or online from ``--ref-load``
  (any torch_dist checkpoint of the same model, Megatron-LM's own included): a frozen
  copy runs forward-only on each micro-batch just before the policy (PP = 1 only).
* Dropout must be 0 (``--hidden-dropout 0 --attention-dropout 0``; Megatron-LM's default
  is 0.1): refused otherwise, because with dropout the policy's log-probs are noisy
  samples, the step-0 loss is not ln 2 and policy and reference disagree on the same
  weights; a warning would let a run start whose rewards mean nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

from adadpo_megatron.integrations.megatron_lm_data import data_paths
from adadpo_megatron.trainer.arguments import add_args as _plugin_add_args

__all__ = ["add_args", "check_args", "gpt_options_from_args", "make_forward_step",
           "open_packed_dataset", "place_reference", "self_check", "uses_te_spec"]


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: add the plugin's flags and return ``parser``."""
    parser = _plugin_add_args(parser)
    pa = parser.add_argument_group("prefix sharing (adadpo-megatron)")
    pa.add_argument("--prefix-attention", choices=["auto", "mask", "flex", "te"],
                    default="auto", help="attention for prefix-shared data; auto: mask on cpu, "
                    "flex on a GPU (te only when named); verified at start")
    g = parser.add_argument_group("metrics output (adadpo-megatron)")
    g.add_argument("--log-dir", default=None,
                   help="write the plugin's metrics.jsonl here (adadpo-train's names); "
                        "TensorBoard scalars go to --tensorboard-dir/adadpo")
    return parser


def _check_megatron_flags(args: argparse.Namespace) -> None:
    if getattr(args, "dataloader_type", None) != "external":
        raise ValueError(f"--dataloader-type {getattr(args, 'dataloader_type', None)}: the "
                         "AdaDPO entry feeds packed micro-batches itself; use "
                         "--dataloader-type external")
    if not getattr(args, "calculate_per_token_loss", False):
        raise ValueError("add --calculate-per-token-loss: the loss is a mean over preference "
                         "pairs, which megatron-core then divides by the global pair count")
    if args.pipeline_model_parallel_size > 1 and args.micro_batch_size != 1:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size} with pipeline "
                         "parallelism: one pack per micro-batch (--micro-batch-size 1), each "
                         "padded to --seq-length")
    for flag, dest in (("--hidden-dropout", "hidden_dropout"),
                       ("--attention-dropout", "attention_dropout")):
        value = getattr(args, dest, 0.0) or 0.0
        if value > 0:
            raise ValueError(f"{flag} {value}: preference training needs deterministic "
                             "log-probs (policy == reference at step 0, loss ln 2); add "
                             "--hidden-dropout 0 --attention-dropout 0 (Megatron-LM's "
                             "default is 0.1)")
    if getattr(args, "num_experts", None) and (getattr(args, "moe_aux_loss_coeff", 0) or 0) > 0:
        raise ValueError("--moe-aux-loss-coeff > 0 with the AdaDPO entry: under "
                         "--calculate-per-token-loss megatron-core scales the router's loss by "
                         "tokens while this entry's loss counts pairs; use adadpo-train (which "
                         "scales it right) or --moe-aux-loss-coeff 0")
    if getattr(args, "rampup_batch_size", None):
        raise ValueError("--rampup-batch-size: the AdaDPO entry resumes its data at "
                         "consumed samples / --global-batch-size; use a fixed batch size")
    for flag, dest in (("--full-validation", "full_validation"),
                       ("--multiple-validation-sets", "multiple_validation_sets")):
        if getattr(args, dest, False):
            raise ValueError(f"{flag} is not supported by the AdaDPO entry: give one "
                             "--valid-data-path and --eval-iters")


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the flag the AdaDPO entry needs but lacks, or refuses.

    Checks Megatron-LM's flags (data loader, per-token loss, dropout, ...), the plugin's
    (loss, reference) and the data paths. Cheap: reads no data and builds nothing.
    """
    from adadpo_megatron.trainer.config import loss_config_from_args

    _check_megatron_flags(args)
    loss = loss_config_from_args(args)
    ref_load, ref_logprobs = getattr(args, "ref_load", None), getattr(args, "ref_logprobs", None)
    if ref_load and ref_logprobs:
        raise ValueError("--ref-load and --ref-logprobs both given: choose the online "
                         "reference or the precomputed side-car")
    if ref_load and args.pipeline_model_parallel_size > 1:
        raise ValueError("--ref-load (online reference) with pipeline parallelism is not "
                         "supported under Megatron-LM's pretrain(): precompute with "
                         "tools/precompute_ref_logprobs.py and pass --ref-logprobs")
    if loss.needs_reference and not (ref_load or ref_logprobs):
        raise ValueError(f"--preference-loss {loss.name} needs reference log-probs: pass "
                         "--ref-load CKPT (online; e.g. the SFT checkpoint the run starts "
                         "from) or --ref-logprobs FILE (tools/precompute_ref_logprobs.py)")
    data_paths(args)


def gpt_options_from_args(args: argparse.Namespace):
    """``model.GPTOptions`` from Megatron-LM's flags (what ``GPTModel`` takes besides config)."""
    from adadpo_megatron.step.model import GPTOptions

    return GPTOptions(
        position_embedding_type=args.position_embedding_type,
        rotary_base=int(getattr(args, "rotary_base", 10000)),
        rotary_percent=float(getattr(args, "rotary_percent", 1.0)),
        untie_embeddings=bool(args.untie_embeddings_and_output_weights),
        prefix_attention=_prefix_attention(args),
    )


def _prefix_attention(args: argparse.Namespace) -> str | None:
    """The prefix-sharing attention a ``--prefix-sharing`` dataset needs (None otherwise)."""
    import json
    import os

    from adadpo_megatron.data.prefix_layout import LAYOUT_PREFIX_SHARED, layout_kind
    from adadpo_megatron.step.model import default_prefix_attention

    try:
        train_path = data_paths(args)[0]
    except ValueError:
        return None  # check_args reports the missing or blended data path
    meta_path = os.path.join(train_path, "meta.json")
    if not os.path.isfile(meta_path):
        return None  # open_packed_dataset reports the missing dataset
    with open(meta_path, encoding="utf-8") as f:
        if layout_kind(json.load(f), meta_path) != LAYOUT_PREFIX_SHARED:
            return None
    if args.context_parallel_size > 1:
        raise ValueError(f"{train_path} is prefix-shared (adadpo-pack --prefix-sharing), "
                         "which context parallelism does not support: "
                         "--context-parallel-size 1, or re-pack without --prefix-sharing")
    choice = getattr(args, "prefix_attention", "auto") or "auto"
    if choice == "auto":
        choice = default_prefix_attention(torch.cuda.is_available())
    elif choice != "mask" and not torch.cuda.is_available():
        raise ValueError(f"--prefix-attention {choice} needs a GPU (FlexAttention has no CPU "
                         "backward; te needs Transformer Engine): use mask or auto")
    if choice != "mask" and getattr(args, "recompute_granularity", None) is not None:
        raise ValueError(f"--recompute-granularity {args.recompute_granularity} with a "
                         f"prefix-shared {train_path} ({choice} attention) is not supported: "
                         "drop it, or re-pack without --prefix-sharing")
    return choice


def uses_te_spec(args: argparse.Namespace) -> bool:
    """True when the entry builds Transformer Engine's layer spec (``--transformer-impl
    transformer_engine``): packs then go through TE's THD attention (``use_thd``); the local
    spec takes a block mask. Follows the spec built, not whether TE imports."""
    return getattr(args, "transformer_impl", "local") == "transformer_engine"


def place_reference(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """The online reference placed and wrapped as Megatron-LM's ``get_model`` does the policy:
    on the current CUDA device, in a ``Float16Module`` under ``--bf16``/``--fp16`` (bf16/fp16
    weights, fp32 outputs). No DDP wrapper: the reference takes no gradients."""
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if getattr(args, "fp16", False) or getattr(args, "bf16", False):
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    return model


def self_check(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """Probe this rank's attention and log-prob paths (``step/self_check.py``) before step 1;
    raises ``SelfCheckError`` (one line: the path and the flag that picks another)."""
    from adadpo_megatron.step.self_check import check_paths

    hint = ("--prefix-attention mask (or flex)" if _prefix_attention(args) is not None
            else "--transformer-impl local" if uses_te_spec(args)
            else "--transformer-impl transformer_engine, and report this")
    check_paths([model], use_thd=uses_te_spec(args),
                logprob_impl=getattr(args, "logprob_impl", "fused"), flag_hint=hint)


def open_packed_dataset(args: argparse.Namespace, path: str):
    """``PackedPairDataset`` of ``path`` padded as the layout needs (CP, SP, FP8, PP)."""
    from adadpo_megatron.data.packed_dataset import PackedPairDataset
    from adadpo_megatron.step.fp8 import FP8Settings, pack_multiple

    cp, tp = args.context_parallel_size, args.tensor_model_parallel_size
    segment = (2 * cp if cp > 1 else 1) * (tp if args.sequence_parallel else 1)
    pad_to = args.seq_length if args.pipeline_model_parallel_size > 1 else None
    return PackedPairDataset(path, segment_multiple=segment,
                             pack_multiple=pack_multiple(FP8Settings.from_args(args)),
                             pad_to=pad_to)


def make_forward_step(args: argparse.Namespace, *, use_thd: bool | None = None,
                      reference: Callable[[], Any] | None = None,
                      metrics: Callable[[], Any] | None = None):
    """``forward_step(data_iterator, model)`` for ``pretrain()`` (per-pair loss mode).

    Wraps :func:`adadpo_megatron.step.forward_step.make_forward_step` with the loss
    from the plugin flags. ``reference``: optional builder of the frozen online reference
    (one unwrapped GPTModel; PP = 1), called once; its per-segment log-probs are attached
    to each micro-batch as ``ref_logps`` before the policy runs. ``metrics``: optional
    builder of a ``megatron_lm_metrics.StepMetrics`` that receives every report. Built
    lazily on the first call, after Megatron-LM has set up the parallel state (the wrapped
    step reads its process groups once).
    """
    from adadpo_megatron.step import forward_step as fs
    from adadpo_megatron.trainer.config import loss_config_from_args

    loss_cfg = loss_config_from_args(args)
    if use_thd is None:
        use_thd = uses_te_spec(args)
    built: dict[str, Any] = {}

    def forward_step(data_iterator, model):
        if not built:
            self_check(model, args)  # the placed, wrapped policy, before its first step
            # No StepContext: under --calculate-per-token-loss no global pair count is
            # needed, and without it the loss function refuses to run (no silent G=1).
            built["step"] = fs.make_forward_step(
                loss_cfg, None, use_thd=use_thd,
                logprob_impl=getattr(args, "logprob_impl", "fused"))
            built["reference"] = reference() if reference is not None else None
            built["metrics"] = metrics() if metrics is not None else None
        batch = next(data_iterator)
        if built["reference"] is not None:
            batch = {**batch, "ref_logps": fs.reference_segment_logps(
                batch, built["reference"], use_thd=use_thd,
                logprob_impl=getattr(args, "logprob_impl", "fused"))}
        output, loss_func = built["step"](iter([batch]), model)
        collector = built["metrics"]
        if collector is None:
            return output, loss_func
        training = bool(model.training)

        def reporting_loss_func(output_tensor):
            loss, num_pairs, report = loss_func(output_tensor)
            collector.add(report, training)
            return loss, num_pairs, report

        return output, reporting_loss_func

    return forward_step
