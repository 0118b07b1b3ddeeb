"""``python -m adadpo_megatron.trainer.launch``: torchrun, quiet where the ranks have spoken.

Same flags as ``torchrun`` (it calls ``torch.distributed.run``). The difference is
what the launcher itself prints when the job ends badly:

* a worker exits with a status the adadpo tools use for an error they already printed
  in one line (1, 2) or for Ctrl-C (130): the launcher exits with that status and adds
  nothing (torchrun prints a ~30-line ``ChildFailedError`` report and a traceback);
* Ctrl-C or SIGTERM reaching the launcher: it stops the workers as torchrun does and
  exits ``128 + signal`` (130 for SIGINT) without a traceback;
* any other failure (a worker crashed with a traceback or was killed): torchrun's full
  report, unchanged.

torchrun's own warnings about the workers it stops are silenced (they repeat the
reported error); its errors are kept.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

__all__ = ["REPORTED_EXIT_CODES", "main"]

REPORTED_EXIT_CODES = frozenset({1, 2, 130})
"""Exit statuses with which an adadpo tool has already printed its one line."""


def _quiet(level: int) -> None:
    """Set the level of torchrun's loggers (each has its own, set from $LOGLEVEL)."""
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run",
                            "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with ``argv``; returns the job's exit status (see the module doc)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # The workers' one-line errors say what happened; torchrun's "Sending process N
    # closing signal SIGTERM" and "failed (exitcode: 2)" log records would repeat them.
    _quiet(logging.CRITICAL)
    try:
        run(args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        if failure.exitcode in REPORTED_EXIT_CODES:
            return failure.exitcode
        _quiet(logging.WARNING)
        print(e, file=sys.stderr)  # torchrun's report: the worker did not say why
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
