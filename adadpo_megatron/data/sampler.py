"""Deterministic, DP-sharded, resumable order of the packs a training run visits.

The unit is a *pack* of a :class:`PackedPairDataset` (``len(ds)`` packs): packs are
atomic, so a preference pair is never split across ranks or micro-batches.

Order (:class:`DistributedPackSampler`)
    Epoch ``e`` visits the packs in a permutation seeded by ``(seed, e)``. A step takes
    the next ``G`` (``--global-batch-size``) packs of that order; DP rank ``r`` gets the
    ``r``-th contiguous block of ``G / dp_size`` of them, which the trainer cuts into
    micro-batches of ``--micro-batch-size`` packs. Which packs make up a step therefore
    depends only on ``G``, not on how it is split over ranks.

    The last ``num_packs mod G`` packs of an epoch's order cannot fill a step. With
    ``remainder="drop"`` (default) they are skipped for that epoch; the next epoch's
    permutation differs, so no pack is skipped in every epoch. With ``remainder="wrap"``
    the last step is completed with packs from the start of the same epoch's order,
    which are then seen twice in that epoch. Either way every rank runs the same number
    of micro-batches per step, as Megatron's schedules require. Within an epoch no pack
    is handed to two ranks or twice to one (except the ``wrap`` fill).

Resume
    The state is ``(epoch, position)``: the packs of epoch ``epoch``'s order already
    handed out. ``state_dict()`` after ``k`` steps, loaded into a fresh sampler, continues
    with step ``k + 1`` exactly as an uninterrupted run would.

The permutation is an argsort of a splitmix64 hash of ``(seed, epoch, pack)`` computed
with numpy integer arithmetic, so it is identical on every machine and numpy version
(numpy's and torch's generators promise no stream stability across versions).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

REMAINDER_MODES = ("drop", "wrap")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def epoch_permutation(num_packs: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: a permutation of ``range(num_packs)``.

    Returns int64 ``[num_packs]``; the same ``(num_packs, seed, epoch)`` always gives
    the same order.
    """
    key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch & _MASK64))
    hashes = _splitmix64(np.arange(num_packs, dtype=np.uint64) ^ key)
    return np.argsort(hashes, kind="stable").astype(np.int64)


def _check_positive(name: str, flag: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r} (set {flag})")


class DistributedPackSampler(Iterator[list[int]]):
    """Infinite, seeded, DP-sharded iterator over the training steps' packs.

    Args:
        num_packs: number of packs in the dataset (``len(ds)``).
        global_batch_size: packs per optimizer step over all DP ranks, ``G``
            (``--global-batch-size``).
        dp_rank, dp_size: this rank's index in, and the size of, the data-parallel group.
        seed: seed of the epoch permutations (``--seed``), an int in ``[0, 2**64)``.
        micro_batch_size: packs per micro-batch (``--micro-batch-size``); ``G`` must be a
            multiple of ``micro_batch_size * dp_size`` so every rank runs the same number
            of whole micro-batches.
        remainder: ``"drop"`` or ``"wrap"`` the packs that cannot fill a last step
            (see the module docstring).
        shuffle: False visits the packs in dataset order every epoch (for debugging).

    Each step (:meth:`next_step`, or iteration) gives this rank's ``G / dp_size`` pack
    indices, micro-batch after micro-batch: ``ids[j*mbs:(j+1)*mbs]`` is micro-batch ``j``.
    """

    def __init__(
        self,
        num_packs: int,
        *,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        micro_batch_size: int = 1,
        remainder: str = "drop",
        shuffle: bool = True,
    ) -> None:
        _check_positive("num_packs", "--data-path to a non-empty packed dataset", num_packs)
        _check_positive("global_batch_size", "--global-batch-size", global_batch_size)
        _check_positive("micro_batch_size", "--micro-batch-size", micro_batch_size)
        _check_positive("dp_size", "the data-parallel size (world / (TP*PP*CP))", dp_size)
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        if not isinstance(seed, int) or not 0 <= seed <= _MASK64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r} (set --seed)")
        if remainder not in REMAINDER_MODES:
            raise ValueError(f"remainder must be one of {REMAINDER_MODES}, got {remainder!r}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"--global-batch-size {global_batch_size} is not a multiple of "
                f"--micro-batch-size {micro_batch_size} x DP {dp_size}: every DP rank must "
                "get the same number of whole micro-batches"
            )
        if global_batch_size > num_packs:
            raise ValueError(
                f"--global-batch-size {global_batch_size} packs exceeds the dataset's "
                f"{num_packs} packs: lower --global-batch-size, or pack with a smaller "
                "--pack-size"
            )
        self.num_packs = num_packs
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.remainder = remainder
        self.shuffle = shuffle
        self.epoch = 0
        """Epoch of the next step (0-based)."""
        self.position = 0
        """Packs of this epoch's order already handed out (all ranks together)."""
        self._order: np.ndarray | None = None

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per rank per step: ``G / (micro_batch_size * dp_size)``."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def steps_per_epoch(self) -> int:
        """Steps in a full epoch started at position 0 (floor for drop, ceil for wrap)."""
        if self.remainder == "drop":
            return self.num_packs // self.global_batch_size
        return -(-self.num_packs // self.global_batch_size)

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = epoch_permutation(self.num_packs, self.seed, self.epoch)
            else:
                self._order = np.arange(self.num_packs, dtype=np.int64)
        return self._order

    def global_step_packs(self) -> list[int]:
        """All DP ranks' packs of the next step, rank-major, without consuming them.

        Rank ``r``'s share is the ``r``-th contiguous block of ``G / dp_size``. When the
        current epoch has no full step left, this first moves to the next epoch.
        """
        exhausted = (
            self.position + self.global_batch_size > self.num_packs
            if self.remainder == "drop"
            else self.position >= self.num_packs
        )
        if exhausted:  # (epoch e, its end) and (epoch e + 1, 0) are the same position
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        # The modulo only matters for "wrap", where the last step borrows from the start.
        idx = (self.position + np.arange(self.global_batch_size)) % self.num_packs
        return self._epoch_order()[idx].tolist()

    def next_step(self) -> list[int]:
        """This rank's ``G / dp_size`` pack indices of the next step; advances past it."""
        packs = self.global_step_packs()
        per_rank = self.global_batch_size // self.dp_size
        self.position += self.global_batch_size
        return packs[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]

    def __iter__(self) -> DistributedPackSampler:
        return self

    def __next__(self) -> list[int]:
        return self.next_step()

    def state_dict(self) -> dict[str, Any]:
        """The position to checkpoint: JSON-able, identical on every DP rank."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_packs": self.num_packs,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`).

        The dataset size, seed and shuffle setting must match, since they define the
        order; the step shape (``G``, micro-batch size, DP size) may differ, in which case
        the rest of the epoch is cut into steps of the new size.
        """
        missing = {"epoch", "position", "seed", "num_packs"} - set(state)
        if missing:
            raise ValueError(
                f"sampler state lacks {sorted(missing)}: not a DistributedPackSampler state"
            )
        for key, mine in (
            ("num_packs", self.num_packs),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
        ):
            theirs = state.get(key, mine)
            if theirs != mine:
                raise ValueError(
                    f"checkpoint's sampler has {key}={theirs!r} but this run has {mine!r}: "
                    "resume with the same --data-path and --seed as the saved run"
                )
        epoch, position = state["epoch"], state["position"]
        bad_epoch = not isinstance(epoch, int) or epoch < 0
        if bad_epoch or not isinstance(position, int) or position < 0:
            raise ValueError(f"invalid sampler position: epoch={epoch!r} position={position!r}")
        self.epoch, self.position, self._order = epoch, position, None
