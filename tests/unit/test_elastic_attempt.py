"""The elastic attempt number comes from the store, so every node agrees on it even when
their agents' restart counts differ (step/elastic_store.py)."""

from __future__ import annotations

import datetime
import threading
import time

import torch

from adadpo_megatron.step.elastic_store import agreed_attempt


def _store():
    return torch.distributed.TCPStore("127.0.0.1", 0, is_master=True,
                                      timeout=datetime.timedelta(seconds=30),
                                      wait_for_workers=False)


def _attempt(store, world: int, order: list[int], delay: float = 0.0) -> dict[int, int]:
    """Start the ranks in ``order`` (``delay`` s apart); their agreed attempts."""
    out: dict[int, int] = {}

    def rank_main(rank: int) -> None:  # each rank its own connection, as each process has
        client = torch.distributed.TCPStore("127.0.0.1", store.port, is_master=False,
                                            timeout=datetime.timedelta(seconds=30))
        out[rank] = agreed_attempt(client, rank, world, timeout=20)

    threads = []
    for rank in order:
        t = threading.Thread(target=rank_main, args=(rank,))
        t.start()
        threads.append(t)
        time.sleep(delay)
    for t in threads:
        t.join(timeout=30)
    return out


def test_every_rank_agrees_across_attempts_whatever_the_start_order() -> None:
    store = _store()
    assert _attempt(store, 3, [0, 1, 2]) == {0: 1, 1: 1, 2: 1}
    # Attempt 2: ranks 1 and 2 start first and see attempt 1's (stale) generation, as a
    # node whose agent did not restart would; rank 0 comes later.
    assert _attempt(store, 3, [2, 1, 0], delay=0.3) == {0: 2, 1: 2, 2: 2}
    assert _attempt(store, 3, [1, 0, 2], delay=0.1) == {0: 3, 1: 3, 2: 3}


def test_a_rank_of_a_half_dead_attempt_does_not_block_the_next() -> None:
    store = _store()
    assert _attempt(store, 2, [0, 1]) == {0: 1, 1: 1}
    # Rank 0 opens generation 2 and dies before rank 1 joins (its node failed at start):
    store.add("adadpo/elastic/generation", 1)
    store.set("adadpo/elastic/latest", "2")
    assert _attempt(store, 2, [1, 0], delay=0.3) == {0: 3, 1: 3}
