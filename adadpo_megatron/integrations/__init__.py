"""Integrations with other training loops: Megatron-LM's ``pretrain()`` (``megatron_lm``)."""
