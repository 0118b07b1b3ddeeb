"""Planner: tokens and FLOPs per pair, separate vs prefix-shared, against the real mask."""

import pytest
import torch

from adadpo_megatron.planner.cli import plan_from_argv
from adadpo_megatron.planner.estimate import PRESETS, gemm_params_per_layer
from adadpo_megatron.planner.pairs import pair_costs
from adadpo_megatron.step.attention import build_shared_layout


@pytest.mark.parametrize(("p", "c", "r"), [(1, 1, 1), (7, 3, 5), (20, 9, 2)])
def test_pair_costs_count_the_keys_the_attention_mask_allows(p, c, r):
    shape = PRESETS["llama3-8b"]
    costs = pair_costs(shape, p, c, r)
    weights = gemm_params_per_layer(shape, 1) * shape.num_layers + (
        shape.padded_vocab(1) * shape.hidden_size)
    per_key = 4 * shape.num_attention_heads * shape.head_dim * shape.num_layers
    for name, cu, spl in (
        ("separate", [0, p + c, 2 * p + c + r], None),
        ("shared", [0, p + c, p + c + r + 1], torch.tensor([0, p - 1])),
    ):
        mask = build_shared_layout(torch.tensor(cu, dtype=torch.int32), spl, "cpu",
                                   "mask").dense_mask
        keys = int((~mask).sum())
        assert costs[name]["tokens"] == cu[-1]
        assert costs[name]["forward_flops"] == 2 * weights * cu[-1] + per_key * keys
    assert costs["token_ratio"] == (2 * p + c + r) / (p + c + r + 1)


def test_planner_reports_pairs_per_step():
    argv = ["--model", "llama3-8b", "--num-gpus", "8", "--tensor-model-parallel-size", "8",
            "--seq-length", "8192", "--train-iters", "1", "--global-batch-size", "64",
            "--pair-lengths", "700", "260", "260"]
    sep = plan_from_argv(argv)
    shared = plan_from_argv([*argv, "--prefix-sharing"])
    assert sep["per_pair"]["layout"] == "separate" and shared["per_pair"]["layout"] == "shared"
    assert shared["pairs_per_step"] / sep["pairs_per_step"] == pytest.approx(1920 / 1221)
    with pytest.raises(ValueError, match="--pair-lengths"):
        pair_costs(PRESETS["llama3-8b"], 0, 1, 1)
