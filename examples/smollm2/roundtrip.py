"""Round trip check: a trained megatron-core checkpoint, converted back to Hugging Face, gives
the same logits in ``transformers`` as the megatron-core model itself.

    python examples/smollm2/roundtrip.py --megatron CKPT_DIR --hf HF_DIR --tokens 1,2,3,...

Prints one JSON object ``{"max_abs_diff", "max_abs_diff_fp64", "max_abs_logit", "tokens"}``:
both models run in fp32 (the dtype they were trained and saved in), then both again in fp64
from the same weights. fp32 through 30 layers in two op orders (megatron-core's fused QKV
and fc1 GEMMs against separate projections) differs by ~1e-4 on logits of ~40; in fp64 that
round-off is gone, so ``max_abs_diff_fp64`` measures the conversion itself. Runs in its own
process (it sets up a one-rank megatron-core parallel state on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def megatron_logits(ckpt: str, shape, tokens: torch.Tensor) -> dict[torch.dtype, torch.Tensor]:
    """Logits ``[1, T, vocab]`` of the latest checkpoint under ``ckpt`` (TP=1, CPU), computed
    in fp32 and in fp64 (the loaded fp32 weights cast up), keyed by dtype."""
    from megatron.core import dist_checkpointing, parallel_state

    from adadpo_megatron.conversion.files import _build_tp1_model
    from adadpo_megatron.trainer import checkpointing as ck

    latest = ck._iter_dir(ckpt, ck.latest_iteration(ckpt))
    padded = dist_checkpointing.load_tensors_metadata(latest)[
        "embedding.word_embeddings.weight"].global_shape[0]
    model = _build_tp1_model(shape, padded, torch.float32)
    try:
        ck.load_model_weights(ckpt, [model])
        out = {}
        for dtype in (torch.float32, torch.float64):
            with torch.no_grad():
                logits = model.to(dtype).eval()(tokens, torch.arange(tokens.shape[1])[None], None)
            out[dtype] = logits[..., : shape.vocab_size].to(dtype)
    finally:
        parallel_state.destroy_model_parallel()
    return out


def compare(ckpt: str, hf_dir: str, tokens: list[int]) -> dict[str, float]:
    """Max |megatron - transformers| over the logits of ``tokens``, and the logits' scale."""
    from transformers import AutoModelForCausalLM

    from adadpo_megatron.conversion.weights import LlamaShape

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        shape = LlamaShape.from_hf_config(json.load(f))
    ids = torch.tensor([tokens])
    ours = megatron_logits(ckpt, shape, ids)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    theirs = {}
    for dtype in (torch.float32, torch.float64):
        with torch.no_grad():
            theirs[dtype] = hf.to(dtype)(ids).logits.to(dtype)
    diff = {dtype: float((ours[dtype] - theirs[dtype]).abs().max()) for dtype in theirs}
    return {"max_abs_diff": diff[torch.float32], "max_abs_diff_fp64": diff[torch.float64],
            "max_abs_logit": float(theirs[torch.float32].abs().max()), "tokens": len(tokens)}


def main(argv: list[str] | None = None) -> int:
    """Command line: print the comparison as JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--megatron", required=True, help="dist-checkpoint directory (--save of a run)")
    p.add_argument("--hf", required=True, help="the same weights converted with --to-hf")
    p.add_argument("--tokens", required=True, help="comma-separated token ids")
    a = p.parse_args(argv)
    from adadpo_megatron.step.cpu import init_distributed_cpu

    init_distributed_cpu()
    try:
        result = compare(a.megatron, a.hf, [int(t) for t in a.tokens.split(",")])
    finally:
        torch.distributed.destroy_process_group()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
