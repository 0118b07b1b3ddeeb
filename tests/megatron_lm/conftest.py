"""Megatron-LM's own ``pretrain()`` loop: where Megatron-LM comes from.

``MEGATRON_LM_PATH`` names a Megatron-LM checkout (what our users have); without it every
test here is skipped with one line saying so. ``.ci/run`` unpacks the unmodified archive
``../shared/third_party/megatron-lm-core_v0.16.1.tar.gz`` into a temporary directory and
sets the variable, so CI always runs them. By hand::

    d=$(mktemp -d) && tar -xzf ../shared/third_party/megatron-lm-core_v0.16.1.tar.gz -C "$d"
    MEGATRON_LM_PATH=$d/Megatron-LM bash tests/run.sh tests/megatron_lm
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def megatron_lm_path() -> str:
    """The Megatron-LM checkout ``$MEGATRON_LM_PATH`` names (skips every test without it)."""
    path = os.environ.get("MEGATRON_LM_PATH")
    if path:
        if not (Path(path) / "megatron" / "training" / "training.py").is_file():
            pytest.fail(f"MEGATRON_LM_PATH={path} is not a Megatron-LM checkout "
                        "(no megatron/training/training.py)")
        return path
    pytest.skip("MEGATRON_LM_PATH is not set: Megatron-LM pretrain() tests skipped "
                "(.ci/run sets it from ../shared/third_party/)")
