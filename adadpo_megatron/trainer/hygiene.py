"""Process hygiene: no process of a training job outlives the rank that started it.

A rank killed with ``kill -9`` (or by torchrun after another rank died) cannot clean up.
Its children would then be orphaned and live on: megatron-core's dist-checkpointing
starts a ``multiprocessing`` Manager server (``spawn``) for its write results, and forks
writer processes during a save. :func:`install` makes every such child die with its rank
(Linux ``PR_SET_PDEATHSIG`` = SIGKILL):

* forked children (``os.fork``, ``multiprocessing`` ``fork``) via an at-fork hook, for
  forks made by the main thread (a death signal follows the forking *thread*);
* megatron-core's write-results Manager, which :func:`install` starts itself with an
  initializer that sets the death signal, and hands to megatron-core in place of the one
  it would start on its first save.

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


def _start_results_manager() -> None:
    """megatron-core's write-results queue, from a Manager that dies with this rank."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        return
    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    manager = start_manager()
    _state["manager"] = manager  # kept alive as long as this rank
    filesystem_async._results_queue = manager.Queue()


def start_manager() -> Any:
    """A started ``multiprocessing`` SyncManager (``spawn``) whose server dies with this process."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    return manager


def install(checkpoint_writer: bool = True) -> None:
    """Make this rank's children die with it (idempotent). Call once per process, early.

    Args:
        checkpoint_writer: also start megatron-core's write-results Manager now (one
            ``spawn`` process; only needed by runs that save checkpoints).
    """
    if not sys.platform.startswith("linux"):
        return
    if not _state["installed"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _state["installed"] = True
    if checkpoint_writer:
        _start_results_manager()
