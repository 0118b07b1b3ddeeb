"""Command-line flags of the trainer, YAML configs, and the validated run configuration.

Flag names follow Megatron-LM's wherever Megatron-LM has the flag, so a Megatron-LM
launch line moves over unchanged. Three entry points:

* ``build_parser()``: every trainer flag, in groups (model, parallel, training,
  optimizer, data, checkpoint, logging, preference, FP8), plus ``--config FILE.yaml``.
* ``add_args(parser)``: only the plugin's own flags (preference loss and reference),
  usable as Megatron-LM's ``extra_args_provider``; none of them clash with Megatron-LM's.
* ``parse_config(argv)``: YAML + command line -> ``TrainConfig``, a tree of keyword-only
  dataclasses, validated before any process-group work. Every error names the flag.

Batch sizes count *packs* (Megatron's "samples"): ``--micro-batch-size`` packs form one
micro-batch, ``--global-batch-size`` packs one optimizer step. A pack holds one or more
whole pairs; the loss is the mean over the pairs actually in the global batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from adadpo_megatron.trainer.config import (
    LOSS_FIELD_FLAGS,
    ConfigError,
    TrainConfig,
    config_from_args,
    loss_config_from_args,
)

__all__ = [
    "LOSS_FIELD_FLAGS",
    "ConfigError",
    "TrainConfig",
    "add_args",
    "build_parser",
    "config_from_args",
    "loss_config_from_args",
    "parse_args",
    "parse_config",
]


def _loss_defaults() -> dict[str, Any]:
    """LossConfig's own field defaults, so ``--help`` shows them and they cannot drift."""
    from adadpo_megatron.losses import LossConfig

    return {
        f.name: f.default
        for f in dataclasses.fields(LossConfig)
        if f.default is not dataclasses.MISSING
    }


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the plugin's preference-loss and reference flags to ``parser`` and return it.

    Usable as Megatron-LM's ``extra_args_provider``: adds only flags Megatron-LM lacks.
    Defaults come from ``LossConfig``; ``--preference-loss`` choices from the registry.
    """
    from adadpo_megatron.losses import available_losses

    d = _loss_defaults()
    g = parser.add_argument_group("preference loss (adadpo-megatron)")
    g.add_argument("--preference-loss", default=d.get("name", "adadpo"),
                   choices=sorted(available_losses()), help="loss from the registry")
    g.add_argument("--dpo-beta", type=float, default=d["beta"],
                   help="beta: inverse temperature of the margin")
    g.add_argument("--dpo-label-smoothing", type=float, default=d["label_smoothing"],
                   help="eps: label smoothing of dpo/adadpo (cDPO) and robust")
    g.add_argument("--simpo-gamma", type=float, default=d["gamma"], help="simpo margin gamma")
    g.add_argument("--rdpo-alpha", type=float, default=d["alpha"],
                   help="R-DPO length penalty alpha")
    g.add_argument("--cpo-lambda", type=float, default=d["lam"],
                   help="lam: NLL weight of cpo / odds-ratio weight of orpo")
    g.add_argument("--sft-weight", type=float, default=d["sft_weight"],
                   help="weight of the added NLL term on the chosen completion")
    g.add_argument("--adadpo-space", choices=["policy", "ratio"], default=d["balance_space"],
                   help="balance score from policy log-probs or from log-ratios")
    g.add_argument("--adadpo-granularity", choices=["token", "sequence"],
                   default=d["balance_granularity"], help="balance per token or per sequence")
    g.add_argument("--adadpo-clip", type=float, default=d["balance_clip"],
                   help="clip bound C >= 1 of the coefficient k ('inf' for none)")
    g.add_argument("--adadpo-clip-mode", choices=["upper", "both"],
                   default=d["balance_clip_mode"], help="clip k <= C, or 1/C <= k <= C")
    r = parser.add_argument_group("reference model (adadpo-megatron)")
    r.add_argument("--ref-logprobs", default=None,
                   help="precomputed reference side-car (tools/precompute_ref_logprobs.py); "
                        "training then holds no reference model")
    r.add_argument("--ref-load", default=None,
                   help="checkpoint of the online frozen reference (default: the policy's "
                        "initial weights)")
    lp = parser.add_argument_group("log-probs (adadpo-megatron)")
    lp.add_argument("--logprob-impl", choices=["fused", "chunked"], default="fused",
                    help="fused: per-token log-probs straight from the last hidden states and "
                         "the output weight, never the [T, V/TP] logits; chunked: the model's "
                         "logits, then a chunked vocab-parallel log-softmax (the reference)")
    return parser


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="default 4*hidden (or Llama's 8/3*hidden rounded under --swiglu: "
                        "give it explicitly)")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="KV heads under --group-query-attention")
    g.add_argument("--seq-length", type=int, default=512,
                   help="pack capacity in tokens (every pack's padded length is at most this)")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default --seq-length")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"],
                   default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="0 by default (Megatron-LM: 0.1) so policy and reference agree at step 0")
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="the tokenizer's vocabulary is padded to a multiple of this times TP")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available (gloo backend and CPU layers on cpu)")
    g.add_argument("--prefix-attention", choices=["auto", "mask", "flex", "te"], default="auto",
                   help="attention for prefix-shared data (adadpo-pack --prefix-sharing); auto: "
                   "mask on cpu, flex on a GPU (te only when named); verified at start")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="packs per micro-batch")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="packs per optimizer step (default micro-batch-size * DP)")
    g.add_argument("--train-iters", type=int, default=None, help="optimizer steps")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    g.add_argument("--max-skipped-steps", type=int, default=5,
                   help="stop after this many consecutive steps skipped for NaN/inf")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)


def _add_optimizer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"],
                   default="cosine")
    g.add_argument("--lr-warmup-fraction", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 turns clipping off")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="packed dataset directory (adadpo-pack)")
    g.add_argument("--eval-data-path", default=None, help="held-out packed dataset directory")
    g.add_argument("--verify-data", action="store_true",
                   help="re-hash every data file against its meta.json at start (sizes are "
                        "always checked)")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None, help="resume from this checkpoint directory")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: take the model weights only, start at step 0")
    g.add_argument("--adopt-unverified-checkpoint", action="store_true",
                   help="a --load/--ref-load checkpoint written before checksum manifests: "
                        "hash it once (with a warning) and write its manifest")


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--log-dir", default=None, help="metrics.jsonl and config.json go here")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=None,
                   help="eval micro-batch groups per evaluation (default: the whole split)")


def build_parser() -> argparse.ArgumentParser:
    """The trainer's full parser: Megatron-LM-named flags, plugin flags, FP8 flags, --config."""
    from adadpo_megatron.step.fp8 import add_fp8_args
    from adadpo_megatron.trainer.exits import add_exit_args
    from adadpo_megatron.trainer.moe_config import add_arch_args
    from adadpo_megatron.trainer.wandb_logging import add_wandb_args

    p = argparse.ArgumentParser(
        prog="adadpo-train",
        description="Train a Megatron-Core GPTModel with AdaDPO or another preference loss.",
    )
    p.add_argument("--config", default=None,
                   help="YAML file of flag values (dashes or underscores); "
                        "the command line overrides it")
    for add in (_add_model_args, _add_parallel_args, _add_training_args, _add_optimizer_args,
                _add_data_args, _add_checkpoint_args, _add_logging_args):
        add(p)
    add_args(p)
    add_arch_args(p)
    add_fp8_args(p)
    add_exit_args(p)
    add_wandb_args(p)
    from adadpo_megatron.trainer.lora_args import add_lora_args

    add_lora_args(p)
    return p


def _yaml_to_argv(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """Turn a YAML mapping of flag values into argv tokens (so argparse checks types/choices)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from e
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of flag: value")
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            raise ConfigError(f"{path}: unknown key '{key}' (not a flag of adadpo-train; see "
                              "adadpo-train --help)")
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: key '{key}' takes true or false, got {value!r}")
            if value:
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(value, list | dict):
            raise ConfigError(f"{path}: key '{key}' takes a single value, got {value!r}")
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) after the ``--config`` YAML's values.

    Returns the raw namespace; argparse exits with status 2 on a malformed flag.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    yaml_argv = _yaml_to_argv(known.config, parser) if known.config else []
    # argparse keeps the last occurrence of a flag, so the command line wins over the YAML.
    return parser.parse_args(yaml_argv + argv)


def parse_config(argv: Sequence[str] | None = None,
                 world_size: int | None = None) -> TrainConfig:
    """Parse and validate: YAML + command line -> ``TrainConfig`` (see ``config_from_args``)."""
    return config_from_args(parse_args(argv), world_size=world_size)
