"""Test-only shim: run Megatron-LM's own ``pretrain()`` loop on a CPU (gloo).

Usage (under torchrun)::

    MEGATRON_LM_PATH=/path/to/Megatron-LM torchrun --nproc-per-node 2 \\
        tests/megatron_lm/shim.py examples/megatron_lm/pretrain_adadpo.py <flags>

Megatron-LM's training loop assumes CUDA. This module belongs to the tests, not the
product: it patches the few places that stop the unmodified loop from starting on a
CPU-only torch, then runs the entry script as ``__main__``. Each patch says why.
megatron-core's own CUDA assumptions are handled by the product's CPU layer
(``adadpo_megatron.step.cpu.enable_cpu_megatron``), which is reused here.
"""

from __future__ import annotations

import os
import runpy
import sys
import types


def _stub_triton() -> None:
    """Megatron-LM's imports reach ``megatron/core/inference`` modules that ``import triton``
    at module level (fused KV-append kernels) without using it in training. The CPU test
    environment has no triton (a 300 MB wheel); a stub module lets those imports succeed.
    Any real use would fail loudly (the stub has no kernels)."""
    try:
        import triton  # noqa: F401
        return
    except ImportError:
        pass

    import importlib.machinery

    def decorator(fn=None, **_kw):
        return fn if fn is not None else (lambda f: f)

    def unused(name: str):
        if name.startswith("__"):  # keep module introspection (inspect, pickle) honest
            raise AttributeError(name)
        return object  # kernel annotations such as tl.constexpr; never called on the CPU

    triton = types.ModuleType("triton")
    triton.__spec__ = importlib.machinery.ModuleSpec("triton", None)
    triton.jit = decorator
    triton.autotune = triton.heuristics = lambda *a, **k: decorator
    triton.cdiv = lambda a, b: (a + b - 1) // b
    triton.__getattr__ = unused  # type: ignore[attr-defined]
    language = types.ModuleType("triton.language")
    language.__spec__ = importlib.machinery.ModuleSpec("triton.language", None)
    language.__getattr__ = unused  # type: ignore[attr-defined]
    triton.language = language
    sys.modules["triton"] = triton
    sys.modules["triton.language"] = language


def _patch_megatron_lm() -> None:
    """Patches on ``megatron.training`` (each with its reason)."""
    import torch
    from megatron.core import parallel_state as mpu
    from megatron.training import initialize, training

    # 1. initialize_megatron asserts torch.cuda.is_available() unless allow_no_cuda.
    original_init = initialize.initialize_megatron

    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_init(*args, **kwargs)

    training.initialize_megatron = initialize_megatron

    # 2. _initialize_distributed creates the model-parallel groups only when
    #    torch.cuda.device_count() > 0; on the CPU it creates the default (gloo) group and
    #    stops. Create the groups the same way afterwards.
    original_dist = initialize._initialize_distributed

    def _initialize_distributed(*args, **kwargs):
        original_dist(*args, **kwargs)
        a = training.get_args()
        if not mpu.model_parallel_is_initialized():
            mpu.initialize_model_parallel(
                a.tensor_model_parallel_size, a.pipeline_model_parallel_size,
                a.virtual_pipeline_model_parallel_size,
                context_parallel_size=a.context_parallel_size,
                order="tp-cp-ep-dp-pp")

    initialize._initialize_distributed = _initialize_distributed

    # 3. _set_random_seed seeds megatron-core's RNG tracker only when a CUDA device exists;
    #    the model's tensor-parallel init then finds no tracker. Seed the CPU (inference)
    #    tracker as adadpo-train does, with Megatron-LM's per-stage seed offset.
    from adadpo_megatron.step.cpu import seed_cpu

    original_seed = initialize._set_random_seed

    def _set_random_seed(seed_, *args, **kwargs):
        original_seed(seed_, *args, **kwargs)
        seed_cpu(seed_ + 100 * mpu.get_pipeline_model_parallel_rank())

    initialize._set_random_seed = _set_random_seed
    # 4. validate_args reads the GPU architecture (torch.cuda.get_device_properties) to
    #    decide whether CUDA_DEVICE_MAX_CONNECTIONS=1 is required under TP; answer
    #    "pre-Blackwell" (the test sets the variable as a recipe does on Hopper).
    from megatron.training import arguments

    arguments.get_device_arch_version = lambda: 0
    # 5. _compile_dependencies builds Megatron-LM's legacy fused CUDA kernels with nvcc
    #    (megatron/legacy/fused_kernels); megatron-core's GPTModel never calls them, and a
    #    CPU machine has no nvcc. Loading becomes a no-op.
    from megatron.legacy import fused_kernels

    fused_kernels.load = lambda args: None
    # 6. get_model wraps the DDP construction in a side CUDA stream (torch.cuda.Stream,
    #    torch.cuda.stream); on the CPU work is ordered already: a no-op stream and context.
    import contextlib

    from adadpo_megatron.step.cpu import _NoOpStream

    torch.cuda.Stream = lambda *a, **k: _NoOpStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()

    # 7. The rerun state machine and checkpoints save and restore the CUDA generator's
    #    state (torch.cuda.get_rng_state / set_rng_state); a CPU run has none: an empty
    #    state, restored as nothing. The CPU generator's state is saved beside it as usual.
    torch.cuda.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda state, device="cuda": None


def main() -> None:
    """Apply the patches and run ``sys.argv[1]`` (the entry script) with the rest as argv."""
    path = os.environ.get("MEGATRON_LM_PATH")
    if not path:
        raise SystemExit("MEGATRON_LM_PATH is not set: point it at a Megatron-LM checkout")
    sys.path.insert(0, path)
    # megatron.core (and torch's compiler stack it pulls in) first: torch probes for a real
    # triton package at import time, and must find none.
    import megatron.core  # noqa: F401
    _stub_triton()
    from adadpo_megatron.step.cpu import enable_cpu_megatron, silence_cpu_notices

    enable_cpu_megatron()
    silence_cpu_notices()
    _patch_megatron_lm()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
