"""LoRA flags (NeMo / Megatron-Bridge names) -> ``step.lora.LoRASettings``.

``--lora-rank R`` turns LoRA on; ``--lora-alpha A`` (update scaled by A/R, default 32 as
NeMo), ``--lora-dropout P`` (default 0), ``--lora-target-modules`` (any of ``linear_qkv
linear_proj linear_fc1 linear_fc2``; default all four).
"""

from __future__ import annotations

import argparse

from adadpo_megatron.step.lora import LORA_TARGETS, LoRASettings

__all__ = ["add_lora_args", "lora_settings_from_args"]


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """The LoRA flag group (off unless --lora-rank is given)."""
    g = parser.add_argument_group("LoRA (adadpo-megatron)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train rank-R LoRA adapters on a frozen base (off when not given)")
    g.add_argument("--lora-alpha", type=float, default=32.0,
                   help="adapter update scaled by alpha / rank (NeMo's default 32)")
    g.add_argument("--lora-dropout", type=float, default=0.0,
                   help="dropout on the adapters' input")
    g.add_argument("--lora-target-modules", nargs="+", default=list(LORA_TARGETS),
                   metavar="MODULE", help=f"linears to adapt: any of {' '.join(LORA_TARGETS)}")


def lora_settings_from_args(a: argparse.Namespace) -> LoRASettings | None:
    """``LoRASettings`` from the flags, or None without --lora-rank; ValueError naming the flag."""
    rank = getattr(a, "lora_rank", None)
    if rank is None:
        return None
    # LoRASettings' ValueError names the flag; config.py re-raises it as a ConfigError.
    return LoRASettings(rank=rank, alpha=a.lora_alpha, dropout=a.lora_dropout,
                        target_modules=tuple(a.lora_target_modules))
