"""Path checks every tool runs at start, before any real work: one line per problem.

Each check raises :class:`PathError` whose message is ``FLAG PATH: cause`` (the flag the
user gave, the path, and what is wrong: missing, a directory where a file is expected, a
parent that is a file, a read-only file system, no permission). The tools print it as
``TOOL: error: MESSAGE`` and exit non-zero, with no traceback. Outputs are checked by
actually creating the directory (as the tool would) and a probe file in it, so a
read-only mount or a full quota is found before the first training step, not at the
first checkpoint.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "PathError",
    "check_paths",
    "check_train_paths",
    "readable_dir",
    "readable_file",
    "writable_dir",
    "writable_file",
]


class PathError(ValueError):
    """A path given on the command line cannot be used; the message is one line."""


def _cause(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _where(flag: str, path: str | os.PathLike) -> str:
    return f"{flag} {path}" if flag else str(path)


def readable_file(path: str | os.PathLike, flag: str = "") -> None:
    """Check that ``path`` is an existing, readable regular file (raises :class:`PathError`)."""
    p = Path(path)
    if not p.exists():
        raise PathError(f"{_where(flag, path)}: no such file")
    if p.is_dir():
        raise PathError(f"{_where(flag, path)}: is a directory, expected a file")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise PathError(f"{_where(flag, path)}: cannot read it ({_cause(exc)})") from None


def readable_dir(path: str | os.PathLike, flag: str = "") -> None:
    """Check that ``path`` is an existing directory whose entries can be listed."""
    p = Path(path)
    if not p.exists():
        raise PathError(f"{_where(flag, path)}: no such directory")
    if not p.is_dir():
        raise PathError(f"{_where(flag, path)}: is a file, expected a directory")
    try:
        os.listdir(p)
    except OSError as exc:
        raise PathError(f"{_where(flag, path)}: cannot read it ({_cause(exc)})") from None


def _file_ancestor(p: Path) -> Path | None:
    """The first existing ancestor of ``p`` (or ``p`` itself) that is not a directory."""
    for q in [p, *p.parents]:
        if q.exists():
            return None if q.is_dir() else q
    return None


def writable_dir(path: str | os.PathLike, flag: str = "", *, create: bool = True) -> None:
    """Check that ``path`` is (or can be made) a directory this process can write files in.

    With ``create`` the directory is created (parents too), as the tool would; a probe
    file is written and removed in it. Without ``create`` only an existing ``path`` is
    probed, and a missing one must have a writable existing parent chain.
    """
    p = Path(path)
    blocker = _file_ancestor(p)
    if blocker is not None:
        what = "is a file" if blocker == p else f"its parent {blocker} is a file"
        raise PathError(f"{_where(flag, path)}: {what}, expected a directory")
    if not p.exists():
        if not create:
            parent = next(q for q in p.parents if q.exists())
            return writable_dir(parent, flag, create=False)
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PathError(f"{_where(flag, path)}: cannot create it ({_cause(exc)})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".adadpo-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PathError(f"{_where(flag, path)}: cannot write there ({_cause(exc)})") from None


def writable_file(path: str | os.PathLike, flag: str = "") -> None:
    """Check that the file ``path`` can be written: not a directory, its directory writable."""
    p = Path(path)
    if p.is_dir():
        raise PathError(f"{_where(flag, path)}: is a directory, expected a file")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise PathError(f"{_where(flag, path)}: cannot write it (permission denied)")
    writable_dir(p.parent if str(p.parent) else Path("."), flag, create=True)


def check_paths(checks: Iterable[tuple[str, str | os.PathLike | None, str]]) -> None:
    """Run several checks: ``(kind, path, flag)`` with kind one of ``"file"`` (readable),
    ``"dir"`` (readable), ``"outdir"`` (writable directory), ``"outfile"``; None paths are
    skipped. Raises the first :class:`PathError`."""
    run = {"file": readable_file, "dir": readable_dir, "outdir": writable_dir,
           "outfile": writable_file}
    for kind, path, flag in checks:
        if path is not None and str(path) != "":
            run[kind](path, flag)


def check_train_paths(cfg) -> None:
    """The path checks of ``adadpo-train`` for a validated ``TrainConfig`` (raises PathError).

    Inputs (``--data-path``, ``--eval-data-path``, ``--load``, ``--ref-logprobs``,
    ``--ref-load``) must exist and be readable; outputs (``--save``, ``--log-dir``,
    ``--tensorboard-dir``) are created and probed with a file.
    """
    io, ref = cfg.io, cfg.reference
    check_paths([
        ("dir", io.data_path, "--data-path"),
        ("dir", io.eval_data_path, "--eval-data-path"),
        ("dir", io.load, "--load"),
        ("file", ref.ref_logprobs, "--ref-logprobs"),
        ("dir", ref.ref_load, "--ref-load"),
        ("outdir", io.save, "--save"),
        ("outdir", io.log_dir, "--log-dir"),
        ("outdir", io.tensorboard_dir, "--tensorboard-dir"),
        ("outdir", getattr(getattr(cfg, "wandb", None), "save_dir", None), "--wandb-save-dir"),
    ])
