"""Turn a preference micro-batch into ``GPTModel`` inputs, in one of two formats.

**Packed (THD)**, the contract of DESIGN.md: a dict of CPU tensors ``tokens [T]``,
``position_ids [T]``, ``labels [T]``, ``loss_mask [T]``, ``cu_seqlens`` int32 ``[S+1]``,
``max_seqlen`` (int), ``pair_index [S]``, ``is_chosen [S]``, optionally ``ref_logps [S]``.
Segment ``2i`` is pair ``i``'s chosen sequence, ``2i+1`` its rejected one. Worked example:
pairs (chosen 5, rejected 3) and (4, 4) give ``cu_seqlens=[0, 5, 8, 12, 16]``,
``is_chosen=[T, F, T, F]``, ``tokens [16]``. The model sees one row ``[1, T]``, and
attention must stay inside each segment:

- with Transformer Engine, ``PackedSeqParams(qkv_format="thd", cu_seqlens...)``
  (variable-length flash/fused attention, no mask tensor);
- without it (CPU, or a GPU without TE: megatron-core's local ``DotProductAttention``
  refuses ``PackedSeqParams``), a block-diagonal causal boolean mask ``[1, 1, T, T]``,
  ``True`` = masked out (megatron-core's convention: ``attention_mask_func`` fills
  ``True`` scores with -10000 before the softmax). RoPE rotates each token by its
  ``position_ids`` (``step/rotary.py``; megatron-core alone would use the place in the
  pack), as learned absolute position embeddings do: positions restart in each segment.

**Padded (BSHD)**: ``tokens``, ``labels``, ``loss_mask`` ``[B, S]`` (optionally
``position_ids [B, S]``), one sequence per row, rows alternating chosen/rejected,
``pair_index [B]``, ``is_chosen [B]``, optionally ``ref_logps [B]``. Padding sits at the
end of each row with ``loss_mask`` 0; a plain causal mask (megatron-core's default when
``attention_mask`` is None) is exact since no real token attends to a later pad.

**Prefix-shared packs** (``shared_prefix_len [S]`` in the batch, ``adadpo-pack
--prefix-sharing``) need the prefix-shared core attention (``step/attention.py``, chosen by
``GPTOptions.prefix_attention``): ``attention_mask`` is then the layout's mask
``[1, 1, T, T]`` (``mask``) or a ``SharedLayout`` (``flex``, ``te``) built once per
micro-batch, ``packed_seq_params`` is None, and RoPE follows ``position_ids``
(``step/rotary.py``). Context parallelism is refused with sharing.

Under context parallelism (packed format only, TE required), each rank keeps its share
of every segment (``adadpo_megatron.logprobs.split_thd_for_cp``) while
``PackedSeqParams`` carries the global boundaries, as TE's CP attention expects.

Index tensors (``cu_seqlens``, segment ids, the mask) are derived on the CPU or from CPU
tensors; nothing here reads a device tensor back to the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from adadpo_megatron.logprobs import split_thd_for_cp

__all__ = [
    "ModelInputs",
    "is_packed_batch",
    "prepare_model_inputs",
    "real_token_count",
    "schedule_shape",
    "block_causal_mask",
]

_TOKEN_KEYS = ("tokens", "position_ids", "labels", "loss_mask")


@dataclasses.dataclass(kw_only=True)
class ModelInputs:
    """One micro-batch ready for ``GPTModel.forward`` and for the loss.

    Token-level tensors are ``[B, S]`` (``B=1, S=T/CP`` for a packed micro-batch) on the
    model's device; per-segment tensors stay on the CPU (only the loss reads them).
    """

    input_ids: torch.Tensor
    """int64 [B, S]: token ids fed to the embedding."""
    position_ids: torch.Tensor
    """int64 [B, S]: positions (restart at 0 in each packed segment)."""
    attention_mask: torch.Tensor | None
    """bool [1, 1, S, S], True = masked out; None for TE THD and for padded batches; a
    ``step.attention.SharedLayout`` for prefix-shared packs with flex/te attention."""
    packed_seq_params: Any
    """megatron-core PackedSeqParams (qkv_format='thd') on the TE path, else None."""
    labels: torch.Tensor
    """int64 [B, S]: next-token targets (global vocabulary ids)."""
    loss_mask: torch.Tensor
    """float32 [B, S]: 1 where the label is a completion token."""
    cu_seqlens: torch.Tensor
    """int32 [S_seg+1], CPU: segment boundaries of the flattened local tokens
    (the local ``cu_seqlens // CP`` under CP, ``arange(B+1) * S`` for padded batches)."""
    pair_index: torch.Tensor
    """int64 [S_seg], CPU: dataset-wide pair id of each segment."""
    is_chosen: torch.Tensor
    """bool [S_seg], CPU: True for a chosen segment."""
    ref_logps: torch.Tensor | None
    """float32 [S_seg] or None: reference per-segment log-prob sums (precomputed or online)."""


def is_packed_batch(batch: Mapping[str, Any]) -> bool:
    """True for the packed THD format (``tokens [T]`` and ``cu_seqlens``), False for padded."""
    tokens = batch["tokens"]
    if tokens.dim() == 1 and "cu_seqlens" in batch:
        return True
    if tokens.dim() == 2:
        return False
    raise ValueError(
        f"micro-batch tokens have shape {tuple(tokens.shape)}: expected [T] with cu_seqlens "
        "(packed THD) or [B, S] (padded); see adadpo_megatron.step.batch"
    )


def schedule_shape(batch: Mapping[str, Any]) -> tuple[int, int]:
    """``(seq_length, micro_batch_size)`` to pass to megatron-core's forward_backward_func.

    Packed: ``(T, 1)``; padded: ``(S, B)``. Full (pre-CP, pre-SP) lengths: the schedule
    divides by CP and by TP under sequence parallelism itself.
    """
    tokens = batch["tokens"]
    if is_packed_batch(batch):
        return int(tokens.shape[0]), 1
    return int(tokens.shape[1]), int(tokens.shape[0])


def real_token_count(batch: Mapping[str, Any]) -> int:
    """Real (non-padding) tokens of a micro-batch, from its loss mask and segment bounds.

    Each sequence (a packed segment ``cu_seqlens[k]:cu_seqlens[k+1]``, or a row of a
    padded ``[B, S]`` batch) holds its own tokens first, then padding. Its completion
    ends the sequence and every completion token but the first is a label, so the last
    scored position ``t`` (``loss_mask[t] = 1``; its label is the final token, EOS) is the
    second-to-last real token: the sequence has ``t + 2`` real tokens (counted from the
    segment start; a prefix-shared rejected segment counts the tokens it holds). A
    sequence with no scored position counts 0. Token ids are never read: id 0 is a real
    token in the Llama-3 and GPT-2 vocabularies.
    """
    mask = batch["loss_mask"]
    if not is_packed_batch(batch):  # [B, S]: one sequence per row
        mask = mask.reshape(mask.shape[0], -1) > 0
        pos = torch.arange(mask.shape[1]).expand_as(mask)
        last = torch.where(mask, pos, torch.full_like(pos, -2)).amax(dim=1)
        return int((last + 2).sum())
    cu = batch["cu_seqlens"].to(device="cpu", dtype=torch.long)
    mask = mask.reshape(-1).to("cpu") > 0
    total = int(cu[-1])
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1], output_size=total)
    pos = torch.arange(total) - cu[:-1][seg]  # position within the segment
    last = torch.full((cu.numel() - 1,), -2, dtype=torch.long)
    last = last.scatter_reduce(0, seg[mask], pos[mask], reduce="amax")
    return int((last + 2).sum())


def block_causal_mask(cu_seqlens: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Block-diagonal causal mask ``[1, 1, T, T]`` (bool, True = masked out) for a pack.

    Query ``q`` may attend key ``k`` iff both lie in the same segment and ``k <= q``.
    ``cu_seqlens`` (int ``[S+1]``) is read on the CPU; the mask is built on ``device``.
    """
    cu = cu_seqlens.to(device="cpu", dtype=torch.long)
    total = int(cu[-1])
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1], output_size=total)
    seg = seg.to(device)
    pos = torch.arange(total, device=device)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed).view(1, 1, total, total)


def _check_pairs(is_chosen: torch.Tensor, pair_index: torch.Tensor) -> None:
    """Segments must alternate chosen/rejected with matching pair ids (CPU tensors)."""
    n = is_chosen.numel()
    ok = (
        n % 2 == 0
        and n > 0
        and bool(is_chosen[0::2].all())
        and not bool(is_chosen[1::2].any())
        and bool((pair_index[0::2] == pair_index[1::2]).all())
    )
    if not ok:
        raise ValueError(
            f"micro-batch segments must come in pairs, chosen first (segment 2i chosen, 2i+1 "
            f"rejected, same pair_index); got is_chosen={is_chosen.tolist()[:8]}..., "
            f"pair_index={pair_index.tolist()[:8]}... ({n} segments). Check the pack tool/collate."
        )


def prepare_model_inputs(
    batch: Mapping[str, Any],
    *,
    device: torch.device | str,
    use_thd: bool,
    cp_size: int = 1,
    cp_rank: int = 0,
    shared_attention: str | None = None,
) -> ModelInputs:
    """Converts one micro-batch (packed or padded, see the module doc) into :class:`ModelInputs`.

    Args:
        batch: the micro-batch dict of CPU tensors.
        device: the model's device; token tensors are copied there (non-blocking).
        use_thd: packed batches go through ``PackedSeqParams`` (needs TE attention) when
            True, through a block-diagonal causal mask when False. Ignored for padded.
        cp_size, cp_rank: context-parallel size and rank; > 1 splits a packed batch's
            tokens (needs ``use_thd``). Padded batches under CP are not supported.
        shared_attention: the model's prefix-sharing attention (``mask``/``flex``/``te``), or
            None when it has megatron-core's own; packed batches then carry a ``SharedLayout``
            as ``attention_mask`` (``use_thd`` is ignored). A prefix-shared batch needs it.

    Raises ValueError on a malformed batch or an unsupported combination.
    """
    pair_index = batch["pair_index"].cpu()
    is_chosen = batch["is_chosen"].cpu().bool()
    _check_pairs(is_chosen, pair_index)
    ref = batch.get("ref_logps")
    if is_packed_batch(batch):
        cu = batch["cu_seqlens"].cpu().to(torch.int32)
        if cu.numel() - 1 != is_chosen.numel():
            raise ValueError(
                f"cu_seqlens has {cu.numel() - 1} segments but is_chosen has {is_chosen.numel()}"
            )
        tok = {k: batch[k] for k in _TOKEN_KEYS}
        local_cu = cu
        shared = _shared_prefix(batch, shared_attention, cp_size)
        if shared_attention is not None:
            tok = {k: v.to(device, non_blocking=True).unsqueeze(0) for k, v in tok.items()}
            from adadpo_megatron.step.attention import build_shared_layout

            layout = build_shared_layout(cu, shared, device, shared_attention)
            # The mask implementation takes the plain tensor (activation recompute saves
            # attention_mask with save_for_backward, which takes tensors only).
            mask = layout.dense_mask if shared_attention == "mask" else layout
            return ModelInputs(
                input_ids=tok["tokens"], position_ids=tok["position_ids"],
                attention_mask=mask, packed_seq_params=None, labels=tok["labels"],
                loss_mask=tok["loss_mask"].float(), cu_seqlens=cu, pair_index=pair_index,
                is_chosen=is_chosen, ref_logps=ref,
            )
        if cp_size > 1:
            if not use_thd:
                raise ValueError(
                    f"context parallel size {cp_size} needs Transformer Engine attention (THD); "
                    "megatron-core's local attention supports CP=1 only"
                )
            tok, local_cu = split_thd_for_cp(tok, cu, cp_size, cp_rank)
        tok = {k: v.to(device, non_blocking=True).unsqueeze(0) for k, v in tok.items()}
        mask, packed = None, None
        if use_thd:
            packed = _packed_seq_params(cu, int(batch["max_seqlen"]), device)
        else:
            mask = block_causal_mask(cu, device)
    else:
        if cp_size > 1:
            raise ValueError(
                "padded [B, S] micro-batches are not supported under CP: use packed THD"
            )
        rows, length = batch["tokens"].shape
        if rows != is_chosen.numel():
            raise ValueError(
                f"padded batch has {rows} rows but {is_chosen.numel()} is_chosen entries"
            )
        tok = {k: batch[k].to(device, non_blocking=True) for k in _TOKEN_KEYS if k in batch}
        if "position_ids" not in tok:
            tok["position_ids"] = torch.arange(length, device=device).expand(rows, length)
        local_cu = torch.arange(rows + 1, dtype=torch.int32) * length
        mask, packed = None, None
    return ModelInputs(
        input_ids=tok["tokens"],
        position_ids=tok["position_ids"],
        attention_mask=mask,
        packed_seq_params=packed,
        labels=tok["labels"],
        loss_mask=tok["loss_mask"].float(),
        cu_seqlens=local_cu,
        pair_index=pair_index,
        is_chosen=is_chosen,
        ref_logps=ref,
    )


def _shared_prefix(
    batch: Mapping[str, Any], shared_attention: str | None, cp_size: int
) -> torch.Tensor | None:
    """``shared_prefix_len`` (CPU) of a packed batch, checked against the model and CP."""
    shared = batch.get("shared_prefix_len")
    shared = None if shared is None else shared.cpu()
    is_shared = shared is not None and bool((shared > 0).any())
    if is_shared and shared_attention is None:
        raise ValueError(
            "the micro-batch is prefix-shared (adadpo-pack --prefix-sharing) but the model was "
            "built without prefix-sharing attention (GPTOptions.prefix_attention); build it "
            "with prefix_attention='mask'|'flex'|'te' or re-pack without --prefix-sharing"
        )
    if shared_attention is not None and cp_size > 1:
        raise ValueError(
            f"prefix sharing with context parallel size {cp_size} is not supported: use "
            "--context-parallel-size 1 or re-pack without --prefix-sharing"
        )
    return shared


def _packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int, device):
    """PackedSeqParams for TE's THD attention; segment lengths already include padding."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(device, non_blocking=True)
    fields = {f.name for f in dataclasses.fields(PackedSeqParams)}
    kwargs: dict[str, Any] = dict(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
    if "cu_seqlens_q_padded" in fields:
        # Padding is inside the segments (loss-masked tokens), so padded == actual boundaries.
        kwargs.update(cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu)
    return PackedSeqParams(**kwargs)
