"""The ETA of the log line and metrics: median step time x steps left, elapsed time."""

from __future__ import annotations

import re

import pytest

from adadpo_megatron.trainer.eta import StepClock, format_duration
from adadpo_megatron.trainer.metrics import format_log_line


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_estimate_is_the_median_step_time_times_the_steps_left() -> None:
    clock = FakeClock()
    eta = StepClock(10, clock=clock)
    assert eta.median() is None and eta.eta(0) is None
    assert eta.metrics(0) == {"elapsed_s": 0.0}
    eta.add(30.0)  # a slow first step (warm-up): alone, it is the estimate
    assert eta.eta(1) == 30.0 * 9
    eta.add(2.0)
    assert eta.median() == 16.0  # even count: the mean of the middle two
    eta.add(2.0)
    eta.add(3.0)
    eta.add(1.0)
    # Sorted 1, 2, 2, 3, 30: the median 2 ignores the slow step (the mean would be 7.6).
    assert eta.median() == 2.0
    assert eta.eta(5) == 2.0 * 5
    assert eta.eta(10) == 0.0 and eta.eta(12) == 0.0
    clock.now = 145.5
    assert eta.metrics(5) == {"elapsed_s": 45.5, "eta_s": 10.0}


def test_lap_times_the_interval_between_step_boundaries() -> None:
    clock = FakeClock()
    eta = StepClock(4, clock=clock)
    for now in (110.0, 111.0, 113.0):  # steps of 10 s (first, slow), 1 s, 2 s
        clock.now = now
        eta.lap()
    assert eta.median() == 2.0 and eta.eta(3) == 2.0 and eta.elapsed() == 13.0


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.4, "0:00:59"), (59.6, "0:01:00"),
                                           (3725, "1:02:05"), (90061, "1 day, 1:01:01"),
                                           (2 * 86400 + 7, "2 days, 0:00:07"), (-3, "0:00:00")])
def test_durations_print_as_hours_minutes_seconds(seconds, text) -> None:
    assert format_duration(seconds) == text


def test_the_log_line_shows_elapsed_and_eta_after_the_step() -> None:
    line = format_log_line(3, 10, {"loss": 0.5, "elapsed_s": 65.0, "eta_s": 3725.0})
    assert re.search(r"\] step 3/10 \| elapsed 0:01:05 \| eta 1:02:05 \| loss 0.5000$", line)
    # Evaluation records carry neither.
    assert "eta" not in format_log_line(3, 10, {"eval/loss": 0.5})


def test_the_trainer_loop_records_elapsed_and_eta(monkeypatch) -> None:
    """train(): every step's record carries both, from the step times it measured."""
    import types

    import adadpo_megatron.trainer.eta as eta_mod
    from adadpo_megatron.trainer import loop

    # perf_counter calls in order: the clock's start, then per step: start, end, elapsed.
    times = iter([0.0, 0.0, 50.0, 50.0,  # step 1: 50 s (slow)
                  50.0, 52.0, 52.0,      # step 2: 2 s
                  52.0, 55.0, 55.0,      # step 3: 3 s
                  55.0, 56.0, 56.0])     # step 4: 1 s
    fake = types.SimpleNamespace(perf_counter=lambda: next(times))
    monkeypatch.setattr(loop, "time", fake)
    monkeypatch.setattr(eta_mod, "time", fake)
    result = types.SimpleNamespace(stepped=True, loss_finite=True, grad_norm=1.0)
    monkeypatch.setattr(loop, "run_step", lambda run: ({"pairs": 1.0, "tokens": 4.0,
                                                         "padded_tokens": 4.0, "loss": 0.7,
                                                         "lr": 1e-3}, result))
    logged = []
    cfg = types.SimpleNamespace(
        training=types.SimpleNamespace(train_iters=4, global_batch_size=1, max_skipped_steps=3),
        model=types.SimpleNamespace(seq_length=4),
        io=types.SimpleNamespace(log_interval=1, eval_interval=None, save=None))
    writer = types.SimpleNamespace(log=lambda step, n, m: logged.append((step, m)),
                                   message=lambda text: None)
    run = loop.Run(cfg=cfg, model=[], optimizer=None, scheduler=None, train_data=None,
                   position=None, eval_data=None, forward_step=None, step_context=None,
                   writer=writer)
    loop.train(run)
    got = [(s, m["step_time_s"], m["elapsed_s"], m["eta_s"]) for s, m in logged]
    # Medians: 50, 26 (50 and 2), 3 (2, 3, 50), 2.5; elapsed counts from train()'s start.
    assert got == [(1, 50.0, 50.0, 150.0), (2, 2.0, 52.0, 52.0), (3, 3.0, 55.0, 3.0),
                   (4, 1.0, 56.0, 0.0)]
