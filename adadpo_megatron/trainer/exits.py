"""Megatron-LM's exit conventions for ``adadpo-train``: stop cleanly, save, exit 0.

Flags (Megatron-LM's names and meaning):

* ``--exit-interval N``: stop after step ``N``, ``2N``, ... (the first one reached).
* ``--exit-duration-in-mins M``: stop after the first step that ends more than ``M``
  minutes after the trainer started.
* ``--exit-signal-handler``: on ``--exit-signal`` (default SIGTERM), finish the step in
  progress, save, exit 0. A Slurm time limit then costs at most one step: ask Slurm for
  the signal ahead of the limit (``#SBATCH --signal=TERM@300``) and requeue
  (``examples/llama3_70b/slurm_adadpo_70b.sbatch``); the next run resumes with ``--load``.

Every rank decides together: the flags are all-reduced (MAX) over the default group once
per step when a signal or a duration can end the run, because a signal may reach the ranks
at different moments and clocks differ. The loop then writes a checkpoint (when ``--save``
is set and the step was not just saved) and returns normally.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import time
from typing import Any

import torch

__all__ = ["ExitConfig", "ExitPolicy", "add_exit_args", "exit_config_from_args"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExitConfig:
    """When a run stops early (and saves): all off by default."""

    exit_interval: int | None = None
    """Stop after a step that is a multiple of this (``--exit-interval``)."""
    exit_duration_in_mins: float | None = None
    """Stop after the first step ending past this many minutes of run time."""
    exit_signal_handler: bool = False
    """Stop after the current step when ``exit_signal`` arrives."""
    exit_signal: int = int(signal.SIGTERM)
    """The signal number (``--exit-signal``, a name such as SIGTERM or SIGUSR1)."""


def _signal_number(text: str) -> int:
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(getattr(signal.Signals, name))
    except AttributeError:
        raise argparse.ArgumentTypeError(
            f"unknown signal {text!r} (e.g. SIGTERM, SIGUSR1)") from None


def add_exit_args(parser: argparse.ArgumentParser) -> None:
    """Adds ``--exit-interval``, ``--exit-duration-in-mins``, ``--exit-signal-handler`` and
    ``--exit-signal`` (group "exits") to ``parser``."""
    g = parser.add_argument_group("exits (Megatron-LM's conventions)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 after a step that is a multiple of N")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 after the first step ending past M minutes")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal: finish the step, save, exit 0")
    g.add_argument("--exit-signal", type=_signal_number, default=int(signal.SIGTERM),
                   help="signal for --exit-signal-handler (default SIGTERM)")


def exit_config_from_args(a: argparse.Namespace) -> ExitConfig:
    """``ExitConfig`` from parsed flags; ValueError naming the flag for a bad value."""
    interval = getattr(a, "exit_interval", None)
    minutes = getattr(a, "exit_duration_in_mins", None)
    if interval is not None and interval < 1:
        raise ValueError(f"--exit-interval {interval}: must be a positive number of steps")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"--exit-duration-in-mins {minutes}: must be a positive duration")
    return ExitConfig(exit_interval=interval, exit_duration_in_mins=minutes,
                      exit_signal_handler=bool(getattr(a, "exit_signal_handler", False)),
                      exit_signal=int(getattr(a, "exit_signal", signal.SIGTERM)))


class ExitPolicy:
    """Decides, after each step, whether the run stops now (the same answer on every rank).

    Create it when the run starts (its clock starts then); with ``exit_signal_handler`` it
    installs a handler that only records the signal. ``clock`` is injectable for tests.
    """

    def __init__(self, cfg: ExitConfig, *, clock=time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.start = clock()
        self.received = False
        self._previous: Any = None
        if cfg.exit_signal_handler:
            self._previous = signal.signal(cfg.exit_signal, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        """Put back the signal handler that was there before (call at the end of the run)."""
        if self._previous is not None:
            signal.signal(self.cfg.exit_signal, self._previous)
            self._previous = None

    def reason(self, step: int) -> str | None:
        """Why the run stops after ``step`` (counted from 1), or None to go on.

        Collective (one all-reduce MAX over the default group) when a signal or a duration
        can end the run and a process group exists; call it on every rank after every step.
        """
        cfg = self.cfg
        if cfg.exit_interval and step % cfg.exit_interval == 0:
            return f"--exit-interval {cfg.exit_interval}"
        if not cfg.exit_signal_handler and cfg.exit_duration_in_mins is None:
            return None
        late = (cfg.exit_duration_in_mins is not None
                and self.clock() - self.start > 60.0 * cfg.exit_duration_in_mins)
        flags = torch.tensor([int(self.received), int(late)], dtype=torch.int64)
        if torch.distributed.is_initialized():
            if torch.distributed.get_backend() == "nccl":
                flags = flags.cuda()
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        received, late = (bool(x) for x in flags.tolist())
        if received:
            return f"signal {signal.Signals(cfg.exit_signal).name} (--exit-signal-handler)"
        if late:
            return f"--exit-duration-in-mins {cfg.exit_duration_in_mins:g} reached"
        return None
