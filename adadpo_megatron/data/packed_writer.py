"""Streaming writer of a packed dataset's token file and rejects (see packed_format)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from adadpo_megatron.data.encode import EncodedPair
from adadpo_megatron.data.packed_format import REJECTS_FILE, TOKENS_PREFIX, indexed_dataset_module
from adadpo_megatron.data.prefix_layout import shared_prefix_len
from adadpo_megatron.data.records import RecordRejected, printable
from adadpo_megatron.data.tokenizer import Tokenizer

__all__ = ["PackedWriter"]


_LINE_BREAKS = ("\x85", "\u2028", "\u2029")
"""Line breaks to str.splitlines() that json.dumps(ensure_ascii=False) leaves unescaped."""


class PackedWriter:
    """Accumulates pairs (tokens straight into the indexed-dataset builder) and rejects.

    Writes ``tokens.bin`` and ``rejects.jsonl`` into ``directory`` as it goes; keeps the
    per-sequence lengths and prompt lengths and the per-pair source lines in memory (a few
    bytes a pair) for the pack plan and ``index.npz``.
    """

    def __init__(self, directory: Path, tokenizer: Tokenizer) -> None:
        indexed = indexed_dataset_module()
        self.dtype = np.dtype(indexed.DType.optimal_dtype(tokenizer.vocab_size))
        self.max_id = min(tokenizer.vocab_size, np.iinfo(self.dtype).max + 1)
        self.builder = indexed.IndexedDatasetBuilder(
            str(directory / "tokens.bin"), dtype=self.dtype.type
        )
        # backslashreplace: a detail quoting a lone surrogate must not stop the run
        self.rejects = open(directory / REJECTS_FILE, "w", encoding="utf-8", errors="backslashreplace")
        self.first_rejects: list[tuple[int, str, str]] = []
        """(line, reason, detail) of the first few rejects, for the error of an empty run."""
        self.reasons: Counter[str] = Counter()
        self.lengths: list[int] = []
        self.prompt_lens: list[int] = []
        self.source_lines: list[int] = []
        self.shared_lens: list[int] = []
        """Per pair: the prefix the prefix-shared layout lets the rejected branch reuse."""
        self.prompts_truncated = 0
        self.completions_truncated = 0

    def add(self, pair: EncodedPair, line: int) -> None:
        """Store both sequences of a pair read from 1-based input ``line``."""
        for seq, prompt_len in (
            (pair.chosen, pair.chosen_prompt_len),
            (pair.rejected, pair.rejected_prompt_len),
        ):
            if int(seq.max()) >= self.max_id or int(seq.min()) < 0:
                raise ValueError(
                    f"line {line}: token id {int(seq.max())} does not fit the vocabulary size "
                    f"{self.max_id} ({self.dtype}); the tokenizer's vocab_size is wrong"
                )
            self.builder.add_document(seq.astype(self.dtype), [len(seq)])
            self.lengths.append(len(seq))
            self.prompt_lens.append(prompt_len)
        self.source_lines.append(line)
        self.shared_lens.append(
            shared_prefix_len(
                pair.chosen, pair.rejected, pair.chosen_prompt_len, pair.rejected_prompt_len
            )
        )
        self.prompts_truncated += int(pair.prompt_truncated)
        self.completions_truncated += pair.completions_truncated

    def reject(self, line: int, exc: RecordRejected) -> None:
        """Append ``{"line", "reason", "detail"}`` to rejects.jsonl."""
        self.reasons[exc.reason] += 1
        if len(self.first_rejects) < 3:
            self.first_rejects.append((line, exc.reason, exc.detail))
        entry = {"line": line, "reason": exc.reason, "detail": exc.detail}
        text = json.dumps(entry, ensure_ascii=False)
        for char in _LINE_BREAKS:  # str.splitlines() breaks lines at these: keep one per line
            text = text.replace(char, f"\\u{ord(char):04x}")
        self.rejects.write(text + "\n")

    def nothing_packed(self, source: Path, output: Path, lines_read: int) -> str:
        """The one-line error of a run that packed no pair (nothing is published then)."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        shown = "; ".join(f"{source}:{line}: {reason}: {printable(detail)}"
                          for line, reason, detail in self.first_rejects)
        return (f"no pair was packed from {source} ({lines_read} lines read, all rejected: "
                f"{reasons or 'none'}); nothing written to {output}. First rejects: {shown or '-'}")

    @property
    def num_pairs(self) -> int:
        """Pairs stored so far."""
        return len(self.source_lines)

    def close(self, directory: Path | None) -> None:
        """Close the files; with ``directory``, finalize the .idx there."""
        try:
            self.rejects.close()
        finally:
            if directory is None:
                self.builder.data_file.close()
        if directory is not None:
            self.builder.finalize(str(directory / f"{TOKENS_PREFIX}.idx"))
