"""Helpers of ``rehearse.sh`` (the 70B journey shrunk to 8 CPU processes).

    python examples/llama3_70b/rehearsal.py make-hf --output DIR --flags "<trainer flags>"
        A random-init Hugging Face Llama whose shape is read from the trainer flags (the
        same list the run uses, so the two cannot disagree), saved by ``transformers``.
    python examples/llama3_70b/rehearsal.py compare --reference RUN_A --resumed RUN_B
        RUN_B (stopped by SIGTERM, then relaunched) must log RUN_A's losses and grad norms
        step for step (relative 1e-5) and end with RUN_A's weights, bitwise.

Each prints one JSON line and exits 1 when its check fails.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

# The relaunch repeats the same arithmetic on the same layout: round-off only.
RESUME_RTOL = 1e-5


def make_hf(output: str, flags: str, vocab_size: int, seed: int) -> dict:
    """Saves a random-init ``LlamaForCausalLM`` (fp32) shaped by ``flags`` into ``output``."""
    import torch
    import transformers

    from adadpo_megatron.trainer.arguments import build_parser

    a, _ = build_parser().parse_known_args(shlex.split(flags))
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.ffn_hidden_size,
        num_hidden_layers=a.num_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_query_groups,
        max_position_embeddings=a.max_position_embeddings,
        rms_norm_eps=a.norm_epsilon,
        rope_theta=float(a.rotary_base),
        tie_word_embeddings=not a.untie_embeddings_and_output_weights,
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(output)
    return {"hf": output, "params": sum(p.numel() for p in model.parameters()),
            "layers": a.num_layers, "hidden": a.hidden_size, "vocab": vocab_size}


def _metrics(run: Path) -> dict[int, dict]:
    rows = {}
    for line in (run / "logs" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "step" in row:
            rows[row["step"]] = row
    return rows


def _weights(ckpt: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f"{ckpt.name}.consolidated.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    # Our own file, consolidated a moment ago from this rehearsal's checkpoint (trusted): it
    # holds numpy RNG states besides the tensors, which weights_only refuses.
    sd = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)
            and not k.startswith(("optimizer", "rng_state")) and "_extra_state" not in k}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RESUME_RTOL * max(abs(a), abs(b), 1e-12)


def compare(reference: str, resumed: str) -> dict:
    """Step-by-step comparison of two runs of the same flags (see the module doc)."""
    ref_dir, res_dir = Path(reference), Path(resumed)
    a, b = _metrics(ref_dir), _metrics(res_dir)
    report: dict = {"steps_reference": len(a), "steps_resumed": len(b), "mismatches": []}
    if sorted(a) != sorted(b):
        report["mismatches"].append(f"steps differ: {sorted(a)} vs {sorted(b)}")
    for step in sorted(set(a) & set(b)):
        for key in ("loss", "grad_norm"):
            if key in a[step] and not _close(a[step][key], b[step].get(key, float("nan"))):
                report["mismatches"].append(f"step {step} {key}: {a[step][key]} vs {b[step][key]}")
    report["max_loss_rel_diff"] = max(
        (abs(a[s]["loss"] - b[s]["loss"]) / max(abs(a[s]["loss"]), 1e-12) for s in set(a) & set(b)),
        default=None)
    last = max(a)
    ckpt_name = f"iter_{last:07d}"
    wa, wb = _weights(ref_dir / ckpt_name), _weights(res_dir / ckpt_name)
    if wa.keys() != wb.keys() or not wa:
        report["mismatches"].append("checkpoint tensors differ in names")
    else:
        diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
        report["max_weight_abs_diff"] = diff
        report["weight_tensors"] = len(wa)
        # Bitwise: the recipe's lr (5e-7) moves weights by less than any useful tolerance,
        # and the same layout repeats the same arithmetic (gloo reductions are deterministic).
        if diff != 0.0:
            report["mismatches"].append(f"final weights differ by {diff:.3g}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module doc."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-hf")
    m.add_argument("--output", required=True)
    m.add_argument("--flags", required=True, help="the trainer flags, one shell-quoted string")
    m.add_argument("--vocab-size", type=int, required=True)
    m.add_argument("--seed", type=int, default=0)
    c = sub.add_parser("compare")
    c.add_argument("--reference", required=True)
    c.add_argument("--resumed", required=True)
    a = p.parse_args(argv)
    if a.cmd == "make-hf":
        print(json.dumps(make_hf(a.output, a.flags, a.vocab_size, a.seed)))
        return 0
    report = compare(a.reference, a.resumed)
    print(json.dumps(report))
    return 1 if report["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
