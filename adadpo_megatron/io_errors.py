"""A failing disk in one line: find the OSError behind a failure and name it.

A full disk (``ENOSPC``), a quota (``EDQUOT``) or an I/O error (``EIO``) surfaces
wrapped: megatron-core's dist-checkpointing raises torch's ``CheckpointException`` (a
``BaseException`` whose text holds every rank's traceback), buffered files raise at
``close()`` without a file name. :func:`find_os_error` digs the ``OSError`` out and
:func:`describe_os_error` turns it into ``PATH: [Errno 28] No space left on device``.
"""

from __future__ import annotations

import errno
import os

__all__ = ["DISK_ERRNOS", "WriteFailed", "describe_os_error", "find_os_error", "is_disk_error",
           "write_failure"]

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
"""OS errors of a full, read-only or failing disk."""


class WriteFailed(RuntimeError):
    """An output file could not be written (its one-line text names the path and OS error)."""


def find_os_error(exc: BaseException | None) -> OSError | None:
    """The first ``OSError`` in ``exc``, its causes and contexts, and (for torch's
    ``CheckpointException``) the lowest failing rank's exception; None if there is none."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for rank in sorted(failures):
                wrapped = failures[rank]
                todo.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        todo += [e.__cause__, e.__context__]
    return None


def is_disk_error(exc: BaseException | None) -> bool:
    """True when ``exc`` is, or wraps, an OSError of a full or failing disk."""
    found = find_os_error(exc)
    return found is not None and found.errno in DISK_ERRNOS


def _innermost(exc: BaseException) -> tuple[BaseException, int | None]:
    """The lowest failing rank's exception inside a ``CheckpointException`` (and its rank)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        wrapped = failures[rank]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(inner, BaseException):
            return inner, rank
    return exc, None


def _disk_full(path: str | os.PathLike | None) -> bool:
    """True when the file system holding ``path`` (or its nearest existing parent) has
    under 1 MiB left for unprivileged writes."""
    probe = os.path.abspath(path) if path else None
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        probe = None if parent == probe else parent
    if not probe:
        return False
    try:
        st = os.statvfs(probe)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def describe_os_error(exc: BaseException, path: str | os.PathLike | None = None) -> str:
    """``PATH: [Errno N] text`` for the OSError in ``exc`` (``path`` when it names none).

    Some writers lose the OSError (torch's zip writer raises a RuntimeError "unexpected
    pos" when a write comes up short): then, if the disk holding ``path`` is full, the
    line says ENOSPC and quotes the writer's error; else it quotes the error alone.
    """
    found = find_os_error(exc)
    if found is None:
        inner, rank = _innermost(exc)
        first = (str(inner).strip().splitlines() or [""])[0][:200]
        what = f"{type(inner).__name__}: {first}" + (f" on rank {rank}" if rank is not None else "")
        if _disk_full(path):
            return f"{path}: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)} ({what})"
        return f"{path}: {what}" if path else what
    where = found.filename or path
    code = f"[Errno {found.errno}] " if found.errno is not None else ""
    text = found.strerror or str(found)
    return f"{where}: {code}{text}" if where else f"{code}{text}"


def write_failure(exc: BaseException, path: str | os.PathLike | None) -> str | None:
    """:func:`describe_os_error` when ``exc`` is an I/O failure (an OSError inside, or the
    disk holding ``path`` is full); None for any other error (a bug to show as it is)."""
    if find_os_error(exc) is None and not _disk_full(path):
        return None
    return describe_os_error(exc, path)
