"""The prefix-shared pair layout (``adadpo-pack --prefix-sharing``) and pair caps per pack.

Without sharing a pair occupies two segments, ``[prompt + chosen][prompt + rejected]``, and
every prompt token runs through the model twice. With sharing, a pair is one group
``[prompt | chosen | rejected]``: the chosen segment keeps its whole sequence (BOS, prompt,
completion, EOS) and the rejected segment holds only what follows the **shared prefix**,
the first ``s`` tokens of the chosen segment, which its tokens attend to in place of their
own copy. Rejected position ids start at ``s``, the position they have without sharing.

``s`` is the longest prefix both sequences share whose tokens are unscored in both (their
labels are prompt tokens): ``s = min(lcp(chosen, rejected), prompt_len_c - 1,
prompt_len_r - 1)``, at least 0. With an ordinary prompt of ``P`` tokens (BOS included)
``s = P - 1``: the last prompt token is kept in each branch, since its output predicts
the first completion token, which differs between the two. A pair then costs
``P + C + R + 1`` token slots instead of ``2P + C + R`` (C, R: completion lengths incl. EOS).

Stored on disk: ``meta.json["layout"] = {"kind": "prefix_shared" | "separate",
"max_pairs_per_pack": N | None}`` and, for the shared kind, ``index.npz`` holds
``pair_shared_prefix_len`` (int64 ``[N]``, ``s`` per pair). The token file is the same in
both layouts (full chosen and rejected sequences); only the reader's cut differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "build_pack",
    "LAYOUT_PREFIX_SHARED",
    "LAYOUT_SEPARATE",
    "SHARED_PREFIX_ARRAY",
    "layout_kind",
    "layout_meta",
    "limit_pairs_per_pack",
    "segment_skips",
    "shared_prefix_len",
]

LAYOUT_SEPARATE = "separate"
LAYOUT_PREFIX_SHARED = "prefix_shared"
SHARED_PREFIX_ARRAY = "pair_shared_prefix_len"
"""index.npz array of a prefix-shared dataset: int64 [N], the shared prefix ``s`` per pair."""


def shared_prefix_len(
    chosen: np.ndarray, rejected: np.ndarray, chosen_prompt_len: int, rejected_prompt_len: int
) -> int:
    """Shared prefix ``s`` of one pair (see the module docstring).

    Args:
        chosen, rejected: int token ids of the full sequences ``[Lc]``, ``[Lr]``.
        chosen_prompt_len, rejected_prompt_len: leading unscored tokens of each (BOS + prompt).

    Returns:
        int ``s >= 0``: tokens at the start of ``chosen`` the rejected branch reuses.
    """
    a, b = np.asarray(chosen), np.asarray(rejected)
    n = min(a.shape[0], b.shape[0])
    differ = np.flatnonzero(a[:n] != b[:n])
    lcp = int(differ[0]) if differ.size else n
    return max(min(lcp, int(chosen_prompt_len) - 1, int(rejected_prompt_len) - 1), 0)


def segment_skips(shared: np.ndarray | None, num_pairs: int) -> np.ndarray:
    """int64 ``[2N]``: tokens each stored sequence drops at its start in the layout.

    0 for every chosen sequence and, without sharing (``shared`` None), for every rejected
    one; ``shared[j]`` for pair ``j``'s rejected sequence.
    """
    skips = np.zeros(2 * num_pairs, dtype=np.int64)
    if shared is not None:
        skips[1::2] = shared
    return skips


def layout_meta(prefix_sharing: bool, max_pairs_per_pack: int | None) -> dict[str, Any]:
    """The ``meta.json["layout"]`` entry the pack tool writes."""
    return {
        "kind": LAYOUT_PREFIX_SHARED if prefix_sharing else LAYOUT_SEPARATE,
        "max_pairs_per_pack": max_pairs_per_pack,
    }


def layout_kind(meta: dict[str, Any], where: str) -> str:
    """The layout kind of a dataset's meta.json (datasets from before the field: separate).

    Raises ValueError naming ``where`` (the meta.json path) for an unknown kind.
    """
    kind = (meta.get("layout") or {}).get("kind", LAYOUT_SEPARATE)
    if kind not in (LAYOUT_SEPARATE, LAYOUT_PREFIX_SHARED):
        raise ValueError(
            f"{where}: layout kind {kind!r} is unknown (expected {LAYOUT_SEPARATE!r} or "
            f"{LAYOUT_PREFIX_SHARED!r}); re-pack with this version's adadpo-pack"
        )
    return kind


def limit_pairs_per_pack(plan: Any, max_pairs: int, footprints: np.ndarray) -> Any:
    """Split every pack of ``plan`` that holds more than ``max_pairs`` pairs, in order.

    A pack of ``k`` pairs becomes ``ceil(k / max_pairs)`` packs holding consecutive runs of
    its pairs (the pair order is kept); a subset of a pack that fits still fits. Packs are
    renumbered in order. ``footprints`` (int64 ``[N]``, what the packer counted per pair)
    give the new ``pack_tokens``. Returns a new ``PackPlan``; ``max_pairs=1`` gives one
    pair per pack (the padded baseline).
    """
    from adadpo_megatron.packing import PackPlan

    if isinstance(max_pairs, bool) or not isinstance(max_pairs, int | np.integer) or max_pairs < 1:
        raise ValueError(f"--max-pairs-per-pack must be an integer >= 1, got {max_pairs!r}")
    counts = plan.pairs_per_pack()
    pieces = -(-counts // max_pairs)
    new_counts = np.full(int(pieces.sum()), max_pairs, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    new_counts[last] = counts - (pieces - 1) * max_pairs
    offsets = np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64)
    order = plan.pair_order.astype(np.int64)
    pack_of_pair = np.empty_like(order)
    pack_of_pair[order] = np.repeat(np.arange(new_counts.shape[0], dtype=np.int64), new_counts)
    tokens = np.add.reduceat(np.asarray(footprints, dtype=np.int64)[order], offsets[:-1]) if (
        order.size
    ) else np.zeros(0, dtype=np.int64)
    return PackPlan(
        pack_of_pair=pack_of_pair,
        pair_order=order,
        pack_offsets=offsets,
        pack_tokens=tokens.astype(np.int64),
        capacity=plan.capacity,
        align=plan.align,
    )


def build_pack(
    sequences: Sequence[np.ndarray],
    prompt_lens: Sequence[int] | np.ndarray,
    pair_ids: Sequence[int] | np.ndarray,
    *,
    skips: Sequence[int] | np.ndarray | None = None,
    segment_multiple: int = 1,
    total: int | None = None,
) -> dict[str, Any]:
    """One pack as a THD micro-batch dict (``PackedPairDataset`` documents the fields).

    Args:
        sequences: ``2n`` int token arrays, pair ``k``'s chosen at ``2k``, rejected at
            ``2k+1``, each the full stored sequence (BOS, prompt, completion, EOS).
        prompt_lens: ``[2n]`` leading unscored tokens of each sequence.
        pair_ids: ``[n]`` dataset-wide pair ids.
        skips: ``[2n]`` tokens each sequence drops at its start (:func:`segment_skips`:
            the shared prefix on rejected sequences); None: the separate layout, and no
            ``shared_prefix_len`` in the result.
        segment_multiple: pad each segment to a multiple of this.
        total: pad the pack to exactly this length (the extra goes into the last segment);
            None: no extra padding.

    Returns:
        ``tokens``/``position_ids``/``labels`` int64 ``[T]``, ``loss_mask`` float32 ``[T]``,
        ``cu_seqlens`` int32 ``[2n+1]``, ``max_seqlen`` int, ``pair_index`` int64 ``[2n]``,
        ``is_chosen`` bool ``[2n]`` and, with ``skips``, ``shared_prefix_len`` int64 ``[2n]``.
    """
    shared = skips is not None
    skip = np.zeros(len(sequences), np.int64) if skips is None else np.asarray(skips, np.int64)
    lens = np.array([len(x) for x in sequences], dtype=np.int64) - skip
    m = int(segment_multiple)
    seg = -(-lens // m) * m
    if total is not None:
        seg[-1] += int(total) - int(seg.sum())
    cu = np.concatenate([[0], np.cumsum(seg)])
    size = int(cu[-1])
    tokens = np.zeros(size, dtype=np.int64)
    labels = np.zeros(size, dtype=np.int64)
    loss_mask = np.zeros(size, dtype=np.float32)
    for k, full in enumerate(sequences):
        s, n, cut = int(cu[k]), int(lens[k]), int(skip[k])
        seq = np.asarray(full, dtype=np.int64)[cut:]
        tokens[s : s + n] = seq
        labels[s : s + n - 1] = seq[1:]
        # Position t is scored when its label t+1 lies in the completion: t >= prompt_len-1
        # (t counted in the stored sequence, whose first `cut` tokens the layout drops).
        loss_mask[s + max(int(prompt_lens[k]) - 1 - cut, 0) : s + n - 1] = 1.0
    position_ids = np.arange(size, dtype=np.int64) - np.repeat(cu[:-1] - skip, seg)
    pairs = np.asarray(pair_ids, dtype=np.int64)
    out = {
        "tokens": torch.from_numpy(tokens),
        "position_ids": torch.from_numpy(position_ids),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "cu_seqlens": torch.from_numpy(cu.astype(np.int32)),
        "max_seqlen": int(seg.max()),
        "pair_index": torch.from_numpy(np.repeat(pairs, 2)),
        "is_chosen": torch.from_numpy(np.tile(np.array([True, False]), len(pairs))),
    }
    if shared:
        out["shared_prefix_len"] = torch.from_numpy(skip.copy())
    return out
