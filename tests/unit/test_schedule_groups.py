"""Micro-batch counts under virtual pipelining (trainer/schedule_groups.py) and the token
counts of the step metrics (step/batch.real_token_count), with a vocabulary whose id 0 is a
real token."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from adadpo_megatron.trainer.arguments import parse_config
from adadpo_megatron.trainer.config import ConfigError
from adadpo_megatron.trainer.schedule_groups import accepted_count, step_count_problem

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "data" / "pack"))

VPP = ["--data-path", "/data", "--train-iters", "10", "--num-layers", "4",
       "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]


def _valid_interleaved(m: int, group: int, pp: int) -> bool:
    """megatron-core 0.16's checks in forward_backward_pipelining_with_interleaving."""
    return group <= m and not (0 < m % group < pp)


@pytest.mark.parametrize("group, pp", [(2, 2), (4, 4), (3, 2), (4, 2), (5, 4)])
def test_accepted_count_is_the_smallest_count_the_schedule_takes(group, pp):
    for m in range(1, 20):
        got = accepted_count(m, group, pp)
        assert _valid_interleaved(got, group, pp), (m, got)
        assert all(not _valid_interleaved(k, group, pp) for k in range(m, got)), (m, got)


def test_training_step_count_checked_at_start_under_vpp():
    assert step_count_problem(4, 2, 2) is None and step_count_problem(3, 2, None) is None
    msg = step_count_problem(3, 2, 2)
    assert "3 micro-batches per step" in msg and "multiple of 2" in msg
    with pytest.raises(ConfigError, match="3 micro-batches per step"):
        parse_config([*VPP, "--global-batch-size", "3"], world_size=2)
    with pytest.raises(ConfigError, match="1 micro-batches per step"):
        parse_config([*VPP, "--global-batch-size", "1"], world_size=2)
    assert parse_config([*VPP, "--global-batch-size", "4"], world_size=2).training \
        .num_microbatches == 4
    # Without virtual stages any count runs (1F1B).
    parse_config([*VPP[:-2], "--global-batch-size", "3"], world_size=2)


def _id0_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer.json whose id 0 is the word "the" (as "!" is id 0 in GPT-2)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    words = "the cat sat on a mat dog ran far away".split()
    vocab = {"the": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return directory / "tokenizer.json"


@pytest.mark.parametrize("layout", [[], ["--prefix-sharing"]])
def test_token_metrics_count_id_0_as_a_real_token(tmp_path, layout):
    from pack_helpers import run_pack, write_jsonl

    from adadpo_megatron.data.packed_dataset import PackedPairDataset
    from adadpo_megatron.trainer.loop import _counts, collate_packs

    tok = _id0_tokenizer(tmp_path / "tok")
    rows = [{"prompt": "the cat sat on the mat", "chosen": " the dog ran",
             "rejected": " the cat ran far away the"},
            {"prompt": "a dog", "chosen": " sat on the mat", "rejected": " ran the"},
            {"prompt": "the the", "chosen": " the", "rejected": " cat"}]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    rc, out, meta, _ = run_pack(src, tmp_path / "data", tok, "--pack-size", "64", "--strict",
                                *layout)
    assert rc in (0, None) and meta is not None
    real = int(meta["real_tokens"])  # adadpo-pack's count: sum of the stored segment lengths
    # Segments padded to multiples of 4 and packs to 64 tokens: padding inside segments too.
    ds = PackedPairDataset(out, segment_multiple=4, pad_to=64)
    mbs = [collate_packs([ds[i] for i in range(len(ds))])] + [ds[i] for i in range(len(ds))]
    whole = _counts(mbs[:1], torch.device("cpu")).tolist()
    per_pack = _counts(mbs[1:], torch.device("cpu")).tolist()
    assert whole == per_pack == [3.0, float(real), 64.0 * len(ds)]
    old_rule = sum(int((mb["tokens"] != 0).sum()) for mb in mbs[1:])
    assert old_rule < real  # "the" (id 0) is dropped by a token-id rule


def test_real_token_count_padded_rows():
    from adadpo_megatron.step.batch import real_token_count

    mask = torch.zeros(2, 10)
    mask[0, 2:5] = 1  # a 6-token sequence: scored positions 2..4, EOS at 5
    mask[1, 0:1] = 1  # a 2-token sequence
    batch = {"tokens": torch.zeros(2, 10, dtype=torch.long), "loss_mask": mask}
    assert real_token_count(batch) == 8
