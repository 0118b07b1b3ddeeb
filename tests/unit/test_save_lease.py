"""The --save writer lease: one job per directory, dead holders taken over with a note."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from adadpo_megatron.trainer.save_lease import LEASE, LeaseHeld, SaveLease, lost_lease


def _holder(tmp_path, **fields) -> dict:
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
              "job_id": None, "token": "t0", "started": time.time(),
              "heartbeat": time.time(), **fields}
    (tmp_path / LEASE).write_text(json.dumps(record))
    return record


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_take_beat_release(tmp_path) -> None:
    lease = SaveLease(str(tmp_path), stale_after=0.5).acquire()
    first = json.loads((tmp_path / LEASE).read_text())
    assert first["pid"] == os.getpid() and first["token"] == lease.token
    time.sleep(0.3)  # the thread beats every stale_after / 10 s
    assert json.loads((tmp_path / LEASE).read_text())["heartbeat"] > first["heartbeat"]
    assert lost_lease(str(tmp_path)) is None
    lease.release()
    assert sorted(os.listdir(tmp_path)) == []  # no lease, no temp file


def test_a_live_holder_on_this_host_is_refused_in_one_line(tmp_path, sleeper) -> None:
    _holder(tmp_path, pid=sleeper.pid, job_id="77")
    with pytest.raises(LeaseHeld) as info:
        SaveLease(str(tmp_path)).acquire()
    text = str(info.value)
    assert "\n" not in text and f"--save {tmp_path} is being written by another job" in text
    assert f"host {socket.gethostname()} pid {sleeper.pid}, Slurm job 77" in text, text


def test_a_dead_pid_on_this_host_is_taken_over_with_a_note(tmp_path, sleeper) -> None:
    sleeper.kill()
    sleeper.wait()
    _holder(tmp_path, pid=sleeper.pid)
    notes: list[str] = []
    lease = SaveLease(str(tmp_path), note=notes.append).acquire()
    assert len(notes) == 1 and f"its process {sleeper.pid} on this host is gone" in notes[0]
    assert json.loads((tmp_path / LEASE).read_text())["token"] == lease.token
    lease.release()


def test_a_reused_pid_is_not_the_holder(tmp_path, sleeper) -> None:
    _holder(tmp_path, pid=sleeper.pid, pid_start="1")  # same pid, another process's start
    notes: list[str] = []
    SaveLease(str(tmp_path), note=notes.append).acquire().release()
    assert "is gone" in notes[0]


def test_another_host_needs_a_stale_heartbeat(tmp_path) -> None:
    _holder(tmp_path, host="node-b", pid=1, heartbeat=time.time() - 10)
    with pytest.raises(LeaseHeld, match="host node-b pid 1, heartbeat 10 s ago"):
        SaveLease(str(tmp_path), stale_after=60).acquire()
    _holder(tmp_path, host="node-b", pid=1, heartbeat=time.time() - 120)
    notes: list[str] = []
    SaveLease(str(tmp_path), stale_after=60, note=notes.append).acquire().release()
    assert "no heartbeat for 120 s (> 60 s)" in notes[0], notes


def test_a_slurm_requeue_takes_over_its_own_lease(tmp_path, sleeper, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _holder(tmp_path, host="node-b", pid=sleeper.pid, job_id="4242")  # fresh heartbeat
    notes: list[str] = []
    SaveLease(str(tmp_path), note=notes.append).acquire().release()
    assert "the same Slurm job 4242 restarted (a requeue)" in notes[0]
    _holder(tmp_path, pid=sleeper.pid, job_id="9999")  # another job: refused
    with pytest.raises(LeaseHeld):
        SaveLease(str(tmp_path)).acquire()


def test_a_holder_whose_lease_was_taken_stops_writing(tmp_path) -> None:
    lease = SaveLease(str(tmp_path), stale_after=1000).acquire()
    _holder(tmp_path, host="node-b", pid=1, token="theirs")  # taken over behind its back
    lease.heartbeat()
    assert "was taken over by host node-b pid 1" in lost_lease(str(tmp_path))
    lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "theirs"  # not removed


def _race(path: str, start, out) -> None:
    start.wait()
    try:
        SaveLease(path, stale_after=1000, note=lambda s: None).acquire()
        out.put("won")
        time.sleep(2)  # hold it while the others look
    except LeaseHeld:
        out.put("refused")


def test_concurrent_takers_exactly_one_wins(tmp_path) -> None:
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    results = sorted(out.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results == ["refused", "refused", "refused", "won"]
