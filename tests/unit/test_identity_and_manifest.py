"""Identity checks at start (tokenizer of eval data and checkpoints) and checkpoint manifests.

Both read only files, so they run here without a process group; the distributed trainer
test (tests/distributed/test_train.py) refuses real damaged checkpoints end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from adadpo_megatron.trainer.arguments import parse_config
from adadpo_megatron.trainer.config import ConfigError
from adadpo_megatron.trainer.identity import check_identity
from adadpo_megatron.trainer.manifest import ManifestError, verify_manifest, write_manifest


def dataset(fingerprint: str, vocab: int, bad_hash: bool = False):
    def verify():
        if bad_hash:
            raise ValueError("/d/tokens.bin: sha256 differs from meta.json")

    return SimpleNamespace(meta={"tokenizer": {"fingerprint": fingerprint, "vocab_size": vocab}},
                           verify=verify)


def checkpoint(root: Path, tokenizer: dict | None) -> Path:
    it = root / "iter_0000004"
    it.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("4\n")
    (it / "adadpo_meta.json").write_text(json.dumps({"format_version": 1, "tokenizer": tokenizer}))
    return root


def test_eval_data_and_checkpoints_must_share_the_training_tokenizer(tmp_path) -> None:
    from adadpo_megatron.trainer.checkpointing import CheckpointError

    train = dataset("a" * 64, 1000)
    cfg = parse_config(["--data-path", "/d", "--eval-data-path", "/e", "--train-iters", "3"], world_size=1)
    check_identity(cfg, train, dataset("a" * 64, 1000))
    for other in (dataset("b" * 64, 1000), dataset("a" * 64, 999)):
        with pytest.raises(ConfigError, match="--eval-data-path /e was tokenized with another tokenizer"):
            check_identity(cfg, train, other)
    same = checkpoint(tmp_path / "same", {"fingerprint": "a" * 64, "vocab_size": 1000})
    other = checkpoint(tmp_path / "other", {"fingerprint": "c" * 64, "vocab_size": 1000})
    legacy = checkpoint(tmp_path / "legacy", None)  # e.g. converted from HF: not recorded
    for flags in (["--load", str(same)], ["--load", str(legacy), "--finetune"],
                  ["--preference-loss", "dpo", "--ref-load", str(same)]):
        check_identity(parse_config(["--data-path", "/d", "--train-iters", "3", *flags], world_size=1), train, None)
    for flag in ("--load", "--ref-load"):
        extra = ["--preference-loss", "dpo"] if flag == "--ref-load" else []
        cfg = parse_config(["--data-path", "/d", "--train-iters", "3", flag, str(other), *extra], world_size=1)
        with pytest.raises(CheckpointError) as info:
            check_identity(cfg, train, None)
        assert str(info.value).startswith(f"{flag} {other}: {other}/iter_0000004 was trained with another tokenizer")
    cfg = parse_config(["--data-path", "/d", "--train-iters", "3", "--verify-data"], world_size=1)
    with pytest.raises(ConfigError, match="--data-path: /d/tokens.bin: sha256 differs"):
        check_identity(cfg, dataset("a" * 64, 1000, bad_hash=True), None)


def test_manifest_refuses_changed_missing_and_truncated_files(tmp_path) -> None:
    ckpt = tmp_path / "iter_0000001"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(os.urandom(5000))
    (ckpt / "sub" / "common.pt").write_bytes(b"x" * 100)
    (ckpt / "adadpo_meta.json").write_text("{}")  # written after the manifest: not listed
    write_manifest(str(ckpt))
    manifest = json.loads((ckpt / "adadpo_manifest.json").read_text())
    assert sorted(manifest["files"]) == ["__0_0.distcp", "sub/common.pt"]
    verify_manifest(str(ckpt))
    shard = ckpt / "__0_0.distcp"
    good = shard.read_bytes()
    damaged = {
        "flipped": good[:2000] + bytes(b ^ 0xFF for b in good[2000:3024]) + good[3024:],
        "truncated": good[:4000],
    }
    for name, data in damaged.items():
        shard.write_bytes(data)
        with pytest.raises(ManifestError) as info:
            verify_manifest(str(ckpt))
        msg = str(info.value)
        assert str(shard) in msg and "\n" not in msg
        assert ("was changed" if name == "flipped" else "is truncated: 4000 bytes, the manifest says 5000") in msg
    shard.unlink()
    with pytest.raises(ManifestError, match=r"__0_0.distcp is missing"):
        verify_manifest(str(ckpt))
    (ckpt / "adadpo_manifest.json").unlink()
    with pytest.raises(ManifestError, match="adadpo_manifest.json is missing"):
        verify_manifest(str(ckpt))
