"""Preference data: JSONL validation, tokenizers, the packed dataset and its sampler.

Exports are lazy so that ``adadpo-pack --help`` does not import torch or megatron-core.
"""

from typing import Any

__all__ = ["PackedDatasetError", "PackedPairDataset", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in ("PackedPairDataset", "PackedDatasetError"):
        from adadpo_megatron.data import packed_dataset

        return getattr(packed_dataset, name)
    if name == "load_tokenizer":
        from adadpo_megatron.data.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(name)
