"""Input readers of ``adadpo-pack``: every supported file form behind one interface.

:func:`open_input` picks a reader from the path and returns an :class:`InputReader`;
iterating it yields ``(line, record_or_rejection)`` for every row in input order, where the
second item is a :class:`~adadpo_megatron.data.records.PreferenceRecord` or the
:class:`~adadpo_megatron.data.records.RecordRejected` that explains why the row is unusable.
Every row yields exactly one item, so ``rows read == pairs + rejects`` holds for each form.

Forms (the rows are validated by :mod:`adadpo_megatron.data.records`, so the standard and
the conversational forms and every reject reason apply to all of them):

* ``*.jsonl`` (any other name): one JSON object per line; ``line`` is 1-based.
* ``*.jsonl.gz`` / ``*.json.gz``: the same, gzip-compressed; ``line`` is 1-based.
* ``*.parquet``: one row per pair (string columns, or lists of ``{role, content}``
  structs); ``line`` is the 0-based row index.
* a directory written by ``datasets.Dataset.save_to_disk`` (``state.json`` + ``*.arrow``
  files); ``line`` is the 0-based row index (``dataset[line]``). A ``DatasetDict``
  directory is refused with the splits to choose from.

``hf:NAME`` (a Hugging Face dataset through ``datasets.load_dataset``) is read by
:mod:`adadpo_megatron.data.hub`. Parquet and Arrow need ``pyarrow`` (``pip install pyarrow``); ``datasets`` itself is not
needed to read a ``save_to_disk`` directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adadpo_megatron.data.records import (
    PreferenceRecord,
    RecordRejected,
    iter_lines,
    parse_line,
    parse_record,
)

__all__ = ["FORMATS", "InputReader", "open_input"]

FORMATS = ("jsonl", "jsonl.gz", "parquet", "datasets", "hf")
"""Input forms, as recorded in ``meta.json`` (``input.format``)."""

Item = tuple[int, PreferenceRecord | RecordRejected]

_ROW_BATCH = 1024  # rows converted to Python objects at a time (Parquet/Arrow)


class InputReader:
    """One pass over a preference input; see the module docstring for the forms.

    Attributes:
        path: the input path.
        format: one of :data:`FORMATS`.
        unit: the progress unit (``"B"`` bytes, or ``"rows"``).
        total: the progress total in ``unit`` (file size, or row count).
        done: progress so far in ``unit`` (updated while iterating).
        line_base: 1 when ``line`` counts lines from 1, 0 when it is a row index.
    """

    def __init__(self, path: Path, fmt: str, unit: str, total: int, line_base: int) -> None:
        self.path, self.format, self.unit = path, fmt, unit
        self.total, self.done, self.line_base = total, 0, line_base
        self._digest = hashlib.sha256()

    def __iter__(self) -> Iterator[Item]:
        if self.format in ("jsonl", "jsonl.gz"):
            return self._lines()
        return self._rows()

    def location(self, line: int) -> str:
        """``FILE:LINE`` for JSONL, ``FILE: row N`` for row inputs (for error messages)."""
        return f"{self.path}:{line}" if self.line_base else f"{self.path}: row {line}"

    def describe(self) -> dict[str, Any]:
        """``meta.json``'s ``input`` record: path, format, sha256 (complete once iterated)."""
        return {"path": str(self.path.resolve()), "format": self.format, "sha256": self.sha256()}

    def sha256(self) -> str:
        """Digest of the input's content: its lines (decompressed), or its data files' bytes.

        Complete once iteration has finished.
        """
        return self._digest.hexdigest()

    def _lines(self) -> Iterator[Item]:
        with open(self.path, "rb") as raw_file:
            stream: Any = gzip.GzipFile(fileobj=raw_file) if self.format == "jsonl.gz" else raw_file
            try:
                for number, raw in iter_lines(stream):
                    self._digest.update(raw)
                    self.done = raw_file.tell()
                    yield number, _guarded(parse_line, raw, number)
            except (OSError, EOFError) as exc:  # gzip: truncated or not gzip at all
                raise ValueError(f"{self.path}: cannot decompress ({exc})") from None

    def _rows(self) -> Iterator[Item]:
        files = _data_files(self.path, self.format)
        for name in files:
            _hash_file(name, self._digest)
        index = 0
        for batch in _record_batches(files, self.format):
            for row in batch.to_pylist():
                yield index, _guarded(parse_record, row, index)
                index += 1
                self.done = index


def _guarded(parse: Any, value: Any, line: int) -> PreferenceRecord | RecordRejected:
    """``parse(value, line)``, or the rejection: no row ever stops the run."""
    try:
        return parse(value, line)
    except RecordRejected as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - recorded as a reject with its type and message
        return RecordRejected("unexpected_error", f"{type(exc).__name__}: {exc}")


def _hash_file(path: Path, digest: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ValueError(
            "reading Parquet or a datasets directory needs pyarrow: pip install pyarrow"
        ) from None
    return pyarrow


def _data_files(path: Path, fmt: str) -> list[Path]:
    """The files holding the rows, in row order."""
    if fmt == "parquet":
        return [path]
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    files = [path / entry["filename"] for entry in state.get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise ValueError(f"{path}/state.json lists data files that are not there: "
                         f"{', '.join(missing) or '(none listed)'}")
    return files


def _record_batches(files: list[Path], fmt: str) -> Iterator[Any]:
    pa = _pyarrow()
    for name in files:
        try:
            if fmt == "parquet":
                yield from pa.parquet.ParquetFile(name).iter_batches(batch_size=_ROW_BATCH)
                continue
            with pa.memory_map(str(name)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:  # older datasets versions wrote the file format
                    reader = pa.ipc.open_file(source)
                    for i in range(reader.num_record_batches):
                        yield reader.get_batch(i)
                    continue
                yield from reader
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{name}: not a readable {fmt} file ({exc})") from None


def _row_count(files: list[Path], fmt: str) -> int:
    pa = _pyarrow()
    if fmt == "parquet":
        try:
            return pa.parquet.ParquetFile(files[0]).metadata.num_rows
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{files[0]}: not a readable Parquet file ({exc})") from None
    return 0  # Arrow streams carry no row count up front; the bar counts without a total


def open_input(path: str | Path) -> InputReader:
    """A reader for ``path``, its form chosen from the name (see the module docstring).

    Args:
        path: a ``.jsonl``/``.jsonl.gz``/``.parquet`` file or a ``save_to_disk`` directory.

    Returns:
        An :class:`InputReader` (nothing is read until it is iterated).

    Raises:
        ValueError: no such input, a ``DatasetDict`` directory, a directory that is not a
            ``save_to_disk`` dataset, or pyarrow missing for Parquet/Arrow. The message
            names the path.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))
            names = ", ".join(str(s) for s in splits.get("splits", []))
            raise ValueError(f"input {path} is a datasets DatasetDict (splits: {names}); "
                             f"give one split's directory, e.g. {path}/{names.split(', ')[0]}")
        if not (path / "state.json").is_file():
            raise ValueError(f"input {path}: is a directory, expected a file or a directory "
                             "written by datasets' save_to_disk (no state.json there)")
        files = _data_files(path, "datasets")
        return InputReader(path, "datasets", "rows", _row_count(files, "datasets"), 0)
    if not path.is_file():
        raise ValueError(f"input {path}: no such file or directory")
    name = path.name.lower()
    if name.endswith(".parquet"):
        return InputReader(path, "parquet", "rows", _row_count([path], "parquet"), 0)
    fmt = "jsonl.gz" if name.endswith(".gz") else "jsonl"
    return InputReader(path, fmt, "B", path.stat().st_size, 1)
