"""torchrun worker (2 ranks) for tests/distributed/test_moe_train.py: the trainer with MoE
and converted checkpoints of every family, in one launch.

1. ``moe``: adadpo-train on a Qwen3-MoE-shaped model at EP=2 (DP=2) for 4 steps, saving
   at step 2; a resumed run from step 2 (same layout). Records loss and ``moe/aux_loss``.
   Then the step-2 weights through precompute_ref_logprobs.py at EP=1 and at EP=2.
2. ``families``: for each family, a tiny random transformers model (vocabulary of the
   packed data's tokenizer) is saved, converted with tools/convert_hf_to_megatron.py to
   torch_dist, and tools/precompute_ref_logprobs.py computes the per-sequence log-prob sums
   of the packed set from it (dense: TP=2; MoE: EP=2) with the printed trainer flags.
   Rank 0 computes the same sums with transformers, each sequence alone.

Rank 0 writes WORK/results.json. By hand:
``torchrun --nproc-per-node 2 tests/distributed/moe_train_worker.py DATA_DIR WORK_DIR``
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, os.path.join(REPO, "tests", "unit"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from adadpo_megatron.train import build_run, init_distributed  # noqa: E402
from adadpo_megatron.trainer.arguments import parse_config  # noqa: E402
from adadpo_megatron.trainer.loop import train  # noqa: E402

MOE_FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "48",
             "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
             "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--qk-layernorm",
             "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
             "--moe-aux-loss-coeff", "0.1"]


def _base(data: str) -> list[str]:
    return ["--data-path", data, "--seq-length", "128", "--global-batch-size", "4",
            "--micro-batch-size", "1", "--lr", "1e-3", "--lr-warmup-fraction", "0",
            "--seed", "1234", "--preference-loss", "adadpo", "--dpo-beta", "0.5"]


def _train(argv: list[str]) -> tuple[dict, int]:
    cfg = parse_config(argv)
    init_distributed(cfg)
    run = build_run(cfg)
    record: dict[int, dict] = {}
    run.on_step = lambda step, metrics: record.__setitem__(step, dict(metrics))
    start = run.iteration
    try:
        train(run)
    finally:
        run.writer.close()
    keep = ("loss", "moe/aux_loss", "moe/load_imbalance")
    return {str(k): {n: v[n] for n in keep if n in v} for k, v in sorted(record.items())}, start


def case_moe(data: str, work: str, out: dict) -> None:
    ep2 = _base(data) + MOE_FLAGS + ["--expert-model-parallel-size", "2", "--train-iters", "4"]
    full = os.path.join(work, "moe_full")
    out["moe_full"], _ = _train(ep2 + ["--save", full, "--save-interval", "2"])
    half = os.path.join(work, "moe_half")
    if dist.get_rank() == 0:
        os.makedirs(half)
        shutil.copytree(os.path.join(full, "iter_0000002"), os.path.join(half, "iter_0000002"))
        with open(os.path.join(half, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("2\n")
    dist.barrier()
    out["moe_resumed"], out["moe_resumed_start"] = _train(ep2 + ["--load", half])
    # The EP=2 checkpoint's weights at EP=1 and EP=2: the same reference log-prob sums
    # (dist-checkpointing regroups the experts). Optimizer state is not resharded across
    # EP sizes (megatron-core chains an expert optimizer only at EP > 1): resume keeps EP.
    import numpy as np

    pre = _tool("precompute_ref_logprobs")
    sums = {}
    for ep in ("1", "2"):
        cfg = parse_config(_base(data) + MOE_FLAGS + ["--train-iters", "1",
                                                      "--expert-model-parallel-size", ep])
        init_distributed(cfg)
        sidecar = os.path.join(work, f"moe_ref_ep{ep}.npz")
        pre.precompute(cfg, half, sidecar)
        with np.load(sidecar) as z:
            sums[ep] = z["seq_logps"].astype(np.float64)
    out["moe_ep1_vs_ep2_sums"] = float(np.abs(sums["1"] - sums["2"]).max())
    out["moe_sums_scale"] = float(np.abs(sums["2"]).max())


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _transformers_sums(model, data: str) -> list[float]:
    """Per-sequence completion log-prob sums in side-car order, each sequence alone."""
    from adadpo_megatron.data.packed_dataset import PackedPairDataset

    ds = PackedPairDataset(data)
    sums = [0.0] * (2 * ds.num_pairs)
    for i in range(len(ds)):
        pack = ds[i]
        cu = pack["cu_seqlens"].tolist()
        for s in range(len(cu) - 1):
            tokens = pack["tokens"][cu[s]:cu[s + 1]]
            labels = pack["labels"][cu[s]:cu[s + 1]]
            mask = pack["loss_mask"][cu[s]:cu[s + 1]].double()
            with torch.no_grad():
                logits = model(tokens[None]).logits[0].double()
            logp = torch.log_softmax(logits, -1).gather(-1, labels[:, None].long())[:, 0]
            seq = 2 * int(pack["pair_index"][s]) + (0 if bool(pack["is_chosen"][s]) else 1)
            sums[seq] = float((logp * mask).sum())
    return sums


def case_families(data: str, work: str, out: dict) -> None:
    import numpy as np
    from test_hf_families import FAMILIES, random_model, tiny_config

    from adadpo_megatron.conversion.weights import LlamaShape

    converter, pre = _tool("convert_hf_to_megatron"), _tool("precompute_ref_logprobs")
    for family in FAMILIES:
        hf_dir, mc_dir = os.path.join(work, f"hf_{family}"), os.path.join(work, f"mc_{family}")
        config = tiny_config(family, vocab_size=1024, max_position_embeddings=128)
        model = random_model(config)
        if dist.get_rank() == 0:
            model.save_pretrained(hf_dir)
        dist.barrier()
        assert converter.main(["--hf", hf_dir, "--output", mc_dir, "--dtype", "fp32"]) == 0
        shape = LlamaShape.from_hf_config(config)
        layout = (["--expert-model-parallel-size", "2"] if shape.num_experts
                  else ["--tensor-model-parallel-size", "2"])
        cfg = parse_config(_base(data) + shape.trainer_flags() + layout + ["--train-iters", "1"])
        init_distributed(cfg)
        sidecar = os.path.join(work, f"ref_{family}.npz")
        pre.precompute(cfg, mc_dir, sidecar)
        if dist.get_rank() == 0:
            with np.load(sidecar) as z:
                ours = z["seq_logps"].astype(np.float64)
            theirs = np.array(_transformers_sums(model, data))
            out[f"sums_{family}"] = dict(
                max_abs_diff=float(np.abs(ours - theirs).max()),
                scale=float(np.abs(theirs).max()), n=int(ours.size))
        dist.barrier()


def main() -> int:
    data, work = sys.argv[1], sys.argv[2]
    out: dict = {}
    case_moe(data, work, out)
    case_families(data, work, out)
    if dist.get_rank() == 0:
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump(out, f, indent=1)
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
