"""Glue for Megatron-LM's ``pretrain()``: switch a Megatron-LM recipe to AdaDPO by flags.

``examples/megatron_lm/pretrain_adadpo.py`` is the entry point; this module holds its
testable parts (``megatron.training`` is not on PyPI, so nothing here imports it):

* :func:`add_args`: the plugin's flags (``--preference-loss``, ``--dpo-beta``, ...,
  ``--ref-logprobs``) for ``pretrain(..., extra_args_provider=add_args)``. Megatron-LM
  defines the FP8 flags itself (same names and dests as ``fp8.add_fp8_args``), so they
  are not added again.
* :func:`check_args`: what the entry needs from Megatron-LM's flags, checked once.
* :func:`gpt_options_from_args`, :func:`pack_data_iterator`, :func:`make_forward_step`.

Contract with Megatron-LM's loop (``megatron/training/training.py``):

* ``--dataloader-type external``: the datasets provider returns iterators that yield
  finished micro-batches (one THD dict per ``next``), built here from the packed
  dataset with our DP-sharded sampler; it is marked ``is_distributed`` so every rank
  (every TP and PP rank: each pipeline stage pulls its own copy) builds it.
* ``--calculate-per-token-loss``: ``loss_func`` returns ``(CP * sum of pair losses,
  pairs, report)``, and megatron-core's ``finalize_model_grads`` divides the gradients by
  the pairs of the whole global batch; so the loss is the mean over pairs however they
  fell into packs, as in ``adadpo-train``.
* Reference log-probs come precomputed (``--ref-logprobs``); an online reference model
  needs the second pass of ``adadpo-train`` and is refused here.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from adadpo_megatron.trainer.arguments import add_args as _plugin_add_args

__all__ = ["add_args", "check_args", "gpt_options_from_args", "make_forward_step",
           "pack_data_iterator"]


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: add the plugin's flags and return ``parser``."""
    return _plugin_add_args(parser)


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the Megatron-LM flag the AdaDPO entry needs but lacks."""
    from adadpo_megatron.trainer.config import loss_config_from_args

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
    if getattr(args, "ref_load", None):
        raise ValueError("--ref-load (online reference) is not supported under Megatron-LM's "
                         "pretrain(): precompute with tools/precompute_ref_logprobs.py and pass "
                         "--ref-logprobs, or train with adadpo-train")
    loss = loss_config_from_args(args)
    if loss.needs_reference and not getattr(args, "ref_logprobs", None):
        raise ValueError(f"--preference-loss {loss.name} needs reference log-probs: pass "
                         "--ref-logprobs (tools/precompute_ref_logprobs.py)")


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

    import torch

    from adadpo_megatron.data.prefix_layout import LAYOUT_PREFIX_SHARED, layout_kind
    from adadpo_megatron.step.model import default_prefix_attention

    if getattr(args, "data_path", None) is None:
        return None
    meta_path = os.path.join(_data_path(args), "meta.json")
    if not os.path.isfile(meta_path):
        return None  # open_packed_dataset reports the missing dataset
    with open(meta_path, encoding="utf-8") as f:
        if layout_kind(json.load(f), meta_path) != LAYOUT_PREFIX_SHARED:
            return None
    if args.context_parallel_size > 1:
        raise ValueError(f"--data-path {_data_path(args)} is prefix-shared (adadpo-pack "
                         "--prefix-sharing), which context parallelism does not support: "
                         "--context-parallel-size 1, or re-pack without --prefix-sharing")
    choice = default_prefix_attention(torch.cuda.is_available())
    if choice != "mask" and getattr(args, "recompute_granularity", None) is not None:
        raise ValueError(f"--recompute-granularity {args.recompute_granularity} with a "
                         f"prefix-shared --data-path ({choice} attention) is not supported: "
                         "drop it, or re-pack without --prefix-sharing")
    return choice


def _data_path(args: argparse.Namespace) -> str:
    path = args.data_path
    if isinstance(path, list | tuple):  # Megatron-LM: --data-path takes a (weighted) list
        if len(path) != 1:
            raise ValueError(f"--data-path {' '.join(map(str, path))}: give exactly one packed "
                             "dataset directory (adadpo-pack output); blends are not supported")
        path = path[0]
    return str(path)


def open_packed_dataset(args: argparse.Namespace):
    """``PackedPairDataset`` of ``--data-path`` padded as the layout needs (CP, SP, FP8, PP)."""
    from adadpo_megatron.data.packed_dataset import PackedPairDataset
    from adadpo_megatron.step.fp8 import FP8Settings, pack_multiple

    cp, tp = args.context_parallel_size, args.tensor_model_parallel_size
    segment = (2 * cp if cp > 1 else 1) * (tp if args.sequence_parallel else 1)
    pad_to = args.seq_length if args.pipeline_model_parallel_size > 1 else None
    return PackedPairDataset(_data_path(args), segment_multiple=segment,
                             pack_multiple=pack_multiple(FP8Settings.from_args(args)),
                             pad_to=pad_to)


def pack_data_iterator(dataset, args: argparse.Namespace, *, dp_rank: int, dp_size: int,
                       reference=None) -> Iterator[dict[str, Any]]:
    """Endless iterator of micro-batches (THD dicts) for this DP rank, step after step.

    ``dataset``: a ``PackedPairDataset`` (or anything with ``len``/``[i]``); ``reference``:
    an optional ``PrecomputedReference`` whose sums are attached as ``ref_logps``. Each
    step yields ``--global-batch-size / (DP * --micro-batch-size)`` micro-batches, the
    number Megatron-LM's loop pulls per iteration.
    """
    from adadpo_megatron.data.sampler import DistributedPackSampler
    from adadpo_megatron.trainer.loop import collate_packs

    sampler = DistributedPackSampler(
        len(dataset), global_batch_size=args.global_batch_size, dp_rank=dp_rank,
        dp_size=dp_size, seed=args.seed, micro_batch_size=args.micro_batch_size)
    mbs = args.micro_batch_size
    for ids in sampler:
        for j in range(0, len(ids), mbs):
            packs = [dataset[i] for i in ids[j:j + mbs]]
            if reference is not None:
                packs = [reference.attach(p) for p in packs]
            yield collate_packs(packs)


def make_forward_step(args: argparse.Namespace, *, use_thd: bool | None = None):
    """``forward_step(data_iterator, model)`` for ``pretrain()`` (per-pair loss mode).

    Wraps :func:`adadpo_megatron.step.forward_step.make_forward_step` with the loss
    from the plugin flags. Built lazily on the first call, after Megatron-LM has set up
    the parallel state (the wrapped step reads its process groups once).
    """
    from adadpo_megatron.step import forward_step as fs
    from adadpo_megatron.trainer.config import loss_config_from_args

    loss_cfg = loss_config_from_args(args)
    built: list[Any] = []

    def forward_step(data_iterator, model):
        if not built:
            # No StepContext: under --calculate-per-token-loss no global pair count is
            # needed, and without it the loss function refuses to run (no silent G=1).
            built.append(fs.make_forward_step(
                loss_cfg, None, use_thd=use_thd,
                logprob_impl=getattr(args, "logprob_impl", "fused")))
        return built[0](data_iterator, model)

    return forward_step
