"""Tokens and forward FLOPs of one preference pair, separate vs prefix-shared layout.

A pair has a prompt of ``P`` tokens (BOS included) and completions of ``C`` and ``R``
tokens (EOS included). Separate layout: two segments ``P + C`` and ``P + R``. Prefix-shared
layout (``adadpo-pack --prefix-sharing``): the chosen segment ``P + C`` and a rejected
branch of ``R + 1`` tokens (the last prompt token is kept in each branch) that attends to
the first ``P - 1`` tokens of the chosen segment: ``P + C + R + 1`` tokens.

Forward FLOPs: ``2 x GEMM weights`` per token (the output layer included) plus causal
attention, ``4 * q_dim`` per layer and (query, visible key) pair (QK^T and PV). The keys a
token sees are the same in both layouts except that the prompt's self-attention runs once
with sharing, so the attention saved is that of ``P - 1`` prompt tokens.
"""

from __future__ import annotations

from typing import Any

from adadpo_megatron.planner.estimate import ModelShape, gemm_params_per_layer

__all__ = ["pair_costs"]


def _causal_pairs(n: int) -> int:
    """(query, key) pairs of causal attention over ``n`` tokens."""
    return n * (n + 1) // 2


def pair_costs(shape: ModelShape, prompt: int, chosen: int, rejected: int,
               tp: int = 1) -> dict[str, Any]:
    """Tokens and forward FLOPs per pair in both layouts.

    Args:
        shape: the model shape.
        prompt, chosen, rejected: ``P``, ``C``, ``R`` token counts (P >= 1, C, R >= 1).
        tp: tensor-parallel size (only pads the vocabulary of the output layer).

    Returns:
        ``{"separate": {...}, "shared": {...}, "token_ratio", "flops_ratio"}``, each layout
        with ``tokens`` and ``forward_flops`` (a pair's policy step is 3x the forward).
    """
    if prompt < 1 or chosen < 1 or rejected < 1:
        raise ValueError(f"--pair-lengths {prompt} {chosen} {rejected}: each must be >= 1")
    q_dim = shape.num_attention_heads * shape.head_dim
    weights = gemm_params_per_layer(shape, 1) * shape.num_layers + (
        shape.padded_vocab(tp) * shape.hidden_size)
    per_key = 4 * q_dim * shape.num_layers
    s = prompt - 1
    sep_tokens = 2 * prompt + chosen + rejected
    sep_keys = _causal_pairs(prompt + chosen) + _causal_pairs(prompt + rejected)
    sh_tokens = prompt + chosen + rejected + 1
    # Rejected branch token j (1-based) sees the s shared tokens and j branch tokens.
    sh_keys = _causal_pairs(prompt + chosen) + (rejected + 1) * s + _causal_pairs(rejected + 1)
    out = {}
    for name, tokens, keys in (("separate", sep_tokens, sep_keys), ("shared", sh_tokens, sh_keys)):
        out[name] = {"tokens": tokens, "forward_flops": 2 * weights * tokens + per_key * keys}
    out["token_ratio"] = sep_tokens / sh_tokens
    out["flops_ratio"] = out["separate"]["forward_flops"] / out["shared"]["forward_flops"]
    return out
