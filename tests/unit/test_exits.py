"""adadpo-train's exit flags and the per-step exit decision (trainer/exits.py), in one process."""

from __future__ import annotations

import os
import signal

import pytest

from adadpo_megatron.trainer.arguments import parse_config
from adadpo_megatron.trainer.config import ConfigError
from adadpo_megatron.trainer.exits import ExitConfig, ExitPolicy

BASE = ["--train-iters", "10", "--data-path", "/d", "--device", "cpu"]


def test_flags_parse_into_the_config() -> None:
    cfg = parse_config([*BASE, "--exit-interval", "4", "--exit-duration-in-mins", "1.5",
                        "--exit-signal-handler", "--exit-signal", "SIGUSR1"], world_size=1)
    assert cfg.exits == ExitConfig(exit_interval=4, exit_duration_in_mins=1.5,
                                   exit_signal_handler=True, exit_signal=int(signal.SIGUSR1))
    assert parse_config(BASE, world_size=1).exits == ExitConfig()  # all off by default


@pytest.mark.parametrize(("flags", "needle"), [
    (["--exit-interval", "0"], "--exit-interval 0"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins 0"),
])
def test_bad_values_name_the_flag(flags, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config([*BASE, *flags], world_size=1)


def test_interval_stops_on_multiples() -> None:
    policy = ExitPolicy(ExitConfig(exit_interval=3))
    assert [s for s in range(1, 10) if policy.reason(s)] == [3, 6, 9]
    assert "--exit-interval 3" in policy.reason(3)


def test_duration_counts_from_the_start() -> None:
    now = [100.0]
    policy = ExitPolicy(ExitConfig(exit_duration_in_mins=2), clock=lambda: now[0])
    now[0] += 119.0
    assert policy.reason(1) is None
    now[0] += 2.0
    assert "--exit-duration-in-mins 2 reached" in policy.reason(2)


def test_signal_is_recorded_and_the_old_handler_restored() -> None:
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(a))
    try:
        policy = ExitPolicy(ExitConfig(exit_signal_handler=True, exit_signal=int(signal.SIGUSR1)))
        assert policy.reason(1) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # handled between bytecodes: recorded only
        assert "signal SIGUSR1" in policy.reason(2)
        policy.restore()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert len(seen) == 1  # the handler that was there before is back
    finally:
        signal.signal(signal.SIGUSR1, previous)
