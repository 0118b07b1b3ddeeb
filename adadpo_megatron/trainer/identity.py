"""Identity checks at start: every input of a run belongs to the training data's tokenizer.

Run by ``build_run`` right after the datasets are opened, before the model is built:

* ``--eval-data-path`` must be tokenized with the same tokenizer as ``--data-path``
  (fingerprint and vocabulary size): other token ids would give silently wrong eval
  metrics, or an ``IndexError`` in the embedding.
* a checkpoint given to ``--load`` (resume or ``--finetune``) or ``--ref-load`` must
  have been trained with that tokenizer (recorded in its ``adadpo_meta.json`` since this
  check exists; a checkpoint without the record, e.g. a converted HF model, is checked
  by the vocabulary size alone where it records one);
* with ``--verify-data``, every data file is re-hashed against its ``meta.json``, once per
  node (by its LOCAL_RANK 0).

A reference side-car is bound to its dataset's fingerprint (which includes the
tokenizer's) by :class:`adadpo_megatron.step.reference.PrecomputedReference`.
Packed data is checked against its index and ``meta.json`` (sizes) when opened
(:class:`adadpo_megatron.data.packed_dataset.PackedPairDataset`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from adadpo_megatron.trainer.config import ConfigError, TrainConfig

__all__ = ["check_identity", "tokenizer_record"]


def tokenizer_record(ds: Any) -> dict[str, Any]:
    """``{"fingerprint", "vocab_size"}`` of a dataset's tokenizer (stored in checkpoints)."""
    tok = ds.meta["tokenizer"]
    return {"fingerprint": str(tok["fingerprint"]), "vocab_size": int(tok["vocab_size"])}


def _checkpoint_tokenizer(root: str) -> tuple[str, dict[str, Any] | None]:
    """(checkpoint dir, its tokenizer record or None) of ``root``'s latest checkpoint."""
    from adadpo_megatron.trainer.checkpointing import META, _iter_dir, latest_iteration

    ckpt = _iter_dir(root, latest_iteration(root))
    try:
        with open(os.path.join(ckpt, META), encoding="utf-8") as f:
            return ckpt, json.load(f).get("tokenizer")
    except (OSError, ValueError):
        return ckpt, None  # the checkpoint loader reports a missing or corrupt meta file


def check_identity(cfg: TrainConfig, train_data: Any, eval_data: Any | None) -> None:
    """Raise ConfigError/CheckpointError (one line) when an input has another tokenizer.

    Args:
        cfg: the run's configuration (``--load``, ``--ref-load``, ``--verify-data``).
        train_data, eval_data: the opened ``PackedPairDataset`` s (eval may be None).
    """
    from adadpo_megatron.trainer.checkpointing import CheckpointError

    want = tokenizer_record(train_data)
    if eval_data is not None:
        got = tokenizer_record(eval_data)
        if got != want:
            raise ConfigError(
                f"--eval-data-path {cfg.io.eval_data_path} was tokenized with another tokenizer "
                f"(sha256 {got['fingerprint'][:16]}..., vocab {got['vocab_size']}) than "
                f"--data-path {cfg.io.data_path} (sha256 {want['fingerprint'][:16]}..., vocab "
                f"{want['vocab_size']}): re-pack it with the training tokenizer")
    roots = [("--load", cfg.io.load), ("--ref-load", cfg.reference.ref_load)]
    for flag, root in roots:
        if not root:
            continue
        ckpt, rec = _checkpoint_tokenizer(root)
        if rec is not None and rec != want:
            raise CheckpointError(
                f"{flag} {root}: {ckpt} was trained with another tokenizer (sha256 "
                f"{rec['fingerprint'][:16]}..., vocab {rec['vocab_size']}) than --data-path "
                f"(sha256 {want['fingerprint'][:16]}..., vocab {want['vocab_size']}): its "
                "token ids mean other words")
    if cfg.io.verify_data:
        _verify_data_once_per_node(train_data, eval_data)


def _verify_data_once_per_node(train_data: Any, eval_data: Any) -> None:
    """``--verify-data``: the first rank of each node (LOCAL_RANK 0) re-hashes the files,
    the others wait; every rank then raises the first error found (collective)."""
    import os

    from adadpo_megatron.trainer.write_failure import agree

    error = None
    if os.environ.get("LOCAL_RANK", "0") == "0":
        for flag, ds in (("--data-path", train_data), ("--eval-data-path", eval_data)):
            if ds is not None:
                try:
                    ds.verify()
                except ValueError as e:
                    error = f"{flag}: {e}"
                    break
    error = agree(error)
    if error is not None:
        raise ConfigError(error)
