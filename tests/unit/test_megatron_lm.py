"""The Megatron-LM entry (examples/megatron_lm/pretrain_adadpo.py) without Megatron-LM:
flag parsing next to Megatron-LM-like flags, the argument checks, the data iterator, and
the forward step on a tiny GPTModel against a plain log-softmax reference."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adadpo_megatron.integrations import megatron_lm
from adadpo_megatron.integrations.megatron_lm_data import data_paths, train_iterator

REPO = Path(__file__).resolve().parents[2]


def megatron_lm_like_parser() -> argparse.ArgumentParser:
    """A subset of Megatron-LM's own flags, with its names, dests and defaults."""
    p = argparse.ArgumentParser()
    for flag, kw in {
        "--tensor-model-parallel-size": {"type": int, "default": 1},
        "--pipeline-model-parallel-size": {"type": int, "default": 1},
        "--context-parallel-size": {"type": int, "default": 1},
        "--sequence-parallel": {"action": "store_true"},
        "--micro-batch-size": {"type": int, "default": None},
        "--global-batch-size": {"type": int, "default": None},
        "--seq-length": {"type": int, "default": None},
        "--seed": {"type": int, "default": 1234},
        "--data-path": {"nargs": "*", "default": None},
        "--train-data-path": {"nargs": "*", "default": None},
        "--valid-data-path": {"nargs": "*", "default": None},
        "--hidden-dropout": {"type": float, "default": 0.1},
        "--attention-dropout": {"type": float, "default": 0.1},
        "--dataloader-type": {"default": None, "choices": ["single", "cyclic", "external"]},
        "--calculate-per-token-loss": {"action": "store_true"},
        "--position-embedding-type": {"default": "learned_absolute"},
        "--rotary-base": {"type": int, "default": 10000},
        "--untie-embeddings-and-output-weights": {"action": "store_true"},
        "--fp8-format": {"default": None, "choices": ["e4m3", "hybrid"], "dest": "fp8"},
        "--fp8-recipe": {"default": "delayed", "dest": "fp8_recipe"},
        "--load": {"default": None},
        "--save": {"default": None},
        "--lr": {"type": float, "default": None},
    }.items():
        p.add_argument(flag, **kw)
    return p


RECIPE = [
    "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size", "4",
    "--micro-batch-size", "1", "--global-batch-size", "128", "--seq-length", "8192",
    "--data-path", "/data/pack", "--dataloader-type", "external", "--calculate-per-token-loss",
    "--fp8-format", "hybrid", "--lr", "5e-7", "--hidden-dropout", "0", "--attention-dropout", "0",
    "--preference-loss", "adadpo", "--dpo-beta", "0.1", "--adadpo-space", "ratio",
    "--ref-logprobs", "/data/pack/ref.npz",
]


def _recipe_args(*extra: str) -> argparse.Namespace:
    return megatron_lm.add_args(megatron_lm_like_parser()).parse_args([*RECIPE, *extra])


def test_plugin_flags_sit_beside_megatron_lm_flags() -> None:
    from adadpo_megatron.step.fp8 import FP8Settings
    from adadpo_megatron.trainer.config import loss_config_from_args

    args = _recipe_args()
    megatron_lm.check_args(args)
    loss = loss_config_from_args(args)
    assert (loss.name, loss.beta, loss.balance_space) == ("adadpo", 0.1, "ratio")
    assert FP8Settings.from_args(args).format == "hybrid"  # Megatron-LM's own FP8 flags
    assert data_paths(args) == ("/data/pack", None)
    args = _recipe_args("--data-path", "--train-data-path", "/t", "--valid-data-path", "/v")
    assert data_paths(args) == ("/t", "/v")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--dataloader-type", "single"], "--dataloader-type external"),
        (["--micro-batch-size", "2"], "--micro-batch-size 1"),
        (["--ref-load", "/ckpt"], "--ref-load and --ref-logprobs"),
        (["--hidden-dropout", "0.1"], "--hidden-dropout 0.1"),
        (["--attention-dropout", "0.05"], "--attention-dropout 0.05"),
        (["--data-path"], "no training data"),
        (["--data-path", "a", "b"], "exactly one"),
    ],
)
def test_check_args_names_the_flag(change: list[str], message: str | None) -> None:
    args = _recipe_args(*change)
    with pytest.raises(ValueError, match=message):
        megatron_lm.check_args(args)


def test_check_args_needs_per_token_loss_and_reference() -> None:
    args = megatron_lm.add_args(megatron_lm_like_parser()).parse_args(
        [a for a in RECIPE if a != "--calculate-per-token-loss"])
    with pytest.raises(ValueError, match="--calculate-per-token-loss"):
        megatron_lm.check_args(args)
    args = _recipe_args("--ref-logprobs", "")
    with pytest.raises(ValueError, match="needs reference log-probs"):
        megatron_lm.check_args(args)
    megatron_lm.check_args(_recipe_args("--preference-loss", "simpo", "--adadpo-space", "policy",
                                         "--ref-logprobs", ""))
    # The online reference from a checkpoint: fine at PP=1, refused under PP.
    megatron_lm.check_args(_recipe_args("--ref-logprobs", "", "--ref-load", "/ckpt",
                                        "--pipeline-model-parallel-size", "1"))
    with pytest.raises(ValueError, match="pipeline parallelism"):
        megatron_lm.check_args(_recipe_args("--ref-logprobs", "", "--ref-load", "/ckpt"))


def _pack(pair_ids: list[int], lengths: list[int]) -> dict:
    """A THD pack of two-segment pairs; tokens encode the pair id for checking."""
    tokens = torch.cat([torch.full((n,), 3 + p % 50) for p, n in zip(
        [p for p in pair_ids for _ in (0, 1)], lengths, strict=True)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.roll(tokens, -1)
    mask = torch.ones(len(tokens))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for end in cu[1:].tolist():
        labels[end - 1], mask[end - 1] = 0, 0.0
    mask[cu[:-1].long()] = 0.0  # first token of each segment counts as prompt
    return {"tokens": tokens, "position_ids": positions, "labels": labels, "loss_mask": mask,
            "cu_seqlens": cu, "max_seqlen": max(lengths),
            "pair_index": torch.tensor(pair_ids).repeat_interleave(2),
            "is_chosen": torch.tensor([True, False] * len(pair_ids))}


class _FakeReference:
    def attach(self, pack: dict) -> dict:
        return {**pack, "ref_logps": -pack["pair_index"].float()}


def test_data_iterator_shards_steps_over_dp() -> None:
    dataset = [_pack([i], [4, 3]) for i in range(8)]
    args = argparse.Namespace(global_batch_size=4, micro_batch_size=1, seed=5)
    seen = []
    for rank in range(2):
        it = train_iterator(dataset, args, dp_rank=rank, dp_size=2,
                            attach=_FakeReference().attach)
        step = [next(it) for _ in range(2)]  # GBS / (DP * MBS) micro-batches per step
        seen += [int(mb["pair_index"][0]) for mb in step]
        assert all(torch.equal(mb["ref_logps"], -mb["pair_index"].float()) for mb in step)
    assert len(set(seen)) == 4  # one step: four different packs over the two DP ranks
    # Resume: after 3 consumed steps the iterator starts at step 4 of the same order.
    fresh = train_iterator(dataset, args, dp_rank=0, dp_size=1)
    order = [int(next(fresh)["pair_index"][0]) for _ in range(16)]
    resumed = train_iterator(dataset, argparse.Namespace(**vars(args), consumed_train_samples=12),
                             dp_rank=0, dp_size=1)
    assert [int(next(resumed)["pair_index"][0]) for _ in range(4)] == order[12:16]
    with pytest.raises(ValueError, match="not a multiple of --global-batch-size 4"):
        train_iterator(dataset, argparse.Namespace(**vars(args), consumed_train_samples=6),
                       dp_rank=0, dp_size=1)


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_forward_step_on_a_tiny_model(impl: str) -> None:
    from megatron.core import parallel_state

    from adadpo_megatron.losses import compute_preference_loss
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config
    from adadpo_megatron.trainer.config import loss_config_from_args

    initialize_model_parallel_cpu(tp=1, pp=1)
    try:
        args = _recipe_args("--tensor-model-parallel-size", "1",
                            "--pipeline-model-parallel-size", "1", "--logprob-impl", impl)
        config = build_transformer_config(
            num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
            position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
            add_bias_linear=False, calculate_per_token_loss=True)
        model = build_gpt_model(config, 64, 32, use_te=False)
        batch = _FakeReference().attach(_pack([7, 9], [5, 4, 6, 3]))
        step = megatron_lm.make_forward_step(args, use_thd=False)
        output, loss_func = step(iter([batch]), model)
        loss, num_pairs, report = loss_func(output)
        # Plain reference: full log-softmax of the same logits, masked segment sums.
        logits = output.detach()
        if impl == "fused":  # the model handed over hidden states [1, T, H]
            weight = (model.shared_embedding_or_output_weight()
                      if model.share_embeddings_and_output_weights else model.output_layer.weight)
            assert output.shape[-1] == 32
            logits = logits @ weight.detach().T
        assert logits.shape[-1] == 64
        logps = F.log_softmax(logits.float()[0], -1)
        token = logps.gather(-1, batch["labels"][:, None])[:, 0] * batch["loss_mask"]
        sums = torch.stack([token[a:b].sum() for a, b in zip(
            batch["cu_seqlens"][:-1].tolist(), batch["cu_seqlens"][1:].tolist(), strict=True)])
        counts = torch.tensor([3.0, 2.0, 4.0, 1.0])
        ref = batch["ref_logps"]
        losses, _ = compute_preference_loss(loss_config_from_args(args), sums[0::2], sums[1::2],
                                            ref[0::2], ref[1::2], counts[0::2], counts[1::2])
        torch.testing.assert_close(loss.detach(), losses.sum())  # CP = 1
        assert int(num_pairs) == 2 and num_pairs.dtype == torch.int
        torch.testing.assert_close(report["loss"], torch.stack([losses.sum(), torch.tensor(2.0)]))
        loss.backward()
        assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0
    finally:
        parallel_state.destroy_model_parallel()


def test_example_imports_without_megatron_lm() -> None:
    spec = importlib.util.spec_from_file_location(
        "pretrain_adadpo", REPO / "examples" / "megatron_lm" / "pretrain_adadpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.train_valid_test_datasets_provider.is_distributed is True
    assert callable(module.forward_step) and callable(module.model_provider)
    if importlib.util.find_spec("megatron.training") is None:
        with pytest.raises(ModuleNotFoundError, match="megatron.training"):
            module.main()


def test_step_metrics_reduce_write_and_fix_the_max_for_megatron_lm() -> None:
    from megatron.core import parallel_state

    from adadpo_megatron.integrations.megatron_lm_metrics import StepMetrics
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu

    class Writer:
        logged: list = []

        def log(self, step, train_iters, metrics):
            self.logged.append((step, metrics))

    def report(loss_sum, pairs, coef_max):
        return {"loss": torch.tensor([loss_sum, pairs]),
                "adadpo/coef_max": torch.tensor([coef_max, 1.0])}

    initialize_model_parallel_cpu(tp=1, pp=1)
    try:
        step = [1]
        writer = Writer()
        metrics = StepMetrics(writer=writer, step_fn=lambda: step[0], train_iters=3,
                              train_period=2, eval_period=2, log_interval=2)
        for step[0] in (1, 2, 3):
            reports = [report(1.0, 2.0, 1.25), report(-4.0, 3.0, 1.5)]
            for r in reports:
                metrics.add(r, training=True)
            # Megatron-LM sums [sum, count] over micro-batches: the max now comes out whole.
            total = reports[0]["adadpo/coef_max"] + reports[1]["adadpo/coef_max"]
            assert float(total[0] / total[1]) == 1.5
        metrics.add(report(2.0, 1.0, 2.0), training=False)
        metrics.add(report(0.0, 1.0, 1.0), training=False)
        assert [s for s, _ in writer.logged] == [2, 3, 3]  # --log-interval 2, the last step
        first = dict(writer.logged[0][1])
        # Elapsed time and the ETA (trainer/eta.py): one step left after step 2.
        assert first.pop("elapsed_s") >= 0.0
        assert first.pop("eta_s") > 0.0
        assert first == pytest.approx({"loss": -0.6, "adadpo/coef_max": 1.5, "pairs": 5.0})
        assert writer.logged[1][1]["eta_s"] == 0.0
        assert writer.logged[2][1] == {"eval/loss": 1.0, "eval/adadpo/coef_max": 2.0}
    finally:
        parallel_state.destroy_model_parallel()


def test_use_thd_follows_the_spec_and_the_reference_is_placed_like_the_policy(
        monkeypatch) -> None:
    """use_thd follows --transformer-impl (the spec built), not whether TE imports; the
    online reference is wrapped in Float16Module under --bf16 as get_model wraps the policy;
    the first forward_step call runs the self-check and refuses a wrong path."""
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    from adadpo_megatron.step import self_check
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    te = argparse.Namespace(transformer_impl="transformer_engine")
    assert megatron_lm.uses_te_spec(te) and not megatron_lm.uses_te_spec(
        argparse.Namespace(transformer_impl="local"))
    initialize_model_parallel_cpu(tp=1, pp=1)
    try:
        config = build_transformer_config(num_layers=2, hidden_size=32, num_attention_heads=4,
                                          ffn_hidden_size=64, bf16=True)
        ref = megatron_lm.place_reference(build_gpt_model(config, 64, 32, use_te=False),
                                          argparse.Namespace(bf16=True, fp16=False))
        assert isinstance(ref, Float16Module)
        assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
        plain = build_gpt_model(config, 64, 32, use_te=False)
        assert megatron_lm.place_reference(plain, argparse.Namespace(bf16=False)) is plain

        seen = {}
        monkeypatch.setattr(self_check, "check_paths", lambda chunks, **kw: seen.update(kw))
        args = _recipe_args("--tensor-model-parallel-size", "1",
                            "--pipeline-model-parallel-size", "1")
        args.transformer_impl = "local"
        step = megatron_lm.make_forward_step(args)
        with pytest.raises(StopIteration):
            step(iter([]), plain)
        assert seen["use_thd"] is False and seen["logprob_impl"] == "fused"
    finally:
        parallel_state.destroy_model_parallel()
