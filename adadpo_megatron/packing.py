"""Pair packing: place (chosen, rejected) pairs into fixed-capacity packs, never splitting a pair.

The work is done by the C++ extension ``adadpo_megatron._packer`` (``cpp/``), which packs a
million pairs in well under a second with the GIL released. This module validates inputs,
calls it, and holds a pure-Python twin of each algorithm (``backend="python"``) that yields
the identical plan: it is the fallback when the extension is not built and the oracle in tests.

Rules shared by both backends (change them in both, ``cpp/packer.cpp`` and here):

* footprint of pair ``i`` = ``round_up(chosen[i], align) + round_up(rejected[i], align)``;
* ``ffd`` / ``bfd`` place pairs by footprint descending, ties by pair index ascending;
  ``first_fit_shuffle`` places them in a Fisher-Yates order driven by SplitMix64(seed);
* first fit: the lowest-numbered pack with room; best fit: the pack with the least room that
  still fits, ties to the lowest pack id; a new pack opens when none fits, and pack ids count
  up in order of opening;
* ``pair_order`` lists pairs pack by pack, inside a pack in the order they were placed.

Example::

    >>> plan = pack_pairs([5, 4, 3], [3, 4, 1], capacity=10)
    >>> plan.pack_of_pair.tolist(), plan.pack_tokens.tolist()
    ([0, 1, 2], [8, 8, 4])
"""

from __future__ import annotations

import bisect
import functools
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["ALGORITHMS", "BACKENDS", "PackPlan", "footprints", "pack_pairs"]

ALGORITHMS: tuple[str, ...] = ("ffd", "first_fit_shuffle", "bfd")
"""Valid ``algorithm`` names of :func:`pack_pairs`."""
BACKENDS: tuple[str, ...] = ("cpp", "python")
"""Valid ``backend`` names of :func:`pack_pairs`."""

_MAX_CAPACITY = 1 << 60  # same bound as cpp/packer.cpp: round-ups and sums stay inside int64
_MASK64 = (1 << 64) - 1
_FIT_HINT = "raise the capacity (--pack-size) or truncate the pair (--max-seq-len)"


@dataclass(frozen=True, kw_only=True)
class PackPlan:
    """Where each pair goes. All arrays are int64 numpy arrays; N pairs, P packs.

    Pack ``p`` holds the pairs ``pair_order[pack_offsets[p]:pack_offsets[p + 1]]``, in that
    order; in the packed sequence each pair is its chosen then its rejected segment.
    """

    pack_of_pair: np.ndarray
    """[N] pack id of each pair."""
    pair_order: np.ndarray
    """[N] pair ids grouped by pack (pack 0 first), in placement order within a pack."""
    pack_offsets: np.ndarray
    """[P+1] offsets into ``pair_order``; ``pack_offsets[0] == 0``, ``[-1] == N``."""
    pack_tokens: np.ndarray
    """[P] padded fill of each pack: the sum of its pairs' footprints (<= capacity)."""
    capacity: int
    """Token slots per pack the plan was made for."""
    align: int = 1
    """Each sequence's length was rounded up to a multiple of this in the footprint."""

    @property
    def num_pairs(self) -> int:
        """N, the number of pairs."""
        return int(self.pack_of_pair.shape[0])

    @property
    def num_packs(self) -> int:
        """P, the number of packs."""
        return int(self.pack_tokens.shape[0])

    def pairs_in_pack(self, pack: int) -> np.ndarray:
        """Pair ids in pack ``pack`` (int64 view into ``pair_order``), in layout order."""
        if not 0 <= pack < self.num_packs:
            raise IndexError(f"pack {pack} out of range [0, {self.num_packs})")
        return self.pair_order[self.pack_offsets[pack] : self.pack_offsets[pack + 1]]

    def pairs_per_pack(self) -> np.ndarray:
        """[P] int64: the number of pairs in each pack."""
        return np.diff(self.pack_offsets)

    def efficiency(self, real_tokens: int | None = None) -> float:
        """Fraction of the ``P * capacity`` slots holding tokens (1.0 for an empty plan).

        ``real_tokens`` is the total unpadded length (``sum(chosen) + sum(rejected)``); without
        it the padded fill ``sum(pack_tokens)`` is used, which equals it when ``align == 1``.
        """
        slots = self.num_packs * self.capacity
        if slots == 0:
            return 1.0
        used = int(self.pack_tokens.sum()) if real_tokens is None else int(real_tokens)
        return used / slots

    def validate(self, chosen_lens: Any = None, rejected_lens: Any = None) -> None:
        """Check the plan's invariants; raise ``ValueError`` naming the first one broken.

        Always checked: dtypes and shapes, every pair in exactly one pack, ``pair_order``
        consistent with ``pack_of_pair`` and ``pack_offsets``, no empty pack, no pack over
        ``capacity``. With the lengths given, also that each ``pack_tokens[p]`` is the sum
        of its pairs' footprints.
        """
        arrays = {name: getattr(self, name) for name in _PLAN_ARRAYS}
        for name, arr in arrays.items():
            if not isinstance(arr, np.ndarray) or arr.dtype != np.int64 or arr.ndim != 1:
                raise ValueError(f"PackPlan.{name} must be a 1-D int64 numpy array")
        n, p = self.num_pairs, self.num_packs
        if self.pair_order.shape[0] != n or self.pack_offsets.shape[0] != p + 1:
            raise ValueError(
                f"PackPlan shapes disagree: pack_of_pair [{n}], pair_order "
                f"[{self.pair_order.shape[0]}], pack_offsets [{self.pack_offsets.shape[0]}], "
                f"pack_tokens [{p}] (want [N], [N], [P+1], [P])"
            )
        if n and not np.array_equal(np.sort(self.pair_order), np.arange(n)):
            raise ValueError("PackPlan.pair_order is not a permutation of range(N)")
        counts = self.pairs_per_pack()
        if self.pack_offsets[0] != 0 or self.pack_offsets[-1] != n or (counts < 1).any():
            raise ValueError("PackPlan.pack_offsets must rise strictly from 0 to N")
        if not np.array_equal(self.pack_of_pair[self.pair_order], np.repeat(np.arange(p), counts)):
            raise ValueError("PackPlan.pack_of_pair disagrees with pair_order/pack_offsets")
        if p and int(self.pack_tokens.max()) > self.capacity:
            worst = int(np.argmax(self.pack_tokens))
            raise ValueError(
                f"pack {worst} holds {int(self.pack_tokens[worst])} tokens > capacity "
                f"{self.capacity}"
            )
        if chosen_lens is not None or rejected_lens is not None:
            fp = footprints(chosen_lens, rejected_lens, self.align)
            if fp.shape[0] != n:
                raise ValueError(f"lengths give {fp.shape[0]} pairs, the plan has {n}")
            fill = np.bincount(self.pack_of_pair, weights=fp, minlength=p).astype(np.int64)
            if not np.array_equal(fill, self.pack_tokens):
                raise ValueError("PackPlan.pack_tokens is not the sum of each pack's footprints")


_PLAN_ARRAYS = ("pack_of_pair", "pair_order", "pack_offsets", "pack_tokens")


def _as_lengths(values: Any, name: str) -> np.ndarray:
    """Validate a 1-D array of positive integers; return it unchanged (any int dtype)."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of lengths, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(
            f"{name} must hold integers (token counts), got dtype {arr.dtype}; "
            "cast with .astype(np.int64) if the values are whole numbers"
        )
    if arr.min() < 1:
        i = int(np.argmax(arr < 1))
        raise ValueError(f"{name}[{i}] = {int(arr[i])}: every length must be >= 1")
    return arr


def _as_positive_int(value: Any, name: str, upper: int = _MAX_CAPACITY) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 1 <= int(value) <= upper:
        raise ValueError(f"{name} must be in [1, 2^60], got {int(value)}")
    return int(value)


def _checked_lengths(chosen_lens: Any, rejected_lens: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both length arrays validated and converted to int64 [N]."""
    chosen = _as_lengths(chosen_lens, "chosen_lens")
    rejected = _as_lengths(rejected_lens, "rejected_lens")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen_lens and rejected_lens must have the same shape, got {chosen.shape} "
            f"and {rejected.shape}"
        )
    for arr, name in ((chosen, "chosen_lens"), (rejected, "rejected_lens")):
        if arr.size and int(arr.max()) > _MAX_CAPACITY:
            i = int(np.argmax(arr))
            raise ValueError(f"pair {i} cannot fit: {name}[{i}] = {int(arr[i])} > 2^60")
    return np.ascontiguousarray(chosen, np.int64), np.ascontiguousarray(rejected, np.int64)


def footprints(chosen_lens: Any, rejected_lens: Any, align: int = 1) -> np.ndarray:
    """[N] int64 slots each pair takes: both lengths rounded up to ``align``, summed.

    Lengths must be positive integers no larger than 2^60 (larger ones fit no pack).
    """
    chosen, rejected = _checked_lengths(chosen_lens, rejected_lens)
    return _footprints(chosen, rejected, _as_positive_int(align, "align"))


def _footprints(chosen: np.ndarray, rejected: np.ndarray, align: int) -> np.ndarray:
    if align == 1:  # skip two integer divisions over N in the common case
        return chosen + rejected
    return (chosen + align - 1) // align * align + (rejected + align - 1) // align * align


def _shuffled_indices(n: int, seed: int) -> list[int]:
    """Fisher-Yates permutation of range(n) by SplitMix64(seed); mirrors cpp ShuffledIndices."""
    order = list(range(n))
    state = seed
    for i in range(n - 1, 0, -1):
        bound = i + 1
        threshold = (1 << 64) % bound  # rejection below it removes the modulo bias
        while True:
            state = (state + 0x9E3779B97F4A7C15) & _MASK64
            z = state
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
            z ^= z >> 31
            if z >= threshold:
                break
        j = z % bound
        order[i], order[j] = order[j], order[i]
    return order


def _first_fit(sizes: list[int], capacity: int) -> list[int]:
    """Pack of each item of ``sizes`` (in the given order) by first fit: max segment tree.

    Leaves not yet opened hold a full ``capacity``, so the leftmost leaf with room is an open
    pack or the next to open. First fit leaves at most one pack at most half full, so it opens
    at most ``2 * total // capacity + 1`` packs (and at most N): that many leaves suffice.
    """
    max_packs = min(len(sizes), 2 * sum(sizes) // capacity + 1)
    leaves = 1
    while leaves < max_packs:
        leaves <<= 1
    room = [capacity] * (2 * leaves)
    packs = [0] * len(sizes)
    for step, f in enumerate(sizes):
        node = 1
        while node < leaves:
            node <<= 1
            if room[node] < f:
                node += 1
        packs[step] = node - leaves
        room[node] -= f
        node >>= 1
        while node:
            left = room[2 * node]
            right = room[2 * node + 1]
            best = left if left > right else right
            if room[node] == best:  # rooms only shrink: nothing above changes
                break
            room[node] = best
            node >>= 1
    return packs


class _SortedInts:
    """A sorted multiset of ints as a list of sorted chunks (the design of sortedcontainers).

    ``add`` and ``pop_ceiling`` cost a bisect over chunk maxima plus a list move of at most
    ``2 * load`` items, fast in CPython where a balanced tree of Python objects is not.
    """

    def __init__(self, load: int = 256) -> None:
        self._load = load
        self._chunks: list[list[int]] = []
        self._maxes: list[int] = []

    def add(self, x: int) -> None:
        if not self._maxes:
            self._chunks.append([x])
            self._maxes.append(x)
            return
        i = bisect.bisect_left(self._maxes, x)
        if i == len(self._maxes):
            i -= 1
            chunk = self._chunks[i]
            chunk.append(x)
            self._maxes[i] = x
        else:
            chunk = self._chunks[i]
            bisect.insort(chunk, x)
        if len(chunk) > 2 * self._load:
            self._chunks[i : i + 1] = [chunk[: self._load], chunk[self._load :]]
            self._maxes[i : i + 1] = [chunk[self._load - 1], chunk[-1]]

    def pop_ceiling(self, x: int) -> int | None:
        """Remove and return the smallest element >= x, or None if there is none."""
        i = bisect.bisect_left(self._maxes, x)
        if i == len(self._maxes):
            return None
        chunk = self._chunks[i]
        value = chunk.pop(bisect.bisect_left(chunk, x))
        if not chunk:
            del self._chunks[i]
            del self._maxes[i]
        elif value == self._maxes[i]:
            self._maxes[i] = chunk[-1]
        return value


def _best_fit(sizes: list[int], capacity: int) -> list[int]:
    """Pack of each item by best fit; (room, pack) keys encoded as ``room * stride + pack``."""
    stride = max(len(sizes), 1)  # pack ids < N, so the encoding keeps (room, pack) order
    min_size = min(sizes, default=0)
    open_packs = _SortedInts()
    packs = [0] * len(sizes)
    num_packs = 0
    for step, f in enumerate(sizes):
        key = open_packs.pop_ceiling(f * stride)
        if key is None:
            pack, room = num_packs, capacity - f
            num_packs += 1
        else:
            room, pack = divmod(key, stride)
            room -= f
        if room >= min_size:  # a pack with less room can never be chosen again
            open_packs.add(room * stride + pack)
        packs[step] = pack
    return packs


def _pack_python(
    fp: np.ndarray, capacity: int, algorithm: str, seed: int
) -> tuple[np.ndarray, ...]:
    n = fp.shape[0]
    if algorithm == "first_fit_shuffle":
        order = np.asarray(_shuffled_indices(n, seed), dtype=np.int64)
    else:
        order = np.argsort(-fp, kind="stable").astype(np.int64)
    sizes = fp[order].tolist()
    fit = _best_fit if algorithm == "bfd" else _first_fit
    pack_of_step = np.asarray(fit(sizes, capacity), dtype=np.int64)
    num_packs = int(pack_of_step.max()) + 1 if n else 0
    pack_of_pair = np.empty(n, dtype=np.int64)
    pack_of_pair[order] = pack_of_step
    pair_order = order[np.argsort(pack_of_step, kind="stable")]
    counts = np.bincount(pack_of_step, minlength=num_packs)
    pack_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    pack_tokens = np.bincount(pack_of_step, weights=fp[order], minlength=num_packs)
    return pack_of_pair, pair_order, pack_offsets, pack_tokens.astype(np.int64)


@functools.cache
def _extension() -> ModuleType | None:
    """The compiled packer, or None after one warning if it cannot be imported."""
    try:
        from adadpo_megatron import _packer
    except ImportError as exc:
        warnings.warn(
            f"adadpo_megatron._packer is not built ({exc}); packing falls back to the much "
            "slower pure-Python twin. Build it with `pip install -e .` or "
            "`python setup.py build_ext --inplace`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return _packer


def pack_pairs(
    chosen_lens: Any,
    rejected_lens: Any,
    capacity: int,
    algorithm: str = "ffd",
    seed: int = 0,
    align: int = 1,
    backend: str = "cpp",
) -> PackPlan:
    """Pack N preference pairs into packs of ``capacity`` token slots, never splitting a pair.

    Args:
        chosen_lens: integer array-like [N], full length (prompt + completion) of each chosen
            sequence; every value >= 1.
        rejected_lens: integer array-like [N], the same for each rejected sequence.
        capacity: token slots per pack, >= 1.
        algorithm: ``"ffd"`` (first-fit decreasing), ``"first_fit_shuffle"`` (first fit in a
            seeded random order) or ``"bfd"`` (best-fit decreasing).
        seed: integer in [0, 2^64), used by ``first_fit_shuffle`` only.
        align: each sequence is rounded up to a multiple of this in the footprint (e.g. the
            segment padding multiple 2*CP), >= 1.
        backend: ``"cpp"`` (the extension; falls back to ``"python"`` with one warning if it
            is not built) or ``"python"`` (the pure-Python twin, identical plan).

    Returns:
        A :class:`PackPlan` (int64 arrays). Deterministic: same inputs, same plan, on every
        machine and with both backends.

    Raises:
        ValueError: bad argument (named in the message) or a pair whose footprint exceeds
            ``capacity`` (its index and footprint are named).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    capacity = _as_positive_int(capacity, "capacity")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    align = _as_positive_int(align, "align")
    chosen, rejected = _checked_lengths(chosen_lens, rejected_lens)
    module = _extension() if backend == "cpp" else None
    if module is not None:
        try:  # the extension checks the fit itself, in the same words as below
            arrays = module.pack_pairs(chosen, rejected, capacity, algorithm, int(seed), align)
        except ValueError as exc:  # after the checks above: a pair that does not fit
            raise ValueError(f"{exc}; {_FIT_HINT}") from None
    else:
        fp = _footprints(chosen, rejected, align)
        if fp.size and int(fp.max()) > capacity:
            i = int(np.argmax(fp > capacity))
            raise ValueError(
                f"pair {i} does not fit: footprint {int(fp[i])} > capacity {capacity}; {_FIT_HINT}"
            )
        arrays = _pack_python(fp, capacity, algorithm, int(seed))
    fields = dict(zip(_PLAN_ARRAYS, arrays, strict=True))
    return PackPlan(**fields, capacity=capacity, align=align)
