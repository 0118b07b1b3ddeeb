"""Regenerate the bundled preference set in ``examples/data/`` deterministically.

Source: *The Devil's Dictionary* by Ambrose Bierce (1911; public domain), as shipped
by Debian's ``dict-devil`` package (``/usr/share/dictd/devil.dict.dz`` and
``devil.index``). The entries are kept in ``examples/data/devils_dictionary.jsonl``
so that the set can be rebuilt without that package.

Each entry becomes one or more preference pairs: the prompt is a run of the entry's
words, ``chosen`` the words that truly follow, ``rejected`` the same words in a seeded
random order (a word-shuffled continuation: same words, broken word order). Entries
are split into train and eval *before* pairing, so held-out pairs are unseen text.
A sentencepiece model is trained on the train entries only.

Usage (from the repository root)::

    python tools/make_example_data.py                # rebuild from the committed entries
    python tools/make_example_data.py --dict /usr/share/dictd/devil.dict.dz
        # re-extract the entries from the Debian package first (apt-get install dict-devil)
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "examples" / "data"
SOURCE_NAME = "devils_dictionary.jsonl"

# dictd stores offsets and lengths in its own base-64 digits.
_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def decode_dictd_number(digits: str) -> int:
    """Decode a dictd index number (base 64, most significant digit first) to an int."""
    value = 0
    for ch in digits:
        pos = _DICTD_DIGITS.find(ch)
        if pos < 0:
            raise ValueError(f"invalid dictd base-64 digit {ch!r} in {digits!r}")
        value = value * 64 + pos
    return value


def extract_entries(dict_path: Path, index_path: Path) -> list[dict[str, str]]:
    """Read a dictd database (``.dict.dz`` or ``.dict`` plus ``.index``).

    Returns the entries in file order as ``{"headword", "text"}`` dicts, with dictd's
    own ``00database*`` header entries and duplicate offsets (aliases) dropped.
    """
    opener = gzip.open if dict_path.suffix == ".dz" else open
    with opener(dict_path, "rb") as f:
        blob = f.read()
    seen: set[int] = set()
    entries: list[tuple[int, dict[str, str]]] = []
    for lineno, line in enumerate(index_path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(
                f"{index_path}:{lineno}: expected 3 tab-separated fields, got {line!r}"
            )
        headword, offset_s, length_s = fields
        if headword.startswith("00database"):
            continue
        offset = decode_dictd_number(offset_s)
        if offset in seen:
            continue
        seen.add(offset)
        text = blob[offset : offset + decode_dictd_number(length_s)].decode("utf-8").strip()
        entries.append((offset, {"headword": headword, "text": text}))
    entries.sort(key=lambda item: item[0])
    return [entry for _, entry in entries]


def entry_words(text: str) -> list[str]:
    """Split an entry into words, dropping the ``_italic_`` underscores of the e-text."""
    return text.replace("_", "").split()


def unique_entries(entries: list[dict[str, str]]) -> list[dict[str, str]]:
    """``entries`` without those whose text repeats an earlier one's.

    The e-text holds two entries twice (PRECEDENT, PRECIPITATE); a duplicate could
    otherwise land in both splits and leak eval text into training.
    """
    seen: set[str] = set()
    out = []
    for entry in entries:
        if entry["text"] not in seen:
            seen.add(entry["text"])
            out.append(entry)
    return out


def split_entries(
    entries: list[dict[str, str]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Seeded split of whole entries into (train, eval), each kept in source order."""
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(entries) * eval_fraction)
    eval_ids = set(order[:n_eval])
    train = [e for i, e in enumerate(entries) if i not in eval_ids]
    held_out = [e for i, e in enumerate(entries) if i in eval_ids]
    return train, held_out


def shuffle_words(words: list[str], rng: random.Random, tries: int = 20) -> list[str] | None:
    """A seeded reordering of ``words`` that moves at least half of them.

    Returns None when no such reordering is found (e.g. repeated words only).
    """
    for _ in range(tries):
        out = list(words)
        rng.shuffle(out)
        if sum(a != b for a, b in zip(out, words, strict=True)) * 2 >= len(words):
            return out
    return None


def make_pairs(
    entries: list[dict[str, str]],
    *,
    prompt_words: int,
    completion_words: int,
    min_completion_words: int,
    seed: int,
) -> list[dict[str, str]]:
    """Cut each entry into (prompt, continuation) windows and build preference pairs.

    Windows of ``prompt_words + completion_words`` words tile the entry without
    overlap; a last window keeps a completion of at least ``min_completion_words``.
    An entry shorter than one window gives one pair split at its middle, when the
    completion is long enough. Returns ``{"prompt", "chosen", "rejected"}`` dicts.
    """
    rng = random.Random(seed)
    pairs: list[dict[str, str]] = []
    for entry in entries:
        words = entry_words(entry["text"])
        if len(words) < prompt_words + min_completion_words:
            cut = (len(words) + 1) // 2
            windows = [(words[:cut], words[cut:])]
        else:
            step = prompt_words + completion_words
            windows = [
                (words[i : i + prompt_words], words[i + prompt_words : i + step])
                for i in range(0, len(words), step)
            ]
        for prompt, completion in windows:
            if len(completion) < min_completion_words:
                continue
            rejected = shuffle_words(completion, rng)
            if rejected is None:
                continue
            # Completions start with the separating space: the pack tool tokenizes the
            # text prompt + completion as one string (TRL's convention).
            pairs.append(
                {
                    "prompt": " ".join(prompt),
                    "chosen": " " + " ".join(completion),
                    "rejected": " " + " ".join(rejected),
                }
            )
    return pairs


def train_tokenizer(texts: list[str], model_path: Path, vocab_size: int) -> None:
    """Train a sentencepiece BPE model on ``texts`` and write it to ``model_path``.

    One thread and no input sampling, so the same text gives the same model file.
    Ids: 0 <unk>, 1 <s>, 2 </s>, 3 <pad>; byte fallback keeps every character encodable.
    """
    import io

    import sentencepiece as spm

    # Training from an iterator into memory keeps temporary paths out of the model
    # file (the trainer spec records its input and prefix), so rebuilds are byte-equal.
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=3,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    model_path.write_bytes(buffer.getvalue())


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    """Write one JSON object per line (UTF-8, keys in insertion order)."""
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """Read a JSONL file written by :func:`write_jsonl`."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of this tool."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--output", type=Path, default=DATA_DIR, help="output directory (default: examples/data)"
    )
    p.add_argument(
        "--dict",
        type=Path,
        default=None,
        help="re-extract the entries from this dictd file (devil.dict.dz) first; "
        "its .index must sit beside it",
    )
    p.add_argument("--seed", type=int, default=1234, help="seed of the split and the shuffles")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of entries held out")
    p.add_argument("--prompt-words", type=int, default=8)
    p.add_argument("--completion-words", type=int, default=16)
    p.add_argument("--min-completion-words", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=1024)
    return p


def main(argv: list[str] | None = None) -> int:
    """Regenerate the source entries (optional), the train/eval pairs and the tokenizer."""
    args = build_parser().parse_args(argv)
    if not 0.0 < args.eval_fraction < 1.0:
        raise SystemExit(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    source = out / SOURCE_NAME
    if args.dict is not None:
        index = args.dict.with_name(args.dict.name.split(".")[0] + ".index")
        if not args.dict.is_file() or not index.is_file():
            raise SystemExit(
                f"--dict {args.dict}: need the file and {index} (apt-get install dict-devil)"
            )
        write_jsonl(source, extract_entries(args.dict, index))
    if not source.is_file():
        raise SystemExit(
            f"{source} is missing: pass --dict /usr/share/dictd/devil.dict.dz to extract it"
        )
    entries = unique_entries(read_jsonl(source))
    train, held_out = split_entries(entries, args.eval_fraction, args.seed)
    shape = {
        "prompt_words": args.prompt_words,
        "completion_words": args.completion_words,
        "min_completion_words": args.min_completion_words,
    }
    train_pairs = make_pairs(train, seed=args.seed, **shape)
    eval_pairs = make_pairs(held_out, seed=args.seed + 1, **shape)
    write_jsonl(out / "train.jsonl", train_pairs)
    write_jsonl(out / "eval.jsonl", eval_pairs)
    train_tokenizer(
        [" ".join(entry_words(e["text"])) for e in train], out / "tokenizer.model", args.vocab_size
    )
    print(
        f"{len(entries)} entries ({len(train)} train, {len(held_out)} eval) -> "
        f"{len(train_pairs)} train pairs, {len(eval_pairs)} eval pairs, "
        f"tokenizer vocab {args.vocab_size} in {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
