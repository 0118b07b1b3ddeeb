"""Faults users meet, on 2-4 CPU processes: a full disk at a checkpoint, errors printed
once per job (not per rank), Ctrl-C.

The trainer runs under ``python -m adadpo_megatron.trainer.launch`` (torchrun, quiet where
the ranks already reported) or plain torchrun, through tests/distributed/fault_worker.py,
which injects the faults (an ENOSPC inside megatron-core's checkpoint writer on one rank;
an error only one rank sees). A real full disk (a 6 MiB tmpfs) runs where mounting works.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import TOKENIZER, _pairs
from torchrun_launch import free_port

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "distributed" / "fault_worker.py"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from adadpo_megatron.data.pack_tool import main as pack_main

    work = tmp_path_factory.mktemp("faults")
    jsonl = work / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(40)))
    assert pack_main([str(jsonl), "--output", str(work / "data"), "--tokenizer", str(TOKENIZER),
                      "--pack-size", "128", "--strict"]) == 0
    return work / "data"


def _flags(data: Path, save: Path, iters: int = 8) -> list[str]:
    return ["--device", "cpu", "--num-layers", "2", "--hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "128", "--global-batch-size", "2",
            "--train-iters", str(iters), "--lr", "1e-3", "--preference-loss", "simpo",
            "--data-path", str(data), "--save", str(save), "--save-interval", "2",
            "--log-dir", f"{save}.log"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def _cmd(nproc: int, args: list[str], launcher: str = "adadpo") -> list[str]:
    launch = (["-m", "adadpo_megatron.trainer.launch"] if launcher == "adadpo"
              else ["-m", "torch.distributed.run"])
    return [sys.executable, *launch, f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", str(WORKER), *args]


def _run(nproc: int, args: list[str], launcher: str = "adadpo", timeout: float = 300,
         **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(nproc, args, launcher), env=_env(**env), cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("adadpo-train:")
            and "resuming from it" not in line]


def _assert_intact(save: Path, step: int) -> None:
    """The tracker names ``step``, its checkpoint verifies, no staging is left."""
    from adadpo_megatron.trainer.manifest import verify_manifest

    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(step)
    verify_manifest(str(save / f"iter_{step:07d}"))
    assert not [p.name for p in save.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _full_disk_then_resume(data: Path, save: Path, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    lines = _error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-3000:]
    line = lines[0]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"cannot write checkpoint {save / 'iter_0000006'}" in line, line
    assert "[Errno 28] No space left on device" in line, line
    assert f"the last good checkpoint is {save / 'iter_0000004'}" in line, line
    _assert_intact(save, 4)
    again = _run(2, _flags(data, save))  # the disk has room again: the rerun resumes
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds checkpoint step 4: resuming from it" in again.stderr
    _assert_intact(save, 8)
    steps = [json.loads(x)["step"] for x in Path(f"{save}.log/metrics.jsonl").read_text()
             .splitlines()]
    assert steps == list(range(1, 9)), steps


def test_full_disk_at_a_checkpoint_is_one_line_and_a_rerun_resumes(data, tmp_path) -> None:
    save = tmp_path / "ckpt"
    done = _run(2, _flags(data, save), ADADPO_FAULT_ENOSPC="6:1")  # rank 1's disk only
    _full_disk_then_resume(data, save, done)


def test_full_tmpfs_at_a_checkpoint(data, tmp_path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6M", "tmpfs", str(mnt)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC test runs")
    try:
        save = mnt / "ckpt"  # 2.3 MB a checkpoint: steps 2 and 4 fit, 6 does not
        done = _run(2, [*_flags(data, save), "--log-dir", str(tmp_path / "log")])
        assert done.returncode == 1, done.stderr[-3000:]
        (line,) = _error_lines(done.stderr)
        assert "[Errno 28] No space left on device" in line, line
        assert f"the last good checkpoint is {save / 'iter_0000004'}" in line, line
        _assert_intact(save, 4)
        subprocess.run(["mount", "-o", "remount,size=30M", str(mnt)], check=True)
        again = _run(2, [*_flags(data, save), "--log-dir", str(tmp_path / "log")])
        assert again.returncode == 0, again.stderr[-3000:]
        _assert_intact(save, 8)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_errors_print_once_per_job_and_rank_local_errors_still_print(data, tmp_path) -> None:
    bad = [*_flags(data, tmp_path / "a"), "--global-batch-size", "4",
           "--data-path", str(tmp_path / "missing")]
    for launcher in ("torchrun", "adadpo"):  # plain torchrun: the ranks still say it once
        done = _run(4, bad, launcher=launcher)
        assert done.returncode != 0
        lines = _error_lines(done.stderr)
        assert lines == [f"adadpo-train: error: --data-path {tmp_path / 'missing'}: no such "
                         "directory"], done.stderr[-3000:]
    assert done.returncode == 2 and done.stderr.strip() == lines[0]  # the launcher adds nothing
    done = _run(2, _flags(data, tmp_path / "b"), ADADPO_FAULT_RANK_ERROR="1")
    # 2 from rank 1, or 1 from rank 0 when its broken collective ends first (quietly)
    assert done.returncode in (1, 2), done.stderr[-3000:]
    assert _error_lines(done.stderr) == ["adadpo-train: error: only rank 1 sees this"]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def _tree(pid: int) -> list:
    """The launcher and every process below it (torchrun puts each rank in its own session)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _alive(procs: list) -> list[int]:
    return [p.pid for p in procs if p.is_running() and p.status() != "zombie"]


def test_ctrl_c_exits_130_in_one_line_and_keeps_the_checkpoints(data, tmp_path) -> None:
    save = tmp_path / "ckpt"
    proc = subprocess.Popen(_cmd(2, _flags(data, save, iters=400)), env=_env(), cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group, as a terminal's
    tracker = save / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 240
    while not tracker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    tree = _tree(proc.pid)
    assert len(tree) >= 3, tree  # the launcher, two ranks (and their helpers)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    start = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 130, stderr[-3000:]
    assert took < 30, took  # seconds, on a loaded 2-core machine
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("adadpo")]
    assert len(lines) == 1 and re.match(
        r"adadpo-train: interrupted \(SIGINT\); the last good checkpoint is .*iter_\d{7}: rerun "
        "the same command to resume from it", lines[0]), stderr[-3000:]
    time.sleep(1)
    assert _alive(tree) == []  # no orphan: not a rank, a writer, a Manager
    _assert_intact(save, int(tracker.read_text()))


def test_two_jobs_on_one_save_the_second_refuses_then_takes_over_a_dead_one(data, tmp_path):
    save = tmp_path / "ckpt"
    first = subprocess.Popen(_cmd(2, _flags(data, save, iters=400)), env=_env(), cwd=REPO,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    tracker = save / "latest_checkpointed_iteration.txt"
    try:
        deadline = time.monotonic() + 240
        while not tracker.is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-3000:]
        holder = json.loads((save / "adadpo_writer.lease").read_text())
        second = _run(2, _flags(data, save, iters=400))  # a manual relaunch, say
        assert second.returncode == 2, second.stderr[-3000:]
        assert _error_lines(second.stderr) == [
            x for x in second.stderr.splitlines() if x.startswith("adadpo")], second.stderr
        (line,) = _error_lines(second.stderr)
        assert line.startswith(f"adadpo-train: error: --save {save} is being written by another "
                               f"job: host {holder['host']} pid {holder['pid']}, heartbeat"), line
        assert first.poll() is None  # the holder runs on, untouched
    finally:
        import psutil

        for p in _tree(first.pid):  # the holder dies without releasing its lease
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass  # a writer that ended on its own
        first.communicate(timeout=60)
    step = int(tracker.read_text())
    third = _run(2, [*_flags(data, save, iters=400), "--exit-interval", str(step + 2)])
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"took over the --save lease of host {holder['host']} pid {holder['pid']}" \
           in third.stderr and f"its process {holder['pid']} on this host is gone" in third.stderr
    assert f"holds checkpoint step {step}: resuming from it" in third.stderr
    _assert_intact(save, step + 2)
    assert not (save / "adadpo_writer.lease").exists()  # released at the end
