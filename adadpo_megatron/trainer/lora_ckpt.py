"""Adapter-only checkpoints: the LoRA factors, their optimizer state, the run state.

Same layout, atomicity and checks as ``trainer/checkpointing.py`` (one dist-checkpoint per
``SAVE/iter_N``, tracker, manifest, ``adadpo_meta.json``), but the model part holds only
the adapters, under global names ``lora.decoder.layers.<i>.<module>.lora_{A,B}`` (sharded
like the base weight: column-parallel B over dim 0, row-parallel A over dim 1; the
gated ``linear_fc1`` B as [gate; up] halves, as megatron-core stores the fused weight),
so a checkpoint is a few MB even for 70B and reloads at another TP/PP layout.
``adadpo_meta.json`` gains ``"lora": {"settings", "base", "adapter_params"}``; ``base``
is ``lora_run.base_record`` (where the base came from and its fingerprint).
"""

from __future__ import annotations

from typing import Any

import torch

from adadpo_megatron.step.lora import _unwrap, adapter_modules

__all__ = ["adapter_sharded_state", "load_adapters", "load_lora_checkpoint",
           "save_lora_checkpoint"]


def adapter_sharded_state(chunks: list[torch.nn.Module]) -> dict[str, Any]:
    """``{"lora": {key: ShardedTensor|Factory}}`` over this rank's adapters (the parameters
    themselves, so megatron-core's optimizer maps its state onto them)."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    sd: dict[str, Any] = {}
    for chunk in chunks:
        gated = bool(getattr(_unwrap(chunk).config, "gated_linear_unit", False))
        for name, _, adapter in adapter_modules(chunk):
            prefix = f"lora.{name}."
            axis = {"column": {"lora_B": 0}, "row": {"lora_A": 1}}.get(adapter.kind, {})
            sh = make_sharded_tensors_for_checkpoint(
                {"lora_A": adapter.lora_A, "lora_B": adapter.lora_B}, prefix, axis, ())
            if gated and name.endswith("mlp.linear_fc1"):
                from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

                sh[prefix + "lora_B"] = apply_swiglu_sharded_factory(sh[prefix + "lora_B"], ())
            sd.update(sh)
    return {"lora": sd}


def load_adapters(chunks: list[torch.nn.Module], loaded: dict[str, Any]) -> None:
    """Copy ``loaded["lora"]`` (a loaded :func:`adapter_sharded_state`) into the adapters."""
    got = loaded["lora"]
    with torch.no_grad():
        for chunk in chunks:
            for name, _, adapter in adapter_modules(chunk):
                for part in ("lora_A", "lora_B"):
                    getattr(adapter, part).copy_(got[f"lora.{name}.{part}"])


def _adapter_count(chunks: list[torch.nn.Module]) -> int:
    """Adapter parameters of the whole model (TP shards and PP stages summed, DP once)."""
    from megatron.core import parallel_state as ps

    n = 0
    for chunk in chunks:
        for _, _, a in adapter_modules(chunk):
            for p in (a.lora_A, a.lora_B):
                if p.tensor_model_parallel or ps.get_tensor_model_parallel_rank() == 0:
                    n += p.numel()
    once = ps.get_data_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
    t = torch.tensor([float(n if once else 0)], device=next(chunks[0].parameters()).device)
    torch.distributed.all_reduce(t)  # SUM over the world: each shard counted once
    return int(t.item())


def save_lora_checkpoint(run: Any, base: dict[str, Any]) -> str:
    """Write the adapter checkpoint of step ``run.iteration`` into --save (collective)."""
    from adadpo_megatron.trainer.checkpointing import save_checkpoint
    from adadpo_megatron.trainer.identity import tokenizer_record

    cfg = run.cfg
    lora = {"settings": cfg.to_dict()["lora"], "base": base,
            "adapter_params": _adapter_count(run.model)}
    return save_checkpoint(
        cfg.io.save, run.iteration, model=run.model, optimizer=run.optimizer,
        scheduler=run.scheduler, data_state=run.position.state_dict(),
        fingerprint=cfg.fingerprint(), config=cfg.to_dict(),
        data_fingerprint=run.train_data.fingerprint, skipped_in_a_row=run.skipped_in_a_row,
        reference=run.reference if run.save_reference else None,
        tokenizer=tokenizer_record(run.train_data),
        model_state=adapter_sharded_state(run.model), extra_meta={"lora": lora})


def load_lora_checkpoint(cfg: Any, run: Any) -> dict[str, Any]:
    """Resume the adapters, optimizer, schedule, data position and RNG from --load."""
    from adadpo_megatron.trainer.checkpointing import load_checkpoint

    return load_checkpoint(
        cfg.io.load, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        fingerprint=cfg.fingerprint(), config=cfg.to_dict(),
        data_fingerprint=run.train_data.fingerprint,
        reference=run.reference if run.save_reference else None,
        model_state=adapter_sharded_state(run.model),
        apply_model=lambda loaded: load_adapters(run.model, loaded))
