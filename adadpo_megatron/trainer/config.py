"""The validated run configuration: one keyword-only dataclass per flag group.

``config_from_args(namespace)`` turns the namespace of ``arguments.build_parser()`` into a
``TrainConfig``. Every check runs here, before any process-group work, and every error is a
``ConfigError`` whose message names the flag to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

# LossConfig field -> the flag that sets it: one table, owned by the loss library.
from adadpo_megatron.losses.config import FIELD_FLAGS as LOSS_FIELD_FLAGS


class ConfigError(ValueError):
    """An invalid or contradictory setting; the message names the flag (and file) to fix."""


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """GPT shape (Megatron-LM flag names); mapped onto TransformerConfig by step/model.py."""

    num_layers: int
    """--num-layers: transformer layers in the whole model."""
    hidden_size: int
    """--hidden-size: model width."""
    ffn_hidden_size: int
    """--ffn-hidden-size: MLP width (4*hidden when not given)."""
    num_attention_heads: int
    """--num-attention-heads: query heads."""
    num_query_groups: int
    """--num-query-groups: KV heads (== heads without --group-query-attention)."""
    seq_length: int
    """--seq-length: pack capacity in tokens."""
    max_position_embeddings: int
    """--max-position-embeddings: learned position table size (>= --seq-length)."""
    normalization: str
    """--normalization: LayerNorm or RMSNorm."""
    norm_epsilon: float
    """--norm-epsilon."""
    swiglu: bool
    """--swiglu: gated SiLU MLP."""
    position_embedding_type: str
    """--position-embedding-type: learned_absolute or rope."""
    rotary_base: int
    """--rotary-base: RoPE base (rope only)."""
    untie_embeddings_and_output_weights: bool
    """--untie-embeddings-and-output-weights."""
    disable_bias_linear: bool
    """--disable-bias-linear: no bias in linear layers."""
    init_method_std: float
    """--init-method-std: normal init std of weights."""
    hidden_dropout: float
    """--hidden-dropout."""
    attention_dropout: float
    """--attention-dropout."""
    make_vocab_size_divisible_by: int
    """--make-vocab-size-divisible-by: vocab padding multiple (times TP)."""

    def padded_vocab_size(self, vocab_size: int, tp: int) -> int:
        """The tokenizer's ``vocab_size`` rounded up to a multiple of divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass(frozen=True, kw_only=True)
class ParallelArgs:
    """Parallel layout; DP is derived from the world size."""

    tensor_model_parallel_size: int
    """--tensor-model-parallel-size (TP)."""
    pipeline_model_parallel_size: int
    """--pipeline-model-parallel-size (PP)."""
    virtual_pipeline_model_parallel_size: int | None
    """Model chunks per PP rank, from --num-layers-per-virtual-pipeline-stage; None = no VPP."""
    context_parallel_size: int
    """--context-parallel-size (CP)."""
    sequence_parallel: bool
    """--sequence-parallel (needs TP > 1)."""
    use_distributed_optimizer: bool
    """--use-distributed-optimizer: Adam state and fp32 master weights sharded over DP."""
    device: str
    """'cpu' (gloo, CPU layers) or 'cuda' (nccl), resolved from --device."""
    world_size: int
    """Processes in the job (torchrun's WORLD_SIZE)."""
    data_parallel_size: int
    """DP = world / (TP * PP * CP)."""
    prefix_attention: str = "auto"
    """--prefix-attention: core attention for prefix-shared data (auto, mask, flex, te);
    takes effect only when --data-path is prefix-shared (train.prefix_attention_for)."""


@dataclass(frozen=True, kw_only=True)
class TrainingArgs:
    """Batch sizes (in packs), steps, precision, recompute, NaN policy."""

    micro_batch_size: int
    """--micro-batch-size: packs per micro-batch."""
    global_batch_size: int
    """--global-batch-size: packs per optimizer step."""
    num_microbatches: int
    """Micro-batches per step and DP rank: global / (micro * DP)."""
    train_iters: int
    """--train-iters: optimizer steps."""
    seed: int
    """--seed: init, data order and dropout."""
    bf16: bool
    """--bf16."""
    max_skipped_steps: int
    """--max-skipped-steps: consecutive NaN/inf skips tolerated."""
    recompute_granularity: str | None
    """--recompute-granularity: full or selective."""
    recompute_method: str | None
    """--recompute-method: uniform or block (full only)."""
    recompute_num_layers: int | None
    """--recompute-num-layers (full only)."""
    logprob_impl: str = "fused"
    """--logprob-impl: fused (hidden states + output weight) or chunked (from logits)."""


@dataclass(frozen=True, kw_only=True)
class OptimArgs:
    """Adam and the learning-rate schedule (megatron-core OptimizerParamScheduler)."""

    lr: float
    """--lr: peak learning rate."""
    min_lr: float
    """--min-lr: final learning rate of the decay."""
    lr_decay_style: str
    """--lr-decay-style: constant, linear or cosine."""
    lr_warmup_fraction: float
    """--lr-warmup-fraction: share of --train-iters spent warming up linearly from 0."""
    weight_decay: float
    """--weight-decay (decoupled, AdamW)."""
    adam_beta1: float
    """--adam-beta1."""
    adam_beta2: float
    """--adam-beta2."""
    adam_eps: float
    """--adam-eps."""
    clip_grad: float
    """--clip-grad: global grad-norm clip; 0 = off."""


@dataclass(frozen=True, kw_only=True)
class IOArgs:
    """Data, checkpoints, logging and evaluation."""

    data_path: str
    """--data-path: training packed dataset directory."""
    eval_data_path: str | None
    """--eval-data-path: held-out packed dataset directory."""
    save: str | None
    """--save: checkpoint directory."""
    save_interval: int | None
    """--save-interval: steps between checkpoints (a final one is always written)."""
    load: str | None
    """--load: checkpoint directory to resume from."""
    finetune: bool
    """--finetune: with --load, weights only, step 0."""
    log_interval: int
    """--log-interval: steps per log line / metrics.jsonl record."""
    log_dir: str | None
    """--log-dir: metrics.jsonl and config.json."""
    tensorboard_dir: str | None
    """--tensorboard-dir: TensorBoard event files (if tensorboard is installed)."""
    eval_interval: int | None
    """--eval-interval: steps between evaluations."""
    eval_iters: int | None
    """--eval-iters: eval steps (global batches) per evaluation; None = the whole split."""
    verify_data: bool = False
    """--verify-data: re-hash the data files against meta.json at start."""
    adopt_unverified_checkpoint: bool = False
    """--adopt-unverified-checkpoint: write the manifest of a pre-manifest checkpoint."""


@dataclass(frozen=True, kw_only=True)
class ReferenceArgs:
    """Where reference log-probs come from."""

    mode: str
    """'none' (reference-free loss), 'precomputed' (--ref-logprobs), 'online', or 'base'
    (LoRA: the policy with its adapters off, trainer/lora_run.py)."""
    ref_logprobs: str | None
    """--ref-logprobs: side-car path."""
    ref_load: str | None
    """--ref-load: online reference checkpoint; None = the policy's initial weights."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a run needs, validated; build it with ``parse_config`` or ``config_from_args``."""

    model: ModelArgs
    parallel: ParallelArgs
    training: TrainingArgs
    optim: OptimArgs
    io: IOArgs
    loss: Any
    """adadpo_megatron.losses.LossConfig."""
    reference: ReferenceArgs
    fp8: Any
    """adadpo_megatron.step.fp8.FP8Settings."""
    exits: Any = None
    """adadpo_megatron.trainer.exits.ExitConfig (None: never stop early)."""
    arch: Any = None
    """adadpo_megatron.trainer.moe_config.ArchSettings: family and MoE flags (None: dense)."""
    wandb: Any = None
    """adadpo_megatron.trainer.wandb_logging.WandbConfig (None: no W&B logging)."""
    lora: Any = None
    """adadpo_megatron.step.lora.LoRASettings (None: full-parameter training)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able nested dict of every setting (written to config.json and checkpoints)."""
        def conv(v: Any) -> Any:
            if dataclasses.is_dataclass(v):
                return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            return v
        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def fingerprint(self) -> str:
        """sha256 over what a checkpoint must agree on to resume: model shape and loss."""
        d = self.to_dict()
        shape = {"model": d["model"], "loss": d["loss"]}
        if self.arch is not None and not self.arch.is_default:  # dense runs: as before
            shape["arch"] = self.arch.shape_dict()  # not the layout: EP may change
        if d.get("lora"):  # full-parameter runs: as before
            shape["lora"] = d["lora"]
        blob = json.dumps(shape, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_args(a: argparse.Namespace, tp: int) -> ModelArgs:
    for flag, v in (("--num-layers", a.num_layers), ("--hidden-size", a.hidden_size),
                    ("--num-attention-heads", a.num_attention_heads),
                    ("--seq-length", a.seq_length)):
        _require(v is not None and v > 0, f"{flag} must be a positive integer, got {v}")
    groups = a.num_query_groups if a.group_query_attention else a.num_attention_heads
    _require(not (a.num_query_groups is not None and not a.group_query_attention),
             f"--num-query-groups {a.num_query_groups} needs --group-query-attention")
    _require(groups is not None and groups > 0,
             "--group-query-attention needs --num-query-groups N (the number of KV heads)")
    heads = a.num_attention_heads
    _require(a.hidden_size % heads == 0,
             f"--hidden-size {a.hidden_size} is not divisible by --num-attention-heads {heads}")
    _require(heads % groups == 0,
             f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}")
    _require(heads % tp == 0, f"--num-attention-heads {heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    _require(groups % tp == 0, f"--num-query-groups {groups} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    ffn = a.ffn_hidden_size if a.ffn_hidden_size is not None else 4 * a.hidden_size
    _require(ffn > 0 and ffn % tp == 0,
             f"--ffn-hidden-size {ffn} must be positive and divisible by "
             f"--tensor-model-parallel-size {tp}")
    max_pos = a.max_position_embeddings or a.seq_length
    _require(a.position_embedding_type != "learned_absolute" or max_pos >= a.seq_length,
             f"--max-position-embeddings {max_pos} is below --seq-length {a.seq_length}")
    _require(a.rotary_base > 0, f"--rotary-base {a.rotary_base} must be positive")
    for flag, v in (("--hidden-dropout", a.hidden_dropout),
                    ("--attention-dropout", a.attention_dropout)):
        _require(0.0 <= v < 1.0, f"{flag} {v} must be in [0, 1)")
    _require(a.make_vocab_size_divisible_by > 0, "--make-vocab-size-divisible-by must be > 0")
    return ModelArgs(
        num_layers=a.num_layers, hidden_size=a.hidden_size, ffn_hidden_size=ffn,
        num_attention_heads=heads, num_query_groups=groups, seq_length=a.seq_length,
        max_position_embeddings=max_pos, normalization=a.normalization,
        norm_epsilon=a.norm_epsilon, swiglu=a.swiglu,
        position_embedding_type=a.position_embedding_type, rotary_base=a.rotary_base,
        untie_embeddings_and_output_weights=a.untie_embeddings_and_output_weights,
        disable_bias_linear=a.disable_bias_linear, init_method_std=a.init_method_std,
        hidden_dropout=a.hidden_dropout, attention_dropout=a.attention_dropout,
        make_vocab_size_divisible_by=a.make_vocab_size_divisible_by)


def _parallel_args(a: argparse.Namespace, world_size: int) -> ParallelArgs:
    tp, pp, cp = (a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                  a.context_parallel_size)
    for flag, v in (("--tensor-model-parallel-size", tp),
                    ("--pipeline-model-parallel-size", pp),
                    ("--context-parallel-size", cp)):
        _require(v >= 1, f"{flag} must be >= 1, got {v}")
    model_parallel = tp * pp * cp
    _require(world_size % model_parallel == 0,
             f"world size {world_size} (torchrun --nproc-per-node x --nnodes) is not divisible "
             f"by TP*PP*CP = {tp}*{pp}*{cp} = {model_parallel}")
    vpp = None
    if a.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = a.num_layers_per_virtual_pipeline_stage
        _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs "
                 "--pipeline-model-parallel-size > 1")
        _require(per_stage > 0 and a.num_layers % (pp * per_stage) == 0,
                 f"--num-layers {a.num_layers} is not divisible by --pipeline-model-parallel-size"
                 f" {pp} x --num-layers-per-virtual-pipeline-stage {per_stage}")
        vpp = a.num_layers // (pp * per_stage)
        if vpp == 1:
            vpp = None
    _require(a.num_layers % pp == 0, f"--num-layers {a.num_layers} is not divisible by "
             f"--pipeline-model-parallel-size {pp}")
    _require(not a.sequence_parallel or tp > 1,
             "--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards "
             "activations over the TP group); drop the flag or raise TP")
    seg = (2 * cp if cp > 1 else 1) * (tp if a.sequence_parallel else 1)
    _require(pp == 1 or a.seq_length % seg == 0,
             f"--seq-length {a.seq_length} is not a multiple of {seg}: pipeline stages pad "
             f"every pack to it, and context/sequence parallelism split it in {seg} parts")
    device = _resolve_device(a.device)
    return ParallelArgs(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        sequence_parallel=a.sequence_parallel,
        use_distributed_optimizer=a.use_distributed_optimizer, device=device,
        world_size=world_size, data_parallel_size=world_size // model_parallel,
        prefix_attention=_prefix_attention_arg(a, device))


def _prefix_attention_arg(a: argparse.Namespace, device: str) -> str:
    choice = getattr(a, "prefix_attention", "auto")
    _require(device != "cpu" or choice in ("auto", "mask"),
             f"--prefix-attention {choice} needs a GPU (FlexAttention has no CPU backward in "
             "PyTorch; te needs Transformer Engine): use mask or auto on the CPU")
    return choice


def _training_args(a: argparse.Namespace, par: ParallelArgs) -> TrainingArgs:
    _require(a.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got "
             f"{a.micro_batch_size}")
    dp = par.data_parallel_size
    gbs = a.global_batch_size or a.micro_batch_size * dp
    _require(gbs % (a.micro_batch_size * dp) == 0,
             f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
             f"{a.micro_batch_size} x data-parallel size {dp}")
    from adadpo_megatron.trainer.schedule_groups import step_count_problem

    problem = step_count_problem(gbs // (a.micro_batch_size * dp),
                                 par.pipeline_model_parallel_size,
                                 par.virtual_pipeline_model_parallel_size)
    _require(problem is None, problem or "")
    _require(a.train_iters is not None and a.train_iters >= 1,
             f"--train-iters must be a positive integer, got {a.train_iters}")
    _require(a.max_skipped_steps >= 1, "--max-skipped-steps must be >= 1")
    _require(not (a.bf16 and par.device == "cpu"),
             "--bf16 does not run on the CPU (megatron-core's mixed-precision optimizer "
             "accepts only CUDA tensors): drop --bf16 for CPU runs (they train in fp32)")
    if a.recompute_method is not None or a.recompute_num_layers is not None:
        _require(a.recompute_granularity == "full",
                 "--recompute-method/--recompute-num-layers need --recompute-granularity full")
        _require(a.recompute_method is not None and a.recompute_num_layers is not None,
                 "--recompute-granularity full needs both --recompute-method and "
                 "--recompute-num-layers")
    if a.recompute_granularity == "full":
        _require(a.recompute_method is not None,
                 "--recompute-granularity full needs --recompute-method uniform|block "
                 "and --recompute-num-layers N")
    return TrainingArgs(
        micro_batch_size=a.micro_batch_size, global_batch_size=gbs,
        num_microbatches=gbs // (a.micro_batch_size * dp), train_iters=a.train_iters,
        seed=a.seed, bf16=a.bf16, max_skipped_steps=a.max_skipped_steps,
        recompute_granularity=a.recompute_granularity, recompute_method=a.recompute_method,
        recompute_num_layers=a.recompute_num_layers,
        logprob_impl=getattr(a, "logprob_impl", "fused"))


def _optim_args(a: argparse.Namespace) -> OptimArgs:
    _require(a.lr > 0, f"--lr must be > 0, got {a.lr}")
    _require(0.0 <= a.min_lr <= a.lr, f"--min-lr {a.min_lr} must be in [0, --lr {a.lr}]")
    _require(0.0 <= a.lr_warmup_fraction < 1.0,
             f"--lr-warmup-fraction {a.lr_warmup_fraction} must be in [0, 1)")
    _require(a.weight_decay >= 0, f"--weight-decay must be >= 0, got {a.weight_decay}")
    for flag, v in (("--adam-beta1", a.adam_beta1), ("--adam-beta2", a.adam_beta2)):
        _require(0.0 <= v < 1.0, f"{flag} {v} must be in [0, 1)")
    _require(a.adam_eps > 0, f"--adam-eps must be > 0, got {a.adam_eps}")
    _require(a.clip_grad >= 0, f"--clip-grad must be >= 0 (0 = off), got {a.clip_grad}")
    return OptimArgs(
        lr=a.lr, min_lr=a.min_lr, lr_decay_style=a.lr_decay_style,
        lr_warmup_fraction=a.lr_warmup_fraction, weight_decay=a.weight_decay,
        adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
        clip_grad=a.clip_grad)


def _io_args(a: argparse.Namespace) -> IOArgs:
    _require(bool(a.data_path), "--data-path is required: a packed dataset directory "
             "(make one with adadpo-pack)")
    _require(a.log_interval >= 1, "--log-interval must be >= 1")
    _require(a.save_interval is None or a.save_interval >= 1, "--save-interval must be >= 1")
    _require(a.save_interval is None or a.save, "--save-interval needs --save DIR")
    _require(not a.finetune or a.load, "--finetune needs --load DIR (the weights to start from)")
    if a.save:
        import importlib.util

        # megatron-core's checkpoint writer processes die on a missing psutil, and the save
        # then hangs: fail here instead.
        _require(importlib.util.find_spec("psutil") is not None,
                 "--save needs the psutil package (megatron-core dist-checkpointing uses it): "
                 "pip install psutil")
    if a.eval_interval is not None:
        _require(a.eval_interval >= 1, "--eval-interval must be >= 1")
        _require(bool(a.eval_data_path), "--eval-interval needs --eval-data-path DIR")
    _require(a.eval_iters is None or a.eval_iters >= 1, "--eval-iters must be >= 1")
    return IOArgs(
        data_path=a.data_path, eval_data_path=a.eval_data_path, save=a.save,
        save_interval=a.save_interval, load=a.load, finetune=a.finetune,
        log_interval=a.log_interval, log_dir=a.log_dir, tensorboard_dir=a.tensorboard_dir,
        eval_interval=a.eval_interval, eval_iters=a.eval_iters,
        verify_data=bool(getattr(a, "verify_data", False)),
        adopt_unverified_checkpoint=bool(getattr(a, "adopt_unverified_checkpoint", False)))


def loss_config_from_args(a: argparse.Namespace) -> Any:
    """``LossConfig`` from the plugin flags; its ValueError is re-raised naming the flag."""
    from adadpo_megatron.losses import LossConfig

    dests = {field: flag.lstrip("-").replace("-", "_") for field, flag in LOSS_FIELD_FLAGS.items()}
    kwargs = {field: getattr(a, dest) for field, dest in dests.items()}
    try:
        return LossConfig(**kwargs)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if any(flag in msg for flag in LOSS_FIELD_FLAGS.values()):
            raise ConfigError(msg) from e  # LossConfig already names the flag
        named = [flag for field, flag in LOSS_FIELD_FLAGS.items()
                 if field in msg and field != "name"]
        flags = ", ".join(named) if named else "--preference-loss"
        raise ConfigError(f"{flags} (with --preference-loss {a.preference_loss}): {msg}") from e


def _reference_args(a: argparse.Namespace, loss: Any, lora: Any = None) -> ReferenceArgs:
    _require(not (a.ref_logprobs and a.ref_load),
             "--ref-logprobs and --ref-load are alternatives (precomputed vs online "
             "reference): give one")
    if not loss.needs_reference:
        _require(not (a.ref_logprobs or a.ref_load),
                 f"--preference-loss {loss.name} uses no reference model: drop "
                 f"{'--ref-logprobs' if a.ref_logprobs else '--ref-load'}")
        return ReferenceArgs(mode="none", ref_logprobs=None, ref_load=None)
    if a.ref_logprobs:
        return ReferenceArgs(mode="precomputed", ref_logprobs=a.ref_logprobs, ref_load=None)
    if lora is not None and not a.ref_load:  # LoRA: the base is the reference, no copy
        return ReferenceArgs(mode="base", ref_logprobs=None, ref_load=None)
    ref_load = a.ref_load or (a.load if a.finetune else None)
    return ReferenceArgs(mode="online", ref_logprobs=None, ref_load=ref_load)


def config_from_args(a: argparse.Namespace, world_size: int | None = None) -> TrainConfig:
    """Validate a parsed namespace into a ``TrainConfig``; raises ``ConfigError`` naming the flag.

    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 when unset). Touches no process
    group, so every error surfaces before any distributed set-up.
    """
    from adadpo_megatron.trainer.config_groups import group_settings
    from adadpo_megatron.trainer.lora_args import lora_settings_from_args

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = _parallel_args(a, world_size)
    model = _model_args(a, parallel.tensor_model_parallel_size)
    training = _training_args(a, parallel)
    loss = loss_config_from_args(a)
    try:
        groups = group_settings(a, parallel, model)
        lora = lora_settings_from_args(a)  # --lora-*; None without --lora-rank
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from e
    return TrainConfig(model=model, parallel=parallel, training=training,
                       optim=_optim_args(a), io=_io_args(a), loss=loss,
                       reference=_reference_args(a, loss, lora), lora=lora, **groups)
