"""examples/loss_demo.py: dpo's grad_ratio drifts above 1, adadpo's is 1 wherever the clip is free."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

DEMO = Path(__file__).resolve().parents[2] / "examples" / "loss_demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("loss_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; see test_losses_math._one_thread
    yield module
    torch.set_num_threads(threads)


def test_demo_shows_the_imbalance_and_the_balance(demo) -> None:
    history = demo.run(steps=40)
    dpo, ada = history["dpo"], history["adadpo"]
    assert dpo[0]["balance/grad_ratio"] < 1.3 < sum(r["balance/grad_ratio"] for r in dpo[-10:]) / 10
    for row in ada:
        assert row["adadpo/coef_max"] <= 2.0 + 1e-6
        assert math.isnan(row["ratio|free"]) or row["ratio|free"] == 1.0
    clipped = [r["adadpo/clip_frac"] for r in ada]
    assert 0 < max(clipped) < 1
    assert ada[-1]["balance/grad_ratio"] < dpo[-1]["balance/grad_ratio"]


def test_demo_main_prints_both_losses(demo, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--steps", "4", "--log-every", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "grad_ratio" in lines[0] and "clip_frac" in lines[0] and len(lines) == 3
