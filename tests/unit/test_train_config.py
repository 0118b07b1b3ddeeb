"""Trainer flags, YAML configs and validation (adadpo_megatron.trainer.arguments/config),
plus the CPU-only pieces of the trainer: schedule, side-car, collate, metrics files."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from adadpo_megatron.losses import available_losses
from adadpo_megatron.trainer.arguments import add_args, build_parser, parse_args, parse_config
from adadpo_megatron.trainer.config import LOSS_FIELD_FLAGS, ConfigError, config_from_args

REPO = Path(__file__).resolve().parents[2]
BASE = ["--data-path", "/data", "--train-iters", "10"]


def cfg_of(*flags: str, world_size: int = 1):
    return parse_config([*BASE, *flags], world_size=world_size)


def error_of(*flags: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        cfg_of(*flags, world_size=world_size)
    return str(info.value)


def test_defaults_validate_and_derive():
    cfg = cfg_of("--tensor-model-parallel-size", "2", "--global-batch-size", "8",
                 world_size=4)
    assert cfg.parallel.data_parallel_size == 2
    assert cfg.training.num_microbatches == 4
    assert cfg.model.ffn_hidden_size == 4 * cfg.model.hidden_size
    assert cfg.model.num_query_groups == cfg.model.num_attention_heads
    assert cfg.reference.mode == "online" and cfg.loss.name == "adadpo"
    json.dumps(cfg.to_dict())  # JSON-able, inf included
    assert cfg.model.padded_vocab_size(1000, 2) == 1024


@pytest.mark.parametrize("flags, world, needle", [
    (["--num-attention-heads", "6", "--hidden-size", "60", "--tensor-model-parallel-size", "4"],
     4, "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"],
     4, "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--num-query-groups", "2"], 1, "needs --group-query-attention"),
    (["--hidden-size", "30"], 1, "--hidden-size 30 is not divisible by --num-attention-heads 4"),
    (["--num-layers", "6", "--pipeline-model-parallel-size", "4"], 4,
     "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4"),
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--pipeline-model-parallel-size 2 x --num-layers-per-virtual-pipeline-stage 3"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "needs --pipeline-model-parallel-size"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1,
     "--global-batch-size 6 is not divisible by --micro-batch-size 4"),
    (["--global-batch-size", "3"], 2, "--global-batch-size 3 is not divisible"),
    (["--tensor-model-parallel-size", "2"], 3, "world size 3"),
    (["--sequence-parallel"], 1, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "129",
      "--pipeline-model-parallel-size", "2"], 4, "--seq-length 129 is not a multiple of 2"),
    (["--fp8-format", "hybrid", "--device", "cpu"], 1, "--fp8-format"),
    (["--bf16", "--device", "cpu"], 1, "--bf16 does not run on the CPU"),
    (["--min-lr", "1", "--lr", "0.1"], 1, "--min-lr"),
    (["--lr-warmup-fraction", "1.5"], 1, "--lr-warmup-fraction"),
    (["--clip-grad", "-1"], 1, "--clip-grad"),
    (["--recompute-granularity", "full"], 1, "--recompute-method"),
    (["--recompute-method", "block"], 1, "--recompute-granularity full"),
    (["--eval-interval", "5"], 1, "--eval-data-path"),
    (["--save-interval", "5"], 1, "--save"),
    (["--finetune"], 1, "--finetune needs --load"),
    (["--max-position-embeddings", "64", "--seq-length", "128"], 1, "--max-position-embeddings"),
    (["--ref-logprobs", "a", "--ref-load", "b"], 1, "--ref-logprobs and --ref-load"),
    (["--preference-loss", "simpo", "--ref-load", "b"], 1, "uses no reference model"),
])
def test_invalid_settings_name_the_flag(flags, world, needle):
    assert needle in error_of(*flags, world_size=world)


def test_cpu_accepts_the_70b_recipes_parallel_and_memory_flags():
    # Sequence parallelism, recompute and the distributed optimizer run on the CPU
    # (step/norms.py, step/cpu.py); tests/distributed/test_train_cpu_layouts.py runs them.
    cfg = cfg_of("--sequence-parallel", "--tensor-model-parallel-size", "2", "--device", "cpu",
                 "--use-distributed-optimizer", "--recompute-granularity", "selective",
                 world_size=4)
    assert cfg.parallel.sequence_parallel and cfg.parallel.use_distributed_optimizer
    assert cfg.training.recompute_granularity == "selective"


def test_missing_required_values_are_errors():
    with pytest.raises(ConfigError, match="--data-path"):
        parse_config(["--train-iters", "3"])
    with pytest.raises(ConfigError, match="--train-iters"):
        parse_config(["--data-path", "/d"])


@pytest.mark.parametrize("flags, flag", [
    (["--adadpo-clip", "0.5"], "--adadpo-clip"),
    (["--preference-loss", "dpo", "--simpo-gamma", "1"], "--simpo-gamma"),
    (["--preference-loss", "simpo", "--adadpo-space", "ratio"], "--adadpo-space"),
    (["--dpo-beta", "0"], "--dpo-beta"),
    (["--preference-loss", "ipo", "--adadpo-granularity", "sequence"], "--adadpo-granularity"),
])
def test_loss_config_errors_name_our_flag(flags, flag):
    assert flag in error_of(*flags)


def test_loss_flags_map_onto_loss_config():
    cfg = cfg_of("--preference-loss", "adadpo", "--dpo-beta", "0.2", "--adadpo-clip", "inf",
                 "--adadpo-clip-mode", "both", "--adadpo-granularity", "sequence",
                 "--adadpo-space", "ratio", "--dpo-label-smoothing", "0.1", "--sft-weight", "0.5")
    loss = cfg.loss
    assert (loss.beta, loss.balance_clip_mode, loss.balance_granularity) == (0.2, "both",
                                                                              "sequence")
    assert math.isinf(loss.balance_clip) and loss.balance_space == "ratio"
    assert (loss.label_smoothing, loss.sft_weight) == (0.1, 0.5)


def test_preference_loss_choices_come_from_the_registry():
    action = next(a for a in build_parser()._actions if a.dest == "preference_loss")
    assert sorted(action.choices) == sorted(available_losses())
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--preference-loss", "no-such-loss"])


def test_add_args_adds_only_the_plugin_flags():
    parser = add_args(argparse.ArgumentParser())
    flags = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert flags == set(LOSS_FIELD_FLAGS.values()) | {
        "--ref-logprobs", "--ref-load", "--logprob-impl"}
    # As Megatron-LM's extra_args_provider: must not collide with a parser that already has
    # Megatron-LM's own flags (a few of its names stand in for the whole set here).
    megatron_like = argparse.ArgumentParser()
    for f in ("--fp8-format", "--load", "--lr", "--micro-batch-size", "--seq-length"):
        megatron_like.add_argument(f)
    add_args(megatron_like)


def test_logprob_impl_flag(capsys):
    from adadpo_megatron.step.forward_step import make_forward_step

    assert cfg_of().training.logprob_impl == "fused"
    assert cfg_of("--logprob-impl", "chunked").training.logprob_impl == "chunked"
    with pytest.raises(SystemExit):
        cfg_of("--logprob-impl", "naive")
    assert "--logprob-impl" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--logprob-impl 'naive'"):
        make_forward_step(None, None, use_thd=False, logprob_impl="naive")


def test_yaml_config_with_command_line_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layers: 4\nhidden_size: 128\nlr: 1e-4\nbf16: false\n"
                    "sequence-parallel: true\ntensor-model-parallel-size: 2\ndevice: cuda\n"
                    "preference-loss: adadpo\nadadpo_clip: .inf\ndata-path: /yaml\n"
                    "train-iters: 5\n")
    cfg = parse_config(["--config", str(path), "--lr", "3e-4", "--data-path", "/cli"],
                       world_size=2)
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (4, 128)
    assert cfg.optim.lr == 3e-4 and cfg.io.data_path == "/cli"  # the command line wins
    assert not cfg.training.bf16 and cfg.parallel.sequence_parallel
    assert cfg.loss.name == "adadpo" and cfg.training.train_iters == 5
    assert math.isinf(cfg.loss.balance_clip)


@pytest.mark.parametrize("text, needle", [
    ("no-such-flag: 1\n", "unknown key 'no-such-flag'"),
    ("bf16: 3\n", "key 'bf16' takes true or false"),
    ("- a\n- b\n", "must be a mapping"),
    ("lr: [1, 2]\n", "single value"),
    ("lr: [\n", "not valid YAML"),
])
def test_bad_yaml_names_the_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_config(["--config", str(path), *BASE])
    assert needle in str(info.value) and str(path) in str(info.value)


def test_shipped_yaml_configs_parse():
    for path in sorted((REPO / "examples" / "configs").glob("*.yaml")):
        parse_config(["--config", str(path), *BASE, "--eval-data-path", "/eval"], world_size=2)


def test_llama3_70b_flags_validate_for_64_gpus():
    script = REPO / "examples" / "llama3_70b" / "flags.sh"
    if not script.is_file():
        pytest.skip("examples/llama3_70b/flags.sh not present")
    out = subprocess.run(["bash", "-c", f'source "{script}"; printf "%s\\0" '
                          '"${ADADPO_70B_FLAGS[@]}"'], check=True, capture_output=True,
                         env={**os.environ, "ADADPO_70B_DATA": "/d", "ADADPO_70B_SAVE": "/s"})
    args = parse_args(out.stdout.decode().split("\0")[:-1])
    # FP8 needs Transformer Engine on a GPU; everything else validates as on the cluster.
    assert args.fp8 == "hybrid"
    args.fp8, args.device = None, "cuda"
    cfg = config_from_args(args, world_size=64)
    assert cfg.parallel.data_parallel_size == 2
    assert cfg.parallel.virtual_pipeline_model_parallel_size == 4
    assert cfg.training.num_microbatches == 64
    assert cfg.reference.mode == "precomputed"


def test_fingerprint_tracks_model_and_loss_not_layout():
    a = cfg_of("--tensor-model-parallel-size", "2", world_size=2).fingerprint()
    assert a == cfg_of(world_size=2).fingerprint()
    assert a != cfg_of("--hidden-size", "128").fingerprint()
    assert a != cfg_of("--dpo-beta", "0.3").fingerprint()


def test_cosine_schedule_with_warmup():
    from adadpo_megatron.trainer.optim import build_scheduler

    cfg = cfg_of("--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-fraction", "0.2",
                 "--train-iters", "10")
    opt = argparse.Namespace(param_groups=[{"lr": 0.0}])
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # 2 warm-up steps from 0
    decay = [1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 2) / 8))
             for s in range(2, 11)]
    assert lrs[2:] == pytest.approx(decay)


def test_collate_packs_concatenates_thd():
    from adadpo_megatron.trainer.loop import collate_packs

    def pack(lens, first_pair):
        total = sum(lens)
        cu = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)
        n = len(lens) // 2
        return {"tokens": torch.arange(total), "position_ids": torch.zeros(total, dtype=torch.long),
                "labels": torch.arange(total), "loss_mask": torch.ones(total),
                "cu_seqlens": cu, "max_seqlen": max(lens),
                "pair_index": torch.arange(first_pair, first_pair + n).repeat_interleave(2),
                "is_chosen": torch.tensor([True, False] * n)}

    mb = collate_packs([pack([5, 3, 4, 4], 0), pack([2, 6], 7)])
    assert mb["cu_seqlens"].tolist() == [0, 5, 8, 12, 16, 18, 24]
    assert mb["cu_seqlens"].dtype == torch.int32 and mb["max_seqlen"] == 6
    assert mb["pair_index"].tolist() == [0, 0, 1, 1, 7, 7]
    assert mb["tokens"].shape == (24,)


def test_sidecar_round_trip_and_refusals(tmp_path):
    from adadpo_megatron.step.reference import (
        PrecomputedReference,
        SidecarError,
        write_sidecar,
    )

    path = str(tmp_path / "ref.npz")
    write_sidecar(path, np.array([-1.0, -2.0, -3.0, -4.0]), "abc", {"reference": "x"})
    ref = PrecomputedReference(path, "abc", num_pairs=2)
    got = ref.lookup(torch.tensor([1, 1, 0, 0]), torch.tensor([True, False, True, False]))
    assert got.tolist() == [-3.0, -4.0, -1.0, -2.0] and got.dtype == torch.float32
    with pytest.raises(SidecarError, match="another dataset"):
        PrecomputedReference(path, "other", num_pairs=2)
    with pytest.raises(SidecarError, match="expected 6"):
        PrecomputedReference(path, "abc", num_pairs=3)
    with pytest.raises(ValueError, match="not finite"):
        write_sidecar(path, np.array([0.0, np.nan]), "abc", {})


def test_metrics_writer_jsonl_and_resume_truncation(tmp_path):
    from adadpo_megatron.trainer.metrics import MetricsWriter

    lines = []
    w = MetricsWriter(enabled=True, log_dir=str(tmp_path), tensorboard_dir=None,
                      print_fn=lambda s, **k: lines.append(s))
    for step in (1, 2, 3):
        w.log(step, 3, {"loss": 0.5, "lr": 1e-3, "grad_norm": float("nan")})
    w.log(3, 3, {"eval/loss": 0.4})
    w.close()
    records = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[0]["grad_norm"] == "nan" and records[-1] == {"step": 3, "eval/loss": 0.4}
    assert "step 1/3 | loss 0.5000 | lr 1.000E-03" in lines[0]
    # A run resumed from step 2 rewrites what came after it.
    MetricsWriter(enabled=True, log_dir=str(tmp_path), tensorboard_dir=None,
                  start_step=2).close()
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1, 2]
    MetricsWriter(enabled=False, log_dir=str(tmp_path / "off"), tensorboard_dir=None).log(1, 1, {})
    assert not (tmp_path / "off").exists()


class _FakeSubOptimizer:
    """The slice of megatron-core's MegatronOptimizer interface optimizer_step uses."""

    def __init__(self, grads):
        self.params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.clone()
        self.config = argparse.Namespace()
        self.stepped = 0

    def prepare_grads(self):
        return False

    def get_main_grads_for_grad_norm(self):
        return [p.grad for p in self.params]

    def get_parameters(self):
        return self.params

    def get_grad_stats_parallel_group(self):
        return None  # the default (one-process) group

    def step_with_ready_grads(self):
        self.stepped += 1
        return True


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_optimizer_step_clips_and_skips(one_process_group):
    from adadpo_megatron.trainer.optim import optimizer_step

    sched = argparse.Namespace(steps=0)
    sched.step = lambda increment: setattr(sched, "steps", sched.steps + increment)
    opt = _FakeSubOptimizer([torch.tensor([3.0]), torch.tensor([4.0])])
    result = optimizer_step(opt, sched, clip_grad=1.0, loss_finite=True)
    assert result.stepped and result.grad_norm == pytest.approx(5.0)
    assert [float(p.grad) for p in opt.params] == pytest.approx([0.6, 0.8], rel=1e-5)
    assert (opt.stepped, sched.steps) == (1, 1)

    small = _FakeSubOptimizer([torch.tensor([0.3]), torch.tensor([0.4])])
    optimizer_step(small, sched, clip_grad=1.0, loss_finite=True)  # below the bound
    assert [float(p.grad) for p in small.params] == pytest.approx([0.3, 0.4])

    for grads, loss_finite in (([torch.tensor([float("nan")]), torch.tensor([1.0])], True),
                               ([torch.tensor([float("inf")])], True),
                               ([torch.tensor([1.0])], False)):
        bad = _FakeSubOptimizer(grads)
        result = optimizer_step(bad, sched, clip_grad=1.0, loss_finite=loss_finite)
        assert not result.stepped and bad.stepped == 0 and sched.steps == 2
        assert result.loss_finite == loss_finite
