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

import atexit
import os
import sys

# Run from a checkout without installing the plugin.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from adadpo_megatron.integrations import megatron_lm  # noqa: E402


def _megatron_args():
    from megatron.training import get_args

    return get_args()


def _fail(message: str) -> None:
    """One line on stderr (rank 0) and exit status 2: a bad flag stops every rank."""
    import torch

    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"pretrain_adadpo.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


_CHECKED = []


def _check_once(args) -> None:
    if not _CHECKED:
        try:
            megatron_lm.check_args(args)
            megatron_lm.gpt_options_from_args(args)  # the dataset's layout vs CP, recompute
        except ValueError as e:
            _fail(str(e))
        _CHECKED.append(True)


def _gpt(args, pre_process: bool = True, post_process: bool = True, vp_stage=None):
    from megatron.training.arguments import core_transformer_config_from_args

    from adadpo_megatron.step.model import build_gpt_model

    config = core_transformer_config_from_args(args)
    config.adadpo_gpt_options = megatron_lm.gpt_options_from_args(args)
    return build_gpt_model(
        config, args.padded_vocab_size, args.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
        use_te=getattr(args, "transformer_impl", "local") == "transformer_engine")


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None, **_):
    """One GPTModel chunk from Megatron-LM's flags (TE spec under --transformer-impl
    transformer_engine, the local spec otherwise). Checks every flag first, so a bad one
    fails before any model is built."""
    args = _megatron_args()
    _check_once(args)
    return _gpt(args, pre_process, post_process, vp_stage)


def _online_reference():
    """The frozen reference: the same model, weights from --ref-load (torch_dist), placed and
    wrapped as Megatron-LM places the policy (CUDA device, Float16Module under --bf16)."""
    from adadpo_megatron.step.reference import build_online_reference
    from adadpo_megatron.trainer.checkpointing import load_model_weights

    args = _megatron_args()
    chunks = build_online_reference(
        lambda: [megatron_lm.place_reference(_gpt(args), args)], [None], args.ref_load,
        load_weights=load_model_weights)
    return chunks[0]


def _step_metrics():
    """The plugin's metrics writer (metrics.jsonl, TensorBoard, log line) for this run."""
    from megatron.core import parallel_state as ps

    from adadpo_megatron.integrations.megatron_lm_data import microbatches_per_step
    from adadpo_megatron.integrations.megatron_lm_metrics import StepMetrics
    from adadpo_megatron.integrations.megatron_lm_wandb import megatron_wandb_sink
    from adadpo_megatron.trainer.loop import _is_logging_rank
    from adadpo_megatron.trainer.metrics import MetricsWriter

    args = _megatron_args()
    start = int(args.consumed_train_samples or 0) // args.global_batch_size
    tb = os.path.join(args.tensorboard_dir, "adadpo") if args.tensorboard_dir else None
    writer = MetricsWriter(enabled=_is_logging_rank(), log_dir=args.log_dir,
                           tensorboard_dir=tb, start_step=start)
    atexit.register(writer.close)
    m = microbatches_per_step(args, ps.get_data_parallel_world_size())
    # Megatron-LM sets args.curr_iteration to the steps done before the one running (and
    # keeps it through the evaluations that follow that step); --skip-train never sets it.
    return StepMetrics(
        writer=writer, step_fn=lambda: int(getattr(args, "curr_iteration", start - 1)) + 1,
        train_iters=args.train_iters, train_period=m,
        eval_period=max(1, int(args.eval_iters or 0)) * m, log_interval=args.log_interval,
        wandb=megatron_wandb_sink(args) if getattr(args, "wandb_project", None) else None)


def train_valid_test_datasets_provider(train_val_test_num_samples):
    """External data iterators (``--dataloader-type external``): train, valid, no test."""
    from megatron.core import parallel_state as ps

    from adadpo_megatron.integrations import megatron_lm_data as data
    from adadpo_megatron.step.reference import PrecomputedReference, default_sidecar_path

    args = _megatron_args()
    _check_once(args)
    dp = {"dp_rank": ps.get_data_parallel_rank(), "dp_size": ps.get_data_parallel_world_size()}
    try:
        train_path, valid_path = data.data_paths(args)
        train = megatron_lm.open_packed_dataset(args, train_path)
        vocab = int(train.meta["tokenizer"]["vocab_size"])
        if vocab > args.padded_vocab_size:
            raise ValueError(f"{train_path} was packed with a {vocab}-token vocabulary but the "
                             f"model has {args.padded_vocab_size} rows: give Megatron-LM the "
                             "same tokenizer (--tokenizer-type/--tokenizer-model)")
        ref = (PrecomputedReference(args.ref_logprobs, train.fingerprint, train.num_pairs)
               if args.ref_logprobs else None)
        train_iter = data.train_iterator(train, args, attach=ref and ref.attach, **dp)
        valid_iter = None
        if valid_path and args.eval_iters:
            valid = megatron_lm.open_packed_dataset(args, valid_path)
            valid_ref = (PrecomputedReference(default_sidecar_path(valid_path),
                                              valid.fingerprint, valid.num_pairs)
                         if ref is not None else None)
            valid_iter = data.eval_iterator(valid, args, attach=valid_ref and valid_ref.attach,
                                            **dp)
    except (ValueError, OSError) as e:
        _fail(str(e))
    return train_iter, valid_iter, None


# Every rank (all TP and PP ranks) builds its own iterator: each pipeline stage pulls the
# micro-batch from it (the THD metadata is needed on every stage).
train_valid_test_datasets_provider.is_distributed = True

_FORWARD_STEP = []


def forward_step(data_iterator, model):
    """Megatron-LM's forward_step_func: (output, loss_func) from our THD forward step."""
    if not _FORWARD_STEP:
        args = _megatron_args()
        _FORWARD_STEP.append(megatron_lm.make_forward_step(
            args, reference=_online_reference if args.ref_load else None,
            metrics=_step_metrics))
    from adadpo_megatron.step.self_check import SelfCheckError

    try:
        return _FORWARD_STEP[0](data_iterator, model)
    except SelfCheckError as e:  # the first call probes the GPU paths (before step 1)
        _fail(str(e))


def main() -> None:
    """Hand everything to Megatron-LM's ``pretrain``."""
    from adadpo_megatron.integrations.megatron_lm_wandb import check_wandb_flags

    # Megatron-LM's own --wandb-* flags: refuse in one line what would be a traceback on
    # its last rank; continue the W&B run of the checkpoint being resumed.
    problem = check_wandb_flags(sys.argv[1:])
    if problem:
        if os.environ.get("RANK", "0") == "0":
            print(f"pretrain_adadpo.py: error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)
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
