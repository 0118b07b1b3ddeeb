"""tools/plot_metrics.py: PNG from two runs' metrics.jsonl, and clear errors on bad input."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="plotting needs the [plot] extra (matplotlib)")

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "plot_metrics.py"
_spec = importlib.util.spec_from_file_location("plot_metrics", _TOOL)
plot_metrics = importlib.util.module_from_spec(_spec)
sys.modules["plot_metrics"] = plot_metrics  # dataclasses look their module up there
_spec.loader.exec_module(plot_metrics)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, ada: bool) -> None:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, 11):
        rec = {
            "step": step,
            "loss": math.log(2) - 0.02 * step,
            "rewards/chosen": 0.01 * step,
            "rewards/rejected": -0.01 * step,
            "rewards/margins": 0.02 * step,
            "rewards/accuracies": min(1.0, 0.5 + 0.05 * step),
            "logps/chosen": -40.0 + step,
            "logps/rejected": -40.0 - step,
            "balance/grad_ratio": 1.0 if ada else 1.0 + 0.1 * step,
        }
        if ada:
            rec["adadpo/coef_mean"] = 1.0 + 0.05 * step
        if step % 5 == 0:
            rec["eval/rewards/accuracies"] = 0.5 + 0.04 * step
            rec["eval/rewards/margins"] = 0.01 * step
        lines.append(json.dumps(rec))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_two_runs_make_a_png(tmp_path, capsys):
    _write_run(tmp_path / "adadpo", ada=True)
    _write_run(tmp_path / "dpo", ada=False)
    out = tmp_path / "plots" / "compare.png"
    rc = plot_metrics.main([str(tmp_path / "adadpo"), str(tmp_path / "dpo"), "-o", str(out)])
    assert rc == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert out.stat().st_size > 20_000  # six panels of curves, not an empty canvas
    assert str(out) in capsys.readouterr().out


def test_series_and_labels(tmp_path):
    _write_run(tmp_path / "a", ada=True)
    records = plot_metrics.load_metrics(tmp_path / "a" / "metrics.jsonl")
    steps, values = plot_metrics.series(records, "eval/rewards/accuracies")
    assert steps == [5, 10]
    assert values == pytest.approx([0.7, 0.9])
    assert plot_metrics.series(records, "no/such") == ([], [])
    out = tmp_path / "x.png"
    assert (
        plot_metrics.main(
            [str(tmp_path / "a" / "metrics.jsonl"), "-o", str(out), "--labels", "mine"]
        )
        == 0
    )
    assert out.is_file()
    assert plot_metrics.main([str(tmp_path / "a"), "-o", str(out), "--labels", "p,q"]) == 2


def test_non_finite_values_are_gaps(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(
        '{"step": 1, "loss": 0.7}\n{"step": 2, "loss": NaN}\n{"step": 3, "loss": 0.5}\n{"step": 4, "loss": Infinity}\n'
    )
    assert plot_metrics.series(plot_metrics.load_metrics(f), "loss") == ([1, 3], [0.7, 0.5])


def test_lines_of_one_step_are_merged_later_values_win(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(
        '{"step": 2, "loss": 5, "lr": 0.1}\n{"step": 1, "loss": 1}\n\n'
        '{"step": 2, "eval/loss": 3}\n{"step": 2, "loss": 2}\n'
    )
    records = plot_metrics.load_metrics(f)
    assert [r["step"] for r in records] == [1, 2]
    assert plot_metrics.series(records, "loss") == ([1, 2], [1.0, 2.0])
    assert records[1] == {"step": 2, "loss": 2, "lr": 0.1, "eval/loss": 3}


def test_missing_file_is_reported(tmp_path, capsys):
    rc = plot_metrics.main([str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"step": 3, "loss": ', "malformed JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"loss": 1.0}', '"step"'),
        ('{"step": "4"}', '"step"'),
    ],
)
def test_bad_line_is_named_with_its_line_number(tmp_path, capsys, bad_line, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n\n' + bad_line + "\n")
    with pytest.raises(plot_metrics.MetricsError, match=f"metrics.jsonl:3: .*{message}"):
        plot_metrics.load_metrics(run / "metrics.jsonl")
    assert plot_metrics.main([str(run), "-o", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl:3:" in capsys.readouterr().err
