"""adadpo-pack reads .jsonl.gz, Parquet and datasets' save_to_disk directories like JSONL.

Each test builds its small input files itself (pyarrow; ``datasets`` for save_to_disk).
"""

import gzip
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "pack"))
from pack_helpers import run_pack, sequences, write_jsonl, write_wordlevel_tokenizer  # noqa: E402

from adadpo_megatron.data.readers import open_input  # noqa: E402

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

WORDS = [*"abcdefghijklmnopqrstuvwxyz"]
FLAGS = ["--pack-size", "14", "--max-seq-len", "8", "--min-prompt-tokens", "7",
         "--chat-template", "plain"]

STANDARD = [  # (row, expected reject reason or None); every column a string (or null)
    ({"prompt": "a b", "chosen": " c d", "rejected": " e f"}, None),
    ({"prompt": "a", "chosen": None, "rejected": " b"}, "wrong_type"),
    ({"prompt": "a", "chosen": "  ", "rejected": " b"}, "empty_field"),
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, "identical_chosen_rejected"),
    ({"prompt": "g h", "chosen": " i", "rejected": " j k"}, None),
    ({"prompt": "a", "chosen": " zzz", "rejected": " yyy"}, "identical_tokens"),
    ({"prompt": "a b c d e f g", "chosen": " h", "rejected": " i"}, "prompt_too_long"),
    ({"prompt": "a b c", "chosen": " d e f", "rejected": " g h i"}, "exceeds_pack_size"),
]


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATIONAL = [  # TRL's implicit-prompt form: whole conversations, shared prefix = prompt
    ({"chosen": [msg("user", "a"), msg("assistant", "b")],
      "rejected": [msg("user", "a"), msg("assistant", "c")]}, None),
    ({"chosen": [msg("user", "a"), msg("user", "b")],
      "rejected": [msg("user", "a"), msg("assistant", "c")]}, "bad_role"),
    ({"chosen": [msg("user", "d"), msg("assistant", "e")],
      "rejected": [msg("user", "d"), msg("assistant", "e")]}, "identical_chosen_rejected"),
    ({"chosen": [msg("user", "f"), msg("assistant", "g h")],
      "rejected": [msg("user", "f"), msg("assistant", "i")]}, None),
]


@pytest.fixture
def tokenizer(tmp_path: Path) -> Path:
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    return write_wordlevel_tokenizer(tmp_path / "tok", [*WORDS, "User:", "Assistant:"],
                                     config=config)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # several row groups
    return path


def write_gz(path: Path, rows: list[dict]) -> Path:
    plain = write_jsonl(path.with_suffix(""), rows)
    path.write_bytes(gzip.compress(plain.read_bytes()))
    return path


def write_datasets(path: Path, rows: list[dict]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS = {"jsonl.gz": write_gz, "parquet": write_parquet, "datasets": write_datasets}
NAMES = {"jsonl.gz": "in.jsonl.gz", "parquet": "in.parquet", "datasets": "in_ds"}


def pack(tmp_path: Path, src: Path, tokenizer: Path, *extra: str, name: str):
    return run_pack(src, tmp_path / name, tokenizer, *FLAGS, *extra)


@pytest.mark.parametrize("form", ["standard", "conversational"])
@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_format_packs_like_jsonl_with_row_index_rejects(tmp_path, tokenizer, fmt, form):
    table = STANDARD if form == "standard" else CONVERSATIONAL
    rows = [r for r, _ in table]
    _, ref_out, ref_meta, ref_rejects = pack(
        tmp_path, write_jsonl(tmp_path / "ref.jsonl", rows), tokenizer, name="ref")
    src = WRITERS[fmt](tmp_path / NAMES[fmt], rows)
    rc, out, meta, rejects = pack(tmp_path, src, tokenizer, name="out")
    assert rc == 0 and meta["input"]["format"] == fmt
    base = 1 if fmt == "jsonl.gz" else 0  # JSONL counts lines from 1; rows are 0-based indices
    expected = [{"line": i + base, "reason": why} for i, (_, why) in enumerate(table) if why]
    assert [{"line": r["line"], "reason": r["reason"]} for r in rejects] == expected
    assert [r["reason"] for r in rejects] == [r["reason"] for r in ref_rejects]
    assert meta["lines_read"] == len(rows) == meta["pairs_packed"] + meta["lines_rejected"]
    assert meta["conversational_pairs"] == ref_meta["conversational_pairs"]
    assert sequences(out) == sequences(ref_out)  # same tokens as the JSONL form
    from adadpo_megatron.data.packed_dataset import PackedPairDataset

    ds = PackedPairDataset(out)
    good = [i + base for i, (_, why) in enumerate(table) if why is None]
    assert [ds.pair(j)["source_line"] for j in range(ds.num_pairs)] == good
    if fmt == "jsonl.gz":  # the digest is of the decompressed lines: same as the plain file
        assert meta["input"]["sha256"] == ref_meta["input"]["sha256"]


def test_strict_names_the_row(tmp_path, tokenizer, capsys):
    src = write_parquet(tmp_path / "in.parquet", [r for r, _ in STANDARD])
    rc, out, _, _ = pack(tmp_path, src, tokenizer, "--strict", name="out")
    assert rc == 1 and not out.exists()
    assert f"{src}: row 1: wrong_type" in capsys.readouterr().err


def test_missing_column_is_a_missing_field_per_row(tmp_path, tokenizer, capsys):
    rows = [{"prompt": "a", "chosen": " b"}, {"prompt": "c", "chosen": " d"}]
    src = write_parquet(tmp_path / "in.parquet", rows)
    rc, out, _, _ = pack(tmp_path, src, tokenizer, name="out")
    assert rc == 1 and not out.exists()  # nothing packed: nothing published, the message says why
    err = capsys.readouterr().err
    assert f"{src}:0: missing_field: no 'rejected' field" in err
    assert f"{src}:1: missing_field" in err


def test_bad_inputs_fail_with_the_path(tmp_path, tokenizer, capsys):
    datasets = pytest.importorskip("datasets")
    rows = [r for r, _ in STANDARD]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows)}).save_to_disk(str(dd))
    (tmp_path / "plain_dir").mkdir()
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all\n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    cases = {dd: "DatasetDict (splits: train, test)", tmp_path / "plain_dir": "no state.json",
             tmp_path / "bad.jsonl.gz": "cannot decompress",
             tmp_path / "bad.parquet": "not a readable Parquet file",
             tmp_path / "absent.parquet": "no such file"}
    for src, words in cases.items():
        rc, out, _, _ = pack(tmp_path, src, tokenizer, name="out")
        err = capsys.readouterr().err
        assert rc == 1 and not out.exists() and str(src) in err and words in err, err
        assert not list(tmp_path.glob("out.tmp-*"))
    # A split's directory is itself a dataset: it packs.
    rc, _, meta, _ = pack(tmp_path, dd / "train", tokenizer, name="split")
    assert rc == 0 and meta["lines_read"] == len(rows)


def test_reader_interface_yields_every_row_once(tmp_path):
    rows = [r for r, _ in STANDARD]
    reader = open_input(write_parquet(tmp_path / "in.parquet", rows))
    items = list(reader)
    assert [n for n, _ in items] == list(range(len(rows)))
    assert reader.total == reader.done == len(rows) and reader.unit == "rows"
