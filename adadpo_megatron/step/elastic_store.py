"""The default process group under torchrun, safe across elastic restarts.

With ``torchrun --max-restarts N`` the restarted workers find the rendezvous store of
the failed attempt still holding its keys (torch 2.13, static and c10d rendezvous): gloo
and NCCL then read the dead workers' addresses and the new attempt cannot connect
("Connection refused" in ``connectFullMesh``, or a hang). Prefixing every key with the
attempt number (``TORCHELASTIC_RESTART_COUNT``, set by torchrun) gives each attempt a
clean namespace in the same store. Outside torchrun's elastic agent this is plain
``env://``.

The attempt number must be the same on every node, and ``TORCHELASTIC_RESTART_COUNT`` is
not: it counts the restarts of *this node's* agent (the node whose worker failed
restarts with count + 1, the others rejoin with their old count). :func:`agreed_attempt`
takes it from the store instead: global rank 0 opens generation ``g`` (an atomic
``store.add``), every other rank registers a fresh nonce in the newest generation it
sees, and rank 0 seals ``g`` by echoing each rank's nonce. A rank that read a stale
generation (the previous attempt's) never sees its nonce sealed there and moves on to
the newer one.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid

import torch

__all__ = ["agreed_attempt", "init_process_group_elastic"]

_KEY = "adadpo/elastic"


def agreed_attempt(store, rank: int, world: int, timeout: float = 600.0) -> int:
    """The job's attempt number, the same on every rank of every node (collective).

    Args:
        store: the job's key-value store (torchrun's agent store), shared by all attempts.
        rank, world: this process's global rank and the world size.
        timeout: seconds to wait for the other ranks.
    """
    deadline = time.monotonic() + timeout
    if rank == 0:
        gen = int(store.add(f"{_KEY}/generation", 1))
        store.set(f"{_KEY}/latest", str(gen))
        for r in range(1, world):
            key = f"{_KEY}/{gen}/join/{r}"
            store.wait([key], datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())))
            store.set(f"{_KEY}/{gen}/sealed/{r}", store.get(key))
        return gen
    nonce = uuid.uuid4().hex.encode()
    joined = None
    while time.monotonic() < deadline:
        if store.check([f"{_KEY}/latest"]):
            gen = int(store.get(f"{_KEY}/latest"))
            if gen != joined:
                store.set(f"{_KEY}/{gen}/join/{rank}", nonce)
                joined = gen
            sealed = f"{_KEY}/{gen}/sealed/{rank}"
            if store.check([sealed]) and store.get(sealed) == nonce:
                return gen
        time.sleep(0.02)
    raise TimeoutError(f"rank {rank}: global rank 0 did not open this attempt in {timeout:g} s")


def init_process_group_elastic(backend: str, timeout: datetime.timedelta | None = None) -> None:
    """``torch.distributed.init_process_group(backend)`` from torchrun's environment.

    Args:
        backend: ``"gloo"`` or ``"nccl"``.
        timeout: collective timeout (None: torch's default for the backend).

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and, under torchrun,
    ``TORCHELASTIC_RESTART_COUNT`` and ``TORCHELASTIC_USE_AGENT_STORE``.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=not agent_store and rank == 0,
        timeout=timeout or datetime.timedelta(minutes=10), multi_tenant=True)
    # The attempt as every node agrees on it (the local restart count may differ).
    attempt = agreed_attempt(store, rank, world,
                             timeout=(timeout or datetime.timedelta(minutes=10)).total_seconds())
    os.environ["ADADPO_ELASTIC_ATTEMPT"] = str(attempt)  # for one-line-per-job reports
    store = torch.distributed.PrefixStore(f"adadpo/attempt_{attempt}", store)
    torch.distributed.init_process_group(backend=backend, store=store, rank=rank,
                                         world_size=world, timeout=timeout)
