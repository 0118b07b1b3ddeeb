"""Parallel-layout planner: memory and FLOPs of a run (``estimate``), its command line (``cli``)."""
