"""The trainer around the step: flags and config, optimizer, the loop, checkpoints, metrics.

``adadpo_megatron.train`` (``adadpo-train``) is its entry point.
"""
