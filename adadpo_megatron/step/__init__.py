"""What runs inside one training step on megatron-core.

Model building (``model``), micro-batches in THD or padded form (``batch``), the
``forward_step``/``loss_func`` pair the schedules call (``forward_step``), reference
log-probs (``reference``), FP8 settings (``fp8``) and the CPU layer (``cpu``).
Importing this package is cheap: megatron-core is imported by the submodules.
"""
