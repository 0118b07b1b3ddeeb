"""megatron-core's mixture-of-experts layer on the CPU: four small stand-ins (gloo, local spec).

:func:`enable_cpu_moe` is called by :func:`adadpo_megatron.step.cpu.enable_cpu_megatron`
(and so before any model is built on the CPU); like the rest of ``step/cpu.py`` it does
nothing when CUDA is available. What megatron-core 0.16.1 needs, and why:

1. ``torch.cuda.Stream`` / ``torch.cuda.stream``: the ``alltoall`` token dispatcher
   creates a side stream for its device-to-host copies
   (``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream``), enters it with
   ``torch.cuda.stream(...)``, records an event on it and later calls
   ``event.synchronize()``. On the CPU the copies are already synchronous: the stand-in
   stream's methods do nothing and ``record_event()`` returns an event whose
   ``synchronize()`` does nothing. Comparing it with ``torch.cuda.current_stream()``
   (``step/cpu.py``'s no-op stream) says "same stream", so no ``record_stream`` follows.
2. ``moe_utils.te_general_gemm``: ``RouterGatingLinearFunction`` tests
   ``te_general_gemm is not None``, but the name is bound only when Transformer Engine
   imports, so without TE it raises ``NameError``. Bound to None: the plain ``torch.mm``
   path runs (the same one it takes for fp64 routers).
3. ``all_to_all`` split sizes: the ``alltoall`` dispatcher keeps its split sizes as
   tensors on the CPU (its device-to-host step converts only CUDA tensors to numpy), and
   gloo's ``all_to_all_single`` takes only lists of ints. The dispatcher's ``all_to_all``
   is wrapped to hand over ``list[int]``.
4. ``reduce_from_tensor_model_parallel_region`` at a group of one returns its input
   itself; the router then updates the routing map's per-expert counts in place
   (``get_tokens_per_expert_and_token_count`` -> in-place ops on a view of a tensor
   that autograd saved). The stand-in returns a clone for a one-rank group (what the
   all-reduce returns for more ranks), so EP=1/TP=1 runs like EP=2.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

__all__ = ["enable_cpu_moe"]

_STATE: dict[str, bool] = {"done": False}


class _CpuEvent:
    """What ``Stream.record_event()`` returns: already complete."""

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def query(self) -> bool:
        return True


class _CpuStream:
    """Stands in for ``torch.cuda.Stream()``: every CPU op is already in order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _CpuEvent:
        return _CpuEvent()

    def synchronize(self) -> None:
        return None

    def __eq__(self, other: object) -> bool:  # one CPU "stream": all streams are the same
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__


def _cpu_stream_context(stream: Any = None):
    return contextlib.nullcontext()


def _list_splits(sizes: Any) -> Any:
    if sizes is None or isinstance(sizes, list):
        return sizes
    if torch.is_tensor(sizes):
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]  # numpy array or tuple


def enable_cpu_moe() -> None:
    """Install the four stand-ins of the module doc (idempotent; CPU-only processes)."""
    if _STATE["done"] or torch.cuda.is_available():
        return
    torch.cuda.Stream = _CpuStream
    torch.cuda.stream = _cpu_stream_context
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original_all_to_all = token_dispatcher.all_to_all

    def all_to_all(group, input_, output_split_sizes=None, input_split_sizes=None):
        return original_all_to_all(
            group, input_, _list_splits(output_split_sizes), _list_splits(input_split_sizes)
        )

    token_dispatcher.all_to_all = all_to_all
    original_reduce = moe_utils.reduce_from_tensor_model_parallel_region

    def reduce_from_tensor_model_parallel_region(input_, group=None):
        if group is None:
            from megatron.core import parallel_state

            group = parallel_state.get_tensor_model_parallel_group()
        if group.size() == 1:
            return input_.clone()
        return original_reduce(input_, group)

    moe_utils.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region
    if hasattr(router, "reduce_from_tensor_model_parallel_region"):
        router.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region
    _STATE["done"] = True
