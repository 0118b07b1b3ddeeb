"""``adadpo-train`` with one injected fault, for tests/distributed/test_faults.py.

Environment (all optional; without any this is plain ``python -m adadpo_megatron.train``):

* ``ADADPO_FAULT_ENOSPC=STEP:RANK``: on global rank RANK, megatron-core's checkpoint
  writer fails to open its shard file of checkpoint STEP with ``OSError(ENOSPC)`` (what a
  full disk does), inside the collective save as a real full disk would.
* ``ADADPO_FAULT_RANK_ERROR=RANK``: global rank RANK alone fails its start-up with a
  ConfigError naming itself (an error the other ranks do not see).
"""

from __future__ import annotations

import errno
import os
import sys


def _inject_enospc(spec: str) -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    step, rank = (int(x) for x in spec.split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return

    def failing_open(file_name, *args, **kwargs):
        if f"iter_{step:07d}" in str(file_name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file_name))
        return open(file_name, *args, **kwargs)

    fa.open = failing_open  # the module's own name for the built-in open


def _inject_rank_error(rank: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    import adadpo_megatron.train as train
    from adadpo_megatron.trainer.config import ConfigError

    real = train.init_distributed

    def init_distributed(cfg):
        real(cfg)
        raise ConfigError(f"only rank {rank} sees this")

    train.init_distributed = init_distributed


def main() -> int:
    if spec := os.environ.get("ADADPO_FAULT_ENOSPC"):
        _inject_enospc(spec)
    if rank := os.environ.get("ADADPO_FAULT_RANK_ERROR"):
        _inject_rank_error(int(rank))
    from adadpo_megatron.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
