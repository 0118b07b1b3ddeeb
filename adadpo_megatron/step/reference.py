"""Reference log-probs, both ways: a precomputed side-car, or an online frozen model.

**Precomputed** (``--ref-logprobs PATH``): ``tools/precompute_ref_logprobs.py`` runs the
reference checkpoint forward-only over a packed dataset and writes one ``.npz`` file,
by default ``DATA_DIR/ref_logprobs.npz``, holding

* ``seq_logps``: float32 ``[2N]``, the reference's completion log-prob sum of every
  sequence in dataset order (sequence ``2j`` is pair ``j``'s chosen, ``2j+1`` its rejected);
* ``dataset_fingerprint``: the fingerprint of the dataset it was computed on;
* ``info``: JSON (reference checkpoint, iteration, layout, precision).

:class:`PrecomputedReference` refuses a side-car made for another dataset and fills
``ref_logps [S]`` of each micro-batch from ``pair_index``/``is_chosen``; training then
holds no reference model.

**Base** (LoRA with no ``--ref-*`` flag): :func:`base_reference_logps` runs the policy's own
chunks with the adapters off, forward-only, before the policy's pass: no second model.

**Online** (default for losses that need a reference): :func:`build_online_reference`
builds a second set of model chunks with its own ``TransformerConfig`` (its own FP8
state, see ``fp8.reference_config_kwargs``), loads ``--ref-load`` or copies the policy's
initial weights, and freezes it. :func:`reference_logps` runs it forward-only through the
same schedule, forward step and micro-batches as the policy, before the policy's pass.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "PrecomputedReference",
    "base_reference_logps",
    "build_online_reference",
    "default_sidecar_path",
    "reference_logps",
    "write_sidecar",
]

SIDECAR_NAME = "ref_logprobs.npz"
SIDECAR_VERSION = 1


class SidecarError(RuntimeError):
    """A side-car or reference checkpoint that does not fit the run."""


def default_sidecar_path(data_dir: str) -> str:
    """Where the precompute tool writes by default: ``DATA_DIR/ref_logprobs.npz``."""
    return os.path.join(data_dir, SIDECAR_NAME)


def write_sidecar(path: str, seq_logps: np.ndarray, dataset_fingerprint: str,
                  info: dict[str, Any]) -> None:
    """Write a side-car atomically (temp file + rename).

    ``seq_logps``: float ``[2N]`` per-sequence sums in dataset order (stored as float32,
    the dtype of ``ref_logps`` in the micro-batch contract).
    """
    arr = np.asarray(seq_logps, dtype=np.float32)
    if arr.ndim != 1 or arr.size % 2:
        raise ValueError(f"seq_logps must be 1-D of even length [2N], got {arr.shape}")
    if not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"seq_logps[{bad}] = {arr[bad]} is not finite: not writing {path}")
    tmp = f"{path}.tmp.npz"
    try:
        np.savez(tmp, seq_logps=arr, dataset_fingerprint=np.array(dataset_fingerprint),
                 version=np.array(SIDECAR_VERSION), info=np.array(json.dumps(info)))
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C: no half-written temp file stays behind
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class PrecomputedReference:
    """A loaded side-car, checked against the dataset it will be used with.

    Args:
        path: the ``--ref-logprobs`` file.
        dataset_fingerprint: the fingerprint of ``--data-path``.
        num_pairs: pairs in that dataset (the side-car must hold ``2 * num_pairs`` sums).
    """

    def __init__(self, path: str, dataset_fingerprint: str, num_pairs: int) -> None:
        if not os.path.isfile(path):
            raise SidecarError(f"--ref-logprobs {path}: no such file (make it with "
                                 "tools/precompute_ref_logprobs.py)")
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["version"])
                fp = str(z["dataset_fingerprint"])
                self.seq_logps = torch.from_numpy(z["seq_logps"].astype(np.float32))
                self.info = json.loads(str(z["info"]))
        except (OSError, KeyError, ValueError) as e:
            raise SidecarError(f"--ref-logprobs {path}: not a reference side-car ({e})") from e
        if version != SIDECAR_VERSION:
            raise SidecarError(f"--ref-logprobs {path}: side-car version {version}, this "
                                 f"adadpo-megatron reads {SIDECAR_VERSION}; recompute it")
        if fp != dataset_fingerprint:
            raise SidecarError(
                f"--ref-logprobs {path} was computed on another dataset (fingerprint {fp[:16]}, "
                f"--data-path has {dataset_fingerprint[:16]}): recompute it with "
                "tools/precompute_ref_logprobs.py on this dataset")
        if self.seq_logps.numel() != 2 * num_pairs:
            raise SidecarError(f"--ref-logprobs {path}: {self.seq_logps.numel()} sums for "
                                 f"{num_pairs} pairs (expected {2 * num_pairs})")

    def lookup(self, pair_index: torch.Tensor, is_chosen: torch.Tensor) -> torch.Tensor:
        """float32 ``[S]`` reference sums for segments given by ``pair_index``/``is_chosen``."""
        seq = 2 * pair_index.long() + (~is_chosen.bool()).long()
        return self.seq_logps[seq]

    def attach(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Return ``batch`` with ``ref_logps`` filled in (a new dict; tensors shared)."""
        return {**batch, "ref_logps": self.lookup(batch["pair_index"], batch["is_chosen"])}


def build_online_reference(build_chunks: Callable[[], list[torch.nn.Module]],
                           policy_chunks: Sequence[torch.nn.Module],
                           ref_load: str | None,
                           load_weights: Callable[[str, list[torch.nn.Module]], Any] | None = None,
                           ) -> list[torch.nn.Module]:
    """The frozen online reference: this rank's chunks, in eval mode, without gradients.

    ``build_chunks`` builds fresh (unwrapped) chunks for the current layout with the
    reference's own ``TransformerConfig``. Weights come from ``ref_load`` (a checkpoint
    directory, read by ``load_weights(ref_load, chunks)``: the trainer passes
    ``trainer.checkpointing.load_model_weights``, which reshards any layout) or, when
    None, are copied from ``policy_chunks`` (the policy's weights at this moment: call it
    before training).
    """
    from adadpo_megatron.step.model import unwrap_ddp

    chunks = build_chunks()
    if len(chunks) != len(policy_chunks):
        raise SidecarError(f"reference has {len(chunks)} chunks, policy {len(policy_chunks)}")
    if ref_load is not None:
        if load_weights is None:
            raise ValueError("build_online_reference: ref_load needs load_weights (e.g. "
                             "adadpo_megatron.trainer.checkpointing.load_model_weights)")
        load_weights(ref_load, chunks)
    else:
        with torch.no_grad():
            for ref, pol in zip(chunks, policy_chunks, strict=True):
                unwrap_ddp(ref).load_state_dict(unwrap_ddp(pol).state_dict(), strict=True)
    for chunk in chunks:
        chunk.eval()
        for p in chunk.parameters():
            p.requires_grad_(False)
    return chunks


def base_reference_logps(chunks: Sequence[torch.nn.Module],
                         run_forward_only: Callable[[list[dict[str, Any]]], list[torch.Tensor]],
                         microbatches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LoRA's reference = base: :func:`reference_logps` on the policy ``chunks`` themselves,
    with their adapters off and in eval mode (no dropout; the RNG is not advanced), then
    back to the mode each chunk was in. No second model is held."""
    from adadpo_megatron.step.lora import adapters_disabled

    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with adapters_disabled(chunks):
            return reference_logps(run_forward_only, microbatches)
    finally:
        for c, mode in zip(chunks, modes, strict=True):
            c.train(mode)


def reference_logps(run_forward_only: Callable[[list[dict[str, Any]]], list[torch.Tensor]],
                    microbatches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run the reference over a step's micro-batches; return them with ``ref_logps`` set.

    ``run_forward_only(microbatches)`` runs the reference chunks through megatron-core's
    schedule (``forward_only=True``) with the log-prob forward step and returns, on the
    last pipeline stage, one float32 ``[S]`` tensor of per-segment sums per micro-batch
    (``[]`` on other stages, whose micro-batches are then returned unchanged: only the
    last stage reads ``ref_logps``).
    """
    with torch.no_grad():
        sums = run_forward_only(microbatches)
    if not sums:
        return microbatches
    if len(sums) != len(microbatches):
        raise RuntimeError(f"reference pass returned {len(sums)} results for "
                           f"{len(microbatches)} micro-batches")
    # Left on the device (no host sync): the loss moves ref_logps to the policy's device.
    return [{**mb, "ref_logps": s.detach().float()}
            for mb, s in zip(microbatches, sums, strict=True)]
