"""Command line of the layout planner (``tools/plan_parallel.py``).

It parses the trainer's own flags with the trainer's own parser
(``adadpo_megatron.trainer.arguments.build_parser``), so a launch script's flag list
feeds it unchanged, plus a few planner flags: ``--model`` (a preset shape), ``--vocab-size``
(the trainer reads it from the dataset's tokenizer), ``--num-gpus``, ``--gpu-memory-gib``,
``--segment-length`` and ``--json``. Model-shape flags given explicitly override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from adadpo_megatron.planner.estimate import GIB, PRESETS, Layout, ModelShape, plan
from adadpo_megatron.planner.pairs import pair_costs

# Trainer flag dest -> ModelShape field (how it is read from the namespace).
_SHAPE_DESTS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "normalization": "normalization",
    "swiglu": "swiglu",
    "untie_embeddings_and_output_weights": "untie_embeddings",
    "position_embedding_type": "position_embedding_type",
    "max_position_embeddings": "max_position_embeddings",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "vocab_size": "vocab_size",
    "kv_channels": "kv_channels",
    "add_qkv_bias": "add_qkv_bias",
    "qk_layernorm": "qk_layernorm",
    "num_experts": "num_experts",
    "moe_router_topk": "moe_router_topk",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
}


def _add_planner_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("planner (tools/plan_parallel.py only)")
    g.add_argument("--model", choices=sorted(PRESETS), default=None,
                   help="preset shape; explicit model flags override it")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary before padding (the preset's by default)")
    g.add_argument("--num-gpus", type=int, default=None,
                   help="GPUs in the job (default: $NNODES x $GPUS_PER_NODE, else $WORLD_SIZE)")
    g.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory of one GPU (H100 80GB: 80)")
    g.add_argument("--segment-length", type=int, default=None,
                   help="mean tokens per sequence for attention FLOPs (default --seq-length/2)")
    g.add_argument("--pair-lengths", type=int, nargs=3, metavar=("P", "C", "R"), default=None,
                   help="mean prompt, chosen and rejected tokens of a pair: report tokens and "
                   "FLOPs per pair, separate vs prefix-shared layout")
    g.add_argument("--prefix-sharing", action="store_true",
                   help="the data is packed with adadpo-pack --prefix-sharing (pairs per step "
                   "from the shared layout's tokens per pair)")
    g.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def build_planner_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The trainer's parser plus the planner flags; with ``suppress_defaults`` only given
    flags appear in the namespace (used to tell explicit flags from defaults)."""
    from adadpo_megatron.trainer.arguments import build_parser

    parser = build_parser()
    parser.prog = "plan_parallel.py"
    _add_planner_args(parser)
    if suppress_defaults:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
    return parser


def _default_num_gpus() -> int:
    env = os.environ
    if "NNODES" in env and "GPUS_PER_NODE" in env:
        return int(env["NNODES"]) * int(env["GPUS_PER_NODE"])
    return int(env.get("WORLD_SIZE", "1"))


def shape_from_args(args: argparse.Namespace, given: set[str]) -> ModelShape:
    """The model shape: the preset (if any), then every explicitly given shape flag."""
    values: dict[str, Any] = {}
    if args.model is not None:
        values = dataclasses.asdict(PRESETS[args.model])
    for dest, field in _SHAPE_DESTS.items():
        if args.model is None or dest in given:
            values[field] = getattr(args, dest)
    if args.model is None or "disable_bias_linear" in given:
        values["add_bias_linear"] = not args.disable_bias_linear
    if "num_query_groups" in given and not args.group_query_attention:
        raise SystemExit("plan_parallel.py: --num-query-groups needs --group-query-attention")
    if args.model is None and not args.group_query_attention:
        values["num_query_groups"] = values["num_attention_heads"]
    if values.get("ffn_hidden_size") is None:
        values["ffn_hidden_size"] = 4 * values["hidden_size"]
    if values.get("num_experts") and values.get("moe_ffn_hidden_size") is None:
        values["moe_ffn_hidden_size"] = values["ffn_hidden_size"]  # the trainer's default
    if values.get("max_position_embeddings") is None:
        values["max_position_embeddings"] = args.seq_length
    if values.get("vocab_size") is None:
        raise SystemExit("plan_parallel.py: give --vocab-size N (or --model PRESET)")
    return ModelShape(**values)


def layout_from_args(args: argparse.Namespace, shape: ModelShape) -> Layout:
    """The layout, batch and precision from the trainer's flags."""
    from adadpo_megatron.step.fp8 import FP8Settings, pack_multiple
    from adadpo_megatron.trainer.config import loss_config_from_args

    fp8 = FP8Settings.from_args(args)
    vpp = None
    if args.num_layers_per_virtual_pipeline_stage:
        per_rank = shape.num_layers // args.pipeline_model_parallel_size
        vpp = per_rank // args.num_layers_per_virtual_pipeline_stage
        vpp = vpp if vpp > 1 else None
    world = args.num_gpus or _default_num_gpus()
    mp = args.tensor_model_parallel_size * args.pipeline_model_parallel_size * \
        args.context_parallel_size
    needs_reference = loss_config_from_args(args).needs_reference
    return Layout(
        tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, vpp=vpp,
        cp=args.context_parallel_size, world_size=world,
        sequence_parallel=args.sequence_parallel,
        distributed_optimizer=args.use_distributed_optimizer,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers,
        bf16=args.bf16, fp8=fp8.enabled, fp8_param_gather=fp8.param_gather,
        pack_multiple=pack_multiple(fp8), seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size or args.micro_batch_size * max(world // mp, 1),
        dropout=args.hidden_dropout > 0 or args.attention_dropout > 0,
        # LoRA without --ref-load: the reference is the base itself (no second copy).
        online_reference=needs_reference and not args.ref_logprobs
        and (args.lora_rank is None or bool(args.ref_load)),
        logprob_impl=args.logprob_impl,
        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size,
        lora_rank=args.lora_rank, lora_targets=tuple(args.lora_target_modules),
        base_reference=needs_reference and args.lora_rank is not None
        and not (args.ref_logprobs or args.ref_load),
    )


def _with_config(argv: list[str]) -> list[str]:
    """``argv`` preceded by the flags of its ``--config`` YAML, as the trainer reads them.

    Raises PathError (unreadable file) or ConfigError (bad YAML or key), one line each.
    """
    from adadpo_megatron.preflight import readable_file
    from adadpo_megatron.trainer.arguments import _yaml_to_argv

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return argv
    readable_file(known.config, "--config")
    return _yaml_to_argv(known.config, build_planner_parser()) + argv


def plan_from_argv(argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``argv`` (trainer flags + planner flags) and return :func:`planner.plan`'s dict."""
    argv = _with_config(list(argv))
    args = build_planner_parser().parse_args(argv)
    given = set(vars(build_planner_parser(suppress_defaults=True).parse_args(argv)))
    shape = shape_from_args(args, given)
    layout = layout_from_args(args, shape)
    result = plan(shape, layout, gpu_memory_gib=args.gpu_memory_gib,
                  segment_length=args.segment_length)
    result["model"] = dataclasses.asdict(shape)
    if args.pair_lengths is not None:
        per_pair = pair_costs(shape, *args.pair_lengths, tp=layout.tp)
        per_pair["layout"] = "shared" if args.prefix_sharing else "separate"
        result["per_pair"] = per_pair
        if "tokens_per_step" in result:
            result["pairs_per_step"] = (
                result["tokens_per_step"] / per_pair[per_pair["layout"]]["tokens"])
    return result


def format_report(r: dict[str, Any]) -> str:
    """Human-readable table of :func:`plan_from_argv`'s result."""
    lay, lines = r["layout"], []
    lines.append(
        f"layout: TP={lay['tp']} PP={lay['pp']} VPP={lay['vpp'] or 1} CP={lay['cp']} "
        f"DP={lay['dp']} on {lay['world_size']} GPUs, SP={lay['sequence_parallel']}, "
        f"dist-opt={lay['distributed_optimizer']}, recompute={lay['recompute_granularity']}, "
        f"fp8={lay['fp8']}"
    )
    lines.append(f"parameters: {r['params_total'] / 1e9:.3f} B total "
                 f"(vocab padded to {r['padded_vocab_size']}; "
                 f"{r['params_total_unpadded'] / 1e9:.3f} B unpadded)")
    if r["params_active"] != r["params_total"]:
        lines.append(f"MoE: {r['params_active'] / 1e9:.3f} B active per token "
                     f"(EP={lay['ep']}, expert TP={lay['etp'] or lay['tp']})")
    if "trainable_params" in r:
        lines.append(f"LoRA rank {lay['lora_rank']}: {r['trainable_params'] / 1e6:.2f} M "
                     "trainable adapter parameters (base frozen)")
    for e in r["errors"]:
        lines.append(f"ERROR: {e}")
    if r["errors"]:
        return "\n".join(lines)
    lines.append(f"per GPU (peak: pipeline rank {r['peak_stage']}): "
                 f"{r['params_per_gpu'] / 1e9:.3f} B parameters, "
                 f"{r['num_microbatches']} micro-batches per step")
    for part, gib in r["memory_gib_per_gpu"].items():
        lines.append(f"  {part:<12} {gib:8.2f} GiB")
    stages = ", ".join(f"{g:.1f}" for g in r["per_stage_total_gib"])
    lines.append(f"  per stage    [{stages}] GiB")
    lines.append(f"FLOPs per step: {r['flops_per_step']:.3e} model, "
                 f"{r['hardware_flops_per_step']:.3e} with recompute/reference "
                 f"({r['tokens_per_step']} tokens)")
    if "per_pair" in r:
        pp_ = r["per_pair"]
        lines.append(
            f"per pair: separate {pp_['separate']['tokens']} tokens "
            f"{pp_['separate']['forward_flops']:.3e} fwd FLOPs; prefix-shared "
            f"{pp_['shared']['tokens']} tokens {pp_['shared']['forward_flops']:.3e} fwd FLOPs "
            f"({pp_['token_ratio']:.2f}x fewer tokens, {pp_['flops_ratio']:.2f}x fewer FLOPs); "
            f"{pp_['layout']} layout: ~{r.get('pairs_per_step', 0):.0f} pairs per step")
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines.append(f"{verdict} in {r['gpu_memory_gib']:.0f} GiB "
                 f"(usable {r['usable_gib']:.0f} GiB after 10% headroom)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan; exit status 0 if it fits, 1 if not (layout errors or memory)."""
    from adadpo_megatron.preflight import PathError
    from adadpo_megatron.trainer.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    try:
        result = plan_from_argv(argv)
    except (PathError, ConfigError) as e:
        print(f"plan_parallel.py: error: {e}", file=sys.stderr)
        return 2
    if "--json" in argv:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(format_report(result))
    return 0 if result["fits"] else 1


__all__ = ["GIB", "build_planner_parser", "format_report", "main", "plan_from_argv"]
