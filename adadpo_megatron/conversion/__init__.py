"""Hugging Face <-> megatron-core checkpoint conversion (Llama, Mistral, Qwen2/2.5, Qwen3,
Mixtral, Qwen3-MoE).

``families``: what config.json may say; ``weights``: the tensor bookkeeping at any
TP/PP/VPP/EP; ``files``: the file formats.
``tools/convert_hf_to_megatron.py`` is the command line.
"""
