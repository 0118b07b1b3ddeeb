"""File formats of the HF <-> megatron-core conversion (``tools/convert_hf_to_megatron.py``).

Readers and writers around the tensor bookkeeping of :mod:`adadpo_megatron.conversion.weights`:

* Hugging Face: a directory with ``config.json`` and ``*.safetensors`` (or ``*.bin``),
  read tensor by tensor; or a GGUF file, de-quantized to fp32 by ``transformers``
  (needs ``transformers``, ``gguf`` and ``accelerate``). Written as ``config.json`` +
  ``model.safetensors``.
* ``torch``: Megatron-LM's per-rank format at the chosen TP/PP/VPP (and EP for MoE):
  ``OUT/release/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` holding ``model`` (or ``model0``,
  ``model1``, ... per virtual chunk), ``checkpoint_version`` 3.0, ``iteration`` 0 and an
  ``args`` namespace; ``OUT/latest_checkpointed_iteration.txt`` says ``release``.
  Megatron-LM loads it with ``--ckpt-format torch --finetune``.
* ``torch_dist``: a megatron-core dist-checkpoint in adadpo-megatron's layout
  (``OUT/iter_0000000`` + ``adadpo_meta.json`` + tracker), which ``adadpo-train --load OUT
  --finetune`` reads at any TP/PP (dist-checkpointing reshards). Written from a TP=1
  model built on the CPU, so the host needs the model's size in memory.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

import torch

from adadpo_megatron.conversion.families import hf_config, to_disk_names
from adadpo_megatron.conversion.weights import (
    LlamaShape,
    Shards,
    StateDict,
    load_into_model,
)

TRACKER = "latest_checkpointed_iteration.txt"


def read_hf(path: str, *, gguf_file: str | None = None) -> tuple[StateDict, LlamaShape]:
    """Read an HF checkpoint of any family (conversion/families.py): (state dict with HF
    disk names, shape). ValueError naming the config.json field of an unsupported option."""
    if gguf_file is not None or path.endswith(".gguf"):
        return _read_gguf(path, gguf_file)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        shape = LlamaShape.from_hf_config(json.load(f))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    state: StateDict = {}
    if files:
        from safetensors import safe_open

        for name in files:
            with safe_open(name, framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
    else:
        for name in sorted(glob.glob(os.path.join(path, "*.bin"))):
            state.update(torch.load(name, map_location="cpu", weights_only=True))
    if not state:
        raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weights next to config.json")
    return state, shape


def _read_gguf(path: str, gguf_file: str | None) -> tuple[StateDict, LlamaShape]:
    model = load_gguf_model(path, gguf_file)
    shape = LlamaShape.from_hf_config(model.config)
    return to_disk_names(dict(model.state_dict()), shape.family), shape


def load_gguf_model(path: str, gguf_file: str | None = None) -> torch.nn.Module:
    """A transformers ``LlamaForCausalLM`` from a GGUF file, de-quantized to fp32.

    ``path`` is the .gguf file, or its directory when ``gguf_file`` names the file.
    """
    try:
        from transformers import AutoModelForCausalLM
    except Exception as exc:  # noqa: BLE001 - any broken install: say what to install
        raise RuntimeError("reading GGUF needs `pip install transformers gguf accelerate` "
                           f"({type(exc).__name__}: {exc})") from exc
    directory, name = (path, gguf_file) if gguf_file else os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)


def write_hf(state: StateDict, shape: LlamaShape, out: str, *, dtype: torch.dtype) -> None:
    """Write ``config.json`` (the family's HF class) and ``model.safetensors`` into ``out``."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    config = hf_config(shape, dtype)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def _rank_dir(root: str, tp_rank: int, pp_rank: int, pp: int, ep_rank: int | None = None) -> str:
    # Megatron-LM's get_checkpoint_name: mp_rank_TT[_PPP][_EEE] (EEE only at EP > 1).
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    name += f"_{ep_rank:03d}" if ep_rank is not None else ""
    return os.path.join(root, "release", name)


def _megatron_args(shape: LlamaShape, tp: int, pp: int, vpp: int, padded_vocab: int,
                   ep: int = 1):
    moe = {}
    if shape.num_experts:
        moe = dict(num_experts=shape.num_experts, moe_router_topk=shape.moe_router_topk,
                   moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
                   moe_router_pre_softmax=shape.moe_router_pre_softmax,
                   expert_model_parallel_size=ep, expert_tensor_parallel_size=tp)
    return argparse.Namespace(
        **moe, add_qkv_bias=shape.qkv_bias, qk_layernorm=shape.qk_layernorm,
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
        group_query_attention=True, num_query_groups=shape.num_query_groups,
        kv_channels=shape.head_dim, swiglu=True, normalization="RMSNorm",
        norm_epsilon=shape.norm_epsilon, position_embedding_type="rope",
        rotary_base=int(shape.rope_theta), add_bias_linear=False,
        untie_embeddings_and_output_weights=not shape.tie_embeddings,
        padded_vocab_size=padded_vocab, max_position_embeddings=shape.max_position_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )


def write_megatron_torch(shards: Shards, shape: LlamaShape, out: str,
                         *, dtype: torch.dtype) -> None:
    """Megatron-LM's per-rank ``torch`` format (module doc) at the shards' TP/PP/VPP."""
    tp = 1 + max(k[0] for k in shards)
    pp = 1 + max(k[1] for k in shards)
    ep = 1 + max(k[2] if len(k) == 3 else 0 for k in shards)
    first = next(iter(shards.values()))
    vpp = len(first)
    padded = first[0]["embedding.word_embeddings.weight"].shape[0] * tp
    args = _megatron_args(shape, tp, pp, vpp, padded, ep)
    for key, chunks in shards.items():
        t, p = key[:2]
        chunks = [{k: v.to(dtype).contiguous() for k, v in c.items()} for c in chunks]
        models = {"model": chunks[0]} if vpp == 1 else {f"model{i}": c for i, c in enumerate(chunks)}
        directory = _rank_dir(out, t, p, pp, key[2] if len(key) == 3 else None)
        os.makedirs(directory, exist_ok=True)
        torch.save({**models, "checkpoint_version": 3.0, "iteration": 0, "args": args},
                   os.path.join(directory, "model_optim_rng.pt"))
    with open(os.path.join(out, TRACKER), "w", encoding="utf-8") as f:
        f.write("release\n")


def _torch_iteration_dir(root: str) -> str:
    """``root/release`` or ``root/iter_NNNNNNN`` as the tracker says (Megatron-LM's layout)."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return os.path.join(root, "release")
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text == "release":
        return os.path.join(root, "release")
    if not text.isdigit():
        raise ValueError(f"{tracker}: holds {text[:40]!r}, not 'release' or an iteration")
    return os.path.join(root, f"iter_{int(text):07d}")


def read_megatron_torch(root: str) -> Shards:
    """Read every rank of a ``torch``-format checkpoint (ours, or Megatron-LM's ``--ckpt-format
    torch``: the tracker's ``release`` or ``iter_*`` directory).

    Each ``model_optim_rng.pt`` is loaded without unpickling arbitrary objects
    (:mod:`adadpo_megatron.conversion.safe_load`): a file naming any other type is refused.
    """
    from adadpo_megatron.conversion.safe_load import load_megatron_torch

    directory = _torch_iteration_dir(root)
    files = sorted(glob.glob(os.path.join(directory, "mp_rank_*", "model_optim_rng.pt")))
    if not files:
        raise FileNotFoundError(f"{root}: no {os.path.basename(directory)}/mp_rank_*/"
                                "model_optim_rng.pt")
    shards: Shards = {}
    for name in files:
        parts = os.path.basename(os.path.dirname(name)).split("_")[2:]
        ckpt = load_megatron_torch(name)
        args = ckpt.get("args")
        pp = getattr(args, "pipeline_model_parallel_size", None)
        if pp is None:  # no args: a second number is the pipeline rank (no EP)
            pp = 2 if len(parts) > 1 else 1
        key = tuple(int(x) for x in parts)  # mp_rank_TT[_PPP][_EEE]
        if pp == 1:
            key = (key[0], 0, *key[1:])
        t, p = key[:2]
        keys = ["model"] if "model" in ckpt else sorted(
            (k for k in ckpt if k.startswith("model") and k[5:].isdigit()), key=lambda k: int(k[5:]))
        # TE layers' ``_extra_state`` (FP8 scaling metadata, a BytesIO) holds no weights.
        shards[(t, p, *key[2:])] = [
            {n: v for n, v in ckpt[k].items() if not n.endswith("._extra_state")} for k in keys]
    return shards


def _build_tp1_model(shape: LlamaShape, padded_vocab: int, dtype: torch.dtype):
    from adadpo_megatron.step.cpu import initialize_model_parallel_cpu
    from adadpo_megatron.step.model import build_gpt_model, build_transformer_config

    initialize_model_parallel_cpu(tp=1, pp=1)
    config = build_transformer_config(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size, num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups, kv_channels=shape.head_dim,
        normalization="RMSNorm", norm_epsilon=shape.norm_epsilon, swiglu=True,
        add_bias_linear=False, position_embedding_type="rope", rotary_base=int(shape.rope_theta),
        untie_embeddings=not shape.tie_embeddings, bf16=dtype == torch.bfloat16,
        **shape.transformer_kwargs(),
    )
    if shape.rope_scaling_factor is not None:
        import dataclasses

        config.adadpo_gpt_options = dataclasses.replace(
            config.adadpo_gpt_options, rope_scaling=True,
            rope_scaling_factor=shape.rope_scaling_factor)
    return build_gpt_model(config, padded_vocab, shape.max_position_embeddings, use_te=False)


def write_megatron_dist(full: StateDict, shape: LlamaShape, out: str,
                        *, dtype: torch.dtype) -> str:
    """A dist-checkpoint ``adadpo-train --load OUT --finetune`` reads; returns its directory."""
    from megatron.core import dist_checkpointing, parallel_state

    from adadpo_megatron.trainer.checkpointing import FORMAT_VERSION, META
    from adadpo_megatron.trainer.manifest import write_manifest

    padded = full["embedding.word_embeddings.weight"].shape[0]
    model = _build_tp1_model(shape, padded, dtype)
    try:
        load_into_model(model, {k: v.to(dtype) for k, v in full.items()})
        ckpt = os.path.join(out, "iter_0000000")
        os.makedirs(ckpt, exist_ok=True)
        dist_checkpointing.save({"model0": model.sharded_state_dict()}, ckpt)
        write_manifest(ckpt)
    finally:
        parallel_state.destroy_model_parallel()
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "iteration": 0, "fingerprint": None,
        "data_fingerprint": None, "layout": {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "world": 1},
        "has_reference": False, "config": {}, "source": "tools/convert_hf_to_megatron.py",
        "trainer_flags": shape.trainer_flags(),
    }
    with open(os.path.join(ckpt, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(out, TRACKER), "w", encoding="utf-8") as f:
        f.write("0\n")
    return ckpt


def read_megatron_dist(root: str, shape: LlamaShape) -> StateDict:
    """The model weights of the latest dist-checkpoint under ``root`` as one TP=1 state dict.

    The padded vocabulary is read from the checkpoint (a run at TP=8 pads to 1024s).
    """
    from megatron.core import dist_checkpointing, parallel_state

    from adadpo_megatron.conversion.safe_load import UnsafeCheckpointError, check_dist_checkpoint
    from adadpo_megatron.trainer import checkpointing as ckpt

    latest = ckpt._iter_dir(root, ckpt.latest_iteration(root))
    try:  # load_tensors_metadata unpickles .metadata: check it first
        check_dist_checkpoint(latest)
    except UnsafeCheckpointError as e:
        raise ckpt.CheckpointError(str(e)) from None
    metadata = dist_checkpointing.load_tensors_metadata(latest)
    padded_vocab = metadata["embedding.word_embeddings.weight"].global_shape[0]
    model = _build_tp1_model(shape, padded_vocab, torch.float32)
    try:
        ckpt.load_model_weights(root, [model])
    finally:
        parallel_state.destroy_model_parallel()
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
