"""Hugging Face <-> megatron-core checkpoint conversion (Llama architecture).

``weights``: the tensor bookkeeping at any TP/PP/VPP; ``files``: the file formats.
``tools/convert_hf_to_megatron.py`` is the command line.
"""
