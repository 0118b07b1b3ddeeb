"""What runs inside one training step on megatron-core.

Model building (``model``), micro-batches in THD or padded form (``batch``), the
``forward_step``/``loss_func`` pair the schedules call (``forward_step``), reference
log-probs (``reference``), FP8 settings (``fp8``), the prefix-sharing core attention
(``attention``) and RoPE by position id (``rotary``), the output layer's hand-over of hidden
states to the fused log-probs (``output_layer``), the CPU layer (``cpu``) and the process
group start that survives torchrun restarts (``elastic_store``).
Importing this package is cheap: megatron-core is imported by the submodules.
"""
