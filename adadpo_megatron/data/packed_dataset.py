"""Reading a packed dataset directory (written by ``adadpo-pack``) as THD micro-batches.

``ds[i]`` is pack ``i`` as one packed micro-batch, a dict of CPU tensors (T tokens, S
segments, two per pair, chosen first):

=============  ===============  =====================================================
tokens         int64 [T]        token ids; padding is id 0
position_ids   int64 [T]        restart at 0 in each segment, count on through padding
labels         int64 [T]        next token within the segment; 0 where there is none
loss_mask      float32 [T]      1.0 where the label is a completion token (incl. EOS)
cu_seqlens     int32 [S+1]      segment boundaries; segment lengths include padding
max_seqlen     int              longest segment (python int, computed on the CPU)
pair_index     int64 [S]        dataset-wide pair id of each segment
is_chosen      bool [S]         True for the chosen segment of each pair
=============  ===============  =====================================================

A prefix-shared dataset (``adadpo-pack --prefix-sharing``, :mod:`.prefix_layout`) adds

=================  ===========  ==================================================
shared_prefix_len  int64 [S]    for a rejected segment, the leading tokens of its pair's
                                chosen segment it also attends to (the shared prefix s);
                                0 for chosen segments
=================  ===========  ==================================================

and its rejected segments hold only the tokens after the shared prefix, with position ids
starting at ``s``. Worked example, prompt ``BOS p1 p2`` (prompt_len 3, so s = 2),
chosen completion ``c1 EOS``, rejected ``r1 r2 EOS``::

    segment        chosen (2*j)               rejected (2*j+1)
    tokens         BOS p1  p2  c1  EOS        p2  r1  r2  EOS
    position_ids   0   1   2   3   4          2   3   4   5
    labels         p1  p2  c1  EOS 0          r1  r2  EOS 0
    loss_mask      0   0   1   1   0          1   1   1   0
    cu_seqlens     [0, 5, 9]   shared_prefix_len [0, 2]   (9 tokens instead of 11)

The rejected tokens attend to ``BOS p1`` (the first 2 tokens of the chosen segment) and to
the rejected tokens before them, never to ``p2 c1 EOS`` of the chosen segment.

Padding is appended inside segments (loss mask 0), never as extra segments: each segment
to a multiple of ``segment_multiple`` (2*CP, times TP under sequence parallelism), then the
pack to a multiple of ``lcm(segment_multiple, pack_multiple)`` (``pack_multiple``: 16 for
FP8) and, if given, to exactly ``pad_to`` (pipeline parallelism needs equal lengths); the
extra goes into the last segment, so it keeps a multiple of ``segment_multiple``.

Worked example, one prompt token + BOS (prompt_len 2) and completion ``c1 c2 EOS``::

    tokens     BOS p1 c1 c2 EOS
    labels     p1  c1 c2 EOS 0
    loss_mask  0   1  1  1   0      (p1 predicts c1: its label is a completion token)
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adadpo_megatron.data.packed_format import (
    DATA_FILES,
    FORMAT_VERSION,
    INDEX_ARRAYS,
    INDEX_FILE,
    META_FILE,
    TOKENS_PREFIX,
    dataset_fingerprint,
    indexed_dataset_module,
)
from adadpo_megatron.data.prefix_layout import (
    LAYOUT_PREFIX_SHARED,
    SHARED_PREFIX_ARRAY,
    build_pack,
    layout_kind,
    segment_skips,
)
from adadpo_megatron.data.tokenizer import file_sha256

__all__ = ["PackedDatasetError", "PackedPairDataset"]


class PackedDatasetError(ValueError):
    """A packed dataset directory is missing, corrupt, of another version or tokenizer."""


def _positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class PackedPairDataset(torch.utils.data.Dataset):
    """Packs of a packed dataset directory as THD micro-batches (see the module docstring).

    Args:
        path: the directory ``adadpo-pack`` wrote.
        segment_multiple: pad each segment to a multiple of this (2*CP[*TP]).
        pack_multiple: pad each pack to a multiple of this (16 for FP8; 32 mxfp8; 128 blockwise).
        pad_to: pad every pack to exactly this many tokens (must be a multiple of
            ``lcm(segment_multiple, pack_multiple)``); a longer pack is an error at load time.
        expected_fingerprint: the training tokenizer's fingerprint (hex sha256 of its model
            file); a dataset tokenized with another tokenizer is refused.

    Raises:
        PackedDatasetError: missing files, wrong format version, inconsistent arrays, another
            tokenizer, or a pack longer than ``pad_to``; the message names the file.
    """

    def __init__(
        self,
        path: str | Path,
        segment_multiple: int = 1,
        pack_multiple: int = 1,
        pad_to: int | None = None,
        *,
        expected_fingerprint: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.segment_multiple = _positive(segment_multiple, "segment_multiple")
        self.pack_multiple = _positive(pack_multiple, "pack_multiple")
        self._round = math.lcm(self.segment_multiple, self.pack_multiple)
        self.pad_to = None if pad_to is None else _positive(pad_to, "pad_to")
        if self.pad_to is not None and self.pad_to % self._round:
            raise ValueError(
                f"pad_to={pad_to} must be a multiple of lcm(segment_multiple={segment_multiple}, "
                f"pack_multiple={pack_multiple}) = {self._round}"
            )
        self._expected_fingerprint = expected_fingerprint
        self.meta: dict[str, Any] = self._load_meta(expected_fingerprint)
        self._load_arrays()
        self.pack_lengths = self._padded_pack_lengths()
        """int64 [P]: the padded length T of each pack as ``ds[i]`` returns it."""
        self._tokens: np.ndarray | None = None  # memmap opened lazily (once per worker)

    # --- loading and checks -------------------------------------------------------------
    def _load_meta(self, expected_fingerprint: str | None) -> dict[str, Any]:
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise PackedDatasetError(
                f"{meta_path} not found: {self.path} is not a finished packed dataset "
                "(write one with adadpo-pack)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PackedDatasetError(f"{meta_path} is not valid JSON: {exc}") from None
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise PackedDatasetError(
                f"{meta_path}: format_version {version!r}, this reader reads version "
                f"{FORMAT_VERSION}; re-pack the data with this version's adadpo-pack"
            )
        actual = meta["tokenizer"]["fingerprint"]
        if expected_fingerprint is not None and actual != expected_fingerprint:
            raise PackedDatasetError(
                f"{meta_path}: the data was tokenized with {meta['tokenizer']['path']} "
                f"(sha256 {actual[:16]}...), not the expected tokenizer (sha256 "
                f"{expected_fingerprint[:16]}...); re-pack with the training tokenizer "
                "(adadpo-pack --tokenizer ...)"
            )
        return meta

    def _load_arrays(self) -> None:
        IndexedDataset = indexed_dataset_module().IndexedDataset  # noqa: N806

        index_path = self.path / INDEX_FILE
        try:
            with np.load(index_path) as npz:
                arrays = {name: npz[name] for name in INDEX_ARRAYS}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise PackedDatasetError(f"{index_path}: unreadable or incomplete ({exc})") from None
        prefix = str(self.path / TOKENS_PREFIX)
        if not IndexedDataset.exists(prefix):
            raise PackedDatasetError(f"{prefix}.bin/.idx not found in {self.path}")
        try:
            indexed = IndexedDataset(prefix)
        except (OSError, ValueError, struct.error) as exc:
            raise PackedDatasetError(f"{prefix}.idx: unreadable or truncated ({exc})") from None
        self._seq_lengths = np.asarray(indexed.sequence_lengths, dtype=np.int64)
        dtype = np.dtype(indexed.index.dtype)
        del indexed
        self._seq_starts = np.concatenate([[0], np.cumsum(self._seq_lengths)[:-1]]).astype(np.int64)
        self._dtype = dtype
        n = int(self.meta["pairs_packed"])
        p = int(self.meta["num_packs"])
        want = {
            "pack_offsets": p + 1,
            "pair_order": n,
            "pack_of_pair": n,
            "pack_tokens": p,
            "seq_prompt_len": 2 * n,
            "seq_pair_id": 2 * n,
            "seq_is_chosen": 2 * n,
            "pair_source_line": n,
        }
        for name, size in want.items():
            if arrays[name].shape != (size,):
                raise PackedDatasetError(
                    f"{index_path}: {name} has shape {arrays[name].shape}, meta.json implies "
                    f"({size},); the directory is corrupt: re-pack it"
                )
        if self._seq_lengths.shape != (2 * n,) or dtype.name != self.meta["token_dtype"]:
            raise PackedDatasetError(
                f"{prefix}.idx holds {self._seq_lengths.shape[0]} {dtype.name} sequences, "
                f"meta.json says {2 * n} {self.meta['token_dtype']}; the directory is corrupt"
            )
        want_bytes = int(self._seq_lengths.sum()) * dtype.itemsize
        have_bytes = Path(f"{prefix}.bin").stat().st_size
        if have_bytes != want_bytes:  # else a truncated file fails only in the middle of a step
            raise PackedDatasetError(
                f"{prefix}.bin is {have_bytes} bytes, tokens.idx needs {want_bytes} "
                f"({int(self._seq_lengths.sum())} {dtype.name} tokens): the file is "
                f"{'truncated' if have_bytes < want_bytes else 'changed'}; re-pack the dataset"
            )
        if not (
            np.array_equal(arrays["seq_pair_id"], np.repeat(np.arange(n), 2))
            and np.array_equal(arrays["seq_is_chosen"], np.tile([True, False], n))
        ):
            raise PackedDatasetError(
                f"{index_path}: sequences are not in pair order (chosen 2j, rejected 2j+1)"
            )
        self.prefix_shared = self._load_shared_prefix(index_path, n)
        self._pack_offsets = arrays["pack_offsets"]
        self._pair_order = arrays["pair_order"]
        self._pack_of_pair = arrays["pack_of_pair"]
        self._prompt_len = arrays["seq_prompt_len"]
        self._source_line = arrays["pair_source_line"]

    def _load_shared_prefix(self, index_path: Path, n: int) -> bool:
        """Reads the layout; sets ``_skip`` [2N] and ``_seg_lengths`` [2N]; True if shared."""
        try:
            kind = layout_kind(self.meta, str(self.path / META_FILE))
        except ValueError as exc:
            raise PackedDatasetError(str(exc)) from None
        shared = None
        if kind == LAYOUT_PREFIX_SHARED:
            with np.load(index_path) as npz:
                if SHARED_PREFIX_ARRAY not in npz:
                    raise PackedDatasetError(
                        f"{index_path}: {SHARED_PREFIX_ARRAY} missing but meta.json says the "
                        "layout is prefix_shared; the directory is corrupt: re-pack it"
                    )
                shared = npz[SHARED_PREFIX_ARRAY].astype(np.int64)
            if shared.shape != (n,) or (shared < 0).any() or (
                shared >= np.minimum(self._seq_lengths[0::2], self._seq_lengths[1::2])
            ).any():
                raise PackedDatasetError(
                    f"{index_path}: {SHARED_PREFIX_ARRAY} must be [N] with 0 <= s < both "
                    "sequence lengths; the directory is corrupt: re-pack it"
                )
        self._shared = shared
        self._skip = segment_skips(shared, n)
        self._seg_lengths = self._seq_lengths - self._skip
        return shared is not None

    def _padded_pack_lengths(self) -> np.ndarray:
        m = self.segment_multiple
        padded = -(-self._seg_lengths // m) * m
        pair_len = padded[0::2] + padded[1::2]
        raw = np.bincount(self._pack_of_pair, weights=pair_len, minlength=len(self)).astype(
            np.int64
        )
        lengths = -(-raw // self._round) * self._round
        if self.pad_to is None:
            return lengths
        if lengths.size and int(lengths.max()) > self.pad_to:
            worst = int(np.argmax(lengths))
            raise PackedDatasetError(
                f"{self.path}: pack {worst} needs {int(lengths[worst])} tokens after padding to "
                f"multiples of {m}/{self._round}, more than pad_to={self.pad_to}; raise pad_to, "
                f"or re-pack with --align {m} and a --pack-size that is a multiple of {self._round}"
            )
        return np.full_like(lengths, self.pad_to)

    def __getstate__(self) -> dict[str, Any]:
        # Workers re-open the directory rather than receive copies of the arrays and memmap.
        return {
            "path": self.path,
            "segment_multiple": self.segment_multiple,
            "pack_multiple": self.pack_multiple,
            "pad_to": self.pad_to,
            "expected_fingerprint": self._expected_fingerprint,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    # --- public API ---------------------------------------------------------------------
    @property
    def num_pairs(self) -> int:
        """Number of pairs in the dataset (pair ids are 0 .. num_pairs - 1)."""
        return int(self._pair_order.shape[0])

    @property
    def fingerprint(self) -> str:
        """Hex sha256 naming the dataset's content (data files and tokenizer), from meta.json."""
        return str(self.meta["dataset_fingerprint"])

    def __len__(self) -> int:
        """Number of packs."""
        return int(self._pack_offsets.shape[0] - 1)

    def pairs_in_pack(self, i: int) -> np.ndarray:
        """int64 pair ids of pack ``i`` in layout order."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"pack {i} out of range for {len(self)} packs in {self.path}")
        i %= len(self)
        return self._pair_order[self._pack_offsets[i] : self._pack_offsets[i + 1]]

    def _sequence(self, doc: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path / "tokens.bin", dtype=self._dtype, mode="r")
        start = self._seq_starts[doc]
        return np.asarray(self._tokens[start : start + self._seq_lengths[doc]], dtype=np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Pack ``i`` as a THD micro-batch dict (see the module docstring)."""
        pairs = self.pairs_in_pack(i)
        docs = np.stack([2 * pairs, 2 * pairs + 1], axis=1).ravel()
        return build_pack(
            [self._sequence(doc) for doc in docs.tolist()],
            self._prompt_len[docs],
            pairs,
            skips=self._skip[docs] if self.prefix_shared else None,
            segment_multiple=self.segment_multiple,
            total=int(self.pack_lengths[i % len(self)]),
        )

    def pair(self, j: int) -> dict[str, Any]:
        """Pair ``j``: ``prompt``, ``chosen``, ``rejected`` token-id lists and ``source_line``.

        ``prompt + chosen`` is exactly the stored chosen sequence (BOS and EOS included when
        they were added); ``prompt`` is the part both sequences share unscored.
        """
        if not 0 <= j < self.num_pairs:
            raise IndexError(f"pair {j} out of range for {self.num_pairs} pairs in {self.path}")
        chosen, rejected = self._sequence(2 * j), self._sequence(2 * j + 1)
        p = int(min(self._prompt_len[2 * j], self._prompt_len[2 * j + 1]))
        return {
            "prompt": chosen[:p].tolist(),
            "chosen": chosen[p:].tolist(),
            "rejected": rejected[p:].tolist(),
            "source_line": int(self._source_line[j]),
        }

    def verify(self) -> None:
        """Re-hash the data files against meta.json; raise PackedDatasetError on a mismatch."""
        hashes = {}
        for name in DATA_FILES:
            hashes[name] = file_sha256(self.path / name)
            if hashes[name] != self.meta["files"].get(name):
                raise PackedDatasetError(
                    f"{self.path / name}: sha256 differs from meta.json; the file changed "
                    "after packing: re-pack the dataset"
                )
        if dataset_fingerprint(hashes, self.meta["tokenizer"]["fingerprint"]) != self.fingerprint:
            raise PackedDatasetError(
                f"{self.path / META_FILE}: dataset_fingerprint is inconsistent"
            )
