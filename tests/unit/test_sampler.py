"""The DP-sharded, resumable pack sampler: coverage, determinism, resume, errors."""

from collections import Counter

import numpy as np
import pytest

from adadpo_megatron.data.sampler import DistributedPackSampler, epoch_permutation


def _samplers(num_packs, dp_size, **kw):
    return [
        DistributedPackSampler(num_packs, dp_rank=r, dp_size=dp_size, **kw) for r in range(dp_size)
    ]


def _epoch_packs(num_packs, dp_size, gbs, remainder="drop", seed=7):
    """Packs each rank gets in epoch 0 (a list per rank); checks the per-step shapes."""
    samplers = _samplers(num_packs, dp_size, global_batch_size=gbs, seed=seed, remainder=remainder)
    seen = [[] for _ in range(dp_size)]
    for _ in range(samplers[0].steps_per_epoch()):
        global_packs = samplers[0].global_step_packs()
        steps = [s.next_step() for s in samplers]
        assert all(s.epoch == 0 for s in samplers)
        assert all(len(ids) == gbs // dp_size for ids in steps)
        assert [p for ids in steps for p in ids] == global_packs
        for r, ids in enumerate(steps):
            seen[r] += ids
    samplers[0].next_step()
    assert samplers[0].epoch == 1  # the epoch is over after steps_per_epoch() steps
    return seen


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("num_packs", [48, 53])
def test_each_pack_once_per_epoch_drop(dp_size, num_packs):
    gbs = 12
    seen = _epoch_packs(num_packs, dp_size, gbs)
    flat = [p for rank in seen for p in rank]
    assert max(Counter(flat).values()) == 1, "a pack was seen twice in one epoch"
    assert len(flat) == (num_packs // gbs) * gbs, "only the remainder may be dropped"
    assert len(set(range(num_packs)) - set(flat)) == num_packs % gbs
    for a in range(dp_size):
        for b in range(a + 1, dp_size):
            assert not set(seen[a]) & set(seen[b]), "two ranks share a pack"


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_wrap_covers_every_pack_and_repeats_only_the_fill(dp_size):
    num_packs, gbs = 53, 12
    flat = [p for rank in _epoch_packs(num_packs, dp_size, gbs, "wrap") for p in rank]
    counts = Counter(flat)
    assert set(counts) == set(range(num_packs))
    assert sum(c - 1 for c in counts.values()) == (-num_packs) % gbs
    assert max(counts.values()) <= 2


def test_dropped_packs_differ_between_epochs():
    s = DistributedPackSampler(53, global_batch_size=8, dp_rank=0, dp_size=1, seed=3)
    per_epoch = {}
    for _ in range(3 * s.steps_per_epoch()):
        ids = s.next_step()
        per_epoch.setdefault(s.epoch, set()).update(ids)
    assert sorted(per_epoch) == [0, 1, 2]
    dropped = {frozenset(range(53)) - packs for packs in per_epoch.values()}
    assert len(dropped) == 3


def test_deterministic_and_seed_dependent():
    def first_steps(seed):
        s = DistributedPackSampler(100, global_batch_size=4, dp_rank=1, dp_size=2, seed=seed)
        return [next(s) for _ in range(30)]

    assert first_steps(5) == first_steps(5)
    assert first_steps(5) != first_steps(6)
    perm = epoch_permutation(1000, seed=5, epoch=0)
    assert perm.dtype == np.int64
    assert sorted(perm.tolist()) == list(range(1000))
    assert not np.array_equal(perm, epoch_permutation(1000, seed=5, epoch=1))
    # Pinned values: the order must not change across machines or numpy versions.
    assert epoch_permutation(10, seed=0, epoch=0).tolist() == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
    unshuffled = DistributedPackSampler(
        8, global_batch_size=4, dp_rank=0, dp_size=1, seed=0, shuffle=False
    )
    assert [next(unshuffled) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3]]


def _splitmix64_py(x):
    m = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (123, 4), (2**64 - 1, 9)])
def test_permutation_matches_pure_python_oracle(seed, epoch):
    key = _splitmix64_py(_splitmix64_py(seed) ^ epoch)
    expected = sorted(range(300), key=lambda i: (_splitmix64_py(i ^ key), i))
    assert epoch_permutation(300, seed=seed, epoch=epoch).tolist() == expected


def test_global_step_independent_of_dp_split():
    one = DistributedPackSampler(96, global_batch_size=16, dp_rank=0, dp_size=1, seed=1)
    four = _samplers(96, 4, global_batch_size=16, micro_batch_size=2, seed=1)
    for _ in range(10):
        assert [p for s in four for p in s.next_step()] == one.next_step()


@pytest.mark.parametrize("remainder", ["drop", "wrap"])
@pytest.mark.parametrize("stop_at", [1, 3, 4, 7, 15])
def test_resume_equals_uninterrupted(remainder, stop_at):
    kw = dict(global_batch_size=8, dp_rank=1, dp_size=2, seed=11, remainder=remainder)
    full = DistributedPackSampler(29, **kw)  # 3 (drop) or 4 (wrap) steps an epoch
    expected = [next(full) for _ in range(20)]
    first = DistributedPackSampler(29, **kw)
    got = [next(first) for _ in range(stop_at)]
    state = first.state_dict()
    resumed = DistributedPackSampler(29, **kw)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(20 - stop_at)]
    assert got == expected


def test_resume_with_other_dp_split_keeps_global_order():
    a = DistributedPackSampler(64, global_batch_size=8, dp_rank=0, dp_size=1, seed=2)
    expected = [next(a) for _ in range(12)]
    b = DistributedPackSampler(64, global_batch_size=8, dp_rank=0, dp_size=1, seed=2)
    got = [next(b) for _ in range(5)]
    halves = _samplers(64, 2, global_batch_size=8, seed=2)
    for s in halves:
        s.load_state_dict(b.state_dict())
    got += [next(halves[0]) + next(halves[1]) for _ in range(7)]
    assert got == expected


def test_state_dict_refuses_another_dataset_or_seed():
    s = DistributedPackSampler(40, global_batch_size=4, dp_rank=0, dp_size=1, seed=4)
    next(s)
    with pytest.raises(ValueError, match="num_packs=40"):
        DistributedPackSampler(
            41, global_batch_size=4, dp_rank=0, dp_size=1, seed=4
        ).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="--seed"):
        DistributedPackSampler(
            40, global_batch_size=4, dp_rank=0, dp_size=1, seed=5
        ).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        s.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="invalid sampler position"):
        s.load_state_dict({**s.state_dict(), "position": -4})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_packs=0), "num_packs"),
        (dict(global_batch_size=0), "--global-batch-size"),
        (dict(micro_batch_size=0), "--micro-batch-size"),
        (dict(micro_batch_size=2.0), "--micro-batch-size"),
        (dict(dp_size=0), "data-parallel"),
        (dict(dp_rank=2), "dp_rank"),
        (dict(dp_rank=-1), "dp_rank"),
        (dict(seed=-1), "--seed"),
        (dict(seed=2**64), "--seed"),
        (dict(remainder="pad"), "remainder"),
        (dict(global_batch_size=6, micro_batch_size=2), "not a multiple"),
        (dict(num_packs=7), "exceeds the dataset's 7 packs"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(num_packs=16, global_batch_size=8, micro_batch_size=1, dp_rank=0, dp_size=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DistributedPackSampler(args.pop("num_packs"), **args)


def test_num_microbatches():
    s = DistributedPackSampler(
        64, global_batch_size=24, micro_batch_size=3, dp_rank=0, dp_size=2, seed=0
    )
    assert s.num_microbatches == 4
    assert len(s.next_step()) == 12
