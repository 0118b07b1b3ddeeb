"""Megatron-LM's own ``pretrain()`` loop: where Megatron-LM comes from.

``MEGATRON_LM_PATH`` names a Megatron-LM checkout (what our users have). Without it, the
unmodified archive in ``../shared/third_party/`` (beside the repository, or one level
further up for a git worktree) is unpacked once into a temporary directory; with neither,
every test here is skipped with one line saying so.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARCHIVE = "megatron-lm-core_v0.16.1.tar.gz"


def _archive() -> Path | None:
    for root in (REPO.parent, REPO.parent.parent):
        path = root / "shared" / "third_party" / ARCHIVE
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def megatron_lm_path(tmp_path_factory) -> str:
    """A Megatron-LM checkout: ``$MEGATRON_LM_PATH`` or the unpacked archive."""
    path = os.environ.get("MEGATRON_LM_PATH")
    if path:
        if not (Path(path) / "megatron" / "training" / "training.py").is_file():
            pytest.fail(f"MEGATRON_LM_PATH={path} is not a Megatron-LM checkout "
                        "(no megatron/training/training.py)")
        return path
    archive = _archive()
    if archive is None:
        pytest.skip(f"MEGATRON_LM_PATH is not set and ../shared/third_party/{ARCHIVE} is "
                    "absent: Megatron-LM pretrain() tests skipped")
    out = tmp_path_factory.mktemp("megatron_lm")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return str(out / "Megatron-LM")
