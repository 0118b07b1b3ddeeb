"""tools/make_example_data.py and the committed examples/data/ it produces."""

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
_spec = importlib.util.spec_from_file_location(
    "make_example_data", ROOT / "tools" / "make_example_data.py"
)
med = importlib.util.module_from_spec(_spec)
sys.modules["make_example_data"] = med
_spec.loader.exec_module(med)


def test_decode_dictd_number():
    assert med.decode_dictd_number("A") == 0
    assert med.decode_dictd_number("/") == 63
    assert med.decode_dictd_number("BdqM") == ((1 * 64 + 29) * 64 + 42) * 64 + 12
    with pytest.raises(ValueError, match="digit"):
        med.decode_dictd_number("a-b")


def test_pairs_are_true_continuations_and_their_shuffles():
    text = " ".join(f"w{i}" for i in range(40))
    pairs = med.make_pairs(
        [{"headword": "x", "text": text}],
        prompt_words=8,
        completion_words=16,
        min_completion_words=6,
        seed=0,
    )
    # 40 words: windows at 0 (8 + 16) and 24 (8 + 8).
    assert len(pairs) == 2
    rebuilt = "".join(p["prompt"] + p["chosen"] + " " for p in pairs).split()
    assert rebuilt == text.split()
    for p in pairs:
        assert p["chosen"].startswith(" ") and p["rejected"].startswith(" ")
        chosen, rejected = p["chosen"].split(), p["rejected"].split()
        assert Counter(chosen) == Counter(rejected)
        assert sum(a != b for a, b in zip(chosen, rejected, strict=True)) * 2 >= len(chosen)


def test_short_entries_split_in_the_middle_or_skipped():
    entry = {"headword": "x", "text": "a b c d e f g h i j k l"}
    (pair,) = med.make_pairs(
        [entry], prompt_words=8, completion_words=16, min_completion_words=6, seed=0
    )
    assert pair["prompt"] == "a b c d e f"
    assert pair["chosen"] == " g h i j k l"
    tiny = {"headword": "y", "text": "a b c d e"}
    assert (
        med.make_pairs([tiny], prompt_words=8, completion_words=16, min_completion_words=6, seed=0)
        == []
    )


def test_shuffle_gives_up_on_repeated_words():
    assert med.shuffle_words(["the"] * 6, random.Random(0)) is None


def _rows(name):
    return [json.loads(line) for line in (DATA / name).open(encoding="utf-8")]


def test_committed_pairs_are_well_formed_and_held_out():
    train, held_out = _rows("train.jsonl"), _rows("eval.jsonl")
    assert len(train) > 2000 and len(held_out) > 200
    for row in train + held_out:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] != row["rejected"]
        assert Counter(row["chosen"].split()) == Counter(row["rejected"].split())
    train_text = {r["prompt"] + r["chosen"] for r in train}
    assert not any(r["prompt"] + r["chosen"] in train_text for r in held_out)
    assert sum(p.stat().st_size for p in DATA.iterdir()) < 3 * 2**20


def test_regeneration_reproduces_the_committed_files(tmp_path):
    pytest.importorskip("sentencepiece")
    (tmp_path / med.SOURCE_NAME).write_bytes((DATA / med.SOURCE_NAME).read_bytes())
    assert med.main(["--output", str(tmp_path)]) == 0
    for name in ("train.jsonl", "eval.jsonl", "tokenizer.model"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), (
            f"examples/data/{name} is stale: run python tools/make_example_data.py"
        )
