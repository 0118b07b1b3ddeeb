"""adadpo-megatron: AdaDPO and the DPO family of preference losses for Megatron-Core."""

__version__ = "0.1.0"
