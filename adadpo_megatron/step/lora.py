"""LoRA adapters on megatron-core's tensor-parallel linear layers (base frozen).

``add_lora(chunks, settings, seed=...)`` attaches one :class:`LoRAAdapter` to each target
linear (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2`` by default) of this
rank's model chunks, freezes every other parameter (``requires_grad=False``: megatron-core's
DDP gives them no grad buffer and its optimizer no state), and adds ``scaling * B A x`` to
the linear's output through a forward hook, with ``scaling = alpha / rank`` (PEFT's default).
The adapter is a child module named ``adapter`` of the linear (``...linear_qkv.adapter.lora_A``)
so ``parameters()``, ``train()``/``eval()`` and DDP see it; the base weights keep their names.

Sharding follows the base weight (TP group ``g`` of size ``t``; x: the linear's input)::

    column-parallel  W [out/t, in]:  A [r, in] replicated,  B [out/t, r] sharded like W
        h = x A^T;  no SP: h = copy_to_tp(h)           (fwd identity, bwd all-reduce SUM on g)
                    SP:    h = gather_from_sp(h)       (fwd all-gather, bwd reduce-scatter on g;
                           x is this rank's sequence slice, so dA is partial: A is marked
                           ``sequence_parallel`` and finalize_model_grads all-reduces it on g)
        delta = scaling * h B^T                         [s, b, out/t], like the base output
    row-parallel     W [out, in/t]:  A [r, in/t] sharded like W,  B [out, r] replicated
        h = x A^T (partial sum over t);  no SP: h = reduce_from_tp(h)  (fwd all-reduce SUM)
                                        SP:    h = reduce_scatter_to_sp(h)  (fwd RS on g; dB
                           is partial over sequence slices: B is marked ``sequence_parallel``)
        delta = scaling * h B^T                         [s(/t), b, out], like the base output

Only the rank-r activations cross the TP group. ``B`` starts at zero, so an adapted model
equals its base exactly at step 0; ``A`` is Kaiming-uniform (PEFT's init) from a generator
seeded by (seed, global module name), so every layout draws the same full ``A``.

:func:`adapters_disabled` switches the adapters off (the reference = base pass);
:func:`adapters_detached` hides them from ``state_dict`` for base-weight loads. Megatron's
local linears are tested on the CPU; Transformer Engine's (``TELinear``,
``TEColumnParallelLinear``, ``TERowParallelLinear``, ``TELayerNormColumnParallelLinear``,
matched by class name; the fused norm is recomputed for the adapter input) are untested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "LORA_TARGETS",
    "LoRAAdapter",
    "LoRASettings",
    "add_lora",
    "adapter_modules",
    "adapters_detached",
    "adapters_disabled",
    "merge_lora",
]

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_COLUMN = {"ColumnParallelLinear", "TEColumnParallelLinear", "TELayerNormColumnParallelLinear"}
_ROW = {"RowParallelLinear", "TERowParallelLinear"}
_ADAPTER = "adapter"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASettings:
    """LoRA hyper-parameters (NeMo / Megatron-Bridge flag names)."""

    rank: int
    """--lora-rank: r, the adapters' inner dimension."""
    alpha: float
    """--lora-alpha: the update is scaled by alpha / r (PEFT's default scaling)."""
    dropout: float = 0.0
    """--lora-dropout: dropout on the adapter's input (training mode only)."""
    target_modules: tuple[str, ...] = LORA_TARGETS
    """--lora-target-modules: which linears get adapters."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"--lora-rank {self.rank} must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"--lora-alpha {self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout {self.dropout} must be in [0, 1)")
        bad = [t for t in self.target_modules if t not in LORA_TARGETS]
        if bad or not self.target_modules:
            raise ValueError(f"--lora-target-modules {' '.join(self.target_modules)}: "
                             f"{', '.join(bad) or 'none given'}; choose from "
                             f"{', '.join(LORA_TARGETS)}")

    @property
    def scaling(self) -> float:
        """alpha / rank."""
        return self.alpha / self.rank


def _kind(module: torch.nn.Module) -> str:
    name = type(module).__name__
    if name in _COLUMN:
        return "column"
    if name in _ROW:
        return "row"
    if name == "TELinear":  # TE's plain linear; parallel_mode says how it is sharded
        mode = getattr(module, "parallel_mode", None)
        if mode in ("column", "row"):
            return mode
        if mode in (None, "duplicated"):
            return "replicated"
    raise TypeError(f"LoRA cannot wrap {name}: expected megatron-core's column/row-parallel "
                    "linear (local or Transformer Engine)")


class LoRAAdapter(torch.nn.Module):
    """``scaling * B A x`` for one linear, sharded like its weight (module docstring).

    Args:
        kind: "column", "row" or "replicated" (the base linear's sharding).
        in_features, out_features: the base weight's local shape is [out_features, in_features].
        rank, scaling, dropout: from :class:`LoRASettings`.
        tp_group, tp_size: the linear's TP group and its size.
        sequence_parallel: the linear runs under sequence parallelism.
        dtype, device: of the adapter weights (the base's parameter dtype).
    """

    def __init__(self, *, kind: str, in_features: int, out_features: int, rank: int,
                 scaling: float, dropout: float, tp_group: Any, tp_size: int,
                 sequence_parallel: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.kind, self.rank, self.scaling, self.dropout = kind, rank, scaling, dropout
        self.tp_group, self.tp_size = tp_group, tp_size
        self.sequence_parallel = sequence_parallel and tp_size > 1
        self.enabled = True
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, dtype=dtype,
                                                     device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype,
                                                     device=device))
        sharded = {"column": self.lora_B, "row": self.lora_A}.get(kind)
        for p in (self.lora_A, self.lora_B):
            p.tensor_model_parallel = p is sharded and tp_size > 1
            p.partition_dim = 0 if kind == "column" else 1
            p.partition_stride = 1
            # Replicated factor with a sequence-sliced gradient: summed over TP by
            # megatron-core's finalize_model_grads (_allreduce_non_tensor_model_parallel_grads).
            p.sequence_parallel = self.sequence_parallel and p is not sharded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base linear's input [s, b, in_local] -> delta [s, b, out_local] (x.dtype)."""
        from megatron.core.tensor_parallel import mappings as tpm

        if self.dropout > 0 and self.training:
            x = self._dropout(x)
        h = F.linear(x, self.lora_A.to(x.dtype))
        if self.tp_size > 1 and self.kind == "column":
            h = (tpm.gather_from_sequence_parallel_region(h, group=self.tp_group)
                 if self.sequence_parallel
                 else tpm.copy_to_tensor_model_parallel_region(h, group=self.tp_group))
        elif self.tp_size > 1 and self.kind == "row":
            h = (tpm.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
                 if self.sequence_parallel
                 else tpm.reduce_from_tensor_model_parallel_region(h, group=self.tp_group))
        return F.linear(h, self.lora_B.to(h.dtype)) * self.scaling

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        # A TP-sharded input (row-parallel, or a sequence slice under SP) draws from the
        # model-parallel RNG stream, which differs by TP rank; a replicated one from the
        # default stream, the same on every TP rank (h must stay identical across TP).
        if self.kind == "row" or self.sequence_parallel:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            with get_cuda_rng_tracker().fork():
                return F.dropout(x, self.dropout, True)
        return F.dropout(x, self.dropout, True)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``: this rank's [out_local, in_local] update of the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


def _norm_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TE's LayerNorm+linear takes the un-normalised input: recompute its norm for LoRA."""
    if type(module).__name__ != "TELayerNormColumnParallelLinear":
        return x
    cfg = module.config
    w = module.layer_norm_weight
    if getattr(cfg, "layernorm_zero_centered_gamma", False):
        w = w + 1
    if cfg.normalization == "RMSNorm":
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.layernorm_epsilon)
        return (y * w.float()).to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), w, getattr(module, "layer_norm_bias", None),
                        cfg.layernorm_epsilon)


def _hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    adapter = module._adadpo_lora  # noqa: SLF001 - set by add_lora
    if not adapter.enabled:
        return None
    delta = adapter(_norm_input(module, args[0]))
    if isinstance(output, tuple):
        out, *rest = output
        return (out + delta.to(out.dtype), *rest)
    return output + delta.to(output.dtype)


def _global_name(chunk: torch.nn.Module, name: str) -> str:
    """decoder.layers.<local i>... -> decoder.layers.<global i>... (PP/VPP independent)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def _init_A(adapter: LoRAAdapter, full_in: int, seed: int, name: str, tp_rank: int) -> None:
    """Kaiming-uniform(a=sqrt(5)) over the full [r, in], as PEFT; this rank's slice."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    bound = 1.0 / math.sqrt(full_in)
    full = (torch.rand(adapter.rank, full_in, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    if adapter.kind == "row" and adapter.tp_size > 1:
        full = full.chunk(adapter.tp_size, dim=1)[tp_rank]
    with torch.no_grad():
        adapter.lora_A.copy_(full.to(adapter.lora_A.dtype))


def add_lora(chunks: Sequence[torch.nn.Module], settings: LoRASettings, *, seed: int) -> int:
    """Attach adapters to this rank's (unwrapped) chunks and freeze the rest; in place.

    Call before megatron-core DDP wraps the chunks (DDP sizes its grad buffers from the
    parameters that require grad). Returns the number of adapter parameters on this rank.
    Raises ValueError when a chunk has none of the target modules.
    """
    from megatron.core import parallel_state as ps

    count = 0
    for chunk in chunks:
        model = _unwrap(chunk)
        for p in model.parameters():
            p.requires_grad_(False)
        found = []
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] not in settings.target_modules:
                continue
            if hasattr(module, "_adadpo_lora"):
                raise ValueError(f"{name} already has a LoRA adapter")
            kind = _kind(module)
            if kind == "column" and getattr(module, "gather_output", False):
                raise ValueError(f"{name}: LoRA on a column-parallel linear with gather_output")
            if kind == "row" and not getattr(module, "input_is_parallel", True):
                raise ValueError(f"{name}: LoRA on a row-parallel linear needs input_is_parallel")
            weight = module.weight
            out_local, in_local = weight.shape
            tp_group = getattr(module, "tp_group", None) or ps.get_tensor_model_parallel_group()
            tp_size = torch.distributed.get_world_size(tp_group) if kind != "replicated" else 1
            tp_rank = torch.distributed.get_rank(tp_group) if tp_size > 1 else 0
            adapter = LoRAAdapter(
                kind=kind, in_features=in_local, out_features=out_local, rank=settings.rank,
                scaling=settings.scaling, dropout=settings.dropout, tp_group=tp_group,
                tp_size=tp_size, sequence_parallel=bool(getattr(module, "sequence_parallel",
                                                                False)),
                dtype=weight.dtype, device=weight.device)
            full_in = in_local * (tp_size if kind == "row" else 1)
            _init_A(adapter, full_in, seed, _global_name(model, name), tp_rank)
            module.add_module(_ADAPTER, adapter)
            # The hook's handle, outside nn.Module's registry (so not a second child).
            object.__setattr__(module, "_adadpo_lora", adapter)
            module._adadpo_lora_hook = module.register_forward_hook(_hook)
            found.append(name)
            count += adapter.lora_A.numel() + adapter.lora_B.numel()
        if not found:
            raise ValueError(f"--lora-target-modules {' '.join(settings.target_modules)}: no "
                             "such linear layer in the model")
        embedding = getattr(model, "embedding", None)
        if embedding is not None:  # first stage: see _input_requires_grad
            embedding.register_forward_hook(_input_requires_grad)
    return count


def _input_requires_grad(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    """Make the frozen embedding's output require grad (PEFT's enable_input_require_grads).

    Under full activation recompute megatron-core's CheckpointFunction returns outputs that
    require grad only when an input does; with a frozen embedding none would, and the
    adapters inside recomputed layers would silently get no gradient.
    """
    if isinstance(output, torch.Tensor) and not output.requires_grad and torch.is_grad_enabled():
        return output.requires_grad_(True)
    return None


def adapter_modules(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, LoRAAdapter]]:
    """(global module name, base linear, adapter) of one chunk, in module order."""
    model = _unwrap(chunk)
    for name, module in model.named_modules():
        adapter = getattr(module, "_adadpo_lora", None)
        if adapter is not None:
            yield _global_name(model, name), module, adapter


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Run the base model: every adapter of ``chunks`` off inside the block (exactly)."""
    adapters = [a for c in chunks for _, _, a in adapter_modules(c)]
    previous = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a, was in zip(adapters, previous, strict=True):
            a.enabled = was


@contextlib.contextmanager
def adapters_detached(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Hide the adapters from ``state_dict``/``sharded_state_dict`` (base weights only).

    Used to load a base checkpoint into an adapted model; the hooks stay, so forward
    passes inside the block still use the adapters.
    """
    mods = [m for c in chunks for _, m, _ in adapter_modules(c)]
    for m in mods:
        del m._modules[_ADAPTER]
    try:
        yield
    finally:
        for m in mods:
            m.add_module(_ADAPTER, m._adadpo_lora)  # noqa: SLF001


def merge_lora(chunks: Sequence[torch.nn.Module]) -> None:
    """Fold every adapter into its base weight (W += scaling B A) and switch it off."""
    with torch.no_grad():
        for chunk in chunks:
            for _, module, adapter in adapter_modules(chunk):
                w = module.weight
                w.copy_((w.float() + adapter.delta_weight()).to(w.dtype))
                adapter.enabled = False
