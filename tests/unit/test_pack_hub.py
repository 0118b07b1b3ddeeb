"""adadpo-pack hf:NAME: Hugging Face datasets through datasets.load_dataset, offline.

No network: every run is in a fresh process (tests/data/pack/hub_driver.py) with
``HF_DATASETS_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` and ``HF_HOME`` in the test's tmp
directory. Two sources, both made here:

* a local dataset repository (data files plus a README declaring the splits, as
  HuggingFaceH4/ultrafeedback_binarized's does): ``hf:/path/to/repo``;
* a Hub dataset put in the datasets cache as an online load leaves it:
  ``hf:testorg/prefs``, read back from the cache (offline mode).

Each packs like the same rows as JSONL: same sequences, same rejects (with the row index),
same counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pack_readers import FLAGS, STANDARD, WORDS, msg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "pack"))
from pack_helpers import sequences, write_jsonl, write_wordlevel_tokenizer  # noqa: E402

pytest.importorskip("datasets")

DRIVER = Path(__file__).resolve().parents[1] / "data" / "pack" / "hub_driver.py"
REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
README = """---
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: data/train_prefs-*
  - split: test_prefs
    path: data/test_prefs-*
---
"""
MULTI_README = """---
configs:
- config_name: a
  data_files:
  - split: train
    path: a/*.jsonl
- config_name: b
  data_files:
  - split: train
    path: b/*.jsonl
---
"""
# UltraFeedback-binarized's form: a string prompt, chosen/rejected whole conversations
# (every row has every column, as in any datasets table).
ULTRAFEEDBACK = [
    ({"prompt": "a", "chosen": [msg("user", "a"), msg("assistant", "c d")],
      "rejected": [msg("user", "a"), msg("assistant", "e")], "score_chosen": 8.0}, None),
    ({"prompt": "f", "chosen": [msg("user", "f"), msg("assistant", "g")],
      "rejected": [msg("user", "f"), msg("assistant", "g")], "score_chosen": 2.0},
     "identical_chosen_rejected"),
    ({"prompt": "h", "chosen": [msg("user", "h"), msg("user", "i")],
      "rejected": [msg("user", "h"), msg("assistant", "j")], "score_chosen": 1.0}, "bad_role"),
    ({"prompt": "k", "chosen": [msg("user", "k"), msg("assistant", "l m")],
      "rejected": [msg("user", "k"), msg("assistant", "n")], "score_chosen": 9.5}, None),
]

def _expected_rejects(table) -> list[dict]:
    return [{"line": i, "reason": why} for i, (_, why) in enumerate(table) if why]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("hub")
    tok = write_wordlevel_tokenizer(tmp / "tok", [*WORDS, "User:", "Assistant:"],
                                    config={"bos_token": "<s>", "eos_token": "</s>"})
    repo = tmp / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(README)
    standard = [r for r, _ in STANDARD]
    write_jsonl(repo / "data" / "train_prefs-00000-of-00001.jsonl", standard)
    write_jsonl(repo / "data" / "test_prefs-00000-of-00001.jsonl", standard[:2])
    conv = write_jsonl(tmp / "ultrafeedback.jsonl", [r for r, _ in ULTRAFEEDBACK])
    # A repository with two configurations (subsets), "a" and "b", one split each.
    multi = tmp / "multi"
    for sub, rows in (("a", standard[:1]), ("b", standard)):
        (multi / sub).mkdir(parents=True)
        write_jsonl(multi / sub / "train.jsonl", rows)
    (multi / "README.md").write_text(MULTI_README)
    common = ["--tokenizer", str(tok), *FLAGS]
    hub = "hf:testorg/prefs"

    def out(name: str) -> list[str]:
        return ["--output", str(tmp / name)]

    cases = {"cache": {"name": "testorg/prefs", "commit": COMMIT,
                       "files": {"train_prefs": str(conv), "test_prefs": str(conv)}},
             "runs": {
        "ref_standard": [str(repo / "data" / "train_prefs-00000-of-00001.jsonl"),
                         *out("ref_standard"), *common],
        "ref_conv": [str(conv), *out("ref_conv"), *common],
        "local": [f"hf:{repo}", "--split", "train_prefs", *out("local"), *common],
        "cached": [hub, "--split", "train_prefs", *out("cached"), *common],
        "cached_commit": [hub, "--split", "train_prefs", "--revision", COMMIT[:12],
                          *out("cached_commit"), *common],
        "strict": [hub, "--split", "train_prefs", "--strict", *out("strict"), *common],
        "bad_split": [hub, "--split", "nope", *out("x"), *common],
        "default_split": [hub, *out("x"), *common],
        "bad_subset": [hub, "--split", "train_prefs", "--subset", "other", *out("x"), *common],
        "bad_revision": [hub, "--split", "train_prefs", "--revision", "v2", *out("x"), *common],
        "not_cached": ["hf:nobody/absent", "--split", "train", *out("x"), *common],
        "subset_b": [f"hf:{multi}", "--subset", "b", *out("subset_b"), *common],
        "no_subset": [f"hf:{multi}", *out("x"), *common],
        "no_such_dir": [f"hf:{tmp}/no/such/repo", *out("x"), *common],
        "file_with_split": [str(conv), "--split", "train", *out("x"), *common],
    }}
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "HF_HOME": str(tmp / "hf_home"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("HF_HUB_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(DRIVER), str(tmp / "cases.json"),
                           str(tmp / "results.json")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp / "results.json").read_text())
    for name, res in results.items():
        meta_path = tmp / name / "meta.json"
        if meta_path.is_file():
            res["meta"] = json.loads(meta_path.read_text())
            res["rejects"] = [json.loads(x) for x in
                              (tmp / name / "rejects.jsonl").read_text().splitlines()]
            res["sequences"] = sequences(tmp / name)
    results["repo"] = str(repo)
    return results


def _same_as_jsonl(got: dict, ref: dict, table) -> None:
    assert got["rc"] == 0 and ref["rc"] == 0, got["stderr"]
    assert got["sequences"] == ref["sequences"]
    assert [{"line": r["line"], "reason": r["reason"]} for r in got["rejects"]] == \
        _expected_rejects(table)  # the row index, from 0
    meta, ref_meta = got["meta"], ref["meta"]
    for key in ("lines_read", "pairs_packed", "lines_rejected", "rejects_by_reason",
                "conversational_pairs", "num_packs", "real_tokens"):
        assert meta[key] == ref_meta[key], key
    assert meta["lines_read"] == len(table) == meta["pairs_packed"] + meta["lines_rejected"]


def test_local_dataset_repository_packs_like_its_jsonl(runs) -> None:
    got = runs["local"]
    _same_as_jsonl(got, runs["ref_standard"], STANDARD)
    meta = got["meta"]["input"]
    assert meta["format"] == "hf" and meta["name"] == runs["repo"]
    assert meta["split"] == "train_prefs" and meta["subset"] is None and meta["revision"] is None
    assert meta["streaming"] is True and len(meta["fingerprint"]) >= 8
    assert len(meta["sha256"]) == 64


def test_cached_hub_dataset_packs_offline_like_its_jsonl(runs) -> None:
    got = runs["cached"]
    _same_as_jsonl(got, runs["ref_conv"], ULTRAFEEDBACK)
    meta = got["meta"]["input"]
    assert (meta["name"], meta["split"], meta["fingerprint"]) == ("testorg/prefs",
                                                                  "train_prefs", COMMIT)
    assert meta["streaming"] is True
    pinned = runs["cached_commit"]
    assert pinned["rc"] == 0 and pinned["meta"]["input"]["revision"] == COMMIT[:12]
    assert pinned["sequences"] == got["sequences"]
    assert pinned["meta"]["input"]["sha256"] == meta["sha256"]


def test_subset_picks_the_configuration(runs) -> None:
    got = runs["subset_b"]
    _same_as_jsonl(got, runs["ref_standard"], STANDARD)  # config "b" holds every row
    assert (got["meta"]["input"]["subset"], got["meta"]["input"]["split"]) == ("b", "train")


def test_strict_names_the_row(runs) -> None:
    res = runs["strict"]
    assert res["rc"] == 1
    assert "adadpo-pack: error: hf:testorg/prefs [train_prefs]: row 1: " \
           "identical_chosen_rejected" in res["stderr"]


@pytest.mark.parametrize("case, message", [
    ("bad_split", "--split nope: not a split of hf:testorg/prefs (splits: train_prefs, "
                  "test_prefs)"),
    ("default_split", "--split train: not a split of hf:testorg/prefs"),
    ("bad_subset", "--subset other: not a configuration of hf:testorg/prefs"),
    ("bad_revision", "--revision v2: hf:testorg/prefs comes from the local cache (offline), "
                     f"which holds commit {COMMIT}"),
    ("not_cached", "input hf:nobody/absent: not in the local datasets cache"),
    ("no_subset", "has several configurations: give --subset NAME"),
    ("no_such_dir", "/no/such/repo: no such dataset on the Hub or locally"),
    ("file_with_split", "--split applies to hf:NAME inputs (Hugging Face datasets) only"),
])
def test_bad_hub_inputs_fail_in_one_line(runs, case, message) -> None:
    res = runs[case]
    lines = res["stderr"].strip().splitlines()
    assert res["rc"] == 1 and len(lines) == 1, res["stderr"]
    assert lines[0].startswith("adadpo-pack: error: ") and message in lines[0], lines[0]
