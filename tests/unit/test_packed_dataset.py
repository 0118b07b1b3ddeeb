"""PackedPairDataset: THD micro-batches against a plain reference, padding, checks on load."""

import json
import os
import pickle
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "pack"))
from pack_helpers import write_jsonl, write_wordlevel_tokenizer  # noqa: E402

from adadpo_megatron.data.pack_tool import main as pack_main  # noqa: E402
from adadpo_megatron.data.packed_dataset import PackedDatasetError, PackedPairDataset  # noqa: E402

WORDS = list("abcdefghijklmnopqrstuvwxyz")


def wid(word: str) -> int:
    return 3 + WORDS.index(word)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    return write_wordlevel_tokenizer(d, WORDS, config={"bos_token": "<s>", "eos_token": "</s>"})


def pack(directory: Path, rows, tokenizer: Path, *flags: str) -> Path:
    src = write_jsonl(directory / "in.jsonl", rows)
    out = directory / "packed"
    assert pack_main([str(src), "-o", str(out), "--tokenizer", str(tokenizer), *flags]) == 0
    return out


def test_worked_example_of_the_thd_contract(tmp_path, tokenizer):
    # Pair 0: chosen 5 tokens, rejected 3; pair 1: 4 and 4 (no BOS/EOS, no padding).
    rows = [
        {"prompt": "a b", "chosen": " c d e", "rejected": " f"},
        {"prompt": "g", "chosen": " h i j", "rejected": " k l m"},
    ]
    ds = PackedPairDataset(
        pack(tmp_path, rows, tokenizer, "--pack-size", "16", "--no-bos", "--no-eos")
    )
    assert len(ds) == 1 and ds.num_pairs == 2
    b = ds[0]
    w = [wid(c) for c in "abcdeabfghijgklm"]
    assert b["tokens"].tolist() == w
    assert b["cu_seqlens"].tolist() == [0, 5, 8, 12, 16] and b["cu_seqlens"].dtype == torch.int32
    assert b["pair_index"].tolist() == [0, 0, 1, 1] and b["is_chosen"].tolist() == [
        True,
        False,
        True,
        False,
    ]
    assert b["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3]
    assert b["labels"].tolist() == w[1:5] + [0] + w[6:8] + [0] + w[9:12] + [0] + w[13:16] + [0]
    # The last prompt token predicts the first completion token; the last token predicts nothing.
    assert b["loss_mask"].tolist() == [0, 1, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0]
    assert b["max_seqlen"] == 5 and isinstance(b["max_seqlen"], int)
    assert (b["tokens"].dtype, b["labels"].dtype, b["position_ids"].dtype) == (torch.int64,) * 3
    assert b["loss_mask"].dtype == torch.float32 and b["is_chosen"].dtype == torch.bool


def test_eos_is_scored_and_bos_is_not(tmp_path, tokenizer):
    ds = PackedPairDataset(
        pack(
            tmp_path,
            [{"prompt": "a", "chosen": " b", "rejected": " c d"}],
            tokenizer,
            "--pack-size",
            "16",
        )
    )
    b = ds[0]
    assert b["tokens"].tolist()[:4] == [1, wid("a"), wid("b"), 2]
    assert b["loss_mask"].tolist()[:4] == [0, 1, 1, 0]  # labels: a, b, EOS, none
    assert ds.pair(0) == {
        "prompt": [1, wid("a")],
        "chosen": [wid("b"), 2],
        "rejected": [wid("c"), wid("d"), 2],
        "source_line": 1,
    }


def reference_batch(ds: PackedPairDataset, i: int, seg_mult: int, round_to: int, pad_to):
    """The THD dict of pack i built the obvious way from ds.pair(), one token at a time."""
    segments = []
    for j in ds.pairs_in_pack(i).tolist():
        p = ds.pair(j)
        for name in ("chosen", "rejected"):
            segments.append((j, name == "chosen", p["prompt"] + p[name], len(p["prompt"])))
    lengths = [-(-len(s) // seg_mult) * seg_mult for _, _, s, _ in segments]
    total = -(-sum(lengths) // round_to) * round_to
    if pad_to is not None:
        total = pad_to
    lengths[-1] += total - sum(lengths)
    tokens, pos, labels, mask, cu = [], [], [], [], [0]
    for (_, _, seq, prompt_len), length in zip(segments, lengths, strict=True):
        for t in range(length):
            tokens.append(seq[t] if t < len(seq) else 0)
            pos.append(t)
            has_label = t + 1 < len(seq)
            labels.append(seq[t + 1] if has_label else 0)
            mask.append(1.0 if has_label and t + 1 >= prompt_len else 0.0)
        cu.append(cu[-1] + length)
    return {
        "tokens": tokens,
        "position_ids": pos,
        "labels": labels,
        "loss_mask": mask,
        "cu_seqlens": cu,
        "max_seqlen": max(lengths),
        "pair_index": [j for j, _, _, _ in segments],
        "is_chosen": [c for _, c, _, _ in segments],
    }


@pytest.fixture(scope="module")
def random_dataset(tmp_path_factory, tokenizer) -> Path:
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = []
    for _ in range(60):
        prompt = words(rng.randint(1, 9))
        chosen, rejected = words(rng.randint(1, 12)), words(rng.randint(1, 12))
        rows.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected + " z"})
    d = tmp_path_factory.mktemp("random")
    return pack(d, rows, tokenizer, "--pack-size", "96", "--align", "4", "--algorithm", "bfd")


@pytest.mark.parametrize(
    ("seg_mult", "pack_mult", "pad_to"),
    [(1, 1, None), (4, 1, None), (4, 16, None), (2, 3, None), (4, 16, 128), (1, 1, 100)],
)
def test_packs_match_a_plain_reference(random_dataset, seg_mult, pack_mult, pad_to):
    ds = PackedPairDataset(
        random_dataset, segment_multiple=seg_mult, pack_multiple=pack_mult, pad_to=pad_to
    )
    round_to = np.lcm(seg_mult, pack_mult)
    seen = []
    for i in range(len(ds)):
        got, want = ds[i], reference_batch(ds, i, seg_mult, round_to, pad_to)
        for key, value in want.items():
            actual = got[key] if key == "max_seqlen" else got[key].tolist()
            assert actual == value, (i, key)
        seg = np.diff(want["cu_seqlens"])
        assert (seg % seg_mult == 0).all() and want["cu_seqlens"][-1] % pack_mult == 0
        assert ds.pack_lengths[i] == want["cu_seqlens"][-1]
        seen += want["pair_index"][::2]
    assert sorted(seen) == list(range(ds.num_pairs))


def test_pad_to_too_small_names_the_fix(random_dataset):
    with pytest.raises(PackedDatasetError, match="--align 4"):
        PackedPairDataset(random_dataset, segment_multiple=4, pad_to=8)
    with pytest.raises(ValueError, match="multiple of lcm"):
        PackedPairDataset(random_dataset, segment_multiple=4, pack_multiple=16, pad_to=120)
    with pytest.raises(ValueError, match="segment_multiple must be an integer >= 1"):
        PackedPairDataset(random_dataset, segment_multiple=0)


def test_indexing_and_pickling(random_dataset):
    ds = PackedPairDataset(random_dataset, segment_multiple=2)
    assert torch.equal(ds[-1]["tokens"], ds[len(ds) - 1]["tokens"])
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.pair(ds.num_pairs)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.segment_multiple == 2 and clone.fingerprint == ds.fingerprint
    for key in ("tokens", "loss_mask", "cu_seqlens"):
        assert torch.equal(clone[3][key], ds[3][key])
    assert len(pickle.dumps(ds)) < 2000  # workers re-open the files instead of copying arrays


def test_fingerprints_and_meta(random_dataset, tokenizer):
    from adadpo_megatron.data.tokenizer import load_tokenizer

    fp = load_tokenizer(tokenizer).fingerprint
    ds = PackedPairDataset(random_dataset, expected_fingerprint=fp)
    assert ds.meta["tokenizer"]["fingerprint"] == fp and len(ds.fingerprint) == 64
    assert ds.meta["pairs_packed"] == ds.num_pairs == 60
    ds.verify()
    with pytest.raises(PackedDatasetError, match="re-pack with the training tokenizer"):
        PackedPairDataset(random_dataset, expected_fingerprint="0" * 64)


def copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_load_time_checks_name_the_file(random_dataset, tmp_path):
    with pytest.raises(PackedDatasetError, match="meta.json not found"):
        PackedPairDataset(tmp_path / "nowhere")
    d = copy_dataset(random_dataset, tmp_path / "v2")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(PackedDatasetError, match=r"meta.json: format_version 2"):
        PackedPairDataset(d)
    d = copy_dataset(random_dataset, tmp_path / "npz")
    arrays = dict(np.load(d / "index.npz"))
    arrays["pair_order"] = arrays["pair_order"][:-1]
    np.savez(d / "index.npz", **arrays)
    with pytest.raises(PackedDatasetError, match=r"index.npz: pair_order has shape"):
        PackedPairDataset(d)
    del arrays["pair_order"]
    np.savez(d / "index.npz", **arrays)
    with pytest.raises(PackedDatasetError, match=r"index.npz: unreadable or incomplete"):
        PackedPairDataset(d)


def test_verify_detects_a_changed_token_file(random_dataset, tmp_path):
    d = copy_dataset(random_dataset, tmp_path / "bad")
    data = bytearray((d / "tokens.bin").read_bytes())
    data[10] ^= 1
    (d / "tokens.bin").write_bytes(bytes(data))
    with pytest.raises(PackedDatasetError, match=r"tokens.bin: sha256 differs"):
        PackedPairDataset(d).verify()


def test_a_truncated_token_file_is_refused_when_opened(random_dataset, tmp_path):
    d = copy_dataset(random_dataset, tmp_path / "short")
    size = (d / "tokens.bin").stat().st_size
    os.truncate(d / "tokens.bin", size - 2)  # one token short: found at open, not mid-step
    with pytest.raises(PackedDatasetError, match=rf"tokens.bin is {size - 2} bytes, tokens.idx needs {size} .* truncated"):
        PackedPairDataset(d)


@pytest.mark.parametrize("name", ["tokens.idx", "index.npz"])
def test_a_truncated_index_is_refused_naming_it(random_dataset, tmp_path, name):
    d = copy_dataset(random_dataset, tmp_path / "short")
    os.truncate(d / name, (d / name).stat().st_size // 2)
    with pytest.raises(PackedDatasetError, match=rf"{name}: unreadable or (truncated|incomplete)"):
        PackedPairDataset(d)
