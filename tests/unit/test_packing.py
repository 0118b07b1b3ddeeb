"""Tests of adadpo_megatron.packing: the C++ packer, its Python twin, and PackPlan."""

from __future__ import annotations

import itertools
import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adadpo_megatron import packing
from adadpo_megatron.packing import ALGORITHMS, PackPlan, footprints, pack_pairs

_packer = pytest.importorskip("adadpo_megatron._packer", reason="C++ extension not built")

PLAN_ARRAYS = ("pack_of_pair", "pair_order", "pack_offsets", "pack_tokens")
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_same_plan(a: PackPlan, b: PackPlan) -> None:
    for name in PLAN_ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.capacity, a.align) == (b.capacity, b.align)


def check_plan(plan: PackPlan, chosen, rejected, algorithm: str) -> None:
    """Check a plan from first principles (not through PackPlan.validate)."""
    fp = footprints(chosen, rejected, plan.align)
    n = fp.shape[0]
    for name in PLAN_ARRAYS:
        assert getattr(plan, name).dtype == np.int64
    # Each pair in exactly one pack, listed once, in the pack pack_of_pair names.
    assert sorted(plan.pair_order.tolist()) == list(range(n))
    packs = [plan.pairs_in_pack(p).tolist() for p in range(plan.num_packs)]
    assert all(packs), "empty pack"
    assert [plan.pack_of_pair[i] for i in plan.pair_order] == [
        p for p, members in enumerate(packs) for _ in members
    ]
    fill = [int(fp[members].sum()) for members in packs]
    assert fill == plan.pack_tokens.tolist()
    assert all(f <= plan.capacity for f in fill)
    # room_before[j]: the most room any pack before j has at the end (rooms only shrink).
    room_before = np.maximum.accumulate([-1] + [plan.capacity - f for f in fill])[:-1]
    # A pack is opened only for a pair that fits no earlier pack.
    assert all(fp[members[0]] > room_before[j] for j, members in enumerate(packs))
    if algorithm in ("ffd", "first_fit_shuffle"):
        # First fit: every pair of pack j was refused by each earlier pack.
        assert all(fp[members].min() > room_before[j] for j, members in enumerate(packs))
    if algorithm in ("ffd", "bfd"):
        # Placed by footprint descending, ties by pair index ascending.
        for members in packs:
            keys = [(-fp[m], m) for m in members]
            assert keys == sorted(keys)


@st.composite
def packing_inputs(draw):
    """(chosen, rejected, capacity, align): every pair fits, sizes from tiny to huge."""
    capacity = draw(
        st.one_of(
            st.integers(2, 64),
            st.integers(2, 5000),
            st.integers(70_000, 10**7),  # above the dense-path threshold: the sparse code
            st.just(2**31 + 10),  # int64 first-fit tree
        )
    )
    n = draw(st.integers(0, 120))
    mode = draw(st.sampled_from(["any", "ties", "coarse"]))
    if mode == "coarse":  # multiples of capacity / 16: exact fits and equal rooms abound
        unit = max(1, capacity // 16)
        capacity = 16 * unit
        align = draw(st.sampled_from([1, unit]))
        length = st.integers(1, 8).map(lambda k: k * unit)
    else:
        align = draw(
            st.one_of(st.just(1), st.integers(1, max(1, capacity // 8)), st.just(capacity // 2))
        )
        longest = capacity // 2 // align * align  # round_up(length) <= longest if length is
        length = st.integers(1, longest)
    if mode == "ties":  # few distinct lengths
        length = st.sampled_from(draw(st.lists(length, min_size=1, max_size=3)))
    chosen = draw(st.lists(length, min_size=n, max_size=n))
    rejected = draw(st.lists(length, min_size=n, max_size=n))
    return np.array(chosen, dtype=np.int64), np.array(rejected, dtype=np.int64), capacity, align


@HYPOTHESIS
@given(
    inputs=packing_inputs(), algorithm=st.sampled_from(ALGORITHMS), seed=st.integers(0, 2**64 - 1)
)
@example(inputs=(np.array([], np.int64), np.array([], np.int64), 8, 1), algorithm="ffd", seed=0)
@example(inputs=(np.array([4]), np.array([6]), 10, 1), algorithm="bfd", seed=0)  # exactly full
@example(inputs=(np.full(50, 3), np.full(50, 2), 10, 1), algorithm="bfd", seed=0)  # all ties
@example(inputs=(np.full(9, 1), np.full(9, 1), 2, 1), algorithm="first_fit_shuffle", seed=7)
def test_backends_give_identical_valid_plans(inputs, algorithm, seed):
    chosen, rejected, capacity, align = inputs
    plan = pack_pairs(chosen, rejected, capacity, algorithm, seed=seed, align=align)
    twin = pack_pairs(
        chosen, rejected, capacity, algorithm, seed=seed, align=align, backend="python"
    )
    assert_same_plan(plan, twin)
    check_plan(plan, chosen, rejected, algorithm)
    plan.validate(chosen, rejected)
    assert_same_plan(plan, pack_pairs(chosen, rejected, capacity, algorithm, seed, align))


@pytest.mark.parametrize("capacity", [24, 40_000, 2**31 + 10])  # int16, int32, int64 trees
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_backends_agree_on_thousands_of_packs(capacity, algorithm):
    # Thousands of packs make first-fit trees three to four levels deep.
    rng = np.random.default_rng(capacity)
    chosen, rejected = rng.integers(1, capacity // 2 + 1, (2, 5000))
    plan = pack_pairs(chosen, rejected, capacity, algorithm, seed=11)
    assert plan.num_packs > 2000
    assert_same_plan(
        plan, pack_pairs(chosen, rejected, capacity, algorithm, seed=11, backend="python")
    )
    check_plan(plan, chosen, rejected, algorithm)


def test_hand_computed_plans():
    # footprints [4, 7, 5, 5, 2, 4], capacity 10; decreasing order: 1, 2, 3, 0, 5, 4.
    chosen, rejected = [1, 3, 3, 3, 1, 3], [3, 4, 2, 2, 1, 1]
    expected = {
        # pair 4 (2) goes to the first pack with room (room 3).
        "ffd": ([2, 0, 1, 1, 0, 2], [1, 4, 2, 3, 0, 5], [0, 2, 4, 6], [9, 10, 8]),
        # pair 4 (2) goes to the tightest pack (room 2, pack 2), not pack 0 (room 3).
        "bfd": ([2, 0, 1, 1, 2, 2], [1, 2, 3, 0, 5, 4], [0, 1, 3, 6], [7, 10, 10]),
        # seed 0 order of 6 pairs: 4, 2, 5, 3, 0, 1.
        "first_fit_shuffle": (
            [2, 3, 0, 1, 0, 1],
            [4, 2, 5, 3, 0, 1],
            [0, 2, 4, 5, 6],
            [7, 9, 4, 7],
        ),
    }
    # scale 10**5: capacity 10**6 takes the sparse code paths (comparison sort, ordered set).
    for algorithm, (of_pair, order, offsets, tokens) in expected.items():
        for scale, backend in itertools.product([1, 10**5], ["cpp", "python"]):
            c, r = np.multiply(chosen, scale), np.multiply(rejected, scale)
            plan = pack_pairs(c, r, 10 * scale, algorithm, backend=backend)
            got = tuple(getattr(plan, name).tolist() for name in PLAN_ARRAYS)
            assert got == (of_pair, order, offsets, [t * scale for t in tokens]), (
                algorithm,
                scale,
                backend,
            )


@pytest.mark.parametrize("algorithm", ["ffd", "bfd"])
@pytest.mark.parametrize("scale", [1, 10**5])  # dense and sparse code paths
@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_equal_rooms_go_to_the_lowest_pack(algorithm, scale, backend):
    # 40 pairs of footprint 6 open 40 packs with room 4 each; the 40 pairs of footprint 4
    # then fill them in pack order (best fit ties go to the lowest pack id).
    rng = np.random.default_rng(6)
    is_big = rng.permutation(np.arange(80) % 2 == 0)
    chosen = np.where(is_big, 3, 2) * scale
    plan = pack_pairs(chosen, chosen, 10 * scale, algorithm, backend=backend)
    expected = np.empty(80, dtype=np.int64)
    expected[np.flatnonzero(is_big)] = np.arange(40)
    expected[np.flatnonzero(~is_big)] = np.arange(40)
    np.testing.assert_array_equal(plan.pack_of_pair, expected)


def test_align_rounds_each_sequence():
    # align 4: footprints 4 + 4 = 8 and 8 + 4 = 12, so capacity 12 needs two packs.
    plan = pack_pairs([3, 5], [2, 1], capacity=12, align=4)
    assert plan.pack_tokens.tolist() == [12, 8]
    assert footprints([3, 5], [2, 1], 4).tolist() == [8, 12]
    assert pack_pairs([3, 5], [2, 1], capacity=12).num_packs == 1


def splitmix64_first(seed: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_shuffle_is_pinned_across_machines():
    assert splitmix64_first(0) == 0xE220A8397B1DCDAF  # published SplitMix64 reference value
    # 2^64 mod 10 = 6 < first draw, so the first swap partner of index 9 is that draw mod 10.
    assert _packer.shuffled_indices(10, 0).tolist()[9] == splitmix64_first(0) % 10
    golden = {0: [6, 3, 2, 9, 8, 1, 4, 7, 0, 5], 2**64 - 1: [3, 4, 2, 7, 5, 0, 8, 1, 9, 6]}
    for seed, perm in golden.items():
        assert _packer.shuffled_indices(10, seed).tolist() == perm
        assert packing._shuffled_indices(10, seed) == perm


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 3000), seed=st.integers(0, 2**64 - 1))
def test_shuffle_bit_identical(n, seed):
    assert _packer.shuffled_indices(n, seed).tolist() == packing._shuffled_indices(n, seed)


def test_seed_changes_only_the_shuffle():
    rng = np.random.default_rng(3)
    chosen, rejected = rng.integers(1, 50, 200), rng.integers(1, 50, 200)
    for algorithm in ("ffd", "bfd"):
        assert_same_plan(
            pack_pairs(chosen, rejected, 128, algorithm, seed=1),
            pack_pairs(chosen, rejected, 128, algorithm, seed=2),
        )
    a = pack_pairs(chosen, rejected, 128, "first_fit_shuffle", seed=1)
    b = pack_pairs(chosen, rejected, 128, "first_fit_shuffle", seed=2)
    assert not np.array_equal(a.pair_order, b.pair_order)


def test_any_integer_input_gives_the_same_plan():
    rng = np.random.default_rng(4)
    chosen, rejected = rng.integers(1, 100, 300), rng.integers(1, 100, 300)
    reference = pack_pairs(chosen, rejected, 256)
    wide = np.stack([chosen, chosen])  # a strided (non-contiguous) row view below
    for c, r in [
        (chosen.tolist(), rejected.tolist()),
        (chosen.astype(np.int32), rejected.astype(np.uint16)),
        (wide[0, :], rejected.astype(np.uint64)),
        (np.repeat(chosen, 2)[::2], rejected),
    ]:
        assert_same_plan(reference, pack_pairs(c, r, np.int64(256)))


def brute_force_min_packs(sizes: list[int], capacity: int) -> int:
    best = len(sizes)
    for labels in itertools.product(range(len(sizes)), repeat=len(sizes)):
        if labels[0] != 0 or max(labels) + 1 >= best:
            continue
        fill = np.bincount(labels, weights=sizes)
        if fill.max() <= capacity:
            best = max(labels) + 1
    return best


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=6),
    capacity=st.integers(7, 14),
)
def test_packs_against_the_optimum(sizes, capacity):
    chosen = np.array(sizes)
    rejected = np.array([1] * len(sizes))
    opt = brute_force_min_packs((chosen + 1).tolist(), capacity)
    counts = {a: pack_pairs(chosen, rejected, capacity, a).num_packs for a in ALGORITHMS}
    assert all(c >= opt for c in counts.values())
    assert counts["ffd"] <= 11 / 9 * opt + 6 / 9  # Dosa (2007), tight
    assert counts["bfd"] <= 1.5 * opt  # any-fit decreasing, absolute ratio
    assert counts["first_fit_shuffle"] <= int(1.7 * opt)  # Dosa and Sgall (2013)


def test_ffd_near_the_bound_on_many_small_pairs():
    rng = np.random.default_rng(5)
    chosen, rejected = rng.integers(1, 600, 20_000), rng.integers(1, 600, 20_000)
    bound = -(-int(chosen.sum() + rejected.sum()) // 4096)
    for algorithm in ("ffd", "bfd"):
        assert pack_pairs(chosen, rejected, 4096, algorithm).num_packs <= 1.01 * bound


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chosen_lens": [1.0, 2.0]}, "chosen_lens must hold integers"),
        ({"rejected_lens": [True, False]}, "rejected_lens must hold integers"),
        ({"chosen_lens": [3, 0]}, r"chosen_lens\[1\] = 0"),
        ({"rejected_lens": [-2, 1]}, r"rejected_lens\[0\] = -2"),
        ({"chosen_lens": [1, 2, 3]}, "same shape"),
        ({"chosen_lens": [[1, 2]]}, "1-D"),
        ({"capacity": 0}, r"capacity must be in \[1, 2\^60\], got 0"),
        ({"capacity": 2**61}, "capacity must be in"),
        ({"capacity": 8.0}, "capacity must be an integer"),
        ({"align": 0}, r"align must be in \[1, 2\^60\], got 0"),
        ({"algorithm": "nfd"}, "algorithm must be one of ffd, first_fit_shuffle, bfd; got 'nfd'"),
        ({"backend": "rust"}, "backend must be one of cpp, python"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\^64\)"),
        ({"seed": 2**64}, "seed must be"),
        ({"capacity": 6}, r"^pair 1 does not fit: footprint 7 > capacity 6; raise the capacity"),
        ({"align": 6}, "pair 0 does not fit: footprint 12 > capacity 10"),
        ({"chosen_lens": [1, 2**62]}, r"pair 1 cannot fit: chosen_lens\[1\]"),
    ],
)
@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_bad_input_raises_value_error(kwargs, message, backend):
    args = {"chosen_lens": [2, 4], "rejected_lens": [2, 3], "capacity": 10, "backend": backend}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pack_pairs(**args)


def test_extension_checks_its_own_inputs():
    ok = np.array([2, 3], dtype=np.int64)
    with pytest.raises(ValueError, match="pair 1: lengths must be >= 1"):
        _packer.pack_pairs(ok, np.array([1, 0], dtype=np.int64), 10, "ffd", 0, 1)
    with pytest.raises(ValueError, match="pair 1 does not fit: footprint 8 > capacity 7"):
        _packer.pack_pairs(ok, np.array([4, 5], dtype=np.int64), 7, "bfd", 0, 1)
    with pytest.raises(ValueError, match="pair 0 does not fit: footprint 101 > capacity 10"):
        _packer.pack_pairs(ok, np.array([99, 1], dtype=np.int64), 10, "ffd", 0, 1)
    with pytest.raises(
        ValueError, match=r"pair 0 does not fit: lengths 2 \+ 2305843009213693953 >"
    ):
        _packer.pack_pairs(ok, np.array([2**61 + 1, 1], dtype=np.int64), 10, "ffd", 0, 1)
    with pytest.raises(ValueError, match="unknown packing algorithm 'x'"):
        _packer.pack_pairs(ok, ok, 10, "x", 0, 1)
    with pytest.raises(ValueError, match="capacity must be in"):
        _packer.pack_pairs(ok, ok, 0, "ffd", 0, 1)
    with pytest.raises(ValueError, match="equal length"):
        _packer.pack_pairs(ok, ok[:1], 10, "ffd", 0, 1)


def test_plan_helpers():
    plan = pack_pairs([5, 4, 3], [3, 4, 1], capacity=10)
    assert (plan.num_pairs, plan.num_packs) == (3, 3)
    assert plan.pairs_in_pack(2).tolist() == [2]
    assert plan.pairs_per_pack().tolist() == [1, 1, 1]
    assert plan.efficiency() == pytest.approx(20 / 30)
    assert plan.efficiency(real_tokens=10) == pytest.approx(10 / 30)
    with pytest.raises(IndexError):
        plan.pairs_in_pack(3)
    empty = pack_pairs([], [], capacity=10)
    assert (empty.num_pairs, empty.num_packs, empty.efficiency()) == (0, 0, 1.0)
    assert empty.pack_offsets.tolist() == [0]
    empty.validate([], [])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("pair_order", [0, 0, 2], "not a permutation"),
        ("pack_of_pair", [0, 0, 2], "disagrees"),
        ("pack_offsets", [0, 1, 1, 3], "rise strictly"),
        ("pack_tokens", [8, 11, 4], "pack 1 holds 11 tokens > capacity 10"),
        ("pack_tokens", [8, 7, 4], "not the sum"),
        ("pack_tokens", [8.0, 8.0, 4.0], "1-D int64"),
    ],
)
def test_validate_catches_corrupt_plans(field, value, message):
    plan = pack_pairs([5, 4, 3], [3, 4, 1], capacity=10)
    plan.validate([5, 4, 3], [3, 4, 1])
    fields = {name: getattr(plan, name) for name in PLAN_ARRAYS}
    fields[field] = np.array(value, dtype=np.float64 if "1-D" in message else np.int64)
    broken = PackPlan(**fields, capacity=10)
    with pytest.raises(ValueError, match=message):
        broken.validate([5, 4, 3], [3, 4, 1])


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    chosen, rejected = [5, 4, 3], [3, 4, 1]
    expected = pack_pairs(chosen, rejected, 10, backend="python")
    monkeypatch.setitem(sys.modules, "adadpo_megatron._packer", None)  # import now fails
    monkeypatch.delattr(sys.modules["adadpo_megatron"], "_packer", raising=False)
    packing._extension.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert_same_plan(expected, pack_pairs(chosen, rejected, 10))
        assert [type(w.message) for w in caught] == [RuntimeWarning]
        assert "falls back to the much slower pure-Python twin" in str(caught[0].message)
    finally:
        packing._extension.cache_clear()
