"""One writer per ``--save``: a lease file, taken before anything is written, held for the
job's life, released at its end.

``SAVE/adadpo_writer.lease`` (JSON) names its holder: host, pid (and the pid's start
time, so a reused pid is not mistaken for the holder), the Slurm job id, a random token,
and a heartbeat time that a thread refreshes every ``stale_after / 10`` seconds. It is
created with ``os.link`` of a fully written temp file, which fails with EEXIST when the
lease exists: atomic on local and shared (NFS, Lustre, GPFS) file systems, no ``flock``.

A second job finding a live lease refuses in one line naming the holder. A dead
holder's lease is taken over, with a note:

* the same Slurm job id (a requeue: Slurm ended the old process before starting this one);
* the same host and its pid gone (or reused by another process);
* another host and no heartbeat for ``stale_after`` seconds
  (``ADADPO_SAVE_LEASE_STALE_S``, default 300).

Taking over renames the stale file aside first (only one taker can rename it), then
creates a fresh lease. A holder whose lease was taken over (its heartbeat stalled, e.g.
a hung file system) finds out at its next heartbeat, and its next checkpoint refuses
(:func:`lost_lease`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from adadpo_megatron.trainer.config import ConfigError

__all__ = ["LEASE", "LeaseHeld", "SaveLease", "lost_lease"]

LEASE = "adadpo_writer.lease"
DEFAULT_STALE_S = 300.0
_current: dict[str, SaveLease] = {}


class LeaseHeld(ConfigError):
    """Another live job holds the ``--save`` directory's lease."""


def _pid_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux /proc, clock ticks since boot), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _pid_start(pid)
    return start is None or now is None or now == start


def _stale_after() -> float:
    try:
        return float(os.environ.get("ADADPO_SAVE_LEASE_STALE_S", DEFAULT_STALE_S))
    except ValueError:
        raise ConfigError(f"ADADPO_SAVE_LEASE_STALE_S={os.environ['ADADPO_SAVE_LEASE_STALE_S']!r}"
                          ": expected a number of seconds") from None


class SaveLease:
    """The lease of one ``--save`` directory (take it with :meth:`acquire`).

    Args:
        save_dir: the directory (it must exist).
        stale_after: seconds without heartbeat after which a holder on another host is
            presumed dead (None: ``ADADPO_SAVE_LEASE_STALE_S`` or 300).
        note: prints the one-line note of a takeover.
        clock: wall-clock time source (tests).
    """

    def __init__(self, save_dir: str, *, stale_after: float | None = None,
                 note: Callable[[str], None] = print, clock: Callable[[], float] = time.time):
        self.path = os.path.join(save_dir, LEASE)
        self.stale_after = _stale_after() if stale_after is None else float(stale_after)
        self.note = note
        self.clock = clock
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record: dict[str, Any] = {
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "job_id": os.environ.get("SLURM_JOB_ID"), "token": self.token,
            "started": clock(), "heartbeat": clock()}

    # -- the file ---------------------------------------------------------------------------
    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{self.token}.tmp"
        self.record["heartbeat"] = self.clock()
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.record, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _read(self, path: str | None = None) -> dict[str, Any] | None:
        try:
            with open(path or self.path, encoding="utf-8") as f:
                record = json.load(f)
            return record if isinstance(record, dict) else None
        except (OSError, ValueError):
            return None

    def _describe(self, holder: dict[str, Any] | None) -> str:
        if holder is None:
            return f"an unreadable lease ({self.path})"
        job = f", Slurm job {holder['job_id']}" if holder.get("job_id") else ""
        age = self.clock() - float(holder.get("heartbeat", 0))
        return (f"host {holder.get('host')} pid {holder.get('pid')}{job}, heartbeat "
                f"{age:.0f} s ago ({self.path})")

    def _dead(self, holder: dict[str, Any] | None) -> str | None:
        """Why ``holder`` is dead (its lease may be taken over), or None when it may live."""
        if holder is None:
            try:
                age = self.clock() - os.path.getmtime(self.path)
            except OSError:
                return "it is gone"
            return f"unreadable and untouched for {age:.0f} s" if age > self.stale_after else None
        me = self.record
        if holder.get("job_id") and holder["job_id"] == me["job_id"] and \
                (holder.get("host"), holder.get("pid")) != (me["host"], me["pid"]):
            return f"the same Slurm job {me['job_id']} restarted (a requeue)"
        if holder.get("host") == me["host"]:
            pid = int(holder.get("pid", -1))
            if pid == me["pid"]:
                return None
            if not _pid_alive(pid, holder.get("pid_start")):
                return f"its process {pid} on this host is gone"
            return None
        age = self.clock() - float(holder.get("heartbeat", 0))
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s (> {self.stale_after:g} s)"
        return None

    # -- take, keep, give back --------------------------------------------------------------
    def acquire(self, attempts: int = 5) -> SaveLease:
        """Take the lease (or a dead holder's, with a note); LeaseHeld if a live job has it."""
        for _ in range(attempts):
            tmp = self._write_tmp()
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            else:
                self._start()
                return self
            finally:
                os.unlink(tmp)
            holder = self._read()
            reason = self._dead(holder)
            if reason is None:
                raise LeaseHeld(
                    f"--save {os.path.dirname(self.path)} is being written by another job: "
                    f"{self._describe(holder)}; wait for it to end or give another --save (a "
                    f"dead holder's lease is taken over: same host once its pid is gone, "
                    f"another host after {self.stale_after:g} s without heartbeat)")
            aside = f"{self.path}.stale-{self.token}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue  # another job took it over first: look again
            moved = self._read(aside)
            if holder is not None and (moved or {}).get("token") != holder.get("token"):
                try:  # a fresh lease slipped in between: give it back, look again
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                os.unlink(aside)
                continue
            os.unlink(aside)
            self.note(f"adadpo-train: took over the --save lease of {self._describe(holder)}: "
                      f"{reason}")
        raise LeaseHeld(f"{self.path}: could not take the lease in {attempts} attempts "
                        "(several jobs are starting on this --save at once?)")

    def _start(self) -> None:
        _current[os.path.realpath(os.path.dirname(self.path))] = self
        self._clear_dead_staging()
        self._thread = threading.Thread(target=self._beat, name="adadpo-save-lease",
                                        daemon=True)
        self._thread.start()

    def _clear_dead_staging(self) -> None:
        """What a killed writer left in ``--save`` (it cannot clean up after ``kill -9``):
        ``iter_N.tmp-*`` (never committed) is removed; ``iter_N.old-*`` (a checkpoint moved
        aside while the same step was saved again) is removed when ``iter_N`` exists, else
        put back. Safe: this job holds the lease and has written nothing yet."""
        import re
        import shutil

        root = os.path.dirname(self.path)
        for name in sorted(os.listdir(root)):
            match = re.fullmatch(r"(iter_\d+)\.(tmp|old)-\w+", name)
            if match is None:
                continue
            path, final = os.path.join(root, name), os.path.join(root, match.group(1))
            if match.group(2) == "old" and not os.path.exists(final):
                os.replace(path, final)
                self.note(f"adadpo-train: restored {final} from {name}, left by a killed job")
                continue
            shutil.rmtree(path, ignore_errors=True)
            self.note(f"adadpo-train: removed {path}, left unfinished by a killed job")

    def _beat(self) -> None:
        while not self._stop.wait(max(0.05, self.stale_after / 10)):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Refresh the heartbeat (the thread calls it); records a lost lease."""
        if self.lost:
            return
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
            self.lost = (f"the lease {self.path} was taken over by "
                         f"{self._describe(holder)}; this job no longer writes there")
            return
        try:
            os.replace(self._write_tmp(), self.path)
        except OSError:
            pass  # a full disk or a hiccup: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this job's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        _current.pop(os.path.realpath(os.path.dirname(self.path)), None)
        holder = self._read()
        if holder is not None and holder.get("token") == self.token:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def lost_lease(save_dir: str) -> str | None:
    """Why this process may no longer write ``save_dir`` (its lease was taken), or None."""
    lease = _current.get(os.path.realpath(save_dir))
    return None if lease is None else lease.lost
