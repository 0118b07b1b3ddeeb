"""The README's loss table, generated from the registry so that it cannot drift.

``python -m adadpo_megatron.losses.table`` prints the Markdown; ``--write README.md``
replaces the region between ``<!-- losses:begin -->`` and ``<!-- losses:end -->``.
A unit test checks the committed README against :func:`loss_table_markdown`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from adadpo_megatron.losses.compute import METRICS, metric_reduction
from adadpo_megatron.losses.config import (
    BALANCE_GRANULARITIES,
    BALANCE_SPACES,
    CLIP_MODES,
    FIELD_FLAGS,
    LossConfig,
)
from adadpo_megatron.losses.registry import available_losses, get_loss_spec

BEGIN = "<!-- losses:begin -->"
END = "<!-- losses:end -->"

_BALANCE_OPTIONS = {
    "balance_space": (
        ", ".join(BALANCE_SPACES),
        "balance `a = pol` or `a = rho` (ratio needs a reference-based loss); every loss measures `balance/grad_ratio` here",
    ),
    "balance_granularity": (
        ", ".join(BALANCE_GRANULARITIES),
        "`s = a_w/len_w - a_l/len_l` (token, the paper's stable form) or `s = a_w - a_l` (sequence, sum-margin losses only)",
    ),
    "balance_clip": ("float >= 1, or inf", "`C`: `log k = min(s, log C)`"),
    "balance_clip_mode": (", ".join(CLIP_MODES), "upper: `k <= C`; both: `1/C <= k <= C`"),
}


def _default(field: str) -> str:
    value = {f.name: f.default for f in dataclasses.fields(LossConfig)}[field]
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"`{value}`"


def _hparams(name: str) -> str:
    spec = get_loss_spec(name)
    fields = list(spec.hparams)
    if spec.balanced:
        fields += ["balance_clip", "balance_clip_mode"]
    return ", ".join(f"`{f}` `{FIELD_FLAGS[f]}`={_default(f)}" for f in fields)


def loss_table_markdown() -> str:
    """The README's loss section (between the markers), as Markdown text ending in a newline."""
    lines = [
        "<!-- generated from the registry: python -m adadpo_megatron.losses.table --write README.md -->",
        "",
        "Select a loss with `--preference-loss NAME` (`LossConfig.name`). Per pair: `pol_w`, `pol_l` policy",
        "log-probs summed over completion tokens, `ref_*` the reference's, `rho = pol - ref`, `len_*`",
        "completion token counts, `logsig = log(sigmoid)`, `k` the detached AdaDPO balance coefficient,",
        "`sg` stop-gradient, `eps` = `label_smoothing`. The batch loss is the mean over all pairs of the",
        "global batch. `beta` also scales the logged rewards of every loss (ORPO's loss ignores it).",
        "",
        "| loss | per-pair loss | needs reference | hyper-parameters `flag`=default |",
        "|---|---|---|---|",
    ]
    for name in available_losses():
        spec = get_loss_spec(name)
        ref = "yes" if spec.needs_reference else "no"
        lines.append(f"| `{name}` | {spec.formula} | {ref} | {_hparams(name)} |")
    lines += [
        "",
        f"Every loss also takes `sft_weight` `{FIELD_FLAGS['sft_weight']}`={_default('sft_weight')}: "
        "`+ sft_weight*(-pol_w/len_w)` (RPO-style NLL on the chosen completion).",
        "",
        "Balance options (`ada*` losses; `k = exp(log k)`, detached, computed in log space):",
        "",
        "| option | flag | values | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for field, (values, meaning) in _BALANCE_OPTIONS.items():
        lines.append(
            f"| `{field}` | `{FIELD_FLAGS[field]}` | {values} | {_default(field)} | {meaning} |"
        )
    lines += [
        "",
        "Metrics (per pair, averaged over the global batch unless marked max; only `rewards/*` are beta-scaled):",
        "",
    ]
    for metric, meaning in METRICS.items():
        reduction = " (max)" if metric_reduction(metric) == "max" else ""
        lines.append(f"- `{metric}`{reduction}: {meaning}")
    return "\n".join(lines) + "\n"


def replace_region(text: str, body: str) -> str:
    """``text`` with the region between :data:`BEGIN` and :data:`END` replaced by ``body``."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + body + text[end:]


def main(argv: list[str] | None = None) -> int:
    """Print the table, or write it into the README given with ``--write``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", type=Path, help="README.md whose loss region to replace")
    args = parser.parse_args(argv)
    body = loss_table_markdown()
    if args.write is None:
        print(body, end="")
    else:
        args.write.write_text(
            replace_region(args.write.read_text(encoding="utf-8"), body), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
