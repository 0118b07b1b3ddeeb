"""Llama-family weights between Hugging Face and megatron-core, at any TP/PP/VPP (and EP).

Families (``conversion/families.py``): Llama, Mistral, Qwen2/2.5 (``linear_qkv.bias``, laid
out like the weight's rows), Qwen3 (``self_attention.q_layernorm`` / ``k_layernorm``
``[d]`` = HF ``q_norm`` / ``k_norm``), Mixtral and Qwen3-MoE (``mlp.router.weight`` ``[E, h]``
= HF gate; ``mlp.experts.local_experts.e.linear_fc1`` ``[gate_e; up_e]`` and ``linear_fc2``;
at EP > 1 rank ``r`` holds experts ``[r*E/EP, (r+1)*E/EP)`` numbered from 0, split over
TP like the dense MLP).

Pure tensor bookkeeping on CPU (no process group); ``tools/convert_hf_to_megatron.py``
adds the file formats. Names are megatron-core's local-spec ``GPTModel`` names (its
dist-checkpoints map them onto the Transformer Engine names, so either spec loads them).

Layouts that differ from Hugging Face's separate projections:

* ``linear_qkv.weight`` ``[g * (a/g + 2) * d, h]``: for each query group (KV head) in
  turn, the ``a/g`` query heads of that group, then its key head, then its value head.
  Worked example, a=4 heads, g=2 groups, d=1: rows ``[q0, q1, k0, v0, q2, q3, k1, v1]``.
  TP splits it by whole groups (rank r: groups ``[r*g/TP, (r+1)*g/TP)``).
* ``linear_fc1.weight`` ``[2F, h]`` = ``[gate; up]`` (SwiGLU); under TP each rank holds
  ``[gate_r; up_r]`` (its slice of each), not a slice of the concatenation.
* Column-parallel (``linear_qkv``, ``linear_fc1``, embedding, output layer) split dim 0;
  row-parallel (``linear_proj``, ``linear_fc2``) split dim 1; norms are replicated.
* The vocabulary is padded with zero rows to a multiple of ``divisible_by * TP``
  (Megatron-LM's ``--make-vocab-size-divisible-by``) and unpadded on the way back.
* Pipeline: model chunk ``c`` of pipeline rank ``p`` holds global layers
  ``[(c*PP + p) * n, (c*PP + p + 1) * n)``, ``n = L / (PP * VPP)``, numbered from 0 within
  the chunk; the embedding sits on (p=0, c=0), the final norm and output layer on
  (p=PP-1, c=VPP-1). With tied embeddings and PP > 1 the last stage holds a copy of the
  embedding as ``output_layer.weight`` (megatron-core keeps the two in sync).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import torch

from adadpo_megatron.conversion.families import (
    FAMILIES,
    check_options,
    family_name,
    moe_fields,
    rope_scaling_factor,
    rope_theta,
)

Tensor = torch.Tensor
StateDict = dict[str, Tensor]
# (tp_rank, pp_rank) -- or (tp_rank, pp_rank, ep_rank) for MoE at EP > 1 -- -> one state
# dict per model chunk of that rank
Shards = dict[tuple[int, ...], list[StateDict]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaShape:
    """The Llama-architecture hyper-parameters the conversion needs."""

    num_layers: int
    """HF num_hidden_layers / --num-layers."""
    hidden_size: int
    """HF hidden_size / --hidden-size."""
    ffn_hidden_size: int
    """HF intermediate_size / --ffn-hidden-size."""
    num_attention_heads: int
    """HF num_attention_heads / --num-attention-heads."""
    num_query_groups: int
    """HF num_key_value_heads / --num-query-groups."""
    head_dim: int
    """HF head_dim (hidden / heads for Llama)."""
    vocab_size: int
    """Tokenizer vocabulary (unpadded)."""
    tie_embeddings: bool
    """HF tie_word_embeddings (not --untie-embeddings-and-output-weights)."""
    norm_epsilon: float = 1e-5
    """HF rms_norm_eps / --norm-epsilon."""
    rope_theta: float = 10000.0
    """HF rope_theta / --rotary-base."""
    max_position_embeddings: int = 4096
    """HF max_position_embeddings."""
    family: str = "llama"
    """HF model_type (conversion/families.py FAMILIES): llama, mistral, qwen2, qwen3,
    mixtral, qwen3_moe."""
    num_experts: int | None = None
    """MoE families: HF num_local_experts / num_experts (--num-experts); None: dense."""
    moe_router_topk: int = 2
    """HF num_experts_per_tok / --moe-router-topk."""
    moe_ffn_hidden_size: int | None = None
    """Expert MLP width: HF moe_intermediate_size (Mixtral: intermediate_size)."""
    moe_router_pre_softmax: bool = False
    """Qwen3-MoE norm_topk_prob false / --moe-router-pre-softmax."""
    moe_aux_loss_coeff: float = 0.0
    """HF router_aux_loss_coef / --moe-aux-loss-coeff (printed in the trainer flags)."""
    rope_scaling_factor: float | None = None
    """Llama-3.1 RoPE scaling (HF rope_type llama3) / --use-rope-scaling --rope-scaling-factor."""

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections carry a bias (Qwen2; --add-qkv-bias)."""
        return FAMILIES[self.family].qkv_bias

    @property
    def qk_layernorm(self) -> bool:
        """Per-head q/k RMSNorm (Qwen3; --qk-layernorm)."""
        return FAMILIES[self.family].qk_layernorm

    @classmethod
    def from_hf_config(cls, cfg: Any) -> LlamaShape:
        """From a transformers config or the dict of a ``config.json`` (any family of
        ``conversion/families.py``); ValueError naming the field of an unsupported option."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        family = family_name(get)
        check_options(get, family)
        heads = get("num_attention_heads")
        return cls(
            num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
            ffn_hidden_size=get("intermediate_size"), num_attention_heads=heads,
            num_query_groups=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            vocab_size=get("vocab_size"), tie_embeddings=bool(get("tie_word_embeddings", False)),
            norm_epsilon=get("rms_norm_eps", 1e-5), rope_theta=rope_theta(get),
            max_position_embeddings=get("max_position_embeddings", 4096), family=family,
            rope_scaling_factor=rope_scaling_factor(get),
            **moe_fields(get, family),
        )

    def trainer_flags(self) -> list[str]:
        """The adadpo-train / Megatron-LM model flags that build this architecture."""
        flags = [
            "--num-layers", str(self.num_layers), "--hidden-size", str(self.hidden_size),
            "--ffn-hidden-size", str(self.ffn_hidden_size),
            "--num-attention-heads", str(self.num_attention_heads),
            "--group-query-attention", "--num-query-groups", str(self.num_query_groups),
            "--normalization", "RMSNorm", "--norm-epsilon", str(self.norm_epsilon), "--swiglu",
            "--position-embedding-type", "rope", "--rotary-base", str(int(self.rope_theta)),
            "--disable-bias-linear",
        ]
        if self.head_dim * self.num_attention_heads != self.hidden_size:  # Qwen3's head_dim
            flags += ["--kv-channels", str(self.head_dim)]
        if self.rope_scaling_factor is not None:
            flags += ["--use-rope-scaling", "--rope-scaling-factor", str(self.rope_scaling_factor)]
        flags += ["--add-qkv-bias"] if self.qkv_bias else []
        flags += ["--qk-layernorm"] if self.qk_layernorm else []
        if self.num_experts:
            flags += ["--num-experts", str(self.num_experts),
                      "--moe-router-topk", str(self.moe_router_topk),
                      "--moe-ffn-hidden-size", str(self.moe_ffn_hidden_size),
                      "--moe-aux-loss-coeff", str(self.moe_aux_loss_coeff)]
            flags += ["--moe-router-pre-softmax"] if self.moe_router_pre_softmax else []
        return flags + ([] if self.tie_embeddings else ["--untie-embeddings-and-output-weights"])

    def transformer_kwargs(self) -> dict[str, Any]:
        """The family's ``TransformerConfig`` fields (``build_transformer_config`` overrides)."""
        kw: dict[str, Any] = {"add_qkv_bias": self.qkv_bias, "qk_layernorm": self.qk_layernorm}
        if self.num_experts:
            kw.update(num_moe_experts=self.num_experts, moe_router_topk=self.moe_router_topk,
                      moe_ffn_hidden_size=self.moe_ffn_hidden_size,
                      moe_router_pre_softmax=self.moe_router_pre_softmax)
        return kw

    def check(self, tp: int, pp: int, vpp: int, ep: int = 1) -> None:
        """Raise ValueError if this shape cannot be split ``tp`` x ``pp`` x ``vpp`` (x ``ep``) ways."""
        g, a = self.num_query_groups, self.num_attention_heads
        for what, n, flag in (("query groups (KV heads)", g, "--tp"), ("heads", a, "--tp"),
                              ("FFN width", self.ffn_hidden_size, "--tp"),
                              ("expert FFN width", self.moe_ffn_hidden_size or tp, "--tp")):
            if n % tp:
                raise ValueError(f"{n} {what} are not divisible by TP={tp}: choose {flag} "
                                 f"among the divisors of {math.gcd(g, a)}")
        if self.num_layers % (pp * vpp):
            raise ValueError(f"{self.num_layers} layers are not divisible by PP*VPP={pp * vpp}")
        if (self.num_experts or 1) % ep or (ep > 1 and not self.num_experts):
            raise ValueError(f"{self.num_experts} experts are not divisible by EP={ep} (--ep)")


def _hf_layer(i: int) -> str:
    return f"model.layers.{i}."


def hf_to_megatron(hf: StateDict, shape: LlamaShape, *, divisible_by: int = 128,
                   tp: int = 1) -> StateDict:
    """HF state dict (disk names, any family) -> one unsplit megatron-core state dict
    (local-spec names).

    The vocabulary is zero-padded to a multiple of ``divisible_by * tp`` rows. Tensors keep
    their dtype. Raises KeyError naming a missing HF tensor.
    """
    s, out = shape, {}
    d, g = s.head_dim, s.num_query_groups
    per_group = s.num_attention_heads // g
    multiple = divisible_by * tp
    padded = math.ceil(s.vocab_size / multiple) * multiple
    out["embedding.word_embeddings.weight"] = _pad_rows(hf["model.embed_tokens.weight"], padded)
    for i in range(s.num_layers):
        src, dst = _hf_layer(i), f"decoder.layers.{i}."
        q = hf[src + "self_attn.q_proj.weight"].reshape(g, per_group * d, -1)
        k = hf[src + "self_attn.k_proj.weight"].reshape(g, d, -1)
        v = hf[src + "self_attn.v_proj.weight"].reshape(g, d, -1)
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], 1).flatten(0, 1)
        if s.qkv_bias:  # Qwen2: the bias follows the weight's rows
            q, k, v = (hf[src + f"self_attn.{n}_proj.bias"].reshape(g, -1) for n in "qkv")
            out[dst + "self_attention.linear_qkv.bias"] = torch.cat([q, k, v], 1).flatten()
        if s.qk_layernorm:  # Qwen3: one [d] RMSNorm weight each, shared by the heads
            out[dst + "self_attention.q_layernorm.weight"] = hf[src + "self_attn.q_norm.weight"]
            out[dst + "self_attention.k_layernorm.weight"] = hf[src + "self_attn.k_norm.weight"]
        out[dst + "self_attention.linear_proj.weight"] = hf[src + "self_attn.o_proj.weight"]
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        if s.num_experts:
            out.update(_experts_to_megatron(hf, s, src, dst))
            continue
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]], 0)
        out[dst + "mlp.linear_fc2.weight"] = hf[src + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not s.tie_embeddings:
        out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], padded)
    return out


def megatron_to_hf(mc: StateDict, shape: LlamaShape) -> StateDict:
    """Unsplit megatron-core state dict -> HF state dict in the family's disk names
    (vocabulary unpadded).

    A tied model gets ``lm_head.weight`` only when the source holds ``output_layer.weight``
    (never for an unsplit tied checkpoint); HF ties it on load.
    """
    s, hf = shape, {}
    d, g, v_rows = s.head_dim, s.num_query_groups, s.vocab_size
    per_group = s.num_attention_heads // g
    hf["model.embed_tokens.weight"] = mc["embedding.word_embeddings.weight"][:v_rows]
    for i in range(s.num_layers):
        src, dst = f"decoder.layers.{i}.", _hf_layer(i)
        qkv = mc[src + "self_attention.linear_qkv.weight"]
        qkv = qkv.reshape(g, (per_group + 2) * d, qkv.shape[-1])
        q, k, v = qkv.split([per_group * d, d, d], dim=1)
        hf[dst + "self_attn.q_proj.weight"] = q.flatten(0, 1)
        hf[dst + "self_attn.k_proj.weight"] = k.flatten(0, 1)
        hf[dst + "self_attn.v_proj.weight"] = v.flatten(0, 1)
        if s.qkv_bias:
            bias = mc[src + "self_attention.linear_qkv.bias"].reshape(g, (per_group + 2) * d)
            for n, part in zip("qkv", bias.split([per_group * d, d, d], 1), strict=True):
                hf[dst + f"self_attn.{n}_proj.bias"] = part.flatten()
        if s.qk_layernorm:
            hf[dst + "self_attn.q_norm.weight"] = mc[src + "self_attention.q_layernorm.weight"]
            hf[dst + "self_attn.k_norm.weight"] = mc[src + "self_attention.k_layernorm.weight"]
        hf[dst + "self_attn.o_proj.weight"] = mc[src + "self_attention.linear_proj.weight"]
        hf[dst + "input_layernorm.weight"] = mc[src + "input_layernorm.weight"]
        hf[dst + "post_attention_layernorm.weight"] = mc[src + "pre_mlp_layernorm.weight"]
        if s.num_experts:
            hf.update(_experts_to_hf(mc, s, src, dst))
            continue
        gate, up = mc[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        hf[dst + "mlp.gate_proj.weight"] = gate
        hf[dst + "mlp.up_proj.weight"] = up
        hf[dst + "mlp.down_proj.weight"] = mc[src + "mlp.linear_fc2.weight"]
    hf["model.norm.weight"] = mc["decoder.final_layernorm.weight"]
    if not s.tie_embeddings:
        hf["lm_head.weight"] = mc["output_layer.weight"][:v_rows]
    return {k: t.contiguous() for k, t in hf.items()}


def _experts_to_megatron(hf: StateDict, s: LlamaShape, src: str, dst: str) -> StateDict:
    """One layer's router and experts: HF disk names -> megatron ``mlp.router`` /
    ``mlp.experts.local_experts.e.linear_fc1`` (``[gate; up]``) / ``linear_fc2``."""
    fam = FAMILIES[s.family]
    gate, up, down = fam.expert_names
    moe = src + fam.moe + "."
    out = {dst + "mlp.router.weight": hf[moe + "gate.weight"]}
    for e in range(s.num_experts):
        hf_e, mc_e = f"{moe}experts.{e}.", f"{dst}mlp.experts.local_experts.{e}."
        out[mc_e + "linear_fc1.weight"] = torch.cat(
            [hf[hf_e + gate + ".weight"], hf[hf_e + up + ".weight"]], 0)
        out[mc_e + "linear_fc2.weight"] = hf[hf_e + down + ".weight"]
    return out


def _experts_to_hf(mc: StateDict, s: LlamaShape, src: str, dst: str) -> StateDict:
    """Inverse of :func:`_experts_to_megatron` for one layer."""
    fam = FAMILIES[s.family]
    gate, up, down = fam.expert_names
    moe = dst + fam.moe + "."
    out = {moe + "gate.weight": mc[src + "mlp.router.weight"]}
    for e in range(s.num_experts):
        hf_e, mc_e = f"{moe}experts.{e}.", f"{src}mlp.experts.local_experts.{e}."
        g, u = mc[mc_e + "linear_fc1.weight"].chunk(2, dim=0)
        out[hf_e + gate + ".weight"], out[hf_e + up + ".weight"] = g, u
        out[hf_e + down + ".weight"] = mc[mc_e + "linear_fc2.weight"]
    return out


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, more than {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


# How each per-layer tensor is split over TP: dim, and whether fc1's [gate; up] halves split
# separately. Everything not listed (norms, the router) is replicated. Expert weights split
# like the dense MLP's over the expert-TP group (= TP in the per-rank torch format).
_TP_SPLIT = {
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "mlp.linear_fc1.weight": 0,
    "mlp.linear_fc2.weight": 1,
    "mlp.experts.local_experts.linear_fc1.weight": 0,
    "mlp.experts.local_experts.linear_fc2.weight": 1,
    "mlp.shared_experts.linear_fc1.weight": 0,  # no converted family has one; the trainer can
    "mlp.shared_experts.linear_fc2.weight": 1,
    "embedding.word_embeddings.weight": 0,
    "output_layer.weight": 0,
}
_EXPERT = re.compile(r"(.*mlp\.experts\.local_experts\.)(\d+)(\..*)")


def _suffix(name: str) -> str:
    suffix = name.split("decoder.layers.", 1)[-1].split(".", 1)[-1] if "layers." in name else name
    return re.sub(r"local_experts\.\d+\.", "local_experts.", suffix)


def _split_tp(name: str, t: Tensor, tp: int) -> list[Tensor]:
    suffix = _suffix(name)
    dim = _TP_SPLIT.get(suffix)
    if dim is None or tp == 1:
        return [t] * tp
    if suffix.endswith("linear_fc1.weight"):
        gates, ups = (half.chunk(tp, 0) for half in t.chunk(2, 0))
        return [torch.cat([gt, up]) for gt, up in zip(gates, ups, strict=True)]
    return [c.contiguous() for c in t.chunk(tp, dim)]  # qkv: whole groups, groups contiguous


def _merge_tp(name: str, parts: list[Tensor]) -> Tensor:
    suffix = _suffix(name)
    dim = _TP_SPLIT.get(suffix)
    if dim is None or len(parts) == 1:
        return parts[0]
    if suffix.endswith("linear_fc1.weight"):
        halves = [p.chunk(2, 0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(parts, dim)


def _split_ep(state: StateDict, num_experts: int, ep: int) -> list[StateDict]:
    """One rank's state dict -> one per EP rank: rank ``r`` keeps experts
    ``[r*E/EP, (r+1)*E/EP)`` renumbered from 0 (megatron's local expert index); the rest is
    replicated."""
    per_rank = num_experts // ep
    out: list[StateDict] = [{} for _ in range(ep)]
    for name, t in state.items():
        m = _EXPERT.fullmatch(name)
        if m is None:
            for d in out:
                d[name] = t
        else:
            e = int(m.group(2))
            out[e // per_rank][f"{m.group(1)}{e % per_rank}{m.group(3)}"] = t
    return out


def _merge_ep(states: list[StateDict]) -> StateDict:
    """Inverse of :func:`_split_ep` (EP rank order)."""
    per_rank = 1 + max((int(m.group(2)) for n in states[0] if (m := _EXPERT.fullmatch(n))),
                       default=-1)
    out: StateDict = {}
    for r, state in enumerate(states):
        for name, t in state.items():
            m = _EXPERT.fullmatch(name)
            out[name if m is None else f"{m.group(1)}{r * per_rank + int(m.group(2))}{m.group(3)}"] = t
    return out


def _chunk_layers(shape: LlamaShape, pp: int, vpp: int, p: int, c: int) -> range:
    n = shape.num_layers // (pp * vpp)
    start = (c * pp + p) * n
    return range(start, start + n)


def split(full: StateDict, shape: LlamaShape, *, tp: int, pp: int, vpp: int = 1,
          ep: int = 1) -> Shards:
    """Unsplit megatron state dict -> per (tp_rank, pp_rank) list of chunk state dicts.

    With ``ep > 1`` (MoE) the keys are ``(tp_rank, pp_rank, ep_rank)`` and each EP rank
    holds its ``E/EP`` experts (megatron's local numbering). ``full``'s vocabulary must
    already be padded for ``tp`` (:func:`hf_to_megatron`).
    """
    shape.check(tp, pp, vpp, ep)
    shards: Shards = {(t, p): [{} for _ in range(vpp)] for t in range(tp) for p in range(pp)}
    for p in range(pp):
        for c in range(vpp):
            names = {}
            for j, i in enumerate(_chunk_layers(shape, pp, vpp, p, c)):
                for key in full:
                    if key.startswith(f"decoder.layers.{i}."):
                        names[key] = f"decoder.layers.{j}." + key.split(".", 3)[3]
            first, last = (p, c) == (0, 0), (p, c) == (pp - 1, vpp - 1)
            if first:
                names["embedding.word_embeddings.weight"] = "embedding.word_embeddings.weight"
            if last:
                names["decoder.final_layernorm.weight"] = "decoder.final_layernorm.weight"
                if not shape.tie_embeddings:
                    names["output_layer.weight"] = "output_layer.weight"
                elif not first:  # tied, PP > 1: the last stage's copy of the embedding
                    names["embedding.word_embeddings.weight"] = "output_layer.weight"
            for src, dst in names.items():
                for t, part in enumerate(_split_tp(dst, full[src], tp)):
                    shards[(t, p)][c][dst] = part
    if ep == 1:
        return shards
    return {(t, p, e): [_split_ep(c, shape.num_experts, ep)[e] for c in chunks]
            for (t, p), chunks in shards.items() for e in range(ep)}


def merge(shards: Shards, shape: LlamaShape) -> StateDict:
    """Inverse of :func:`split`: per-rank chunk state dicts -> one unsplit state dict."""
    if len(next(iter(shards))) == 3:  # (tp, pp, ep): put each rank's experts back together
        ep = 1 + max(k[2] for k in shards)
        shards = {(t, p): [_merge_ep([shards[(t, p, e)][c] for e in range(ep)])
                           for c in range(len(shards[(t, p, 0)]))]
                  for t, p, e in shards if e == 0}
    tp = 1 + max(t for t, _ in shards)
    pp = 1 + max(p for _, p in shards)
    vpp = len(shards[(0, 0)])
    full: StateDict = {}
    for p in range(pp):
        for c in range(vpp):
            layers = _chunk_layers(shape, pp, vpp, p, c)
            for name in shards[(0, p)][c]:
                parts = [shards[(t, p)][c][name] for t in range(tp)]
                if name.startswith("decoder.layers."):
                    _, _, j, rest = name.split(".", 3)
                    full[f"decoder.layers.{layers[int(j)]}.{rest}"] = _merge_tp(name, parts)
                elif name == "output_layer.weight" and shape.tie_embeddings:
                    continue  # the tied copy: the embedding is the source of truth
                else:
                    full[name] = _merge_tp(name, parts)
    return full


def load_into_model(model: torch.nn.Module, state: StateDict) -> None:
    """``model.load_state_dict(state)``, tolerating only megatron's absent ``_extra_state``.

    Raises RuntimeError naming unexpected or missing tensors (wrong shape raises too).
    """
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"state dict does not fit the model: missing {missing}, "
                           f"unexpected {result.unexpected_keys}")
