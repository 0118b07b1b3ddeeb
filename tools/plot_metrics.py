"""Draw training curves of one or several runs from their ``metrics.jsonl`` into a PNG.

Each run is a log directory holding ``metrics.jsonl`` (or the JSONL file itself), one
JSON object per logged step with ``step`` and metric names as in LOSSES.md
(``loss``, ``logps/chosen``, ``rewards/margins``, ``adadpo/coef_mean``, ...; evaluation
metrics prefixed ``eval/``). Each run is one colour, labelled with its directory name
or ``--labels``, so DPO and AdaDPO runs can be compared panel by panel.

Usage::

    python tools/plot_metrics.py runs/adadpo runs/dpo --output runs/compare.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

# (title, [(metric, line style, legend suffix)], y label)
PANELS: list[tuple[str, list[tuple[str, str, str]], str]] = [
    ("loss", [("loss", "-", "train"), ("eval/loss", "--", "eval")], "loss"),
    (
        "completion log-probs",
        [
            ("logps/chosen", "-", "chosen"),
            ("logps/rejected", ":", "rejected"),
            ("eval/logps/chosen", "--", "eval chosen"),
            ("eval/logps/rejected", "-.", "eval rejected"),
        ],
        "summed log-prob",
    ),
    (
        "reward margin",
        [("rewards/margins", "-", "train"), ("eval/rewards/margins", "--", "eval")],
        "beta * (rho_w - rho_l)",
    ),
    (
        "reward accuracy",
        [("rewards/accuracies", "-", "train"), ("eval/rewards/accuracies", "--", "eval")],
        "fraction rho_w > rho_l",
    ),
    ("AdaDPO coefficient k", [("adadpo/coef_mean", "-", "mean")], "k"),
    ("gradient balance", [("balance/grad_ratio", "-", "")], "|dL/dpi_l| / |dL/dpi_w|"),
]


class MetricsError(ValueError):
    """A metrics file that cannot be read; the message names the file and line."""


@dataclass(frozen=True, kw_only=True)
class Run:
    """One run's metrics: its label and its records sorted by step."""

    label: str
    """Legend label of the run."""
    records: list[dict[str, float]]
    """One dict per logged step (its lines merged), sorted by ``step``."""


def metrics_path(path: Path) -> Path:
    """``path`` itself if it is a file, else ``path/metrics.jsonl``."""
    return path / "metrics.jsonl" if path.is_dir() else path


def load_metrics(path: Path) -> list[dict[str, float]]:
    """Read a ``metrics.jsonl``; returns its records sorted by ``step``.

    Blank lines are skipped. Records of the same step are merged (the trainer writes a
    step's training and evaluation metrics as two lines); where a metric appears twice
    for one step (a run resumed from an earlier checkpoint logs those steps again) the
    later value wins. Raises MetricsError naming the file and 1-based line of a bad line.
    """
    if not path.is_file():
        raise MetricsError(
            f"{path}: no such metrics file (pass a run's --log-dir or its metrics.jsonl)"
        )
    by_step: dict[int, dict[str, float]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise MetricsError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            step = record.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                raise MetricsError(f'{path}:{lineno}: missing or non-integer "step" ({step!r})')
            by_step.setdefault(step, {}).update(record)
    if not by_step:
        raise MetricsError(f"{path}: no metrics records")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of metric ``key`` over the records where it is a finite number."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def plot_runs(runs: list[Run], output: Path, title: str | None = None) -> Path:
    """Draw every panel of PANELS for ``runs`` into the PNG ``output``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel_title, metrics, ylabel) in zip(axes.flat, PANELS, strict=True):
        drawn = False
        for i, run in enumerate(runs):
            for key, style, suffix in metrics:
                steps, values = series(run.records, key)
                if not steps:
                    continue
                label = f"{run.label} {suffix}".strip()
                ax.plot(
                    steps,
                    values,
                    style,
                    color=colors[i % len(colors)],
                    label=label,
                    marker="o" if len(steps) <= 30 else None,
                    markersize=3,
                )
                drawn = True
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            n_lines = len(ax.get_legend_handles_labels()[1])
            ax.legend(fontsize="x-small", ncol=2 if n_lines > 4 else 1)
        else:
            ax.text(
                0.5,
                0.5,
                "not logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
    if title:
        fig.suptitle(title)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags of this tool."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="+", type=Path, help="run log directories or metrics.jsonl files")
    p.add_argument("--output", "-o", type=Path, default=Path("metrics.png"), help="PNG to write")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per run")
    p.add_argument("--title", default=None, help="figure title")
    return p


def main(argv: list[str] | None = None) -> int:
    """Plot the runs named on the command line; returns 0, or 2 on unreadable input."""
    args = build_parser().parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        print(f"--labels has {len(labels)} labels for {len(args.runs)} runs", file=sys.stderr)
        return 2
    runs = []
    try:
        for i, path in enumerate(args.runs):
            file = metrics_path(path)
            label = labels[i] if labels else (path.name if path.is_dir() else file.parent.name)
            runs.append(Run(label=label, records=load_metrics(file)))
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = plot_runs(runs, args.output, args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
