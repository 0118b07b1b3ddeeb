"""Model families of the HF <-> megatron-core conversion: what ``config.json`` may say.

One table, :data:`FAMILIES`, keyed by HF ``model_type`` (``architectures`` is the
fallback). Each family is Llama plus at most one of: QKV bias (Qwen2/2.5,
megatron ``add_qkv_bias``), per-head q/k RMSNorm (Qwen3, ``qk_layernorm``), a
mixture-of-experts MLP in every layer (Mixtral, Qwen3-MoE; megatron ``MoELayer``, top-k
softmax router, SwiGLU experts, no shared expert).

Refused, in one line naming the ``config.json`` field: an unknown family; a sliding
window that binds (``sliding_window`` below ``max_position_embeddings``, or
``use_sliding_window: true``; megatron-core's attention here is full causal, so the
logits would differ: when you train on sequences no longer than the window, set
``sliding_window`` to null in config.json, which is then exact); a rope scaling other
than none (``rope_scaling`` / ``rope_parameters.rope_type``: llama3, yarn, ... are not
mapped); a biased o_proj/MLP (``attention_bias`` on Llama/Mistral, ``mlp_bias``); an
activation other than SiLU; MoE layouts megatron cannot express from these flags
(``decoder_sparse_step`` != 1, ``mlp_only_layers``, ``router_jitter_noise``).

HF checkpoint names of the MoE MLP (as stored on disk, what every hub checkpoint holds):

* Mixtral: ``block_sparse_moe.gate.weight`` ``[E, h]``; expert ``e``:
  ``block_sparse_moe.experts.e.w1`` (gate) / ``w3`` (up) ``[F, h]``, ``w2`` (down) ``[h, F]``.
* Qwen3-MoE: ``mlp.gate.weight``; ``mlp.experts.e.gate_proj`` / ``up_proj`` / ``down_proj``.

transformers >= 5 fuses the experts in memory (``mlp.experts.gate_up_proj`` ``[E, 2F, h]``
= ``[gate; up]`` per expert, ``mlp.experts.down_proj`` ``[E, h, F]``, ``mlp.gate.weight``)
and splits them again on save; :func:`to_disk_names` maps a model's ``state_dict()`` to
the disk names. Router: megatron's ``moe_router_pre_softmax=False`` (top-k of the
logits, softmax over the k) is Mixtral's routing and Qwen3-MoE's with
``norm_topk_prob: true``; ``norm_topk_prob: false`` (softmax over all experts, top-k
weights not renormalised) is ``--moe-router-pre-softmax``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model family the converter knows."""

    architecture: str
    """HF ``architectures[0]`` written back into config.json."""
    qkv_bias: bool = False
    """q/k/v projections carry a bias (megatron ``add_qkv_bias``)."""
    qk_layernorm: bool = False
    """Per-head RMSNorm of q and k before RoPE (megatron ``qk_layernorm``)."""
    moe: str | None = None
    """HF prefix of the MoE MLP inside a layer (``block_sparse_moe`` / ``mlp``); None: dense."""
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """HF names of an expert's gate, up and down projections."""


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM"),
    "mistral": Family("MistralForCausalLM"),
    "qwen2": Family("Qwen2ForCausalLM", qkv_bias=True),
    "qwen3": Family("Qwen3ForCausalLM", qk_layernorm=True),
    "mixtral": Family("MixtralForCausalLM", moe="block_sparse_moe",
                      expert_names=("w1", "w3", "w2")),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qk_layernorm=True, moe="mlp"),
}
_BY_ARCH = {f.architecture: name for name, f in FAMILIES.items()}


def family_name(get) -> str:
    """``model_type`` of a config (``architectures[0]`` when absent); ValueError if unknown."""
    model_type = get("model_type")
    if model_type is None:
        archs = get("architectures") or []
        model_type = _BY_ARCH.get(archs[0]) if archs else "llama"
        if model_type is None:
            raise ValueError(f"config.json architectures={archs}: not a supported family "
                             f"(supported architectures: {', '.join(sorted(_BY_ARCH))})")
    if model_type not in FAMILIES:
        raise ValueError(f"config.json model_type={model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    return model_type


def check_options(get, name: str) -> None:
    """Raise ValueError naming the config.json field of an option the conversion can't honour."""
    max_pos = get("max_position_embeddings", 4096)
    window = get("sliding_window")
    uses_window = get("use_sliding_window", name in ("mistral", "mixtral"))
    if uses_window and window is not None and window < max_pos:
        raise ValueError(
            f"config.json sliding_window={window} (< max_position_embeddings={max_pos}): "
            "sliding-window attention is not supported (megatron-core attention is full "
            "causal here); if you train on sequences of at most that many tokens the window "
            "never binds: set sliding_window to null in config.json")
    if "sliding_attention" in (get("layer_types") or []):
        raise ValueError("config.json layer_types has 'sliding_attention' layers: "
                         "sliding-window attention is not supported")
    if get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={get('hidden_act')!r}: only silu (SwiGLU)")
    if get("mlp_bias", False):
        raise ValueError("config.json mlp_bias=true is not supported (megatron bias flags "
                         "would add biases elsewhere too)")
    if get("attention_bias", False) and not FAMILIES[name].qkv_bias:
        raise ValueError(f"config.json attention_bias=true on {name}: biased q/k/v and o_proj "
                         "are not supported (Qwen2's q/k/v-only bias is)")
    if FAMILIES[name].moe is not None:
        for field, ok in (("decoder_sparse_step", get("decoder_sparse_step", 1) == 1),
                          ("mlp_only_layers", not get("mlp_only_layers")),
                          ("router_jitter_noise", not get("router_jitter_noise", 0.0)),
                          ("shared_expert_intermediate_size",
                           not get("shared_expert_intermediate_size"))):
            if not ok:
                raise ValueError(f"config.json {field}={get(field)!r} is not supported "
                                 "(every layer must be a plain top-k MoE layer)")


# Llama 3.1's RoPE scaling as megatron-core hard-codes it (RotaryEmbedding._apply_scaling).
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def rope_theta(get) -> float:
    """RoPE base from config.json (see :func:`rope_scaling_factor` for the scaling)."""
    rope = get("rope_parameters") or get("rope_scaling") or {}
    return float(get("rope_theta") or rope.get("rope_theta") or 10000.0)


def rope_scaling_factor(get) -> float | None:
    """Llama-3.1 RoPE scaling factor (megatron-core ``rope_scaling``), None without scaling;
    ValueError naming the field for any other scaling."""
    rope = get("rope_parameters") or get("rope_scaling") or {}
    field = "rope_parameters" if get("rope_parameters") else "rope_scaling"
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind != "llama3":
        raise ValueError(f"config.json {field} rope_type={kind!r}: rope scaling is not "
                         "supported (megatron-core RoPE): only 'default' and 'llama3'")
    for key, want in LLAMA3_ROPE.items():
        if float(rope.get(key, want)) != want:
            raise ValueError(f"config.json {field} {key}={rope.get(key)}: megatron-core's "
                             f"llama3 RoPE scaling fixes it at {want:g}")
    if "factor" not in rope:
        raise ValueError(f"config.json {field} rope_type='llama3' has no factor")
    return float(rope["factor"])


def moe_fields(get, name: str) -> dict[str, Any]:
    """The MoE fields of :class:`~adadpo_megatron.conversion.weights.LlamaShape` (empty: dense)."""
    if FAMILIES[name].moe is None:
        return {}
    experts = get("num_local_experts") or get("num_experts")
    return {
        "num_experts": int(experts), "moe_router_topk": int(get("num_experts_per_tok")),
        "moe_ffn_hidden_size": int(get("moe_intermediate_size") or get("intermediate_size")),
        "moe_router_pre_softmax": name == "qwen3_moe" and not get("norm_topk_prob", False),
        "moe_aux_loss_coeff": float(get("router_aux_loss_coef", 0.0) or 0.0),
    }


def hf_config(shape, dtype: torch.dtype) -> dict[str, Any]:
    """config.json contents for ``shape`` (a ``LlamaShape``) in its family's HF class."""
    fam = FAMILIES[shape.family]
    cfg: dict[str, Any] = {
        "architectures": [fam.architecture], "model_type": shape.family,
        "num_hidden_layers": shape.num_layers, "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups, "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size, "tie_word_embeddings": shape.tie_embeddings,
        "rms_norm_eps": shape.norm_epsilon, "rope_theta": shape.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta},
        "max_position_embeddings": shape.max_position_embeddings, "hidden_act": "silu",
        "attention_bias": fam.qkv_bias, "mlp_bias": False,
        "torch_dtype": str(dtype).split(".")[-1],
    }
    if shape.rope_scaling_factor is not None:
        cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": shape.rope_theta,
                                  "factor": shape.rope_scaling_factor, **LLAMA3_ROPE}
    if shape.family in ("mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe"):
        cfg.update(sliding_window=None, use_sliding_window=False)
    if shape.family == "mixtral":
        cfg.update(num_local_experts=shape.num_experts,
                   num_experts_per_tok=shape.moe_router_topk,
                   router_aux_loss_coef=shape.moe_aux_loss_coeff)
    elif shape.family == "qwen3_moe":
        cfg.update(num_experts=shape.num_experts, num_experts_per_tok=shape.moe_router_topk,
                   moe_intermediate_size=shape.moe_ffn_hidden_size,
                   norm_topk_prob=not shape.moe_router_pre_softmax, decoder_sparse_step=1,
                   mlp_only_layers=[], router_aux_loss_coef=shape.moe_aux_loss_coeff)
    return cfg


def to_disk_names(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A transformers >= 5 in-memory MoE state dict -> the per-expert names of the files.

    Dense families and state dicts already in disk names come back unchanged.
    """
    fam = FAMILIES[family]
    if fam.moe is None or not any(k.endswith("mlp.experts.gate_up_proj") for k in state):
        return state
    gate, up, down = fam.expert_names
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        layer, _, rest = key.rpartition("mlp.")
        if rest == "experts.gate_up_proj":
            for e, fused in enumerate(t):
                g, u = fused.chunk(2, 0)
                out[f"{layer}{fam.moe}.experts.{e}.{gate}.weight"] = g
                out[f"{layer}{fam.moe}.experts.{e}.{up}.weight"] = u
        elif rest == "experts.down_proj":
            for e, d in enumerate(t):
                out[f"{layer}{fam.moe}.experts.{e}.{down}.weight"] = d
        elif rest == "gate.weight":
            out[f"{layer}{fam.moe}.gate.weight"] = t
        else:
            out[key] = t
    return out
