"""LoRA out to Hugging Face: an adapter checkpoint trained at TP=2 on a converted Llama base,
exported merged (--merge-lora) and alone in PEFT's format (--peft). ``peft``'s
``PeftModel.from_pretrained`` on the HF base, the merged HF model and megatron-core with
the adapters on give the same logits (fp32, 1e-4 of the logits' scale).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from torchrun_launch import run_torchrun

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "data" / "tokenizer.model"
pytestmark = pytest.mark.distributed


def _tool():
    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_megatron", REPO / "tools" / "convert_hf_to_megatron.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _mc_logits(state, adapters, meta, shape, tokens):
    from megatron.core import parallel_state

    from adadpo_megatron.conversion.files import _build_tp1_model
    from adadpo_megatron.conversion.weights import load_into_model
    from adadpo_megatron.step.lora import LoRASettings, adapter_modules, add_lora

    model = _build_tp1_model(shape, state["embedding.word_embeddings.weight"].shape[0],
                             torch.float32)
    try:
        load_into_model(model, state)
        s = meta["settings"]
        add_lora([model], LoRASettings(rank=s["rank"], alpha=s["alpha"],
                                       target_modules=tuple(s["target_modules"])), seed=0)
        with torch.no_grad():
            for name, _, a in adapter_modules(model):
                a.lora_A.copy_(adapters[name][0])
                a.lora_B.copy_(adapters[name][1])
        model.eval()
        with torch.no_grad():
            return model(tokens, torch.arange(tokens.shape[1])[None], None)[
                ..., :shape.vocab_size]
    finally:
        parallel_state.destroy_model_parallel()


def test_merged_and_peft_exports_match_megatron(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    if not TOKENIZER.is_file():
        pytest.skip(f"{TOKENIZER} is missing")
    from test_train import _pairs

    from adadpo_megatron.conversion.lora import read_adapter_checkpoint
    from adadpo_megatron.conversion.weights import LlamaShape
    from adadpo_megatron.data.pack_tool import main as pack_main

    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    tool = _tool()
    assert tool.main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "base"),
                      "--dtype", "fp32"]) == 0
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _pairs(8)))
    assert pack_main([str(jsonl), "--output", str(tmp_path / "data"), "--tokenizer",
                      str(TOKENIZER), "--pack-size", "128"]) in (0, None)
    flags = json.loads((tmp_path / "base" / "iter_0000000" / "adadpo_meta.json").read_text())
    run_torchrun(2, "-m", "adadpo_megatron.train", *flags["trainer_flags"],
                 "--data-path", str(tmp_path / "data"), "--seq-length", "128",
                 "--max-position-embeddings", "256", "--tensor-model-parallel-size", "2",
                 "--global-batch-size", "2", "--train-iters", "3", "--lr", "5e-3",
                 "--load", str(tmp_path / "base"), "--finetune", "--save", str(tmp_path / "lora"),
                 "--lora-rank", "4", "--lora-alpha", "8", "--device", "cpu", timeout=600)
    common = ["--to-hf", "--megatron", str(tmp_path / "lora"), "--hf-config",
              str(tmp_path / "hf" / "config.json"), "--dtype", "fp32"]
    with pytest.raises(SystemExit, match="give --merge-lora or --peft"):
        tool.main([*common, "--output", str(tmp_path / "x")])
    assert tool.main([*common, "--output", str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert tool.main([*common, "--output", str(tmp_path / "peft"), "--peft"]) == 0

    shape = LlamaShape.from_hf_config(config)
    state, adapters, meta = read_adapter_checkpoint(str(tmp_path / "lora"), shape)
    assert all(b.abs().max() > 0 for _, b in adapters.values())  # the adapters trained
    tokens = torch.tensor([random.Random(1).randrange(1024) for _ in range(40)])[None]
    ours = _mc_logits(state, adapters, meta, shape, tokens)
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        base_logits = base(tokens).logits
        peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        peft_logits = peft_model(tokens).logits
        merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        merged_logits = merged(tokens).logits
    scale = ours.abs().max().item()
    # The adapters change the logits well beyond the tolerance, so the checks below bite.
    assert (base_logits - ours).abs().max().item() > 1e-2 * scale
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                            "gate_proj", "up_proj", "down_proj"])
    # fp32 round-off (fused vs separate projections, merged vs B A x): 1e-4 of the scale.
    for name, theirs in (("peft", peft_logits), ("merged", merged_logits)):
        err = (theirs - ours).abs().max().item()
        assert err <= 1e-4 * scale, (name, err, scale)
