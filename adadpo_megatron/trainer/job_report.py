"""One line per job, not per rank: the tools' errors and notes printed once.

Every rank of a torchrun job runs the same checks, so a bad flag would be reported by
each of them (8 identical lines with 8 ranks). :func:`say` prints a line only on the
first rank that says it: the ranks agree through torchrun's store (the elastic agent's
TCPStore, or the default process group's store), keyed by the text itself. So

* an error every rank detects identically (a flag, a missing file, a full disk seen by
  a collective save) prints once, whichever rank gets there first;
* an error only one rank sees (its own disk, its own shard) prints too: its text is new.

Without a store (no torchrun, or it cannot be reached) every rank prints, as before:
a line is never lost to save noise. :func:`say_error` also marks the job as failed in
the store, so the other ranks, whose collectives then break ("Connection closed by
peer") or who are interrupted by torchrun, can stay quiet: :func:`job_failed`.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from typing import Any, TextIO

__all__ = ["job_failed", "mark_failed", "say", "say_error"]

_PREFIX = "adadpo/job_report"
_cache: dict[str, Any] = {}


def _world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _namespace() -> str:
    # One namespace per attempt of the job: a restarted attempt reports its errors again.
    attempt = os.environ.get("ADADPO_ELASTIC_ATTEMPT")  # agreed by all nodes, once set
    if attempt is None:
        attempt = "local-" + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"{_PREFIX}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{attempt}"


def _store() -> Any:
    """The job's key-value store, or None (single process, or none reachable)."""
    if "store" in _cache:
        return _cache["store"]
    store = None
    try:
        import torch.distributed as dist

        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in os.environ:
            # The elastic agent's store: reachable before init_process_group and after a
            # peer died (the agent, not a rank, hosts it).
            store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                  int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=10),
                                  wait_for_workers=False)
        elif dist.is_available() and dist.is_initialized():
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store()
    except Exception:  # noqa: BLE001 - no store: every rank prints (nothing is lost)
        store = None
    _cache["store"] = store
    return store


def _first_to_say(text: str) -> bool:
    if _world() <= 1:
        return True
    store = _store()
    if store is None:
        return True
    key = f"{_namespace()}/said/{hashlib.sha1(text.encode()).hexdigest()}"
    try:
        return int(store.add(key, 1)) == 1
    except Exception:  # noqa: BLE001 - the store went away: print rather than lose the line
        return True


def say(line: str, *, file: TextIO | None = None) -> bool:
    """Print ``line`` unless another rank of this job already printed the same line.

    Returns True when this rank printed it.
    """
    if not _first_to_say(line):
        return False
    print(line, file=file or sys.stderr, flush=True)
    return True


def mark_failed() -> None:
    """Record in the job's store that a rank failed with a reported error."""
    store = _store() if _world() > 1 else None
    if store is None:
        return
    try:
        store.set(f"{_namespace()}/failed", "1")
    except Exception:  # noqa: BLE001 - best effort: peers then report their own errors
        pass


def say_error(line: str, *, file: TextIO | None = None) -> bool:
    """:func:`mark_failed`, then :func:`say` ``line``. Returns True when this rank printed it."""
    mark_failed()
    return say(line, file=file)


def job_failed() -> bool:
    """True when some rank of this job attempt already failed with a reported error."""
    store = _store() if _world() > 1 else None
    if store is None:
        return False
    try:
        return bool(store.check([f"{_namespace()}/failed"]))
    except Exception:  # noqa: BLE001 - unknown: let the caller report its own error
        return False
