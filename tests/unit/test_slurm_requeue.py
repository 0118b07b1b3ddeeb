"""The Slurm launcher's time-limit path: SIGTERM to the batch script is passed to the
trainer's tasks (which save and exit 0 under --exit-signal-handler) and the job requeues;
a requeued job resumes from --save instead of the SFT model."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "llama3_70b"


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_sigterm_reaches_the_trainer_and_the_job_requeues(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "log"
    # srun stands for the trainer: it waits until SIGTERM, then "saves" and exits 0.
    _fake(bin_dir, "srun", f'echo started >> {log}\ntrap "echo task-got-TERM >> {log}; '
          'exit 0" TERM\nwhile true; do sleep 0.05; done\n')
    _fake(bin_dir, "scontrol", f'if [[ "$1" == requeue ]]; then echo "requeue $2" >> {log}; '
          'else printf "gpu-node-07\\n"; fi\n')
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-07",
               SLURM_NNODES="1", SLURM_JOB_ID="4242", ADADPO_REPO=str(REPO))
    proc = subprocess.Popen(["bash", str(EXAMPLE / "slurm_adadpo_70b.sbatch")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (log.is_file() and "started" in log.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@...` delivers
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert log.read_text().splitlines() == ["started", "task-got-TERM", "requeue 4242"]
    text = (EXAMPLE / "slurm_adadpo_70b.sbatch").read_text()
    assert "#SBATCH --signal=B:TERM@" in text and "#SBATCH --requeue" in text


def _load_flags(save: Path) -> list[str]:
    script = (f'ADADPO_70B_SAVE={save} source {EXAMPLE / "flags.sh"}; '
              'printf "%s\\n" "${ADADPO_70B_FLAGS[@]}"')
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True)
    flags = out.stdout.splitlines()
    return flags[flags.index("--load"):flags.index("--save")]


def test_a_requeued_job_resumes_from_its_own_checkpoints(tmp_path: Path) -> None:
    save = tmp_path / "save"
    assert _load_flags(save)[2:] == ["--finetune"]  # a new job starts from the SFT model
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("100\n")
    assert _load_flags(save) == ["--load", str(save)]
