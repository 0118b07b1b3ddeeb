#!/usr/bin/env python3
"""Pack preference JSONL into a packed dataset directory (same as the ``adadpo-pack`` command).

Run ``python tools/pack_pairs.py --help`` for the flags; the implementation is
:mod:`adadpo_megatron.data.pack_tool`.
"""

import sys

from adadpo_megatron.data.pack_tool import main

if __name__ == "__main__":
    sys.exit(main())
