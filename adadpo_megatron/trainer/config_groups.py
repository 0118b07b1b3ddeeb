"""The flag groups that live in their own modules (FP8, exits, W&B, model family and MoE),
validated together for :func:`adadpo_megatron.trainer.config.config_from_args`.

Each group's own module parses and checks its flags; this one adds the checks that span
groups (FP8 needs a GPU and bf16) and returns them as ``TrainConfig`` keyword arguments.
Errors are ``ValueError``/``RuntimeError`` naming the flag; ``config_from_args`` turns them
into ``ConfigError``.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["group_settings"]


def group_settings(a: argparse.Namespace, parallel: Any, model: Any) -> dict[str, Any]:
    """``{"fp8", "exits", "wandb", "arch"}`` settings from the namespace ``a``.

    ``parallel`` and ``model`` are the already validated ``ParallelArgs`` and ``ModelArgs``.
    Raises ValueError (or RuntimeError for a missing Transformer Engine) naming the flag.
    """
    from adadpo_megatron.step.fp8 import FP8Settings, require_transformer_engine
    from adadpo_megatron.trainer.exits import exit_config_from_args
    from adadpo_megatron.trainer.moe_config import arch_from_args
    from adadpo_megatron.trainer.wandb_logging import wandb_config_from_args

    fp8 = FP8Settings.from_args(a)
    if fp8.enabled:
        if parallel.device != "cuda":
            raise ValueError("--fp8-format needs a CUDA GPU with Transformer Engine; this run "
                             "is on the CPU: drop --fp8-format")
        require_transformer_engine(fp8)
        if not a.bf16:
            raise ValueError("--fp8-format needs --bf16 (FP8 GEMMs run inside a bf16 model)")
    return {"fp8": fp8, "exits": exit_config_from_args(a), "wandb": wandb_config_from_args(a),
            "arch": arch_from_args(a, parallel, model)}
