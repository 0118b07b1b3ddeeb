"""Integrations with other training loops: Megatron-LM's ``pretrain()`` (``megatron_lm``, with
its data iterators in ``megatron_lm_data`` and its metrics output in ``megatron_lm_metrics``)."""
