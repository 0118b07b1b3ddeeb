"""Hugging Face Hub datasets as ``adadpo-pack`` input: ``hf:NAME --split SPLIT``.

    adadpo-pack hf:HuggingFaceH4/ultrafeedback_binarized --split train_prefs \\
        [--subset NAME] [--revision REV] --output DIR --tokenizer ... --pack-size N

``NAME`` is what ``datasets.load_dataset`` takes: a Hub dataset id, or a local dataset
repository (a directory of data files, with or without a README's ``configs``).
``--split`` defaults to ``train`` (TRL's default), ``--subset`` is the configuration
(``load_dataset``'s ``name``), ``--revision`` a branch, tag or commit.

Rows are streamed (``as_streaming_dataset``: only the rows in flight are in memory); a
builder that cannot stream is prepared into the datasets cache and read memory-mapped.
Each row goes through the same validation as a file's rows (``records.parse_record``), so
the same rejects and counts apply; a reject's ``line`` is the row's 0-based index in the
split. ``meta.json``'s ``input`` records ``name``, ``subset``, ``split``, ``revision`` (as
given), ``fingerprint`` (the builder's hash: the Hub commit for a Hub dataset, a hash of the
data files for a local one) and ``sha256`` over the rows read (canonical JSON).

Offline (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) a Hub dataset is read from the
datasets cache where an earlier online run left it; a ``--revision`` is then checked
against the cached commit, since the cache cannot tell a branch or tag apart.
Every failure is one line naming the input or the flag.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adadpo_megatron.data.readers import InputReader, Item, _guarded
from adadpo_megatron.data.records import parse_record

__all__ = ["PREFIX", "HubOptions", "HubReader", "add_hub_args", "hub_options", "is_hub_input",
           "open_hub"]

PREFIX = "hf:"


@dataclass(frozen=True, kw_only=True)
class HubOptions:
    """``--split``, ``--subset`` and ``--revision`` of an ``hf:NAME`` input."""

    split: str = "train"
    subset: str | None = None
    revision: str | None = None


def is_hub_input(value: Any) -> bool:
    """Whether the positional input is ``hf:NAME``."""
    return str(value).startswith(PREFIX)


def add_hub_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--split``, ``--subset`` and ``--revision`` (for ``hf:NAME`` inputs)."""
    g = parser.add_argument_group("Hugging Face datasets (input hf:NAME)")
    g.add_argument("--split", default=None, help="the split to pack (default train)")
    g.add_argument("--subset", default=None, metavar="NAME",
                   help="the dataset's configuration (load_dataset's name)")
    g.add_argument("--revision", default=None, metavar="REV",
                   help="branch, tag or commit of the dataset repository")


def hub_options(args: argparse.Namespace) -> HubOptions | None:
    """The hub options of the command line (None for a file input).

    Raises ValueError naming the flag when one is given with a file input.
    """
    if not is_hub_input(args.input):
        for flag in ("split", "subset", "revision"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag} applies to hf:NAME inputs (Hugging Face datasets) "
                                 f"only; {args.input} is a file")
        return None
    return HubOptions(split=args.split or "train", subset=args.subset, revision=args.revision)


class HubReader(InputReader):
    """Rows of one split of a ``datasets`` dataset (see the module docstring)."""

    def __init__(self, name: str, opts: HubOptions, rows: Any, total: int,
                 fingerprint: str | None, streaming: bool) -> None:
        super().__init__(Path(name), "hf", "rows", total, 0)
        self.name, self.opts, self.fingerprint = name, opts, fingerprint
        self.streaming = streaming
        self._rows_source = rows

    def __iter__(self) -> Iterator[Item]:
        rows = iter(self._rows_source)
        index = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a broken file or connection, one line
                raise ValueError(f"{self.location(index)}: reading the dataset failed: "
                                 f"{type(exc).__name__}: {_one_line(exc)}") from None
            blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
            self._digest.update(blob.encode("utf-8", "surrogatepass") + b"\n")
            self.done = index + 1
            yield index, _guarded(parse_record, row, index)
            index += 1

    def location(self, line: int) -> str:
        """``hf:NAME [SPLIT]: row N`` (for error messages)."""
        return f"{PREFIX}{self.name} [{self.opts.split}]: row {line}"

    def describe(self) -> dict[str, Any]:
        """``meta.json``'s ``input`` record (complete once iterated)."""
        return {"path": f"{PREFIX}{self.name}", "format": self.format, "name": self.name,
                "subset": self.opts.subset, "split": self.opts.split,
                "revision": self.opts.revision, "fingerprint": self.fingerprint,
                "streaming": self.streaming, "sha256": self.sha256()}


def _where(name: str, opts: HubOptions) -> str:
    extra = "".join(f" {flag} {v}" for flag, v in (("--subset", opts.subset),
                                                   ("--revision", opts.revision)) if v)
    return f"input {PREFIX}{name}{extra}"


def _builder(name: str, opts: HubOptions) -> Any:
    try:
        import datasets
        from datasets import config
    except ImportError:
        raise ValueError("hf:NAME inputs need the datasets package: pip install datasets") \
            from None
    where = _where(name, opts)
    try:
        builder = datasets.load_dataset_builder(name, opts.subset, revision=opts.revision)
    except ConnectionError as exc:
        if config.HF_HUB_OFFLINE:
            raise ValueError(f"{where}: not in the local datasets cache "
                             f"({config.HF_DATASETS_CACHE}) and offline mode is on "
                             "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE): load it once online, or "
                             "give a local dataset directory") from None
        raise ValueError(f"{where}: cannot reach the Hugging Face Hub ({exc})") from None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as exc:
        raise ValueError(f"{where}: no such dataset on the Hub or locally, or no access to "
                         f"it ({_one_line(exc)})") from None
    except ValueError as exc:  # an unknown or a missing configuration, among others
        text = _one_line(exc)
        if opts.subset and ("BuilderConfig" in text or "config" in text.lower()):
            raise ValueError(f"--subset {opts.subset}: not a configuration of "
                             f"{PREFIX}{name} ({text})") from None
        if not opts.subset and "Config name is missing" in text:
            raise ValueError(f"{where} has several configurations: give --subset NAME "
                             f"({text})") from None
        raise ValueError(f"{where}: {text}") from None
    except Exception as exc:  # noqa: BLE001 - anything else from datasets, in one line
        raise ValueError(f"{where}: {type(exc).__name__}: {_one_line(exc)}") from None
    if opts.revision and type(builder).__name__ == "Cache":
        cached = str(builder.hash or "")
        if not cached.startswith(opts.revision):
            raise ValueError(f"--revision {opts.revision}: {PREFIX}{name} comes from the "
                             f"local cache (offline), which holds commit {cached}; the cache "
                             "cannot tell whether that is the revision asked for: give the "
                             "commit hash, or run online")
    return builder


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _splits(builder: Any) -> list[str]:
    splits = getattr(builder.info, "splits", None) or {}
    if splits:
        return list(splits)
    data_files = getattr(builder.config, "data_files", None) or {}
    return [str(s) for s in data_files]


def open_hub(name: str, opts: HubOptions | None) -> HubReader:
    """A reader of ``opts.split`` of the dataset ``name`` (the input without ``hf:``).

    Raises ValueError (one line, naming the input or flag): unknown dataset, not cached
    while offline, unknown subset, missing split, datasets not installed.
    """
    opts = opts or HubOptions()
    builder = _builder(name, opts)
    known = _splits(builder)
    if known and opts.split not in known:
        raise ValueError(f"--split {opts.split}: not a split of {PREFIX}{name} "
                         f"(splits: {', '.join(known)})")
    fingerprint = str(builder.hash) if getattr(builder, "hash", None) else None
    try:
        rows, streaming = builder.as_streaming_dataset(split=opts.split), True
    except NotImplementedError:
        builder.download_and_prepare()
        rows, streaming = builder.as_dataset(split=opts.split), False
    except ValueError as exc:  # "Bad split: ..." when the splits were not known up front
        raise ValueError(f"--split {opts.split}: {_one_line(exc)}") from None
    split_info = (getattr(builder.info, "splits", None) or {}).get(opts.split)
    total = int(getattr(split_info, "num_examples", 0) or 0)
    return HubReader(name, opts, rows, total, fingerprint, streaming)

