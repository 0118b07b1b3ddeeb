"""Manifest rules: each rank hashes what it wrote, a second record keeps verification from
being skipped by deleting a file, --verify-data hashes once per node."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from adadpo_megatron.trainer import manifest
from adadpo_megatron.trainer.arguments import parse_config
from adadpo_megatron.trainer.checkpointing import (
    CheckpointError,
    _verify,
    _write_atomic,
    load_model_weights,
)
from adadpo_megatron.trainer.config import ConfigError
from adadpo_megatron.trainer.identity import check_identity


def test_each_rank_hashes_the_shards_it_wrote(tmp_path, monkeypatch) -> None:
    for name in ("__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp",
                 "metadata.json", "common.pt"):
        (tmp_path / name).write_bytes(name.encode())
    assert manifest._writer("__3_0.distcp", 4) == 3 and manifest._writer("common.pt", 4) == 0
    assert manifest._writer("__5_0.distcp", 4) == 1  # saved by more ranks than load it
    hashed: list[str] = []
    real = manifest._digest
    monkeypatch.setattr(manifest, "_digest", lambda p: hashed.append(Path(p).name) or real(p))
    monkeypatch.setattr(manifest, "_dist", lambda: (1, 2))  # as rank 1 of 2
    monkeypatch.setattr(manifest, "_from_rank0", lambda v: manifest._list_files(str(tmp_path)))
    monkeypatch.setattr(manifest, "_gather", lambda v: [v])
    manifest.write_manifest(str(tmp_path))
    assert sorted(hashed) == ["__1_0.distcp", "__1_1.distcp"]


def _ours(root: Path) -> Path:
    """A committed checkpoint as save_checkpoint leaves it (files, manifest, meta, record)."""
    ckpt = root / "iter_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(os.urandom(1000))
    (ckpt / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    manifest.write_manifest(str(ckpt))
    (ckpt / "adadpo_meta.json").write_text(json.dumps({"format_version": 1}))
    manifest.record_checkpoint(str(root), 4, str(ckpt), _write_atomic)
    (root / "latest_checkpointed_iteration.txt").write_text("4\n")
    return ckpt


def test_deleting_the_meta_file_or_the_manifest_does_not_skip_verification(tmp_path) -> None:
    ckpt = _ours(tmp_path)
    _verify(str(ckpt))
    (ckpt / "adadpo_meta.json").unlink()  # it now looks like a Megatron-LM checkpoint...
    with pytest.raises(CheckpointError, match="no adadpo_meta.json"):
        load_model_weights(str(tmp_path), [])  # ...but the record says it is ours
    (ckpt / "adadpo_meta.json").write_text(json.dumps({"format_version": 1}))
    (ckpt / "__0_0.distcp").write_bytes(os.urandom(1000))
    data = json.loads((ckpt / "adadpo_manifest.json").read_text())
    data["files"]["__0_0.distcp"]["sha256"] = manifest._digest(str(ckpt / "__0_0.distcp"))["sha256"]
    (ckpt / "adadpo_manifest.json").write_text(json.dumps(data))  # a manifest made to fit
    with pytest.raises(CheckpointError, match="was changed since the save"):
        _verify(str(ckpt))
    (ckpt / "adadpo_manifest.json").unlink()
    with pytest.raises(CheckpointError, match="is missing, but adadpo_checkpoints.json"):
        _verify(str(ckpt))


def test_verify_data_hashes_once_per_node(monkeypatch) -> None:
    calls: list[str] = []

    def verify():
        calls.append("verify")
        raise ValueError("/d/tokens.bin: sha256 differs from meta.json")

    ds = SimpleNamespace(meta={"tokenizer": {"fingerprint": "a" * 64, "vocab_size": 10}},
                         verify=verify)
    cfg = parse_config(["--data-path", "/d", "--train-iters", "3", "--verify-data"], world_size=1)
    monkeypatch.setenv("LOCAL_RANK", "1")  # not the node's first rank: it does not hash
    check_identity(cfg, ds, None)
    assert calls == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="--data-path: /d/tokens.bin: sha256 differs"):
        check_identity(cfg, ds, None)
    assert calls == ["verify"]


def test_adopting_a_pre_manifest_checkpoint_hashes_it_once_with_a_warning(tmp_path,
                                                                          capsys) -> None:
    import torch

    from adadpo_megatron.trainer import checkpointing

    cfg = parse_config(["--data-path", "/d", "--train-iters", "3", "--load", "/c",
                        "--adopt-unverified-checkpoint"], world_size=1)
    assert cfg.io.adopt_unverified_checkpoint
    ckpt = tmp_path / "old" / "iter_0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "__0_0.distcp").write_bytes(os.urandom(1000))
    (ckpt / "adadpo_meta.json").write_text(json.dumps({"format_version": 1}))
    with pytest.raises(CheckpointError, match="--adopt-unverified-checkpoint hashes it once"):
        _verify(str(ckpt))  # refused by default, naming the way forward
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        checkpointing.adopt_unverified(True)
        _verify(str(ckpt))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has no checksum manifest" in err[0], err
        assert (ckpt / "adadpo_manifest.json").is_file()
        _verify(str(ckpt))  # adopted once: no second warning, verified from now on
        assert capsys.readouterr().err == ""
        (ckpt / "__0_0.distcp").write_bytes(os.urandom(1000))
        with pytest.raises(CheckpointError, match="was changed"):
            _verify(str(ckpt))
    finally:
        checkpointing.adopt_unverified(False)
        torch.distributed.destroy_process_group()
