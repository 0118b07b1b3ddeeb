"""Tiny tokenizers and JSONL writers for the pack-tool and packed-dataset tests.

Everything is generated in the test's tmp directory: nothing is fetched, nothing large is
checked in. Imported by tests/unit/test_pack_tool.py and tests/unit/test_packed_dataset.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

SP_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france? the capital of france is paris.",
    "preference pairs are packed into fixed capacity sequences",
    "a chosen answer and a rejected answer share one prompt",
    "User: hello there\n\nAssistant: hi, how can I help you today?",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ?",
]


def train_sentencepiece(directory: Path, vocab_size: int = 400) -> Path:
    """Train a tiny byte-fallback BPE sentencepiece model (BOS 1, EOS 2) in about a second."""
    import sentencepiece as spm

    prefix = directory / "tiny_sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_CORPUS * 20),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",  # exact round trips, as Llama/Mistral models
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def write_wordlevel_tokenizer(
    directory: Path,
    words: list[str],
    config: dict[str, Any] | None = None,
    post_processor: bool = False,
) -> Path:
    """An HF tokenizer.json with one token per whitespace-separated word.

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then ``words`` in order. With ``config``, a
    ``tokenizer_config.json`` is written beside it (bos/eos, chat_template, ...). With
    ``post_processor``, a ``<s> $A </s>`` template (how HF files name BOS/EOS without a config).
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    if post_processor:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
        )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows (dicts as JSON, ``bytes`` verbatim, ``str`` encoded) one per line."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode("utf-8") + b"\n")
            else:
                f.write(json.dumps(row).encode("utf-8") + b"\n")
    return path


def mistral_sentencepiece_model() -> Path | None:
    """The Mistral-7B sentencepiece model shipped in the mistral-common wheel, if installed.

    Located without importing mistral_common (installed --no-deps, its imports may fail).
    """
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "tokenizer.model.v1"
    return path if path.is_file() else None


def run_pack(src: Path, out: Path, tokenizer: Path, *flags: str):
    """Run adadpo-pack on ``src`` into ``out``.

    Returns (exit code, ``out``, meta dict or None when nothing was published, the rejects
    as a list of dicts or None).
    """
    from adadpo_megatron.data import pack_tool

    rc = pack_tool.main([str(src), "--output", str(out), "--tokenizer", str(tokenizer), *flags])
    if not (out / "meta.json").is_file():
        return rc, out, None, None
    meta = json.loads((out / "meta.json").read_text())
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return rc, out, meta, rejects


def sequences(out: Path) -> list[list[int]]:
    """Every stored sequence of a packed dataset, read with megatron-core's own reader."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out / "tokens"))
    return [ds[k].tolist() for k in range(len(ds))]
