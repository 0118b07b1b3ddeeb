"""LoRA adapter checkpoints -> Hugging Face: merged into the base, or alone in PEFT's format.

An adapter checkpoint (``trainer/lora_ckpt.py``) names its base (``lora_run.base_record``);
:func:`read_adapter_checkpoint` loads both at TP=1 (the base fingerprint-checked, the
adapters resharded from whatever layout trained them) and returns the base's megatron
state dict and each adapted linear's full ``(A [r, in], B [out, r])``.

**Merged** (``--merge-lora``): ``W += (alpha / r) B A`` on the megatron names, then the
usual ``megatron_to_hf``.

**PEFT** (``--peft``): ``adapter_config.json`` + ``adapter_model.safetensors`` with HF
module names (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``).
The fused megatron linears map exactly onto PEFT's separate modules, because the fused
weight is a row-stack of the separate ones and LoRA's update is ``B A``:

* ``linear_qkv``: ``delta W_qkv = B A`` with ``B``'s rows in the fused layout (per query
  group: its query heads, key head, value head); so ``q_proj``/``k_proj``/``v_proj`` each
  get ``lora_A = A`` (identical copies) and ``lora_B`` = their rows of ``B``, de-interleaved
  exactly as the weight is (``weights.megatron_to_hf`` applied to ``B`` as if it were a
  weight with ``r`` input columns);
* ``linear_fc1`` = ``[gate; up]``: ``gate_proj``/``up_proj`` share ``A``, ``B`` splits in halves;
* ``linear_proj`` -> ``o_proj``, ``linear_fc2`` -> ``down_proj``: one to one.

PEFT's scaling is ``lora_alpha / r`` (``use_rslora: false``), the same as ours.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from adadpo_megatron.conversion.weights import LlamaShape, StateDict, megatron_to_hf

__all__ = ["merge_adapters", "merged_hf", "peft_adapter", "read_adapter_checkpoint", "write_peft"]

_HF = {"linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
       "linear_proj": ("self_attn", ("o_proj",)),
       "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
       "linear_fc2": ("mlp", ("down_proj",))}
_MC = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
       "linear_fc1": "mlp", "linear_fc2": "mlp"}


def read_adapter_checkpoint(root: str, shape: LlamaShape
                            ) -> tuple[StateDict, dict[str, tuple[torch.Tensor, torch.Tensor]],
                                       dict[str, Any]]:
    """(base state dict, {megatron module name: (A, B)}, the checkpoint's ``lora`` record).

    One process, TP=1, fp32. Raises CheckpointError when the base is gone or changed.
    """
    from megatron.core import dist_checkpointing, parallel_state

    from adadpo_megatron.conversion.files import _build_tp1_model
    from adadpo_megatron.step.lora import (
        LoRASettings,
        adapter_modules,
        adapters_detached,
        add_lora,
    )
    from adadpo_megatron.trainer import checkpointing as ckpt
    from adadpo_megatron.trainer.lora_ckpt import adapter_sharded_state, load_adapters
    from adadpo_megatron.trainer.lora_run import base_of_adapter_checkpoint, read_adapter_meta

    meta = read_adapter_meta(root)
    if meta is None:
        raise ckpt.CheckpointError(f"{root} is not a LoRA adapter checkpoint")
    base = base_of_adapter_checkpoint(root, None)
    if base is None:
        raise ckpt.CheckpointError(f"{root}: its base is a seeded initialisation, not a "
                                   "checkpoint: nothing to export it onto")
    latest = ckpt._iter_dir(root, ckpt.latest_iteration(root))
    ckpt._read_meta(latest)
    ckpt._verify(latest)
    base_latest = ckpt._iter_dir(base, ckpt.latest_iteration(base))
    metadata = dist_checkpointing.load_tensors_metadata(base_latest)
    padded_vocab = metadata["embedding.word_embeddings.weight"].global_shape[0]
    s = meta["settings"]
    settings = LoRASettings(rank=s["rank"], alpha=s["alpha"], dropout=s["dropout"],
                            target_modules=tuple(s["target_modules"]))
    model = _build_tp1_model(shape, padded_vocab, torch.float32)
    try:
        ckpt.load_model_weights(base, [model])
        add_lora([model], settings, seed=0)
        load_adapters([model], ckpt._load(adapter_sharded_state([model]), latest))
        adapters = {name: (a.lora_A.detach().clone(), a.lora_B.detach().clone())
                    for name, _, a in adapter_modules(model)}
        with adapters_detached([model]):
            state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    finally:
        parallel_state.destroy_model_parallel()
    return state, adapters, meta


def merge_adapters(state: StateDict, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   scaling: float) -> StateDict:
    """A copy of ``state`` with ``W += scaling * B @ A`` for every adapted linear (fp32 math)."""
    out = dict(state)
    for name, (a, b) in adapters.items():
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def _split_b(kind: str, b: torch.Tensor, shape: LlamaShape) -> list[torch.Tensor]:
    """Rows of the fused B for each HF module (the weight's own de-interleaving)."""
    if kind == "linear_qkv":
        d, g = shape.head_dim, shape.num_query_groups
        per_group = shape.num_attention_heads // g
        q, k, v = b.reshape(g, (per_group + 2) * d, b.shape[-1]).split([per_group * d, d, d], 1)
        return [q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)]
    if kind == "linear_fc1":
        return list(b.chunk(2, dim=0))
    return [b]


def peft_adapter(adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], shape: LlamaShape,
                 meta: dict[str, Any], base_model: str | None = None
                 ) -> tuple[StateDict, dict[str, Any]]:
    """(PEFT ``adapter_model`` state dict, ``adapter_config``) for a Llama-family model."""
    tensors: StateDict = {}
    targets: set[str] = set()
    for name, (a, b) in adapters.items():
        parts = name.split(".")  # decoder.layers.<i>.<block>.<linear>
        i, kind = int(parts[2]), parts[-1]
        block, modules = _HF[kind]
        for module, rows in zip(modules, _split_b(kind, b, shape), strict=True):
            prefix = f"base_model.model.model.layers.{i}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a.clone()  # a copy each: PEFT has no sharing
            tensors[f"{prefix}.lora_B.weight"] = rows.contiguous()
            targets.add(module)
    s = meta["settings"]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": s["rank"], "lora_alpha": s["alpha"],
        "lora_dropout": s["dropout"], "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model,
        "adadpo_megatron": {"base": meta["base"]},
    }
    return tensors, config


def write_peft(out: str, tensors: StateDict, config: dict[str, Any],
               dtype: torch.dtype) -> None:
    """``OUT/adapter_config.json`` + ``OUT/adapter_model.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()},
              os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)


def merged_hf(state: StateDict, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
              shape: LlamaShape, scaling: float) -> StateDict:
    """The HF state dict of the base with the adapters merged in."""
    return megatron_to_hf(merge_adapters(state, adapters, scaling), shape)
