"""Launch a worker script under torchrun on this machine (gloo, loopback) for a test.

Shared by the tests in this folder: each launches one torchrun job that runs many cases,
since a launch costs 8-20 s of process start-up on a 2-core CPU.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(
    nproc: int,
    script: str | Path,
    *args: str,
    timeout: float,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Runs ``torchrun --nproc-per-node NPROC SCRIPT ARGS`` from the repository root.

    The workers get the repository on PYTHONPATH, one thread each and no torch.compile.
    Asserts a zero exit status (showing the tails of stdout and stderr otherwise) and
    returns the completed process, stdout and stderr as text.
    """
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, (
        f"torchrun worker failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return proc
