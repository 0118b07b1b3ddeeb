"""Run megatron-core on a CPU: gloo process groups and five small compatibility patches.

megatron-core assumes CUDA in a handful of places. With the gloo backend, tensor-
(with sequence parallelism), pipeline-, virtual-pipeline- and data-parallelism
(megatron-core DDP, with or without the distributed optimizer) and activation recompute
run on the CPU once these things hold:

1. ``torch.cuda.current_device()`` answers ``torch.device("cpu")``,
   ``torch.cuda.synchronize()`` is a no-op (there is no device to wait for) and
   ``torch.cuda.current_stream()`` returns a stream whose methods do nothing.
   Why: megatron-core allocates with ``device=torch.cuda.current_device()`` in
   ``GlobalMemoryBuffer.get_tensor`` (``megatron/core/utils.py``), the tensor-parallel
   mappings and layers (``tensor_parallel/mappings.py``, ``tensor_parallel/layers.py``),
   the pipeline send/recv buffers (``pipeline_parallel/p2p_communication.py``), the DDP
   grad buffers (``distributed/param_and_grad_buffer.py``) and ``GPTModel``; it calls
   ``torch.cuda.synchronize()`` after pipeline send/recv (``p2p_communication.py``:
   with ``batch_p2p_sync``, and always after the shape exchange of
   ``variable_seq_lengths``); from 0.19 DDP's ``start_grad_sync``
   (``param_and_grad_buffer.py``) reads ``torch.cuda.current_stream()`` on every step
   to wait for CUDA-graph events (there are none on the CPU). A CPU-only torch raises
   "Torch not compiled with CUDA enabled" at each of these.
2. Hard-coded ``device="cuda"`` factory calls and ``Tensor.cuda()`` land on the CPU.
   Why: ``pipeline_parallel/schedules.py`` creates ``total_num_tokens`` with
   ``torch.zeros([], dtype=torch.int, device="cuda")`` in every forward-backward
   function, and ``LanguageModule.setup_embeddings_and_output_layer`` calls
   ``weight.data.cuda()`` for tied embeddings under pipeline parallelism. A
   ``TorchFunctionMode`` rewrites a CUDA ``device`` argument to ``"cpu"`` and makes
   ``Tensor.cuda()`` the identity. It is entered once and stays on the mode stack of
   the thread that called :func:`enable_cpu_megatron` (the training thread), like
   ``torch.set_default_device`` does.
3. The RNG tracker is megatron-core's inference tracker
   (``model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)``), whose
   ``fork()`` is a no-op: the training tracker snapshots CUDA generator states.
   :func:`seed_cpu` does this; dropout inside tensor-parallel regions then draws from
   the CPU default generator (tests run with dropout 0).

4. Activation recompute (``--recompute-granularity selective|full``) saves and restores
   no CUDA RNG state: megatron-core's ``tensor_parallel.random._get_cuda_rng_state``
   returns an empty tensor and ``_set_cuda_rng_state`` does nothing.
   Why: ``CheckpointFunction`` and ``CheckpointWithoutOutput`` snapshot
   ``(CPU state, CUDA state, tracker states)`` before the forward and restore them for
   the recompute (``tensor_parallel/random.py``: ``_get_all_rng_states``); the CUDA part
   asks a CPU-only torch for a generator it does not have. On the CPU every draw
   (dropout included, under the inference tracker of patch 3) comes from the CPU
   generator, which they still save and restore, so the recompute replays the forward.
5. ``Tensor.type()`` answers the CUDA type name (``torch.cuda.FloatTensor``) to callers
   in ``megatron.core.optimizer`` only (the calling frame's module is checked).
   Why: ``DistributedOptimizer._build_model_and_main_param_groups``
   (``optimizer/distrib_optimizer.py``) accepts only ``torch.cuda.{Float,Half,BFloat16}
   Tensor`` parameters. With it, megatron-core's distributed optimizer runs on gloo
   (``reduce_scatter_tensor`` / ``all_gather_into_tensor``, in gloo since torch 2.x).
   Its checkpoints need two fixes that hold on any device without apex/TE (torch's
   Adam), in ``trainer/checkpointing.py``.

Sequence parallelism needs no patch here: megatron-core's torch norms refuse it, so the
local spec takes ``step/norms.py``'s under ``--sequence-parallel`` (``step/model.py``).

One setting, not a patch, completes this: ``model.build_transformer_config`` turns off
batched pipeline send/recv (``batch_p2p_comm``) on CPU runs, because gloo pairs the
messages of ``batch_isend_irecv`` wrongly when both pipeline neighbours are one rank
(PP=2 with virtual stages); see ``model._cpu_pipeline_settings``.

Nothing here is applied when CUDA is available: a GPU run is never touched (and a run
that wants the CPU on a machine with CUDA is not supported by this module).
"""

from __future__ import annotations

import datetime
import inspect
import os
import sys
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = [
    "enable_cpu_megatron",
    "cpu_megatron_enabled",
    "init_distributed_cpu",
    "initialize_model_parallel_cpu",
    "seed_cpu",
]

# Modules whose ``Tensor.type()`` checks accept only CUDA type names (patch 5).
_CUDA_TYPE_READERS = ("megatron.core.optimizer.",)

# The patches are process-wide by nature; this records that they are in place (idempotence).
_STATE: dict[str, Any] = {"mode": None}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":", 1)[0] == "cuda"
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU (patch 2 of the module doc)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _type_name(func(*args), sys._getframe(1))
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _type_name(name: str, caller) -> str:
    """Patch 5 of the module doc: ``torch.FloatTensor`` reads ``torch.cuda.FloatTensor`` to
    megatron-core's optimizer modules (``caller`` is the frame that called ``.type()``)."""
    module = caller.f_globals.get("__name__", "") if caller is not None else ""
    if module.startswith(_CUDA_TYPE_READERS) and name.startswith("torch.") and ".cuda." not in name:
        return "torch.cuda." + name[len("torch."):]
    return name


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _cpu_synchronize(device: Any = None) -> None:
    return None


class _NoOpStream:
    """Stands in for ``torch.cuda.current_stream()``: CPU work is already ordered."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


def _cpu_current_stream(device: Any = None) -> _NoOpStream:
    return _NoOpStream()


def cpu_megatron_enabled() -> bool:
    """True when :func:`enable_cpu_megatron` has installed its patches in this process."""
    return _STATE["mode"] is not None


def enable_cpu_megatron() -> bool:
    """Makes megatron-core run on the CPU (patches 1, 2, 4 and 5 of the module doc).

    Idempotent. Does nothing and returns False when ``torch.cuda.is_available()``;
    otherwise installs the patches (once) and returns True. Call it before building
    models or running schedules, from the thread that runs the training step.
    """
    if torch.cuda.is_available():
        return False
    if _STATE["mode"] is None:
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.synchronize = _cpu_synchronize
        torch.cuda.current_stream = _cpu_current_stream
        _stand_in_cuda_rng_state()
        mode = _CudaToCpuMode()
        mode.__enter__()
        _STATE["mode"] = mode
        from adadpo_megatron.step.cpu_moe import enable_cpu_moe  # MoE stand-ins (its doc)

        enable_cpu_moe()
    return True


def _no_cuda_rng_state(device: Any = "cuda", clone: bool = False,
                       graph_safe: bool = False) -> torch.Tensor:
    """Stands in for megatron-core's ``_get_cuda_rng_state``: there is no CUDA generator."""
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(new_state: torch.Tensor, device: Any = -1,
                           graph_safe: bool = False) -> None:
    """Stands in for megatron-core's ``_set_cuda_rng_state`` (nothing to restore)."""
    return None


def _stand_in_cuda_rng_state() -> None:
    """Patch 4 of the module doc: activation recompute saves and restores no CUDA RNG."""
    from megatron.core.tensor_parallel import random as mpu_random

    for name, stand_in in (("_get_cuda_rng_state", _no_cuda_rng_state),
                           ("_set_cuda_rng_state", _set_no_cuda_rng_state)):
        if not hasattr(mpu_random, name):
            raise RuntimeError(f"megatron.core.tensor_parallel.random.{name} is gone: "
                               "update adadpo_megatron/step/cpu.py for this megatron-core")
        setattr(mpu_random, name, stand_in)



# megatron-core notices that say nothing about a CPU run: the GPU-only fused kernels are
# absent (by design here) and a CUDA stream setting that a CPU has no use for.
_CPU_IRRELEVANT_NOTICES = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "When using async grad allreduce it is recommended to set the environment variable "
    "CUDA_DEVICE_MAX_CONNECTIONS",
)


def silence_cpu_notices() -> None:
    """Filters megatron-core's UserWarnings about missing TE/apex and CUDA streams.

    Call only on CPU runs: on a GPU the same notices point at a real problem.
    """
    for message in _CPU_IRRELEVANT_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)

def init_distributed_cpu(timeout_minutes: float = 10.0) -> None:
    """Initialises the default process group with gloo from torchrun's environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by torchrun);
    a process started without them gets a one-process group on an in-memory store (no port:
    picking a "free" port and binding it later races with every other process on the
    machine, which once failed a CI run with EADDRINUSE). Also calls
    :func:`enable_cpu_megatron`. Does nothing if a group already exists.
    """
    enable_cpu_megatron()
    if torch.distributed.is_initialized():
        return
    one_process = os.environ.get("WORLD_SIZE", "1") == "1" and "MASTER_PORT" not in os.environ
    if "RANK" not in os.environ or one_process:
        os.environ.update(RANK="0", WORLD_SIZE="1")
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1,
            timeout=datetime.timedelta(minutes=timeout_minutes))
        return
    from adadpo_megatron.step.elastic_store import init_process_group_elastic

    init_process_group_elastic("gloo", datetime.timedelta(minutes=timeout_minutes))


def initialize_model_parallel_cpu(
    tp: int = 1, pp: int = 1, vpp: int | None = None, cp: int = 1, seed: int = 1234
) -> None:
    """(Re)initialises megatron-core's parallel state for a layout, on gloo, and seeds it.

    Destroys any previous parallel state first, so one process can run several layouts
    in turn (the distributed tests do). ``vpp`` is the number of model chunks per
    pipeline stage (None: no virtual pipeline). Data parallelism takes the remaining
    factor of the world size. Calls :func:`seed_cpu` with ``seed``.
    """
    from megatron.core import parallel_state

    init_distributed_cpu()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
    )
    seed_cpu(seed)


def seed_cpu(seed: int) -> None:
    """Seeds torch's CPU generator and megatron-core's RNG tracker (patch 3).

    Uses ``model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True)`` and resets
    an existing tracker, so a later layout in the same process starts from the same state.
    """
    from megatron.core.tensor_parallel import random as mpu_random

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"inference_rng_tracker": True}
    if (
        "force_reset_rng"
        in inspect.signature(mpu_random.model_parallel_cuda_manual_seed).parameters
    ):
        kwargs["force_reset_rng"] = True
    else:  # older releases: reset the tracker by hand so the inference tracker is installed
        mpu_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    mpu_random.model_parallel_cuda_manual_seed(seed, **kwargs)
