"""Data iterators of the Megatron-LM entry (``--dataloader-type external``).

Megatron-LM's loop calls ``next()`` on the iterators the datasets provider returns, once
per micro-batch: ``M = G / (micro_batch_size * DP)`` times per training step (``G`` =
``--global-batch-size`` packs) and ``--eval-iters * M`` times per evaluation. The plugin
owns the iterators, so it owns where they start:

* :func:`train_iterator` starts at ``args.consumed_train_samples`` (Megatron-LM restores
  it from ``--load``), so a resumed run sees exactly the packs an uninterrupted one would,
  whatever the DP size (the packs of a step depend only on ``G``, see ``data/sampler.py``).
* :func:`eval_iterator` repeats the same ``--eval-iters * G`` packs, cut as adadpo-train's
  ``evaluate`` cuts them (DP rank ``r`` takes packs ``r, r + DP, ...``): its period is
  exactly one evaluation, so every evaluation scores the same packs.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from typing import Any

__all__ = ["data_paths", "eval_iterator", "train_iterator"]


def _one_path(flag: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):  # Megatron-LM: a (weighted) list of prefixes
        if len(value) == 0:
            return None
        if len(value) != 1:
            raise ValueError(f"{flag} {' '.join(map(str, value))}: give exactly one packed "
                             "dataset directory (adadpo-pack output); blends are not supported")
        value = value[0]
    return str(value)


def data_paths(args: argparse.Namespace) -> tuple[str, str | None]:
    """(training, validation) packed dataset directories from Megatron-LM's flags.

    Megatron-LM takes either ``--data-path`` (one source; it refuses a separate
    validation path beside it) or ``--train-data-path`` with ``--valid-data-path``.
    Raises ValueError naming the flag when no training directory is given.
    """
    train = _one_path("--data-path", getattr(args, "data_path", None))
    if train is None:
        train = _one_path("--train-data-path", getattr(args, "train_data_path", None))
    if train is None:
        raise ValueError("no training data: give --data-path DIR, or --train-data-path DIR "
                         "(with --valid-data-path DIR for validation); DIR is adadpo-pack's "
                         "output")
    valid = _one_path("--valid-data-path", getattr(args, "valid_data_path", None))
    return train, valid


def microbatches_per_step(args: argparse.Namespace, dp_size: int) -> int:
    """``M``: micro-batches per DP rank in one step (or one evaluation iteration)."""
    return args.global_batch_size // (args.micro_batch_size * dp_size)


def train_iterator(dataset, args: argparse.Namespace, *, dp_rank: int, dp_size: int,
                   attach=None) -> Iterator[dict[str, Any]]:
    """Endless iterator of this DP rank's training micro-batches (THD dicts).

    Starts at step ``args.consumed_train_samples / G`` of the seeded order (0 for a fresh
    run). ``attach``: optional ``pack -> pack`` (precomputed reference log-probs). Raises
    ValueError when the consumed samples are not a whole number of steps of ``G`` packs
    (a run that changed ``--global-batch-size`` cannot resume exactly).
    """
    from adadpo_megatron.data.sampler import DistributedPackSampler
    from adadpo_megatron.trainer.loop import collate_packs

    g, mbs = args.global_batch_size, args.micro_batch_size
    sampler = DistributedPackSampler(len(dataset), global_batch_size=g, dp_rank=dp_rank,
                                     dp_size=dp_size, seed=args.seed, micro_batch_size=mbs)
    consumed = int(getattr(args, "consumed_train_samples", 0) or 0)
    if consumed % g:
        raise ValueError(f"the checkpoint has consumed {consumed} samples, not a multiple of "
                         f"--global-batch-size {g}: resume with the saved run's batch size")
    for _ in range(consumed // g):  # moves the position only; no data is read
        sampler.next_step()

    def generate() -> Iterator[dict[str, Any]]:
        for ids in sampler:
            for j in range(0, len(ids), mbs):
                packs = [dataset[i] for i in ids[j:j + mbs]]
                yield collate_packs([attach(p) for p in packs] if attach else packs)

    return generate()


def eval_iterator(dataset, args: argparse.Namespace, *, dp_rank: int, dp_size: int,
                  attach=None, flag: str = "--valid-data-path") -> Iterator[dict[str, Any]]:
    """Endless iterator whose period is one evaluation (``--eval-iters`` global batches).

    DP rank ``r`` takes packs ``r, r + DP, ...`` of the first ``--eval-iters * G`` packs,
    in micro-batches of ``--micro-batch-size``, then starts over. Raises ValueError naming
    ``flag`` when the split holds fewer packs than one evaluation needs.
    """
    from adadpo_megatron.trainer.loop import collate_packs

    g, mbs = args.global_batch_size, args.micro_batch_size
    need = args.eval_iters * g
    if len(dataset) < need:
        raise ValueError(f"{flag}: {len(dataset)} packs, fewer than one evaluation needs "
                         f"(--eval-iters {args.eval_iters} x --global-batch-size {g} = {need}); "
                         "lower --eval-iters")
    ids = list(range(dp_rank, need, dp_size))

    def one_pass() -> list[dict[str, Any]]:
        out = []
        for j in range(0, len(ids), mbs):
            packs = [dataset[i] for i in ids[j:j + mbs]]
            out.append(collate_packs([attach(p) for p in packs] if attach else packs))
        return out

    return itertools.cycle(one_pass())
