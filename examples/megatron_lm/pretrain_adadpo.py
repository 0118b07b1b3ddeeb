#!/usr/bin/env python3
"""AdaDPO (or any registered preference loss) as a drop-in Megatron-LM entry point.

Run it like Megatron-LM's ``pretrain_gpt.py``, with Megatron-LM on ``PYTHONPATH`` and a
packed dataset from ``adadpo-pack``; the plugin's flags select the loss::

    torchrun --nproc-per-node 8 examples/megatron_lm/pretrain_adadpo.py \\
        <your Megatron-LM model/parallel/optimizer flags> \\
        --dataloader-type external --calculate-per-token-loss \\
        --data-path /data/packed_pairs --ref-logprobs /data/packed_pairs/ref_logprobs.npz \\
        --preference-loss adadpo --dpo-beta 0.1 --adadpo-space policy

Written against Megatron-LM's documented ``pretrain(train_valid_test_dataset_provider,
model_provider, model_type, forward_step_func, extra_args_provider=...)`` interface;
``megatron.training`` is imported in ``main`` only, so this file can be imported (and its
pieces tested) without Megatron-LM.
"""

from __future__ import annotations

import os
import sys

# Run from a checkout without installing the plugin.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from adadpo_megatron.integrations import megatron_lm  # noqa: E402


def _megatron_args():
    from megatron.training import get_args

    return get_args()


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None, **_):
    """One GPTModel chunk from Megatron-LM's flags (TE spec under --transformer-impl
    transformer_engine, the local spec otherwise)."""
    from megatron.training.arguments import core_transformer_config_from_args

    from adadpo_megatron.step.model import build_gpt_model

    args = _megatron_args()
    config = core_transformer_config_from_args(args)
    config.adadpo_gpt_options = megatron_lm.gpt_options_from_args(args)
    return build_gpt_model(
        config, args.padded_vocab_size, args.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
        use_te=getattr(args, "transformer_impl", "local") == "transformer_engine")


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """External data iterators (``--dataloader-type external``): train, valid, no test."""
    from megatron.core import parallel_state as ps

    from adadpo_megatron.step.reference import PrecomputedReference, default_sidecar_path

    args = _megatron_args()
    megatron_lm.check_args(args)
    dp = {"dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size()}
    train = megatron_lm.open_packed_dataset(args)
    ref = (PrecomputedReference(args.ref_logprobs, train.fingerprint, train.num_pairs)
           if args.ref_logprobs else None)
    train_iter = megatron_lm.pack_data_iterator(train, args, reference=ref, **dp)
    valid_iter = None
    eval_path = (getattr(args, "valid_data_path", None) or [None])[0]  # Megatron-LM: a list
    if eval_path:
        args_eval = type(args)(**{**vars(args), "data_path": eval_path})
        valid = megatron_lm.open_packed_dataset(args_eval)
        valid_ref = (PrecomputedReference(default_sidecar_path(eval_path), valid.fingerprint,
                                          valid.num_pairs) if ref is not None else None)
        valid_iter = megatron_lm.pack_data_iterator(valid, args_eval, reference=valid_ref, **dp)
    return train_iter, valid_iter, None


# Every rank (all TP and PP ranks) builds its own iterator: each pipeline stage pulls the
# micro-batch from it (the THD metadata is needed on every stage).
train_valid_test_datasets_provider.is_distributed = True

_FORWARD_STEP = []


def forward_step(data_iterator, model):
    """Megatron-LM's forward_step_func: (output, loss_func) from our THD forward step."""
    if not _FORWARD_STEP:
        _FORWARD_STEP.append(megatron_lm.make_forward_step(_megatron_args()))
    return _FORWARD_STEP[0](data_iterator, model)


def main() -> None:
    """Hand everything to Megatron-LM's ``pretrain``."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        extra_args_provider=megatron_lm.add_args,
        args_defaults={"dataloader_type": "external"},
    )


if __name__ == "__main__":
    main()
