"""adadpo-pack --prefix-sharing / --max-pairs-per-pack and the layout PackedPairDataset reads.

Every shared pack is checked against the unshared dataset packed from the same lines: the
shared prefix followed by the rejected segment must be, token for token, the unshared
rejected sequence, with the same positions, labels and loss mask.
"""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "pack"))
from pack_helpers import write_jsonl, write_wordlevel_tokenizer  # noqa: E402

from adadpo_megatron.data.pack_tool import main as pack_main  # noqa: E402
from adadpo_megatron.data.packed_dataset import PackedDatasetError, PackedPairDataset  # noqa: E402
from adadpo_megatron.data.prefix_layout import (  # noqa: E402
    limit_pairs_per_pack,
    shared_prefix_len,
)
from adadpo_megatron.packing import footprints, pack_pairs  # noqa: E402

WORDS = list("abcdefghijklmnopqrstuvwxyz")


def wid(word: str) -> int:
    return 3 + WORDS.index(word)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    return write_wordlevel_tokenizer(d, WORDS, config={"bos_token": "<s>", "eos_token": "</s>"})


def pack(directory: Path, rows, tokenizer: Path, *flags: str, name: str = "packed") -> Path:
    src = write_jsonl(directory / f"{name}.jsonl", rows)
    out = directory / name
    assert pack_main([str(src), "-o", str(out), "--tokenizer", str(tokenizer), *flags]) == 0
    return out


def random_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = []
    for _ in range(n):
        chosen, rejected = words(rng.randint(1, 6)), words(rng.randint(1, 6))
        if chosen == rejected:
            rejected += " z"
        rows.append({"prompt": words(rng.randint(1, 9)), "chosen": " " + chosen,
                     "rejected": " " + rejected})
    return rows


def test_worked_example(tmp_path, tokenizer):
    # The README / module docstring example: prompt BOS a b, chosen c EOS, rejected d e EOS.
    rows = [{"prompt": "a b", "chosen": " c", "rejected": " d e"}]
    ds = PackedPairDataset(pack(tmp_path, rows, tokenizer, "--pack-size", "16",
                                "--prefix-sharing"))
    b = ds[0]
    a, bb, c, d, e = (wid(x) for x in "abcde")
    assert b["tokens"].tolist() == [1, a, bb, c, 2, bb, d, e, 2]
    assert b["position_ids"].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5]
    assert b["labels"].tolist() == [a, bb, c, 2, 0, d, e, 2, 0]
    assert b["loss_mask"].tolist() == [0, 0, 1, 1, 0, 1, 1, 1, 0]
    assert b["cu_seqlens"].tolist() == [0, 5, 9]
    assert b["shared_prefix_len"].tolist() == [0, 2]
    meta = json.loads((tmp_path / "packed" / "meta.json").read_text())
    assert meta["layout"] == {"kind": "prefix_shared", "max_pairs_per_pack": None}
    assert meta["real_tokens"] == 9  # P + C + R + 1 = 3 + 2 + 3 + 1 (unshared 2P + C + R = 11)


@pytest.mark.parametrize("segment_multiple", [1, 4])
def test_shared_packs_reconstruct_the_unshared_sequences(tmp_path, tokenizer, segment_multiple):
    rows = random_rows(40, seed=segment_multiple)
    flags = ("--pack-size", "64", "--align", str(segment_multiple))
    plain = PackedPairDataset(pack(tmp_path, rows, tokenizer, *flags, name="plain"),
                              segment_multiple=segment_multiple)
    shared = PackedPairDataset(
        pack(tmp_path, rows, tokenizer, *flags, "--prefix-sharing", name="shared"),
        segment_multiple=segment_multiple)
    assert shared.prefix_shared and not plain.prefix_shared
    assert "shared_prefix_len" not in plain[0]
    ref = {}  # (pair, chosen?) -> (tokens, positions, labels, loss_mask) of the unshared run
    for i in range(len(plain)):
        b = plain[i]
        cu = b["cu_seqlens"].tolist()
        for k in range(len(cu) - 1):
            sl = slice(cu[k], cu[k + 1])
            ref[(int(b["pair_index"][k]), bool(b["is_chosen"][k]))] = tuple(
                b[key][sl].tolist() for key in ("tokens", "position_ids", "labels", "loss_mask"))
    seen, total_shared, total_plain = set(), 0, 0
    for i in range(len(shared)):
        b = shared[i]
        cu, spl = b["cu_seqlens"].tolist(), b["shared_prefix_len"].tolist()
        assert cu[-1] % segment_multiple == 0
        for k in range(0, len(cu) - 1, 2):
            pair = int(b["pair_index"][k])
            seen.add(pair)
            c_sl, r_sl, s = slice(cu[k], cu[k + 1]), slice(cu[k + 1], cu[k + 2]), spl[k + 1]
            assert spl[k] == 0 and s > 0
            got_c = tuple(b[key][c_sl].tolist()
                          for key in ("tokens", "position_ids", "labels", "loss_mask"))
            assert got_c == ref[(pair, True)]
            want = ref[(pair, False)]
            toks = b["tokens"][c_sl][:s].tolist() + b["tokens"][r_sl].tolist()
            # The unshared rejected segment may carry other padding: compare the real part.
            real = len(pair_sequence(shared, pair, chosen=False))
            assert toks[:real] == want[0][:real]
            pos = b["position_ids"][r_sl].tolist()
            assert pos == list(range(s, s + len(pos)))
            assert b["labels"][r_sl].tolist()[: real - s] == want[2][s:real]
            assert b["loss_mask"][r_sl].tolist()[: real - s] == want[3][s:real]
            assert sum(want[3]) == sum(b["loss_mask"][r_sl].tolist()) > 0
        total_shared += cu[-1]
    for i in range(len(plain)):
        total_plain += int(plain[i]["cu_seqlens"][-1])
    assert seen == set(range(len(rows)))
    assert total_shared < total_plain


def pair_sequence(ds: PackedPairDataset, j: int, chosen: bool) -> list[int]:
    p = ds.pair(j)
    return p["prompt"] + (p["chosen"] if chosen else p["rejected"])


def test_shared_prefix_len_rules():
    # Unscored in both and equal in both: min(lcp, pl_c - 1, pl_r - 1).
    assert shared_prefix_len(np.array([1, 5, 6, 7]), np.array([1, 5, 6, 8, 9]), 3, 3) == 2
    assert shared_prefix_len(np.array([1, 5, 6, 7]), np.array([1, 5, 9, 8]), 3, 3) == 2
    assert shared_prefix_len(np.array([1, 5, 6, 7]), np.array([1, 4, 6, 8]), 3, 3) == 1
    assert shared_prefix_len(np.array([1, 5, 6, 7]), np.array([1, 5, 6, 7, 9]), 3, 2) == 1
    assert shared_prefix_len(np.array([4, 5]), np.array([1, 5]), 1, 1) == 0


def test_max_pairs_per_pack(tmp_path, tokenizer):
    rows = random_rows(30, seed=3)
    one = PackedPairDataset(pack(tmp_path, rows, tokenizer, "--pack-size", "64",
                                 "--max-pairs-per-pack", "1", name="one"))
    assert len(one) == 30 and all(one[i]["is_chosen"].numel() == 2 for i in range(30))
    three = PackedPairDataset(pack(tmp_path, rows, tokenizer, "--pack-size", "64",
                                   "--prefix-sharing", "--max-pairs-per-pack", "3", name="three"))
    counts = [len(three.pairs_in_pack(i)) for i in range(len(three))]
    assert max(counts) == 3 and sum(counts) == 30
    assert json.loads((tmp_path / "three" / "meta.json").read_text())["layout"][
        "max_pairs_per_pack"] == 3


def test_limit_pairs_per_pack_keeps_a_valid_plan():
    rng = np.random.default_rng(0)
    c, r = rng.integers(1, 20, 200), rng.integers(1, 20, 200)
    plan = pack_pairs(c, r, 100, align=2)
    for k in (1, 2, 5, 1000):
        new = limit_pairs_per_pack(plan, k, footprints(c, r, 2))
        new.validate(c, r)
        assert int(new.pairs_per_pack().max()) <= k
        assert np.array_equal(new.pair_order, plan.pair_order)
    assert limit_pairs_per_pack(plan, 1000, footprints(c, r, 2)).num_packs == plan.num_packs
    with pytest.raises(ValueError, match="--max-pairs-per-pack"):
        limit_pairs_per_pack(plan, 0, footprints(c, r, 2))


def test_bad_flag_and_corrupt_layout(tmp_path, tokenizer, capsys):
    rows = random_rows(4, seed=5)
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(SystemExit):
        pack_main([str(src), "-o", str(tmp_path / "x"), "--tokenizer", str(tokenizer),
                   "--pack-size", "64", "--max-pairs-per-pack", "0"])
    assert "--max-pairs-per-pack must be >= 1" in capsys.readouterr().err
    out = pack(tmp_path, rows, tokenizer, "--pack-size", "64", "--prefix-sharing")
    with np.load(out / "index.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays.pop("pair_shared_prefix_len")
    np.savez(out / "index.npz", **arrays)
    with pytest.raises(PackedDatasetError, match="pair_shared_prefix_len missing"):
        PackedPairDataset(out)


def test_megatron_lm_entry_reads_the_layout(tmp_path, tokenizer):
    import argparse

    from adadpo_megatron.integrations.megatron_lm import gpt_options_from_args

    rows = random_rows(4, seed=6)
    shared = pack(tmp_path, rows, tokenizer, "--pack-size", "64", "--prefix-sharing",
                  name="shared")
    plain = pack(tmp_path, rows, tokenizer, "--pack-size", "64", name="plain")

    def args(path, cp=1):
        return argparse.Namespace(
            data_path=[str(path)], context_parallel_size=cp, position_embedding_type="rope",
            untie_embeddings_and_output_weights=True)

    assert gpt_options_from_args(args(shared)).prefix_attention == "mask"
    assert gpt_options_from_args(args(plain)).prefix_attention is None
    with pytest.raises(ValueError, match="--context-parallel-size 1"):
        gpt_options_from_args(args(shared, cp=2))


def test_prefix_attention_flag(tmp_path, tokenizer):
    import types

    from adadpo_megatron.train import prefix_attention_for
    from adadpo_megatron.trainer.arguments import parse_config
    from adadpo_megatron.trainer.config import ConfigError

    base = ["--data-path", "/d", "--train-iters", "1", "--device", "cpu"]
    with pytest.raises(ConfigError, match="--prefix-attention flex needs a GPU"):
        parse_config([*base, "--prefix-attention", "flex"], world_size=1)
    cfg = parse_config(base, world_size=1)
    assert cfg.parallel.prefix_attention == "auto"
    shared, plain = types.SimpleNamespace(prefix_shared=True), types.SimpleNamespace(
        prefix_shared=False)
    assert prefix_attention_for(cfg, plain, None) is None
    assert prefix_attention_for(cfg, plain, shared) == "mask"  # eval data shared: needed too
    mask = parse_config([*base, "--prefix-attention", "mask"], world_size=1)
    assert prefix_attention_for(mask, shared) == "mask"
    import dataclasses

    gpu_flex = dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, device="cuda", prefix_attention="flex"),
        training=dataclasses.replace(cfg.training, recompute_granularity="selective"))
    with pytest.raises(ConfigError, match="--recompute-granularity selective"):
        prefix_attention_for(gpu_flex, shared)
    assert prefix_attention_for(gpu_flex, plain) is None
