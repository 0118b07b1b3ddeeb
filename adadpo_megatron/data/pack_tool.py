"""``adadpo-pack``: preference JSONL in, packed dataset directory out.

    adadpo-pack INPUT.jsonl --output DIR --tokenizer PATH --pack-size N
        [--max-seq-len N] [--min-prompt-tokens N] [--algorithm ffd|first_fit_shuffle|bfd]
        [--seed S] [--align N] [--prefix-sharing] [--max-pairs-per-pack N]
        [--chat-template auto|tokenizer|none|chatml|llama3|plain|PATH]
        [--no-bos] [--no-eos] [--bos-token TEXT] [--eos-token TEXT] [--strict] [--overwrite]
    adadpo-pack hf:NAME [--split S] [--subset C] [--revision R] --output DIR ...  (data/hub.py)

Input forms: :mod:`adadpo_megatron.data.records` (rows) and :mod:`adadpo_megatron.data.readers`
(files: .jsonl, .jsonl.gz, .parquet, datasets' save_to_disk directories). BOS/EOS and
truncation rules: :mod:`adadpo_megatron.data.encode`. Chat templates: :mod:`adadpo_megatron.data.chat_template`.
Directory layout: :mod:`adadpo_megatron.data.packed_format`. Read it back with
:class:`adadpo_megatron.data.packed_dataset.PackedPairDataset`.

Every input line ends up either as a packed pair or as a line of ``rejects.jsonl`` (blank
lines too): ``lines_read == pairs_packed + lines_rejected`` is checked before anything is
written. ``--strict`` turns the first rejection into an error naming the file and line.
The directory is built as ``DIR.tmp-XXXX`` beside ``DIR`` and renamed into place at the end,
so an interrupted run never leaves a ``DIR`` that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adadpo_megatron.data.chat_template import TEMPLATE_CHOICES, resolve_chat_template
from adadpo_megatron.data.encode import EncodeConfig, NoChatTemplateError, PairEncoder
from adadpo_megatron.data.hub import add_hub_args, hub_options, is_hub_input, open_hub
from adadpo_megatron.data.packed_format import (
    DATA_FILES,
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    dataset_fingerprint,
    summary_line,
)
from adadpo_megatron.data.packed_writer import PackedWriter
from adadpo_megatron.data.prefix_layout import (
    SHARED_PREFIX_ARRAY,
    layout_meta,
    limit_pairs_per_pack,
    segment_skips,
)
from adadpo_megatron.data.readers import InputReader, open_input
from adadpo_megatron.data.records import PreferenceRecord, RecordRejected, printable
from adadpo_megatron.data.staging import (
    OWNER_FILE,
    clean_stale_staging,
    make_staging_dir,
    write_failed_line,
)
from adadpo_megatron.data.tokenizer import Tokenizer, file_sha256, load_tokenizer
from adadpo_megatron.packing import ALGORITHMS, footprints, pack_pairs
from adadpo_megatron.preflight import PathError, readable_file, writable_dir

__all__ = ["PackError", "PackOptions", "build_parser", "main", "pack_jsonl"]

_EPILOG = """\
sequences: each sequence is [BOS] + prompt + completion + [EOS]. The text prompt+completion is
  tokenized as one string; prompt tokens are never scored, completion tokens and the EOS are.
  BOS is added unless the text already starts with it (--no-bos: never); EOS is added unless
  the completion already ends with it (--no-eos: never).
truncation (only with --max-seq-len L, per sequence, BOS/EOS included): the prompt loses
  tokens from the left as needed but keeps at least --min-prompt-tokens (default L//2); then
  sequences still over L are cut from the right (EOS first, then completion tokens). A pair with
  no completion token left, or whose two sequences exceed --pack-size, is rejected.
chat templates apply to conversational lines (message lists) only; plain-string lines are
  used as is.
output: DIR/tokens.bin+.idx (megatron-core indexed dataset, one document per sequence),
  DIR/index.npz (pack plan, per-sequence prompt lengths, pair ids, roles, source lines),
  DIR/rejects.jsonl ({"line", "reason", "detail"}), DIR/meta.json.
"""


class PackError(Exception):
    """A user-facing failure of the pack tool (bad flag, bad file, --strict rejection)."""


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    """Everything one run needs; the CLI flags of the same names."""

    input: Path
    """Preference pairs: JSONL (.gz), Parquet or a save_to_disk directory (data/readers.py)."""
    output: Path
    """Directory to create."""
    tokenizer: Path
    """sentencepiece .model, HF tokenizer.json, or a directory holding one."""
    encode: EncodeConfig
    """Pack size, BOS/EOS, truncation and alignment."""
    algorithm: str = "ffd"
    """Packing algorithm (adadpo_megatron.packing.ALGORITHMS)."""
    seed: int = 0
    """Seed of first_fit_shuffle (recorded for all)."""
    chat_template: str = "auto"
    """--chat-template value."""
    bos_token: str | None = None
    """Override of the tokenizer's BOS token text."""
    eos_token: str | None = None
    """Override of the tokenizer's EOS token text."""
    strict: bool = False
    """Fail on the first rejected line instead of recording it."""
    overwrite: bool = False
    """Replace an existing packed dataset at ``output``."""
    progress: bool | None = None
    """tqdm progress bar; None: only when stderr is a terminal."""
    prefix_sharing: bool = False
    """--prefix-sharing: lay each pair out as [prompt | chosen | rejected] (data.prefix_layout)."""
    max_pairs_per_pack: int | None = None
    """--max-pairs-per-pack: at most this many pairs per pack (1: one pair per pack)."""
    hub: Any = None
    """--split/--subset/--revision of an hf:NAME input (data.hub.HubOptions)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``adadpo-pack`` argument parser."""
    p = argparse.ArgumentParser(
        prog="adadpo-pack",
        description="Tokenize, validate and pack preference pairs (JSONL) into a packed dataset.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        type=Path,
        help="preference pairs ({prompt, chosen, rejected}): .jsonl, .jsonl.gz, .parquet, a "
        "directory written by datasets' save_to_disk, or hf:NAME (a Hugging Face dataset)",
    )
    io = p.add_argument_group("input and output")
    io.add_argument("--output", "-o", type=Path, required=True, help="directory to create")
    io.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="sentencepiece .model, HF tokenizer.json, or a directory holding one",
    )
    io.add_argument("--overwrite", action="store_true", help="replace an existing packed dataset")
    io.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad line (default: record it in rejects.jsonl)",
    )
    tok = p.add_argument_group("sequences")
    tok.add_argument(
        "--chat-template",
        default="auto",
        metavar="NAME",
        help=f"one of {', '.join(TEMPLATE_CHOICES)}, or a .jinja file (default auto)",
    )
    tok.add_argument("--no-bos", dest="add_bos", action="store_false", help="do not prepend BOS")
    tok.add_argument("--no-eos", dest="add_eos", action="store_false", help="do not append EOS")
    tok.add_argument(
        "--bos-token", metavar="TEXT", help="BOS token text, overriding the tokenizer's"
    )
    tok.add_argument(
        "--eos-token", metavar="TEXT", help="EOS token text, overriding the tokenizer's"
    )
    tok.add_argument(
        "--max-seq-len",
        type=int,
        metavar="N",
        help="truncate each sequence to N tokens (default: no truncation)",
    )
    tok.add_argument(
        "--min-prompt-tokens",
        type=int,
        metavar="N",
        help="prompt tokens truncation keeps (default: max-seq-len // 2)",
    )
    pk = p.add_argument_group("packing")
    pk.add_argument(
        "--pack-size", type=int, required=True, metavar="N", help="token slots per pack"
    )
    pk.add_argument("--algorithm", choices=ALGORITHMS, default="ffd", help="default ffd")
    pk.add_argument("--seed", type=int, default=0, help="seed of first_fit_shuffle (default 0)")
    pk.add_argument(
        "--align",
        type=int,
        default=1,
        metavar="N",
        help="count each sequence rounded up to a multiple of N against --pack-size: "
        "set it to the trainer's segment padding (2*CP, times TP with sequence "
        "parallelism) so padded packs still fit (default 1)",
    )
    pk.add_argument(
        "--prefix-sharing",
        action="store_true",
        help="lay each pair out as [prompt | chosen | rejected]: the prompt runs through the "
        "model once, the rejected tokens attend to it (and keep their own positions); the "
        "packer counts P+C+R tokens a pair instead of 2P+C+R",
    )
    pk.add_argument(
        "--max-pairs-per-pack",
        type=int,
        metavar="N",
        help="at most N pairs per pack (1: one pair per pack, the padded baseline); "
        "fuller packs are split in order (default: no limit)",
    )
    add_hub_args(p)
    return p


def _options(args: argparse.Namespace) -> PackOptions:
    encode = EncodeConfig(
        capacity=args.pack_size,
        add_bos=args.add_bos,
        add_eos=args.add_eos,
        max_seq_len=args.max_seq_len,
        min_prompt_tokens=args.min_prompt_tokens,
        align=args.align,
    )
    return PackOptions(
        input=args.input,
        output=args.output,
        tokenizer=args.tokenizer,
        encode=encode,
        algorithm=args.algorithm,
        seed=args.seed,
        chat_template=args.chat_template,
        bos_token=args.bos_token,
        eos_token=args.eos_token,
        strict=args.strict,
        overwrite=args.overwrite,
        prefix_sharing=args.prefix_sharing,
        max_pairs_per_pack=args.max_pairs_per_pack,
        hub=hub_options(args),
    )


def _progress(opts: PackOptions, reader: InputReader) -> Any:
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if opts.progress is None else opts.progress
    return tqdm(
        total=reader.total or None,
        unit=reader.unit,
        unit_scale=True,
        desc="adadpo-pack",
        disable=not enabled,
        file=sys.stderr,
    )


_CHUNK_LINES = 1024  # lines tokenized per batch call (the tokenizers use all cores on a batch)


def _read_input(
    opts: PackOptions, reader: InputReader, encoder: PairEncoder, writer: PackedWriter
) -> dict[str, Any]:
    """Pass over the input: every line (row) becomes a pair or a reject. Returns input facts."""
    lines_read = 0
    facts = {"conversational_pairs": 0}
    chunk: list[tuple[int, PreferenceRecord | RecordRejected]] = []
    with _progress(opts, reader) as bar:
        for item in reader:
            lines_read += 1
            bar.update(reader.done - bar.n)
            chunk.append(item)
            if len(chunk) == _CHUNK_LINES:
                _flush(chunk, opts, reader, encoder, writer, facts)
        _flush(chunk, opts, reader, encoder, writer, facts)
    return {"lines_read": lines_read, "input": reader.describe(), **facts}


def _flush(
    chunk: list[tuple[int, PreferenceRecord | RecordRejected]],
    opts: PackOptions,
    reader: InputReader,
    encoder: PairEncoder,
    writer: PackedWriter,
    facts: dict[str, int],
) -> None:
    """Tokenize a chunk of parsed lines and record each outcome in line order; empties it."""
    records = [item for _, item in chunk if isinstance(item, PreferenceRecord)]
    encoded = iter(encoder.encode_many(records))
    for number, item in chunk:
        outcome = next(encoded) if isinstance(item, PreferenceRecord) else item
        if isinstance(outcome, NoChatTemplateError):  # a reject too: no line stops the run
            outcome = RecordRejected("chat_template", str(outcome))
        if isinstance(outcome, RecordRejected):
            if opts.strict:
                raise PackError(
                    f"{reader.location(number)}: {outcome.reason}: {printable(outcome.detail)} "
                    "(--strict stops at the first bad line; without it the line goes to "
                    "rejects.jsonl)"
                )
            writer.reject(number, outcome)
            continue
        facts["conversational_pairs"] += int(item.conversational)  # type: ignore[union-attr]
        writer.add(outcome, number)
    chunk.clear()


def _write_index(directory: Path, writer: PackedWriter, opts: PackOptions) -> dict[str, Any]:
    """Pack, write index.npz; return the packing facts for meta.json."""
    lengths = np.asarray(writer.lengths, dtype=np.int64).reshape(-1, 2)
    cfg = opts.encode
    shared = np.asarray(writer.shared_lens, dtype=np.int64) if opts.prefix_sharing else None
    seg_lens = lengths - segment_skips(shared, writer.num_pairs).reshape(-1, 2)
    plan = pack_pairs(
        seg_lens[:, 0],
        seg_lens[:, 1],
        cfg.capacity,
        algorithm=opts.algorithm,
        seed=opts.seed,
        align=cfg.align,
    )
    if opts.max_pairs_per_pack is not None:
        plan = limit_pairs_per_pack(
            plan, opts.max_pairs_per_pack, footprints(seg_lens[:, 0], seg_lens[:, 1], cfg.align)
        )
    n = writer.num_pairs
    extra = {} if shared is None else {SHARED_PREFIX_ARRAY: shared}
    np.savez(
        directory / INDEX_FILE,
        pack_offsets=plan.pack_offsets,
        pair_order=plan.pair_order,
        pack_of_pair=plan.pack_of_pair,
        pack_tokens=plan.pack_tokens,
        seq_prompt_len=np.asarray(writer.prompt_lens, dtype=np.int64),
        seq_pair_id=np.repeat(np.arange(n, dtype=np.int64), 2),
        seq_is_chosen=np.tile(np.array([True, False]), n),
        pair_source_line=np.asarray(writer.source_lines, dtype=np.int64),
        **extra,
    )
    real_tokens = int(seg_lens.sum())
    return {
        "num_packs": plan.num_packs,
        "real_tokens": real_tokens,
        "efficiency": plan.efficiency(real_tokens),
        "packs_lower_bound": math.ceil(real_tokens / cfg.capacity),
    }


def _meta(
    opts: PackOptions, tok: Tokenizer, writer: PackedWriter, facts: dict[str, Any], template: Any
) -> dict[str, Any]:
    cfg = opts.encode
    return {
        "format_version": FORMAT_VERSION,
        "created_by": "adadpo-pack",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": facts.pop("input"),
        "tokenizer": {
            "kind": tok.kind,
            "path": str(tok.path.resolve()),
            "fingerprint": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
        },
        "token_dtype": writer.dtype.name,
        "add_bos": cfg.add_bos,
        "add_eos": cfg.add_eos,
        "chat_template": None
        if template is None
        else {"name": template.name, "sha256": template.sha256},
        "max_seq_len": cfg.max_seq_len,
        "min_prompt_tokens": cfg.min_prompt_tokens,
        "capacity": cfg.capacity,
        "align": cfg.align,
        "algorithm": opts.algorithm,
        "seed": opts.seed,
        "layout": layout_meta(opts.prefix_sharing, opts.max_pairs_per_pack),
        "pairs_packed": writer.num_pairs,
        "lines_rejected": writer.reasons.total(),
        "rejects_by_reason": dict(sorted(writer.reasons.items())),
        "prompts_truncated": writer.prompts_truncated,
        "completions_truncated": writer.completions_truncated,
        **facts,
    }


def _check_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise PackError(f"--output {out} exists; pass --overwrite to replace it")
    if not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file()):
        raise PackError(
            f"--output {out} exists and is not a packed dataset (no {META_FILE}); "
            "--overwrite only replaces packed datasets or empty directories: remove it yourself"
        )


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` directory to ``out`` (replacing an old dataset if allowed)."""
    _check_output(out, overwrite)
    if out.exists():
        old = make_staging_dir(out, "old")
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def pack_jsonl(opts: PackOptions) -> dict[str, Any]:
    """Run the whole tool: read, validate, tokenize, pack and write ``opts.output``.

    Returns:
        The ``meta.json`` contents (a dict).

    Raises:
        PackError: any user-facing failure (bad flag or file, --strict rejection, existing
            output). Nothing is left at ``opts.output`` then, nor any temporary directory.
    """
    out = opts.output
    hub = is_hub_input(opts.input)
    if not hub and not Path(opts.input).is_dir():  # a directory: open_input checks it
        readable_file(opts.input, "input")
    if not Path(opts.tokenizer).is_dir():
        readable_file(opts.tokenizer, "--tokenizer")
    _check_output(out, opts.overwrite)
    try:
        writable_dir(out.parent)
    except PathError as exc:
        raise PackError(f"--output {out}: {exc}") from None
    try:
        reader = open_hub(str(opts.input)[3:], opts.hub) if hub else open_input(opts.input)
        tok = load_tokenizer(opts.tokenizer, bos_token=opts.bos_token, eos_token=opts.eos_token)
        template = resolve_chat_template(opts.chat_template, tok)
        encoder = PairEncoder(tok, template, opts.encode)
    except (OSError, ValueError, ImportError) as exc:
        raise PackError(str(exc)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    for note in clean_stale_staging(out):
        print(f"adadpo-pack: {note}", file=sys.stderr)
    tmp = make_staging_dir(out)
    writer: PackedWriter | None = None
    try:
        writer = PackedWriter(tmp, tok)
        facts = _read_input(opts, reader, encoder, writer)
        if facts["lines_read"] != writer.num_pairs + writer.reasons.total():
            raise RuntimeError(
                f"internal error: {facts['lines_read']} lines read != {writer.num_pairs} packed "
                f"+ {writer.reasons.total()} rejected"
            )
        if writer.num_pairs == 0:
            raise PackError(writer.nothing_packed(opts.input, opts.output, facts["lines_read"]))
        writer.close(tmp)
        (tmp / OWNER_FILE).unlink()
        facts.update(_write_index(tmp, writer, opts))
        meta = _meta(opts, tok, writer, facts, template)
        meta["files"] = {name: file_sha256(tmp / name) for name in DATA_FILES}
        meta["dataset_fingerprint"] = dataset_fingerprint(meta["files"], tok.fingerprint)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, out, opts.overwrite)
    except BaseException as exc:
        if writer is not None and not writer.rejects.closed:
            # A full disk fails the final flush too: the staging directory goes anyway.
            with contextlib.suppress(OSError):
                writer.close(None)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk: one line, the old dataset kept
            raise PackError(write_failed_line(exc, out, tmp)) from None
        raise
    return meta


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``adadpo-pack``; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.seed < 2**64:
        parser.error(f"--seed must be in [0, 2^64), got {args.seed}")
    if args.max_pairs_per_pack is not None and args.max_pairs_per_pack < 1:
        parser.error(f"--max-pairs-per-pack must be >= 1, got {args.max_pairs_per_pack}")
    start = time.perf_counter()
    try:
        opts = _options(args)
        meta = pack_jsonl(opts)
    except (PackError, ValueError, OSError) as exc:  # PathError is a ValueError
        print(f"adadpo-pack: error: {exc}", file=sys.stderr)
        return 1
    print(summary_line(meta, opts.output, time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
