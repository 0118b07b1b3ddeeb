#!/usr/bin/env python3
"""Check a parallel layout and estimate per-GPU memory and FLOPs before launching.

Takes the trainer's own flags (a launch script's flag list works unchanged) plus
``--model llama3-8b|llama3-70b`` or explicit shape flags and ``--vocab-size``,
``--num-gpus``, ``--gpu-memory-gib`` and ``--json``. Exit status 1 when the layout breaks
a megatron-core rule or does not fit. Example::

    python tools/plan_parallel.py --model llama3-70b --num-gpus 64 \\
        --tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 \\
        --num-layers-per-virtual-pipeline-stage 5 --sequence-parallel \\
        --use-distributed-optimizer --bf16 --fp8-format hybrid --seq-length 8192 \\
        --global-batch-size 128 --ref-logprobs refs/
"""

import sys

from adadpo_megatron.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
