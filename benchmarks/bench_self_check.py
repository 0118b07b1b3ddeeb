"""What the start-up self-check (step/self_check.py) costs, against one training step.

    python benchmarks/bench_self_check.py [--layers 24] [--seq 2048] [--repeats 5]

For each core attention path a CPU can run (mask, plain local attention, eager Flex) in fp32
and bf16, it builds one GPT (one process, the local spec), then times, side by side in this
process: ``check_paths`` (the probe: first and last layer's attention vs plain attention,
fused vs chunked log-probs, values and gradients) and one forward + backward of the same model
on a ``--seq``-token pack (the baseline). Prints one JSON line per case with both medians and
their ratio. CPU timings: bf16 matmuls are emulated and Flex runs eagerly here, so GPU ratios
will differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call costs (allocations, kernel selection) are not the probe's
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _train_step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    positions = torch.arange(tokens.shape[1])[None]
    model(tokens, positions, None).float().logsumexp(-1).mean().backward()


def main() -> None:
    """Command line; prints one JSON line per (attention path, dtype)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu, seed_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config
    from adadpo_megatron.step.self_check import check_paths

    initialize_model_parallel_cpu(tp=1, pp=1, seed=1)
    for impl in ("mask", None, "flex"):
        for bf16 in (False, True):
            seed_cpu(3)
            config = build_transformer_config(
                num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=8,
                num_query_groups=4, ffn_hidden_size=4 * a.hidden, normalization="RMSNorm",
                swiglu=True, add_bias_linear=False, untie_embeddings=True,
                position_embedding_type="rope", bf16=bf16)
            config.adadpo_gpt_options = dataclasses.replace(config.adadpo_gpt_options,
                                                            prefix_attention=impl)
            model = build_gpt_model(config, a.vocab, a.seq, use_te=False)
            model = model.bfloat16() if bf16 else model
            tokens = torch.randint(0, a.vocab, (1, a.seq))

            probe = _median_seconds(
                lambda m=model: check_paths([m], use_thd=False, logprob_impl="fused"),
                a.repeats)
            baseline = _median_seconds(lambda m=model, t=tokens: _train_step(m, t), a.repeats)
            print(json.dumps({"attention": impl or "plain", "dtype": "bf16" if bf16 else "fp32",
                              "layers": a.layers, "probe_s": round(probe, 4),
                              "train_step_s": round(baseline, 4),
                              "probe_over_step": round(probe / baseline, 3)}), flush=True)


if __name__ == "__main__":
    main()
