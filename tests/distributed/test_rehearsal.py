"""The Llama-3-70B recipe's journey, shrunk: ``examples/llama3_70b/rehearse.sh`` on 8 CPU ranks.

The script itself checks each stage (exit status, the relaunch equal to the uninterrupted run,
the exported logits); this test runs it and reads what it reports.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def test_recipe_rehearsal_on_8_cpu_processes(tmp_path: Path) -> None:
    work = tmp_path / "rehearsal"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(["bash", str(REPO / "examples/llama3_70b/rehearse.sh"), str(work)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    # The overrides are printed, and are only sizes and what a CPU cannot do.
    assert "flags.sh: drop --bf16" in done.stdout + done.stderr
    assert "rehearsal passed" in out
    compare = json.loads(next(line for line in out.splitlines() if '"mismatches"' in line))
    assert compare["mismatches"] == [] and compare["steps_resumed"] == compare["steps_reference"]
    stopped_at = int(next(line for line in out.splitlines()
                          if line.startswith("stopped and saved at step")).split()[-1])
    assert 3 <= stopped_at < compare["steps_reference"]
    roundtrip = json.loads((work / "roundtrip.json").read_text())
    assert roundtrip["max_abs_diff_fp64"] <= 1e-6
    for layout in ("separate", "shared"):
        assert (work / f"data_{layout}" / "ref_logprobs.npz").is_file()
