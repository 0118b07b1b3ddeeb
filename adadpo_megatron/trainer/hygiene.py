"""Process hygiene: no process of a training job outlives the rank that started it.

A rank killed with ``kill -9`` (or by torchrun after another rank died) cannot clean up.
Its children would then be orphaned and live on: megatron-core's dist-checkpointing
starts a ``multiprocessing`` Manager server (``spawn``) for its write results, and forks
writer processes during a save. :func:`install` makes every such child die with its rank
(Linux ``PR_SET_PDEATHSIG`` = SIGKILL):

* forked children (``os.fork``, ``multiprocessing`` ``fork``) via an at-fork hook, for
  forks made by the main thread (a death signal follows the forking *thread*);
* megatron-core's write-results Manager (started at the first save): :func:`install`
  makes megatron-core start :func:`start_manager`'s instead, whose initializer sets the
  death signal and ignores the SIGTERM/SIGINT sent to the whole process group (the rank
  handles those, e.g. finishing its step and saving through this very Manager).

Elsewhere than Linux :func:`install` does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["die_with_parent", "install", "start_manager"]

_PR_SET_PDEATHSIG = 1
_state: dict[str, Any] = {"installed": False, "manager": None}
_fork_from_main = False


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; else no-op).

    Args:
        parent_pid: the parent expected; if it is already gone (reparented), exit now.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _before_fork() -> None:
    global _fork_from_main
    _fork_from_main = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    if _fork_from_main:
        die_with_parent()
        # Ctrl-C reaches the whole process group: the rank handles it (it stops the job in
        # one line); a forked helper (a checkpoint writer) must not print a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _patch_results_queue() -> None:
    """megatron-core's write-results queue (made at the first save) from :func:`start_manager`."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return
    if not hasattr(fa, "_get_write_results_queue") or _state.get("patched"):
        return

    def get_write_results_queue() -> Any:
        if fa._results_queue is None:
            manager = start_manager()
            _state["manager"] = manager  # kept alive as long as this rank
            fa._results_queue = manager.Queue()
        return fa._results_queue

    fa._get_write_results_queue = get_write_results_queue
    _state["patched"] = True


def _manager_init(parent_pid: int) -> None:
    """In the Manager server: die with the rank, and ignore the SIGTERM/SIGINT sent to the
    whole process group (Slurm, Ctrl-C), which the rank itself handles (it may still be
    finishing a step and saving through this Manager)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)


def start_manager() -> Any:
    """A started ``multiprocessing`` SyncManager (``spawn``) whose server dies with this
    process (and ignores SIGTERM/SIGINT, which this process handles)."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_manager_init, initargs=(os.getpid(),))
    return manager


def install(checkpoint_writer: bool = True) -> None:
    """Make this rank's children die with it (idempotent). Call once per process, early.

    Args:
        checkpoint_writer: also make megatron-core's write-results Manager (started at
            the first save) one from :func:`start_manager`.
    """
    if not sys.platform.startswith("linux"):
        return
    if not _state["installed"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _state["installed"] = True
    if checkpoint_writer:
        _patch_results_queue()
