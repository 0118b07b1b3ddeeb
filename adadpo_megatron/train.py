"""``adadpo-train``: train a Megatron-Core GPTModel with AdaDPO or another preference loss.

Launch with torchrun (one process per GPU, or per CPU slot with the gloo backend)::

    torchrun --nproc-per-node 2 -m adadpo_megatron.train --config run.yaml \\
        --tensor-model-parallel-size 2 --preference-loss adadpo --train-iters 100

``main`` parses and validates every flag before any process-group work, builds the
parallel state, model, optimizer, data and reference, runs the loop of
``adadpo_megatron.trainer.loop``, and always destroys the process group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import torch

from adadpo_megatron.trainer.config import ConfigError, TrainConfig
from adadpo_megatron.trainer.loop import Run, TrainingStopped, train

__all__ = ["build_run", "init_distributed", "main", "prefix_attention_for"]


def init_distributed(cfg: TrainConfig) -> None:
    """Default process group (gloo on CPU, nccl on GPU) and megatron-core's parallel state."""
    from megatron.core import parallel_state

    p = cfg.parallel
    if p.device == "cpu":
        from adadpo_megatron.step.cpu import init_distributed_cpu, seed_cpu

        init_distributed_cpu()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not torch.distributed.is_initialized():
            from adadpo_megatron.step.elastic_store import init_process_group_elastic

            init_process_group_elastic("nccl")  # safe across torchrun restarts
    if torch.distributed.get_world_size() != p.world_size:
        raise ConfigError(f"the job has {torch.distributed.get_world_size()} processes but the "
                          f"configuration was validated for {p.world_size}")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        **(cfg.arch.parallel_kwargs() if cfg.arch is not None else {}),
    )
    seed = cfg.training.seed
    if p.device == "cpu":
        seed_cpu(seed)
    else:
        import random

        import numpy as np
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)


def _transformer_config(cfg: TrainConfig, fp8_kwargs: dict, *, reference: bool,
                        prefix_attention: str | None = None) -> object:
    from megatron.core.distributed import finalize_model_grads

    from adadpo_megatron.step.model import build_transformer_config

    m, p, t = cfg.model, cfg.parallel, cfg.training
    config = build_transformer_config(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, ffn_hidden_size=m.ffn_hidden_size,
        num_query_groups=m.num_query_groups, normalization=m.normalization,
        norm_epsilon=m.norm_epsilon, swiglu=m.swiglu,
        position_embedding_type=m.position_embedding_type, rotary_base=m.rotary_base,
        add_bias_linear=not m.disable_bias_linear,
        untie_embeddings=m.untie_embeddings_and_output_weights,
        tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
        vpp=p.virtual_pipeline_model_parallel_size, cp=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel, bf16=t.bf16,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        recompute_granularity=None if reference else t.recompute_granularity,
        recompute_method=None if reference else t.recompute_method,
        recompute_num_layers=None if reference else t.recompute_num_layers,
        init_method_std=m.init_method_std, **fp8_kwargs,
        **(cfg.arch.transformer_kwargs(reference=reference) if cfg.arch is not None else {}))
    if cfg.arch is not None:  # Llama-3.1 RoPE scaling lives on GPTModel
        config.adadpo_gpt_options = cfg.arch.gpt_options(config.adadpo_gpt_options)
    if not reference:
        config.finalize_model_grads_func = finalize_model_grads
    if prefix_attention is not None:
        import dataclasses

        config.adadpo_gpt_options = dataclasses.replace(
            config.adadpo_gpt_options, prefix_attention=prefix_attention)
    return config


def prefix_attention_for(cfg: TrainConfig, *datasets) -> str | None:
    """The prefix-sharing attention the model needs: None unless a dataset is prefix-shared.

    ``mask`` on the CPU, ``flex`` (FlexAttention) on a GPU, unless --prefix-attention names
    one (``te`` only then). See ``adadpo_megatron/step/attention.py``.
    """
    if not any(ds is not None and ds.prefix_shared for ds in datasets):
        return None
    from adadpo_megatron.step.model import default_prefix_attention, transformer_engine_usable

    choice = cfg.parallel.prefix_attention
    if choice == "auto":
        choice = default_prefix_attention(cfg.parallel.device != "cpu")
    elif choice == "te" and not transformer_engine_usable():
        raise ConfigError("--prefix-attention te needs a usable Transformer Engine on a GPU; "
                          "use flex (FlexAttention) or auto")
    if choice != "mask" and cfg.training.recompute_granularity is not None:
        raise ConfigError(f"--recompute-granularity {cfg.training.recompute_granularity} with "
                          f"prefix-shared data and {choice} attention is not supported "
                          "(recompute saves the attention mask as a tensor); drop it, or use "
                          "--prefix-attention mask")
    return choice


def _open_data(cfg: TrainConfig, path: str, flag: str):
    from adadpo_megatron.data.packed_dataset import PackedPairDataset
    from adadpo_megatron.step.fp8 import pack_multiple

    p = cfg.parallel
    seg = 2 * p.context_parallel_size if p.context_parallel_size > 1 else 1
    if p.sequence_parallel:
        seg *= p.tensor_model_parallel_size
    # Pipeline stages exchange fixed-shape activations, and the allgather MoE dispatcher
    # gathers equal token counts over EP: pad every pack to --seq-length.
    fixed = cfg.arch is not None and cfg.arch.fixed_length_packs
    pad_to = cfg.model.seq_length if p.pipeline_model_parallel_size > 1 or fixed else None
    try:
        ds = PackedPairDataset(path, segment_multiple=seg, pack_multiple=pack_multiple(cfg.fp8),
                               pad_to=pad_to)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{flag} {path}: {e}") from e
    if ds.prefix_shared and p.context_parallel_size > 1:
        raise ConfigError(f"{flag} {path} is prefix-shared (adadpo-pack --prefix-sharing), which "
                          f"context parallelism does not support: --context-parallel-size "
                          f"{p.context_parallel_size} -> 1, or re-pack without --prefix-sharing")
    longest = int(ds.pack_lengths.max()) if len(ds) else 0
    if longest > cfg.model.seq_length:
        raise ConfigError(f"{flag} {path}: packs up to {longest} tokens (after padding) exceed "
                          f"--seq-length {cfg.model.seq_length}; raise --seq-length or re-pack "
                          "with a smaller --pack-size")
    return ds


def _vocab_size(cfg: TrainConfig, ds) -> int:
    vocab = int(ds.meta["tokenizer"]["vocab_size"])
    return cfg.model.padded_vocab_size(vocab, cfg.parallel.tensor_model_parallel_size)


def _require_cp_attention(cfg: TrainConfig) -> None:
    """Context parallelism needs Transformer Engine's attention: refuse it here, in one line,
    rather than let megatron-core's local attention assert while the model is built."""
    from adadpo_megatron.step.model import transformer_engine_usable

    cp = cfg.parallel.context_parallel_size
    if cp > 1 and not transformer_engine_usable():
        raise ConfigError(f"--context-parallel-size {cp} needs Transformer Engine's attention "
                          "(a CUDA GPU with transformer-engine installed); megatron-core's local "
                          "attention has no context parallelism: use --context-parallel-size 1")


def build_run(cfg: TrainConfig) -> Run:
    """Build data, model, optimizer, schedule, reference and writer; resume if --load.

    Needs ``init_distributed(cfg)`` first. Returns the ``Run`` the loop consumes.
    """
    from megatron.core import parallel_state as ps

    from adadpo_megatron.data.sampler import DistributedPackSampler
    from adadpo_megatron.step.forward_step import (
        StepContext,
        make_forward_step,
        make_reference_forward_step,
    )
    from adadpo_megatron.step.fp8 import reference_config_kwargs, transformer_config_kwargs
    from adadpo_megatron.step.model import build_model_chunks
    from adadpo_megatron.step.reference import (
        PrecomputedReference,
        build_online_reference,
        default_sidecar_path,
    )
    from adadpo_megatron.trainer import checkpointing as ckpt
    from adadpo_megatron.trainer.identity import check_identity
    from adadpo_megatron.trainer.loop import _is_logging_rank
    from adadpo_megatron.trainer.metrics import MetricsWriter
    from adadpo_megatron.trainer.optim import build_optimizer, build_scheduler, ddp_config

    ckpt.adopt_unverified(cfg.io.adopt_unverified_checkpoint)
    train_data = _open_data(cfg, cfg.io.data_path, "--data-path")
    eval_data = (_open_data(cfg, cfg.io.eval_data_path, "--eval-data-path")
                 if cfg.io.eval_data_path else None)
    check_identity(cfg, train_data, eval_data)  # same tokenizer everywhere, before the model
    _require_cp_attention(cfg)
    vocab = _vocab_size(cfg, train_data)
    max_pos = cfg.model.max_position_embeddings
    attention = prefix_attention_for(cfg, train_data, eval_data)
    config = _transformer_config(cfg, transformer_config_kwargs(cfg.fp8), reference=False,
                                 prefix_attention=attention)
    lora_base = None
    if cfg.lora is not None:  # adapters on a frozen base (trainer/lora_run.py)
        from adadpo_megatron.trainer.lora_run import build_lora_model

        model, lora_base = build_lora_model(cfg, config, vocab, max_pos, ddp_config(cfg))
    else:
        model = build_model_chunks(config, vocab, max_pos, wrap_ddp=True,
                                   ddp_config=ddp_config(cfg))
    if cfg.arch is not None and cfg.arch.num_experts:  # moe/load_imbalance
        from adadpo_megatron.trainer.moe_metrics import watch_routers

        watch_routers(model)
    _self_check(model, cfg, attention)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    try:
        position = DistributedPackSampler(
            len(train_data), global_batch_size=cfg.training.global_batch_size,
            dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
            seed=cfg.training.seed, micro_batch_size=cfg.training.micro_batch_size)
    except ValueError as e:
        raise ConfigError(f"--data-path {cfg.io.data_path}: {e}") from e
    if eval_data is not None and len(eval_data) < ps.get_data_parallel_world_size():
        raise ConfigError(f"--eval-data-path {cfg.io.eval_data_path} has {len(eval_data)} packs, "
                          "fewer than the data-parallel size: every DP rank needs one")

    if cfg.io.load and cfg.lora is None:
        from adadpo_megatron.trainer.lora_run import refuse_adapter_checkpoint

        refuse_adapter_checkpoint(cfg.io.load)
    if cfg.io.load and cfg.io.finetune and cfg.lora is None:
        ckpt.load_model_weights(cfg.io.load, model)
    step_context = StepContext(num_microbatches=1, global_num_pairs=1)
    run = Run(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler,
              train_data=train_data, position=position, eval_data=eval_data,
              forward_step=make_forward_step(
                  cfg.loss, step_context, logprob_impl=cfg.training.logprob_impl),
              step_context=step_context, lora_base=lora_base)

    if cfg.reference.mode == "online":
        ref_config = _transformer_config(cfg, reference_config_kwargs(cfg.fp8), reference=True,
                                         prefix_attention=attention)
        run.reference = build_online_reference(
            lambda: build_model_chunks(ref_config, vocab, max_pos, wrap_ddp=False),
            model, cfg.reference.ref_load, load_weights=ckpt.load_model_weights)
        run.reference_step = make_reference_forward_step(
            logprob_impl=cfg.training.logprob_impl)
        run.save_reference = cfg.reference.ref_load is None
        if cfg.reference.ref_load is not None:  # recorded, so a bare --load SAVE finds it
            from adadpo_megatron.trainer.reference_source import fingerprint_reference

            run.reference_source = fingerprint_reference(cfg.reference.ref_load)
    elif cfg.reference.mode == "base":  # LoRA: the policy with its adapters off
        run.reference_step = make_reference_forward_step(
            logprob_impl=cfg.training.logprob_impl)
    elif cfg.reference.mode == "precomputed":
        run.precomputed = PrecomputedReference(cfg.reference.ref_logprobs,
                                               train_data.fingerprint, train_data.num_pairs)
        if eval_data is not None:
            run.eval_precomputed = PrecomputedReference(
                default_sidecar_path(cfg.io.eval_data_path), eval_data.fingerprint,
                eval_data.num_pairs)

    if cfg.io.load and not cfg.io.finetune and cfg.lora is not None:
        from adadpo_megatron.trainer.lora_ckpt import load_lora_checkpoint

        state = load_lora_checkpoint(cfg, run)
    elif cfg.io.load and not cfg.io.finetune:
        state = ckpt.load_checkpoint(
            cfg.io.load, model=model, optimizer=optimizer, scheduler=scheduler,
            fingerprint=cfg.fingerprint(), config=cfg.to_dict(),
            data_fingerprint=train_data.fingerprint,
            reference=run.reference if run.save_reference else None)
    if cfg.io.load and not cfg.io.finetune:
        run.iteration = state["iteration"]
        run.skipped_in_a_row = state["skipped_in_a_row"]
        if state.get("reference_source"):  # the reference came from the recorded --ref-load
            run.save_reference, run.reference_source = False, state["reference_source"]
        position.load_state_dict(state["data"])
    from adadpo_megatron.trainer.wandb_logging import WandbStartError, open_wandb

    resume_from = cfg.io.load if cfg.io.load and not cfg.io.finetune else None
    try:
        wandb = open_wandb(cfg.wandb, enabled=_is_logging_rank(), save=cfg.io.save,
                           log_dir=cfg.io.log_dir, resume_from=resume_from, config=cfg.to_dict())
    except WandbStartError as e:
        raise ConfigError(str(e)) from e
    run.writer = MetricsWriter(enabled=_is_logging_rank(), log_dir=cfg.io.log_dir,
                               tensorboard_dir=cfg.io.tensorboard_dir, start_step=run.iteration,
                               wandb=wandb)
    return run


def _self_check(model, cfg: TrainConfig, attention: str | None) -> None:
    """The attention and log-prob paths against plain references (step/self_check.py)."""
    from adadpo_megatron.step.model import transformer_engine_usable
    from adadpo_megatron.step.self_check import SelfCheckError, check_paths

    hint = ("--prefix-attention mask (or flex)" if attention is not None else
            "no adadpo-train flag: run without Transformer Engine (local attention) and "
            "report this")
    try:
        check_paths(model, use_thd=transformer_engine_usable(),
                    logprob_impl=cfg.training.logprob_impl, flag_hint=hint)
    except SelfCheckError as e:
        raise ConfigError(str(e)) from None


def _write_config(cfg: TrainConfig) -> None:
    import json

    if cfg.io.log_dir and torch.distributed.get_rank() == 0:
        os.makedirs(cfg.io.log_dir, exist_ok=True)
        with open(os.path.join(cfg.io.log_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=1, sort_keys=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``adadpo-train`` and ``python -m adadpo_megatron.train``.

    Returns the exit status: 0 on success, 2 for a configuration error (flag checks run
    before any process-group work; data, checkpoint and side-car checks right after the
    process group is up, before the first step), 1 when training stopped on repeated
    non-finite steps or an output could not be written (a full disk), 130 on Ctrl-C
    (SIGINT). Each error is one line per job, not per rank
    (:mod:`adadpo_megatron.trainer.job_report`).
    """
    import signal

    _state["pid"] = os.getpid()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        signal.signal(signal.SIGINT, previous)
        if _state["lease"] is not None:
            _state.pop("lease").release()
            _state["lease"] = None


_state: dict = {"save": None, "lease": None, "pid": None, "interrupted": False}


def _take_save_lease(cfg: TrainConfig) -> None:
    """Global rank 0 takes ``--save``'s writer lease (trainer/save_lease.py) for the job."""
    if cfg.io.save and os.environ.get("RANK", "0") == "0":
        from adadpo_megatron.trainer.save_lease import SaveLease

        _state["lease"] = SaveLease(cfg.io.save, note=_note).acquire()


def _on_sigint(signum, frame) -> None:
    """First SIGINT: stop (KeyboardInterrupt); the ones that follow (torchrun forwards the
    terminal's Ctrl-C again) are ignored so the cleanup runs to the end."""
    import signal

    if os.getpid() != _state["pid"]:
        return  # a forked helper before its own at-fork hook ignores SIGINT: the rank decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _state["interrupted"] = True
    raise KeyboardInterrupt


def _interrupted() -> int:
    import signal

    from adadpo_megatron.trainer.job_report import mark_failed, say
    from adadpo_megatron.trainer.write_failure import resume_hint

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mark_failed()  # a peer whose collective breaks now stays quiet
    save = _state["save"]
    where = resume_hint(save).replace("free space and ", "") if save else "nothing was saved"
    say(f"adadpo-train: interrupted (SIGINT); {where}")
    try:
        _destroy()
    except Exception:  # noqa: BLE001 - peers are gone too; exit anyway
        pass
    return 130


def _main(argv: Sequence[str] | None) -> int:
    from adadpo_megatron.io_errors import WriteFailed
    from adadpo_megatron.preflight import PathError, check_train_paths
    from adadpo_megatron.trainer.arguments import parse_config
    from adadpo_megatron.trainer.job_report import job_failed, say_error
    from adadpo_megatron.trainer.progress import resolve_resume
    from adadpo_megatron.trainer.write_failure import resume_hint

    try:
        cfg = parse_config(argv)
        _state["save"] = cfg.io.save
        check_train_paths(cfg)  # inputs readable, outputs writable: before any step is spent
        _take_save_lease(cfg)  # one job per --save: before reading or writing anything there
        cfg = resolve_resume(cfg, note=_note)  # --save holding a checkpoint: resume or refuse
    except (ConfigError, PathError) as e:
        say_error(f"adadpo-train: error: {e}")
        return 2
    if cfg.parallel.device == "cpu":
        from adadpo_megatron.step.cpu import silence_cpu_notices

        silence_cpu_notices()
    # megatron-core is imported only now, so flag errors and --help come back fast.
    from adadpo_megatron.step.reference import SidecarError
    from adadpo_megatron.trainer.checkpointing import CheckpointError, CheckpointWriteError
    from adadpo_megatron.trainer.hygiene import install

    install(checkpoint_writer=bool(cfg.io.save))  # no child outlives this rank
    try:
        init_distributed(cfg)
        _write_config(cfg)
        run = build_run(cfg)
        from adadpo_megatron.trainer.exits import ExitConfig, ExitPolicy

        run.exits = ExitPolicy(cfg.exits or ExitConfig())
        finished = False
        try:
            train(run)
            finished = True
        finally:
            run.exits.restore()
            try:
                run.writer.close()
            except WriteFailed:
                if finished:  # else the error already on its way says more
                    raise
    except CheckpointWriteError as e:
        say_error(f"adadpo-train: error: {e}")
        return 1
    except WriteFailed as e:
        hint = resume_hint(cfg.io.save) if cfg.io.save else "no --save: a rerun starts over"
        say_error(f"adadpo-train: error: {e}; {hint}")
        return 1
    except (ConfigError, CheckpointError, SidecarError) as e:
        say_error(f"adadpo-train: error: {e}")
        return 2
    except TrainingStopped as e:
        say_error(f"adadpo-train: {e}")
        return 1
    except Exception:
        if _state["interrupted"]:  # Ctrl-C stopped a peer first: this collective broke
            raise KeyboardInterrupt from None
        if job_failed():  # a peer failed and reported it; this rank's collective broke
            return 1
        raise
    finally:
        _destroy()
    return 0


def _note(text: str) -> None:
    """Print a start-up note once per job (global rank 0; before the process group)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr, flush=True)


def _destroy() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
