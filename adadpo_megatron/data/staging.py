"""Staging directories of the pack tool: ``DIR.tmp-*`` built beside ``DIR``, and their cleanup.

A run builds its output in ``DIR.tmp-XXXX`` (and moves an old dataset aside to
``DIR.old-XXXX`` while replacing it) and renames it into place at the end. A run that is
killed leaves them behind. Each staging directory records its owner (host and pid) in
:data:`OWNER_FILE`; the next run removes those whose owner process is gone and reports
the ones it cannot judge (another host, or written by a version without the owner file).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

__all__ = ["OWNER_FILE", "make_staging_dir", "clean_stale_staging", "write_failed_line"]

OWNER_FILE = ".adadpo-pack-owner"
"""JSON ``{"host", "pid"}`` of the run building a staging directory."""


def make_staging_dir(out: Path, kind: str = "tmp") -> Path:
    """Create ``out.parent/out.name.<kind>-XXXX`` holding the owner file; returns its path."""
    path = Path(tempfile.mkdtemp(prefix=f"{out.name}.{kind}-", dir=out.parent))
    (path / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out: Path) -> list[str]:
    """Remove the staging directories of ``out`` left by dead runs on this host.

    Args:
        out: the output directory a run is about to build.

    Returns:
        One message per staging directory found: removed, or left (with the reason)
        because its owner may still be running or is unknown.
    """
    notes: list[str] = []
    if not out.parent.is_dir():
        return notes
    host = socket.gethostname()
    for path in sorted(out.parent.glob(f"{out.name}.tmp-*")) + sorted(
        out.parent.glob(f"{out.name}.old-*")
    ):
        if not path.is_dir():
            continue
        try:
            owner = json.loads((path / OWNER_FILE).read_text())
            owner_host, pid = str(owner["host"]), int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            notes.append(
                f"left {path}: a staging directory of unknown owner (a killed run?); "
                "remove it yourself if no adadpo-pack is writing it"
            )
            continue
        if owner_host != host or _pid_alive(pid):
            where = "this host" if owner_host == host else f"host {owner_host}"
            notes.append(f"left {path}: its run (pid {pid} on {where}) may still be writing it")
            continue
        if ".old-" in path.name and (path / out.name).exists() and not out.exists():
            notes.append(
                f"left {path}: it holds the dataset a killed --overwrite run moved aside; "
                f"move {path / out.name} back to {out} to keep it"
            )
            continue
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path}, left by a killed run (pid {pid})")
    return notes


def write_failed_line(exc: OSError, out: Path, tmp: Path) -> str:
    """The one-line error of a run whose write into ``tmp`` failed (a full disk), after
    ``tmp`` was removed."""
    from adadpo_megatron.io_errors import describe_os_error

    kept = "the dataset already there is untouched" if out.exists() else "nothing"
    return (f"--output {out}: cannot write ({describe_os_error(exc, tmp)}); {kept} was "
            f"published and the staging directory {tmp} was removed")
