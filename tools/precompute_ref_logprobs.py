"""Precompute reference log-probs of a packed dataset, so training holds no reference model.

Runs the reference forward-only over every pack through the trainer's own code path
(same parallel layout flags, model building, micro-batch collation and log-prob forward
step) and writes the per-sequence completion log-prob sums beside the dataset, keyed by
its fingerprint (``DATA_DIR/ref_logprobs.npz``; see ``adadpo_megatron.step.reference``).
Train with ``--ref-logprobs DATA_DIR/ref_logprobs.npz``; with ``--eval-data-path`` the
eval split gets its own side-car in its directory, which the trainer picks up.

    torchrun --nproc-per-node 2 tools/precompute_ref_logprobs.py --config run.yaml \\
        --tensor-model-parallel-size 2 --ref-load /ckpt/sft

Takes every trainer flag (model shape, layout, ``--micro-batch-size``, ``--config``) and
runs under every layout and schedule the trainer accepts, virtual pipelining included: each
schedule call gets a training step's micro-batches (the last one padded with discarded
fillers where the schedule needs it).
The reference weights come from ``--ref-load`` (else ``--load``); with neither, the model
initialised from ``--seed``, exactly as the trainer's online reference would be.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch


def parse(argv: Sequence[str] | None):
    """(TrainConfig, reference checkpoint or None, --output or None) from the command line."""
    from adadpo_megatron.trainer.arguments import parse_args
    from adadpo_megatron.trainer.config import ConfigError, config_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--output", default=None,
                       help="side-car path for --data-path (default DATA_DIR/ref_logprobs.npz)")
    known, rest = extra.parse_known_args(argv)
    args = parse_args(rest)
    if args.train_iters is None:
        args.train_iters = 1  # unused here; the trainer's validation wants a value
    source = args.ref_load or args.load
    args_ref_load = bool(args.ref_load)
    # The side-car is what this tool makes, so a reference flag here names the checkpoint.
    args.ref_logprobs, args.ref_load, args.load, args.finetune = None, None, None, False
    args.save = args.save_interval = None
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        raise SystemExit(f"precompute_ref_logprobs: error: {e}") from e
    if not cfg.loss.needs_reference:
        raise SystemExit(f"precompute_ref_logprobs: --preference-loss {cfg.loss.name} uses no "
                         "reference; nothing to precompute")
    _check_paths(cfg, source, known.output, "--ref-load" if args_ref_load else "--load")
    return cfg, source, known.output


def _check_paths(cfg, source: str | None, output: str | None, source_flag: str) -> None:
    """Inputs readable and side-car outputs writable, before the process group starts."""
    from adadpo_megatron.preflight import PathError, check_paths
    from adadpo_megatron.step.reference import default_sidecar_path

    io = cfg.io
    checks = [("dir", io.data_path, "--data-path"), ("dir", io.eval_data_path, "--eval-data-path"),
              ("dir", source, source_flag),
              ("outfile", output or default_sidecar_path(io.data_path), "--output")]
    if io.eval_data_path:
        checks.append(("outfile", default_sidecar_path(io.eval_data_path), "--eval-data-path side-car"))
    try:
        check_paths(checks)
    except PathError as e:
        raise SystemExit(f"precompute_ref_logprobs: error: {e}") from None


def _sums_for(cfg, chunks, step_fn, ds) -> np.ndarray:
    """Per-sequence sums [2N] over all packs of ``ds`` (filled on the last PP stage).

    Each schedule call gets what a training step gives it: ``--micro-batch-size`` packs per
    micro-batch, a step's count of micro-batches (``TrainingArgs.num_microbatches``) per
    call, so every schedule (interleaved included) takes it. The last call may be short:
    ``_schedule`` pads it with filler micro-batches under virtual pipelining and drops their
    results. Every sequence must then be written exactly once (checked).
    """
    from megatron.core import parallel_state as ps

    from adadpo_megatron.trainer.loop import _schedule, collate_packs

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs = cfg.training.micro_batch_size
    per_call = mbs * cfg.training.num_microbatches
    ids = list(range(rank, len(ds), dp))
    device = next(chunks[0].parameters()).device
    values = torch.zeros(2 * ds.num_pairs, dtype=torch.float64, device=device)
    seen = torch.zeros(2 * ds.num_pairs, dtype=torch.float64, device=device)
    for c in range(0, len(ids), per_call):
        call = ids[c:c + per_call]
        group = [collate_packs([ds[i] for i in call[j:j + mbs]]) for j in range(0, len(call), mbs)]
        with torch.no_grad():
            out = _schedule(chunks, step_fn, group, forward_only=True,
                            collect_non_loss_data=True)
        if not out:  # not the last pipeline stage
            continue
        for mb, sums in zip(group, out, strict=True):
            seq = (2 * mb["pair_index"] + (~mb["is_chosen"]).long()).to(device)
            values[seq] = sums.detach().to(device=device, dtype=torch.float64)
            seen[seq] += 1
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        # SUM over DP: each sequence was computed by exactly one DP rank.
        group = ps.get_data_parallel_group(with_context_parallel=False)
        torch.distributed.all_reduce(values, group=group)
        torch.distributed.all_reduce(seen, group=group)
        if not bool((seen == 1).all()):
            raise RuntimeError(f"{ds.path}: {int((seen != 1).sum())} sequences were not "
                               "computed exactly once")
    return values.cpu().numpy()


def precompute(cfg, source: str | None, output: str | None) -> list[str]:
    """Compute and write the side-cars (the parallel state must be initialised for ``cfg``).

    ``source``: reference checkpoint directory, or None for the ``--seed`` initialisation.
    ``output``: side-car path of ``--data-path`` (None: the default beside the data).
    Returns the paths written. Collective over the world.
    """
    from megatron.core import parallel_state as ps

    from adadpo_megatron.io_errors import WriteFailed, describe_os_error
    from adadpo_megatron.step.forward_step import make_reference_forward_step
    from adadpo_megatron.step.fp8 import reference_config_kwargs
    from adadpo_megatron.step.model import build_model_chunks
    from adadpo_megatron.step.reference import default_sidecar_path, write_sidecar
    from adadpo_megatron.train import (
        _open_data,
        _transformer_config,
        _vocab_size,
        prefix_attention_for,
    )
    from adadpo_megatron.trainer.checkpointing import adopt_unverified, load_model_weights
    from adadpo_megatron.trainer.loop import _is_logging_rank
    from adadpo_megatron.trainer.write_failure import agree

    if source:  # a LoRA adapter checkpoint: its reference is its base (adapters off)
        from adadpo_megatron.trainer.lora_run import base_of_adapter_checkpoint

        source = base_of_adapter_checkpoint(source, source)
    train_ds = _open_data(cfg, cfg.io.data_path, "--data-path")
    targets = [(train_ds, output or default_sidecar_path(cfg.io.data_path))]
    if cfg.io.eval_data_path:
        targets.append((_open_data(cfg, cfg.io.eval_data_path, "--eval-data-path"),
                        default_sidecar_path(cfg.io.eval_data_path)))
    # A prefix-shared dataset runs through the same layout and attention as training.
    config = _transformer_config(cfg, reference_config_kwargs(cfg.fp8), reference=True,
                                 prefix_attention=prefix_attention_for(
                                     cfg, *(ds for ds, _ in targets)))
    chunks = build_model_chunks(config, _vocab_size(cfg, train_ds),
                                cfg.model.max_position_embeddings, wrap_ddp=False)
    adopt_unverified(cfg.io.adopt_unverified_checkpoint)
    iteration = load_model_weights(source, chunks) if source else None
    for chunk in chunks:
        chunk.eval()
    step_fn = make_reference_forward_step(logprob_impl=cfg.training.logprob_impl)
    for ds, path in targets:
        start = time.perf_counter()
        sums = _sums_for(cfg, chunks, step_fn, ds)
        if _is_logging_rank():
            info = {"reference": source or f"initialised from --seed {cfg.training.seed}",
                    "iteration": iteration, "config": cfg.to_dict(),
                    "layout": {"tp": ps.get_tensor_model_parallel_world_size(),
                               "pp": ps.get_pipeline_model_parallel_world_size(),
                               "dp": ps.get_data_parallel_world_size()}}
            try:
                write_sidecar(path, sums, ds.fingerprint, info)
            except OSError as e:  # a full disk: every rank stops, the job says it once
                error = f"cannot write the side-car ({describe_os_error(e, path)}); " \
                        "nothing was written there and its temp file was removed"
            else:
                error = None
                print(f"precompute_ref_logprobs: {ds.num_pairs} pairs, {len(ds)} packs -> "
                      f"{path} in {time.perf_counter() - start:.1f} s", flush=True)
        else:
            error = None
        error = agree(error)
        if error is not None:
            raise WriteFailed(error)
    return [path for _, path in targets]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success. Writes one side-car per dataset given."""
    from adadpo_megatron.io_errors import WriteFailed
    from adadpo_megatron.train import _destroy, init_distributed
    from adadpo_megatron.trainer.job_report import say_error

    try:
        cfg, source, output = parse(argv)
    except SystemExit as e:  # one line per job, not per rank
        if not isinstance(e.code, str):
            raise
        say_error(e.code)
        return 2
    from adadpo_megatron.trainer.checkpointing import CheckpointError
    from adadpo_megatron.trainer.config import ConfigError

    try:
        init_distributed(cfg)
        precompute(cfg, source, output)
    except WriteFailed as e:
        say_error(f"precompute_ref_logprobs: error: {e}")
        return 1
    except (ConfigError, CheckpointError) as e:
        say_error(f"precompute_ref_logprobs: error: {e}")
        return 2
    finally:
        _destroy()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    sys.exit(main())
