"""Elapsed time and the estimated time to the end of training, for the log line and metrics.

The estimate is ``median(step times so far) * steps left``. The median, not the mean: the
first steps of a run are slow (allocator warm-up, the first checkpoint, a first evaluation,
compilation), and a mean would keep that in the estimate for a long time; the median
ignores any minority of slow steps.

Both trainers record two scalars per training step (seconds, floats):

* ``elapsed_s``: wall time since training started in this process (a resumed run counts
  from its own start; the steps of the earlier process are not in it).
* ``eta_s``: the estimate for the steps still to run (0 at the last step).

``format_duration`` prints them on the log line as ``H:MM:SS`` (``D days, H:MM:SS`` past a
day).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

__all__ = ["StepClock", "format_duration"]


class StepClock:
    """Step times of this process and the estimate from their median.

    Args:
        train_iters: the step the run ends at (``--train-iters``).
        clock: seconds from an arbitrary origin (default ``time.perf_counter``).
    """

    def __init__(self, train_iters: int, clock: Callable[[], float] | None = None) -> None:
        self.train_iters = int(train_iters)
        self._clock = clock or time.perf_counter
        self._start = self._clock()
        self._last = self._start
        self._times: list[float] = []  # kept sorted: the median is the middle element(s)

    def add(self, seconds: float) -> None:
        """Record one step that took ``seconds``."""
        bisect.insort(self._times, float(seconds))

    def lap(self) -> float:
        """Record a step as the time since the previous ``lap`` (or since construction) and
        return it: for loops that see only step boundaries (Megatron-LM's)."""
        now = self._clock()
        seconds, self._last = now - self._last, now
        self.add(seconds)
        return seconds

    def median(self) -> float | None:
        """Median step time in seconds (None before the first step)."""
        n = len(self._times)
        if n == 0:
            return None
        mid = n // 2
        return self._times[mid] if n % 2 else 0.5 * (self._times[mid - 1] + self._times[mid])

    def elapsed(self) -> float:
        """Seconds since construction."""
        return self._clock() - self._start

    def eta(self, step: int) -> float | None:
        """Seconds the steps after ``step`` are expected to take (None before any step)."""
        median = self.median()
        if median is None:
            return None
        return median * max(0, self.train_iters - int(step))

    def metrics(self, step: int) -> dict[str, float]:
        """``{"elapsed_s", "eta_s"}`` after ``step`` (``eta_s`` only once a step is known)."""
        out = {"elapsed_s": self.elapsed()}
        eta = self.eta(step)
        if eta is not None:
            out["eta_s"] = eta
        return out


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` from a day on), rounded to the second."""
    total = int(round(max(0.0, float(seconds))))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours}:{minutes:02d}:{secs:02d}"
    if days:
        text = f"{days} day{'s' if days > 1 else ''}, {text}"
    return text
