"""Read back what an offline W&B run wrote (``WANDB_MODE=offline``), for the tests.

wandb 0.31 has no Python reader of its transaction log any more (``wandb.sdk.internal
.datastore`` is gone; the Go ``wandb-core`` writes it), so this is one, small: the file
``wandb/offline-run-*/run-ID.wandb`` is a 7-byte header (``:W&B``, magic 0xBEE1 LE,
version 0) then LevelDB's log format: 32 KiB blocks of records ``crc32c (4) | length (2,
LE) | type (1) | data``, types FULL 1, FIRST 2, MIDDLE 3, LAST 4, a block's tail under 7
bytes zero-padded. Each assembled record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every ``Record`` protobuf of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    assert struct.unpack("<H", data[4:6])[0] == 0xBEE1 and data[6] == 0, path
    out, parts, pos = [], [], _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            parts = [chunk]
        elif kind == _FIRST:
            parts = [chunk]
            continue
        elif kind == _MIDDLE:
            parts.append(chunk)
            continue
        elif kind == _LAST:
            parts.append(chunk)
        else:
            raise AssertionError(f"{path}: unknown record type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(parts))
        out.append(record)
        parts = []
    return out


def history(path: Path) -> list[dict[str, Any]]:
    """The ``run.log`` rows of a ``.wandb`` file: ``{"_step": N, key: value, ...}`` each."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def run_id(path: Path) -> str:
    """The run id of the ``run`` record."""
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    raise AssertionError(f"{path} holds no run record")


def offline_runs(directory: Path) -> list[Path]:
    """The ``.wandb`` files under ``directory`` (any depth), oldest run first."""
    return sorted(Path(directory).rglob("offline-run-*/run-*.wandb"),
                  key=lambda p: p.parent.name)
