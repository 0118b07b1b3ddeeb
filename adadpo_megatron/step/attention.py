"""Core attention for the prefix-shared layout, swapped into megatron-core's layer spec.

A packed micro-batch in the prefix-shared layout (``adadpo_megatron.data.prefix_layout``)
holds per pair a chosen segment ``[prefix | chosen]`` and a rejected segment; the rejected
tokens must see the first ``s`` tokens of the chosen segment (the shared prefix) and the
rejected tokens before them, never the chosen ones; no pair sees another. Per token::

    pair[t]    index of the token's pair in the micro-batch
    branch[t]  0 in the shared prefix, 1 in the rest of the chosen segment, 2 rejected
    q may attend k  iff  pair[q] == pair[k] and k <= q and branch[k] in (0, branch[q])

(``s = 0`` everywhere is the ordinary block-diagonal causal layout.) :class:`SharedLayout`
carries that description through ``GPTModel`` as the ``attention_mask`` argument (megatron
passes it untouched to the core attention), built once per micro-batch for all layers; the
mask implementation gets its plain mask tensor instead. Activation recompute saves
``attention_mask`` with ``save_for_backward`` (tensors only), so ``flex`` and ``te`` refuse
``--recompute-granularity`` (the trainer checks at start); ``mask`` supports it.
Only ``core_attention`` of each layer's spec changes, so the linear layers (Transformer
Engine's and FP8 included) are untouched. Three implementations, one contract:

- ``mask`` (``MaskSharedAttention``): megatron-core's local ``DotProductAttention`` with
  the explicit boolean mask ``[1, 1, T, T]``: the reference; CPU and the local spec. It is
  built with the ``padding`` mask type so masked-softmax fusion cannot pick the causal
  kernel that ignores the mask (:func:`_mask_class`); the local spec uses it for every
  pack, shared or not.
- ``flex`` (:class:`FlexSharedAttention`): PyTorch FlexAttention with a block mask (the fast
  path on a GPU without TE). On the CPU PyTorch runs it forward only (no backward). Packs
  are padded to a power of two >= 128 (:func:`flex_length`), so compiled Flex sees a few
  lengths; a recompile past :data:`FLEX_RECOMPILE_LIMIT` stops the run with an error
  instead of dynamo's silent fallback to uncompiled, dense attention.
- ``te`` (``TESharedAttention``, a subclass of megatron-core's ``TEDotProductAttention``, so
  its FP8 state and checkpoint keys are the TE spec's): Transformer Engine's THD attention
  with separate query and key/value ``cu_seqlens``: each rejected segment's keys/values are
  the shared prefix's followed by its own, with bottom-right causal alignment; a chosen
  segment is an ordinary causal sequence. Written against TE's ``DotProductAttention`` API; **not run yet** (no GPU
  with TE was available).

Rotary embeddings are applied before the core attention, per token by position id
(:mod:`adadpo_megatron.step.rotary`), so every implementation sees correctly rotated keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch

__all__ = [
    "IMPLEMENTATIONS",
    "FlexSharedAttention",
    "MaskSharedAttention",  # noqa: F822 - module __getattr__ builds it
    "SharedLayout",
    "build_shared_layout",
    "core_attention_class",
    "token_pair_branch",
]

IMPLEMENTATIONS = ("mask", "flex", "te")
"""Valid prefix-sharing attention implementations."""


def token_pair_branch(
    cu_seqlens: torch.Tensor, shared_prefix_len: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``pair`` and ``branch`` ids (int64 ``[T]``, CPU) of a packed micro-batch.

    ``cu_seqlens`` int ``[S+1]`` (segments ``2i`` chosen, ``2i+1`` rejected);
    ``shared_prefix_len`` int ``[S]`` (``s`` on rejected segments, 0 elsewhere) or None.
    """
    cu = cu_seqlens.to("cpu", torch.long)
    lens = cu[1:] - cu[:-1]
    total = int(cu[-1])
    seg = torch.repeat_interleave(torch.arange(lens.numel()), lens, output_size=total)
    pair = seg // 2
    branch = 1 + seg % 2
    if shared_prefix_len is not None:
        s = shared_prefix_len.to("cpu", torch.long)
        # The shared prefix of pair i: the first s[2i+1] tokens of segment 2i.
        prefix = s[seg | 1]  # s of this token's pair (read from its rejected segment)
        offset = torch.arange(total) - cu[:-1][seg]
        branch = torch.where((seg % 2 == 0) & (offset < prefix), torch.zeros_like(branch), branch)
    return pair, branch


@dataclasses.dataclass(kw_only=True, eq=False)
class SharedLayout:
    """Attention layout of one packed micro-batch, for every layer (passed as attention_mask).

    Built by :func:`build_shared_layout`; holds what the chosen implementation needs.
    """

    impl: str
    """mask | flex | te: which fields below are filled."""
    pair: torch.Tensor
    """int64 [T] on the device: pair index of each token."""
    branch: torch.Tensor
    """int64 [T] on the device: 0 shared prefix, 1 chosen, 2 rejected."""
    dense_mask: torch.Tensor | None = None
    """bool [1, 1, T, T], True = masked out (mask)."""
    block_mask: Any = None
    """FlexAttention BlockMask over ``flex_len`` tokens (flex)."""
    flex_len: int = 0
    """T padded up to a power of two >= 128 (flex): the only lengths Flex is compiled for."""
    te_kv_index: torch.Tensor | None = None
    """int64 [T_kv]: key/value rows gathered per THD sequence (te)."""
    te_cu_q: torch.Tensor | None = None
    """int32 [S+1]: query boundaries (te)."""
    te_cu_kv: torch.Tensor | None = None
    """int32 [S+1]: key/value boundaries in the gathered rows (te)."""
    te_max_q: int = 0
    te_max_kv: int = 0


def _allowed(pair: torch.Tensor, branch: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    same_pair = pair[q] == pair[k]
    visible = (branch[k] == 0) | (branch[k] == branch[q])
    return same_pair & visible & (k <= q)


def build_shared_layout(
    cu_seqlens: torch.Tensor,
    shared_prefix_len: torch.Tensor | None,
    device: torch.device | str,
    impl: str,
) -> SharedLayout:
    """The :class:`SharedLayout` of a packed micro-batch for implementation ``impl``.

    Args:
        cu_seqlens: int ``[S+1]`` CPU segment boundaries (chosen/rejected alternating).
        shared_prefix_len: int ``[S]`` CPU (see ``PackedPairDataset``), or None (no sharing).
        device: where the model runs; every index tensor is built on the CPU and copied.
        impl: ``mask``, ``flex`` or ``te``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"prefix-sharing attention {impl!r}: use one of {IMPLEMENTATIONS}")
    pair_c, branch_c = token_pair_branch(cu_seqlens, shared_prefix_len)
    pair, branch = pair_c.to(device), branch_c.to(device)
    layout = SharedLayout(impl=impl, pair=pair, branch=branch)
    total = pair_c.numel()
    if impl == "mask":
        pos = torch.arange(total, device=device)
        allowed = _allowed(pair, branch, pos[:, None], pos[None, :])
        layout.dense_mask = (~allowed).view(1, 1, total, total)
    elif impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        # Padding tokens form one-token "pairs" of their own (pair ids -1, -2, ...): each
        # attends only to itself, so no real token sees one and no row is empty; their
        # blocks off the diagonal are empty, which FlexAttention skips.
        layout.flex_len = flex_length(total)
        pad = layout.flex_len - total
        pair_p = torch.cat([pair, -1 - torch.arange(pad, device=device)])
        branch_p = torch.cat([branch, torch.ones(pad, dtype=branch.dtype, device=device)])

        def mask_mod(b, h, q_idx, kv_idx):
            return _allowed(pair_p, branch_p, q_idx, kv_idx)

        layout.block_mask = create_block_mask(mask_mod, None, None, layout.flex_len,
                                              layout.flex_len, device=device)
    else:
        _te_indices(layout, cu_seqlens, shared_prefix_len, device)
    return layout


def _te_indices(layout: SharedLayout, cu_seqlens, shared_prefix_len, device) -> None:
    """Per segment a THD sequence: chosen q = kv = its own tokens; rejected q = its tokens,
    kv = the shared prefix (start of the chosen segment) then its tokens (bottom-right)."""
    cu = cu_seqlens.to("cpu", torch.long)
    s = (torch.zeros(cu.numel() - 1, dtype=torch.long) if shared_prefix_len is None
         else shared_prefix_len.to("cpu", torch.long))
    pieces, kv_lens = [], []
    for k in range(cu.numel() - 1):
        own = torch.arange(int(cu[k]), int(cu[k + 1]))
        if k % 2 == 1 and int(s[k]) > 0:
            own = torch.cat([torch.arange(int(cu[k - 1]), int(cu[k - 1]) + int(s[k])), own])
        pieces.append(own)
        kv_lens.append(own.numel())
    kv_lens_t = torch.tensor(kv_lens, dtype=torch.long)
    layout.te_kv_index = torch.cat(pieces).to(device)
    layout.te_cu_q = cu.to(torch.int32).to(device)
    layout.te_cu_kv = torch.cat([torch.zeros(1, dtype=torch.long), kv_lens_t.cumsum(0)]).to(
        torch.int32).to(device)
    layout.te_max_q = int((cu[1:] - cu[:-1]).max())
    layout.te_max_kv = int(kv_lens_t.max())


FLEX_MIN_LEN = 128
"""Shortest length FlexAttention runs at (its block size); packs are padded up to powers of
two from here, so a run compiles it for at most log2(seq_length / 128) + 1 lengths."""

FLEX_RECOMPILE_LIMIT = 32
"""Compiled FlexAttention may recompile this often (lengths x dtypes x grad modes) before it
stops with an error; dynamo's own limit (8) would silently fall back to eager, dense attention."""


def flex_length(total: int) -> int:
    """The length FlexAttention runs a ``total``-token pack at: next power of two >= 128."""
    return max(FLEX_MIN_LEN, 1 << max(0, int(total) - 1).bit_length())


def _softmax_scale(config, softmax_scale: float | None, layer_number: int) -> float:
    """The scale the attention scores get before the softmax, as megatron-core applies it.

    ``apply_query_key_layer_scaling`` divides the scores by the layer number before the
    product and multiplies them back in the fp32 softmax (``DotProductAttention``: alpha =
    scale / layer_number, then ``FusedScaleMaskSoftmax(scale=layer_number)``; TE alike): a
    guard against fp16 overflow that leaves the effective scale unchanged. FlexAttention
    takes the effective scale in one step, so ``layer_number`` does not enter it.
    """
    del layer_number  # the layer scaling cancels (docstring)
    head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale


class _SharedAttentionBase(torch.nn.Module):
    """Common constructor (megatron-core's core_attention signature) and shape handling."""

    impl = ""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None) -> None:
        super().__init__()
        if config.context_parallel_size > 1:
            raise ValueError(
                "prefix sharing with --context-parallel-size > 1 is not supported: re-pack "
                "without --prefix-sharing, or use CP=1"
            )
        self.config = config
        self.layer_number = layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = _softmax_scale(config, softmax_scale, layer_number)

    def _layout(self, attention_mask) -> SharedLayout:
        return _check_layout(attention_mask, self.impl, type(self).__name__)


@functools.lru_cache(maxsize=4)
def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """bool ``[1, 1, sq, sk]``, True above the (bottom-right aligned) diagonal."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(sk - sq + 1).view(
        1, 1, sq, sk)


@functools.cache
def _mask_class() -> type:
    """``MaskSharedAttention``: megatron-core's local ``DotProductAttention`` (same parameters
    and checkpoint keys) that always applies an explicit mask.

    megatron-core builds its softmax with the layer's mask type, ``causal`` for GPT; with
    ``masked_softmax_fusion`` (Megatron-LM's default) and fp16/bf16 on a GPU the fused kernel
    for ``causal`` is an upper-triangular softmax that ignores the mask it is handed, so
    pairs in a pack and the branches of a shared prefix would see each other. Built with
    the ``padding`` mask type instead, the fused path is ``ScaledMaskedSoftmax`` (which
    applies the mask) and the unfused path applies it too; a missing mask becomes the
    explicit causal mask.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class MaskSharedAttention(DotProductAttention):
        impl = "mask"

        def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
            super().__init__(config, layer_number, AttnMaskType.padding, attention_type,
                             **kwargs)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, **kwargs):
            """``query [sq, b, np, hn]``, ``key``/``value [sk, b, ng, hn]`` -> ``[sq, b, np*hn]``.

            ``attention_mask``: bool ``[1, 1, sq, sk]``, True = masked out (the layout's, or
            a pack's block-diagonal causal mask), a :class:`SharedLayout` (its dense mask),
            or None (padded batches: the causal mask).
            """
            mask = attention_mask
            if isinstance(mask, SharedLayout):
                mask = _check_layout(mask, "mask", type(self).__name__).dense_mask
            if mask is None:
                mask = _causal_mask(query.shape[0], key.shape[0], query.device)
            return super().forward(query, key, value, mask, attn_mask_type=None,
                                   attention_bias=attention_bias,
                                   packed_seq_params=packed_seq_params, **kwargs)

    return MaskSharedAttention


class FlexSharedAttention(_SharedAttentionBase):
    """FlexAttention with the layout's block mask (compiled on CUDA, eager elsewhere)."""

    impl = "flex"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.dropout_p > 0:
            raise ValueError(
                f"--attention-dropout {self.dropout_p}: FlexAttention has no attention dropout; "
                "use 0, or the mask implementation"
            )

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``query [T, 1, np, hn]``, ``key``/``value [T, 1, ng, hn]`` -> ``[T, 1, np*hn]``."""
        from torch.nn.attention.flex_attention import flex_attention

        layout = self._layout(attention_mask)
        t, b = query.shape[0], query.shape[1]
        pad = layout.flex_len - t
        if pad < 0:
            raise ValueError(f"FlexSharedAttention: the layout holds {layout.flex_len} tokens, "
                             f"the query {t}: build it from this micro-batch's cu_seqlens")
        q, k, v = (torch.nn.functional.pad(x.permute(1, 2, 0, 3), (0, 0, 0, pad))
                   for x in (query, key, value))  # [b, h, T_flex, hn]
        kwargs = dict(block_mask=layout.block_mask, scale=self.softmax_scale,
                      enable_gqa=q.shape[1] != k.shape[1])
        out = _compiled_flex_call(q, k, v, kwargs) if query.is_cuda else flex_attention(
            q, k, v, **kwargs)
        return out[:, :, :t].permute(2, 0, 1, 3).reshape(t, b, -1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _compiled_flex_call(q, k, v, kwargs):
    """Compiled FlexAttention; a recompile past FLEX_RECOMPILE_LIMIT raises, never falls back.

    (torch >= 2.6 names the settings ``recompile_limit``/``fail_on_recompile_limit_hit``,
    earlier releases ``cache_size_limit``/``fail_on_cache_limit_hit``.)
    """
    import torch._dynamo

    cfg, exc = torch._dynamo.config, torch._dynamo.exc
    new_names = hasattr(cfg, "fail_on_recompile_limit_hit")
    limit_name = "recompile_limit" if new_names else "cache_size_limit"
    fail_name = "fail_on_recompile_limit_hit" if new_names else "fail_on_cache_limit_hit"
    hit = getattr(exc, "FailOnRecompileLimitHit", None) or exc.FailOnCacheLimitHit
    limit = max(FLEX_RECOMPILE_LIMIT, getattr(cfg, limit_name))
    try:
        with cfg.patch(**{limit_name: limit, fail_name: True}):
            return _compiled_flex()(q, k, v, **kwargs)
    except hit as e:
        raise RuntimeError(
            f"FlexAttention recompiled more than {limit} times (pack of {q.shape[2]} padded "
            "tokens): stopping rather than running it uncompiled (dense, slow); use "
            "--prefix-attention mask or te") from e


@functools.cache
def _te_shared_class() -> type:
    """``TESharedAttention``: megatron-core's ``TEDotProductAttention`` (so its parameters,
    FP8 extra state and sharded checkpoint keys are the TE spec's), run over per-segment
    gathered keys with separate ``cu_seqlens`` and bottom-right causal alignment.

    Written against ``transformer_engine.pytorch.DotProductAttention.forward`` (``qkv_format=
    "thd"``, ``attn_mask_type="padding_causal_bottom_right"``, ``cu_seqlens_q/_kv``,
    ``max_seqlen_q/_kv``). Not run yet: no GPU with Transformer Engine was available.
    """
    import transformer_engine.pytorch as te
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TESharedAttention(TEDotProductAttention):
        impl = "te"

        def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
            if config.context_parallel_size > 1:
                raise ValueError(
                    "prefix sharing with --context-parallel-size > 1 is not supported: "
                    "re-pack without --prefix-sharing, or use CP=1"
                )
            super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None, **kwargs):
            """``query [T, 1, np, hn]``, ``key``/``value [T, 1, ng, hn]`` -> ``[T, 1, np*hn]``."""
            layout = _check_layout(attention_mask, "te", type(self).__name__)
            q = query.squeeze(1)
            k = key.squeeze(1).index_select(0, layout.te_kv_index)
            v = value.squeeze(1).index_select(0, layout.te_kv_index)
            # TE's own forward (megatron's wrapper knows no bottom-right padding mask type).
            out = te.DotProductAttention.forward(
                self, q, k, v,
                qkv_format="thd",
                attn_mask_type="padding_causal_bottom_right",
                cu_seqlens_q=layout.te_cu_q,
                cu_seqlens_kv=layout.te_cu_kv,
                max_seqlen_q=layout.te_max_q,
                max_seqlen_kv=layout.te_max_kv,
            )
            return out.reshape(query.shape[0], 1, -1)

    return TESharedAttention


def _check_layout(attention_mask, impl: str, owner: str) -> SharedLayout:
    if not isinstance(attention_mask, SharedLayout) or attention_mask.impl != impl:
        raise ValueError(
            f"{owner} needs a SharedLayout(impl={impl!r}) as attention_mask, got "
            f"{type(attention_mask).__name__}; build the micro-batch with "
            "prepare_model_inputs(..., shared_attention=...) (adadpo_megatron.step.batch)"
        )
    return attention_mask


def __getattr__(name: str):
    if name == "MaskSharedAttention":  # built on first use (imports megatron-core)
        return _mask_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def core_attention_class(impl: str) -> type:
    """The core-attention class of ``impl`` (mask | flex | te) for a layer spec.

    ``mask`` subclasses megatron-core's ``DotProductAttention`` (also the local spec's
    attention for unshared packs: it honours block masks under masked-softmax fusion);
    ``te`` imports Transformer Engine (megatron-core's ``TEDotProductAttention`` subclass).
    """
    if impl == "mask":
        return _mask_class()
    if impl == "flex":
        return FlexSharedAttention
    if impl == "te":
        return _te_shared_class()
    raise ValueError(f"prefix-sharing attention {impl!r}: use one of {IMPLEMENTATIONS}")
