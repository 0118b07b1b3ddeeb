"""Build and install adadpo-megatron.

The pybind11 pair packer in ``cpp/`` is compiled into ``adadpo_megatron._packer``.
It is torch-free, so the build needs only setuptools, pybind11 and a C++17 compiler.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

packer_extension = Pybind11Extension(
    "adadpo_megatron._packer",
    sources=["cpp/packer.cpp", "cpp/bindings.cpp"],
    depends=["cpp/packer.h", "cpp/trees.h"],  # rebuild when a header changes
    include_dirs=["cpp"],
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="adadpo-megatron",
    version="0.1.0",
    description="AdaDPO and the DPO family of preference losses for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["adadpo_megatron", "adadpo_megatron.*"]),
    ext_modules=[packer_extension],
    cmdclass={"build_ext": build_ext},
    install_requires=[
        "torch>=2.4",
        # 0.16.1 is the newest for Python 3.11; 0.17+ need Python 3.12.
        "megatron-core>=0.16.1,<0.20",
        "numpy>=1.24",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",
        "pyyaml>=6",
        "tqdm>=4.60",
        # megatron-core's checkpoint writer processes die without it and the save hangs.
        "psutil>=5.9",
    ],
    extras_require={
        # Transformer Engine and apex are never required; install them on GPU machines.
        "gpu": ["transformer-engine[pytorch]"],
        "plot": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        # --wandb-project (adadpo-train and the Megatron-LM entry).
        "wandb": ["wandb>=0.17"],
        "hf": ["transformers>=4.45", "gguf>=0.10", "accelerate", "safetensors"],
        # adadpo-pack's Parquet and save_to_disk inputs, and hf:NAME inputs (datasets).
        "data": ["pyarrow>=14", "datasets>=2.16"],
        # tensorboard: the Megatron-LM suite reads the plugin's TensorBoard scalars back.
        # six and pybind11: Megatron-LM's own training loop (tests/megatron_lm) imports six and
        # compiles its dataset helpers with pybind11 at start-up.
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.5",
            "tensorboard>=2.14",
            "six>=1.16",
            "pybind11>=2.11",
            "wandb>=0.17",  # the W&B tests (offline)
            "peft>=0.13",  # our PEFT-format LoRA export loads in peft (tests only)
        ],
    },
    entry_points={
        "console_scripts": [
            "adadpo-train=adadpo_megatron.train:main",
            "adadpo-pack=adadpo_megatron.data.pack_tool:main",
            "adadpo-plan=adadpo_megatron.planner.cli:main",
        ],
    },
)
