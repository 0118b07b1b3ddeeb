"""The default process group under torchrun, safe across elastic restarts.

With ``torchrun --max-restarts N`` the restarted workers find the rendezvous store of
the failed attempt still holding its keys (torch 2.13, static and c10d rendezvous): gloo
and NCCL then read the dead workers' addresses and the new attempt cannot connect
("Connection refused" in ``connectFullMesh``, or a hang). Prefixing every key with the
attempt number (``TORCHELASTIC_RESTART_COUNT``, set by torchrun) gives each attempt a
clean namespace in the same store. Outside torchrun's elastic agent this is plain
``env://``.
"""

from __future__ import annotations

import datetime
import os

import torch

__all__ = ["init_process_group_elastic"]


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
    store = torch.distributed.PrefixStore(f"adadpo/attempt_{attempt}", store)
    torch.distributed.init_process_group(backend=backend, store=store, rank=rank,
                                         world_size=world, timeout=timeout)
