"""No process of a job outlives its rank: megatron-core's save helper and forked children.

A stand-in rank starts the helpers a save starts (megatron-core's write-results Manager,
a forked writer), reports their pids and is killed with SIGKILL; they must be gone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

RANK = textwrap.dedent("""
    import json, os, sys, time
    # megatron-core's first save starts mp.get_context("spawn").Manager() for its results;
    # install() hands it start_manager()'s instead (tests/distributed/test_elastic_restart.py
    # checks that end to end). Here without megatron-core's import time:
    if sys.argv[1] == "install":
        from adadpo_megatron.trainer.hygiene import install, start_manager
        install(checkpoint_writer=False)
        manager = start_manager()
    else:
        import multiprocessing as mp
        manager = mp.get_context("spawn").Manager()
    queue = manager.Queue()
    if os.fork() == 0:  # a forked writer
        time.sleep(600)
        os._exit(0)
    import psutil
    print(json.dumps([p.pid for p in psutil.Process().children(recursive=True)]), flush=True)
    time.sleep(600)
""")


def _orphans_after_kill(mode: str) -> list[int]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RANK, mode], stdout=subprocess.PIPE, text=True,
                            env=env)
    children = json.loads(proc.stdout.readline())
    assert len(children) >= 3  # the Manager server, its resource tracker, the forked writer
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    alive = children
    while alive and time.time() < deadline:
        alive = [pid for pid in alive if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    described = []
    for pid in alive:  # describe, then clean up what this test started
        try:
            p = psutil.Process(pid)
            described.append(f"{pid} {p.status()} {' '.join(p.cmdline())[:80]}")
            os.kill(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return described


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_killed_rank() -> None:
    assert _orphans_after_kill("install") == []
    assert _orphans_after_kill("plain") != []  # without it they stay: what the test guards


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_save_helper_outlives_a_group_sigterm_the_rank_handles() -> None:
    """Slurm's SIGTERM reaches the whole process group; the rank saves after it through the
    Manager, so the Manager must not die of it (it dies with the rank instead)."""
    from adadpo_megatron.trainer.hygiene import start_manager

    manager = start_manager()
    try:
        os.kill(manager._process.pid, signal.SIGTERM)
        time.sleep(0.5)
        queue = manager.Queue()
        queue.put(7)
        assert queue.get(timeout=5) == 7
    finally:
        manager.shutdown()
