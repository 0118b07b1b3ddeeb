"""The on-disk layout of a packed dataset directory, shared by the writer and the reader.

A directory written by ``adadpo-pack`` holds:

``tokens.bin`` / ``tokens.idx``
    A megatron-core indexed dataset (``IndexedDatasetBuilder``), one document per sequence,
    in pair order: document ``2j`` is pair ``j``'s chosen sequence, ``2j + 1`` its rejected.
    Token dtype ``uint16`` when the vocabulary has fewer than 65500 ids, else ``int32``
    (megatron-core's ``DType.optimal_dtype``).
``index.npz``
    The pack plan and per-sequence arrays (:data:`INDEX_ARRAYS`).
``rejects.jsonl``
    One ``{"line", "reason", "detail"}`` object per rejected input line (1-based ``line``).
``meta.json``
    Format version, tokenizer kind and fingerprint, BOS/EOS and truncation settings, chat
    template, pack size, algorithm, seed, counts, efficiency, each data file's sha256 and
    the dataset fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = [
    "summary_line",
    "DATA_FILES",
    "FORMAT_VERSION",
    "INDEX_ARRAYS",
    "INDEX_FILE",
    "META_FILE",
    "REJECTS_FILE",
    "TOKENS_PREFIX",
    "dataset_fingerprint",
    "indexed_dataset_module",
]

FORMAT_VERSION = 1
"""Bumped on any incompatible change; the reader refuses other versions."""

META_FILE = "meta.json"
INDEX_FILE = "index.npz"
REJECTS_FILE = "rejects.jsonl"
TOKENS_PREFIX = "tokens"
"""Path prefix of the indexed dataset inside the directory (``tokens.bin``, ``tokens.idx``)."""
DATA_FILES = ("tokens.bin", "tokens.idx", INDEX_FILE)
"""Files whose sha256 goes into meta.json and the dataset fingerprint."""

INDEX_ARRAYS: dict[str, str] = {
    "pack_offsets": "int64 [P+1]: pack p holds pairs pair_order[pack_offsets[p]:pack_offsets[p+1]]",
    "pair_order": "int64 [N]: pair ids grouped by pack, in layout order",
    "pack_of_pair": "int64 [N]: pack id of each pair",
    "pack_tokens": "int64 [P]: tokens of each pack (sequences rounded up to --align)",
    "seq_prompt_len": "int64 [2N]: leading tokens of each sequence not scored (BOS + prompt)",
    "seq_pair_id": "int64 [2N]: pair id of each sequence (document k belongs to pair k // 2)",
    "seq_is_chosen": "bool [2N]: True for chosen sequences (even documents)",
    "pair_source_line": "int64 [N]: 1-based input line of each pair",
}
"""Arrays of ``index.npz``; N pairs, P packs."""


def dataset_fingerprint(file_hashes: dict[str, str], tokenizer_fingerprint: str) -> str:
    """Hex sha256 naming a dataset's content: its data files' hashes and the tokenizer's."""
    payload = {
        "format_version": FORMAT_VERSION,
        "files": dict(sorted(file_hashes.items())),
        "tokenizer": tokenizer_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def indexed_dataset_module() -> ModuleType:
    """``megatron.core.datasets.indexed_dataset``, imported without megatron-core's CPU notices.

    Importing it imports all of megatron-core, which warns that Transformer Engine and Apex
    are absent and about its own deprecated imports: irrelevant to token files.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Transformer Engine and Apex are not installed", category=UserWarning
        )
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\.")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def summary_line(meta: dict[str, Any], output: Path, seconds: float) -> str:
    """The one-line summary ``adadpo-pack`` prints at the end of a run, from its ``meta.json``."""
    reasons = ", ".join(f"{k} {v}" for k, v in meta["rejects_by_reason"].items())
    return (
        f"adadpo-pack: {meta['lines_read']} lines read = {meta['pairs_packed']} pairs packed + "
        f"{meta['lines_rejected']} rejected{f' ({reasons})' if reasons else ''}; "
        f"{meta['num_packs']} packs of {meta['capacity']} tokens "
        f"(lower bound {meta['packs_lower_bound']}), efficiency {meta['efficiency']:.1%}, "
        f"{meta['real_tokens']} tokens -> {output} in {seconds:.1f} s"
    )
