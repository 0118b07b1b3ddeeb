#!/usr/bin/env python3
"""Convert Hugging Face checkpoints (Llama, Mistral, Qwen2/2.5, Qwen3, Mixtral, Qwen3-MoE) to and from megatron-core.

HF -> Megatron (default)::

    python tools/convert_hf_to_megatron.py --hf PATH/TO/hf_dir_or.gguf --output OUT \\
        --format torch_dist                       # adadpo-train --load OUT --finetune
    python tools/convert_hf_to_megatron.py --hf HF_DIR --output OUT \\
        --format torch --tp 8 --pp 4 --vpp 5      # Megatron-LM per-rank files
    python tools/convert_hf_to_megatron.py --hf MIXTRAL_DIR --output OUT \
        --format torch --tp 2 --ep 4              # MoE: experts split over EP ranks

Megatron -> HF (``--to-hf``; ``--hf-config`` is the original model's config.json)::

    python tools/convert_hf_to_megatron.py --to-hf --megatron OUT --format torch_dist \\
        --hf-config HF_DIR/config.json --output HF_OUT

LoRA adapter checkpoints (``adadpo-train --lora-rank``; the base is found from the record in
the checkpoint and fingerprint-checked)::

    python tools/convert_hf_to_megatron.py --to-hf --megatron SAVE --hf-config ... \
        --output HF_OUT --merge-lora          # the base with the adapters merged in
    python tools/convert_hf_to_megatron.py --to-hf --megatron SAVE --hf-config ... \
        --output PEFT_OUT --peft              # adapter_config.json + adapter_model.safetensors

The family comes from config.json (``model_type``; conversion/families.py lists what is
refused). The model flags the trainer needs for the converted weights are printed at the end.
Layouts (fused QKV per query group, fc1 = [gate; up], vocabulary padding) are documented
in adadpo_megatron/conversion/weights.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys

import torch

from adadpo_megatron.conversion import files as io
from adadpo_megatron.conversion import weights as hc
from adadpo_megatron.io_errors import write_failure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    """The converter's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--to-hf", action="store_true", help="convert Megatron -> HF")
    p.add_argument("--hf", help="HF input: a directory (config.json + safetensors) or a .gguf")
    p.add_argument("--megatron", help="Megatron input directory (with --to-hf)")
    p.add_argument("--hf-config", help="config.json of the HF model (with --to-hf)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--format", choices=["torch_dist", "torch"], default="torch_dist",
                   help="Megatron side: torch_dist (adadpo-train) or torch (Megatron-LM per rank)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (torch format)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size (torch format)")
    p.add_argument("--vpp", type=int, default=1, help="model chunks per pipeline rank")
    p.add_argument("--ep", type=int, default=1,
                   help="expert parallel size (torch format, MoE families; expert TP = --tp)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored dtype")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--merge-lora", action="store_true",
                      help="--megatron is a LoRA adapter checkpoint: merge it into its base")
    lora.add_argument("--peft", action="store_true",
                      help="--megatron is a LoRA adapter checkpoint: write the adapters alone "
                           "in PEFT's format (load with peft.PeftModel.from_pretrained)")
    return p


def _to_megatron(a: argparse.Namespace) -> hc.LlamaShape:
    if not a.hf:
        raise SystemExit("--hf PATH is required (or give --to-hf)")
    if a.format == "torch_dist" and (a.tp, a.pp, a.vpp, a.ep) != (1, 1, 1, 1):
        raise SystemExit("--format torch_dist is layout-free (adadpo-train reshards on load): "
                         "drop --tp/--pp/--vpp/--ep, or use --format torch")
    try:
        state, shape = io.read_hf(a.hf)
        shape.check(a.tp, a.pp, a.vpp, a.ep)
    except ValueError as e:  # an unsupported family or option, or an impossible split
        raise SystemExit(f"convert_hf_to_megatron: error: {a.hf}: {e}") from None
    full = hc.hf_to_megatron(state, shape, divisible_by=a.make_vocab_size_divisible_by, tp=a.tp)
    if a.format == "torch":
        io.write_megatron_torch(hc.split(full, shape, tp=a.tp, pp=a.pp, vpp=a.vpp, ep=a.ep), shape,
                                a.output, dtype=DTYPES[a.dtype])
    else:
        io.write_megatron_dist(full, shape, a.output, dtype=DTYPES[a.dtype])
    return shape


def _to_hf(a: argparse.Namespace) -> hc.LlamaShape:
    if not (a.megatron and a.hf_config):
        raise SystemExit("--to-hf needs --megatron DIR and --hf-config config.json")
    with open(a.hf_config, encoding="utf-8") as f:
        try:
            shape = hc.LlamaShape.from_hf_config(json.load(f))
        except ValueError as e:
            raise SystemExit(f"convert_hf_to_megatron: error: {a.hf_config}: {e}") from None
    from adadpo_megatron.trainer.lora_run import read_adapter_meta

    is_adapter = a.format == "torch_dist" and read_adapter_meta(a.megatron) is not None
    if is_adapter != (a.merge_lora or a.peft):
        raise SystemExit(f"convert_hf_to_megatron: error: --megatron {a.megatron} is "
                         + ("a LoRA adapter checkpoint: give --merge-lora or --peft"
                            if is_adapter else "not a LoRA adapter checkpoint: drop "
                            f"{'--merge-lora' if a.merge_lora else '--peft'}"))
    if is_adapter:
        from adadpo_megatron.conversion import lora

        state, adapters, meta = lora.read_adapter_checkpoint(a.megatron, shape)
        if a.peft:
            tensors, config = lora.peft_adapter(adapters, shape, meta,
                                                os.path.dirname(os.path.abspath(a.hf_config)))
            lora.write_peft(a.output, tensors, config, DTYPES[a.dtype])
        else:
            scaling = meta["settings"]["alpha"] / meta["settings"]["rank"]
            io.write_hf(lora.merged_hf(state, adapters, shape, scaling), shape, a.output,
                        dtype=DTYPES[a.dtype])
        return shape
    if a.format == "torch":
        full = hc.merge(io.read_megatron_torch(a.megatron), shape)
    else:
        full = io.read_megatron_dist(a.megatron, shape)
    io.write_hf(hc.megatron_to_hf(full, shape), shape, a.output, dtype=DTYPES[a.dtype])
    return shape


def _check_paths(a: argparse.Namespace) -> None:
    """Inputs readable, --output writable (created), before any tensor is read."""
    from adadpo_megatron.preflight import PathError, check_paths

    hf_kind = "file" if a.hf and not os.path.isdir(a.hf) and str(a.hf).endswith(".gguf") else "dir"
    checks = [("outdir", a.output, "--output")]
    if a.to_hf:
        checks = [("dir", a.megatron, "--megatron"), ("file", a.hf_config, "--hf-config"), *checks]
    else:
        checks = [(hf_kind, a.hf, "--hf"), *checks]
    try:
        check_paths(checks)
    except PathError as e:
        raise SystemExit(f"convert_hf_to_megatron: error: {e}") from None


def _ranks() -> tuple[int, bool]:
    """(this rank, whether a process group runs): called inside a torchrun job, every rank
    converts together (the dist-checkpoint save is collective) into one staging directory."""
    import torch.distributed as dist

    running = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if running else 0), running


def _staging(output: str) -> str:
    """A fresh directory beside ``output`` to write the conversion into (rank 0 makes it and
    every rank of a running process group gets its name)."""
    import tempfile

    import torch.distributed as dist

    rank, running = _ranks()
    parent, name = os.path.split(os.path.abspath(output))
    path = [tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=parent) if rank == 0 else None]
    if running:
        dist.broadcast_object_list(path, src=0)
    return path[0]


def _barrier() -> None:
    import torch.distributed as dist

    if _ranks()[1]:
        dist.barrier()


def _publish(staging: str, output: str) -> None:
    """Move the finished conversion into ``output`` (the tracker file last), replacing
    the entries of an earlier conversion of the same names."""
    from adadpo_megatron.trainer.progress import TRACKER

    os.makedirs(output, exist_ok=True)
    names = sorted(os.listdir(staging), key=lambda n: n == TRACKER)
    for name in names:
        dest = os.path.join(output, name)
        if os.path.isdir(dest) and not os.path.islink(dest):
            shutil.rmtree(dest)
        os.replace(os.path.join(staging, name), dest)


def main(argv: list[str] | None = None) -> int:
    """Run one conversion; returns the exit status."""
    a = build_parser().parse_args(argv)
    _check_paths(a)
    from adadpo_megatron.conversion.safe_load import UnsafeCheckpointError
    from adadpo_megatron.trainer.checkpointing import CheckpointError

    output = a.output
    a.output = _staging(output)  # written there, moved into --output when complete
    rank, _ = _ranks()
    try:
        shape = _to_hf(a) if a.to_hf else _to_megatron(a)
        _barrier()  # every rank's shards are in the staging directory
        if rank == 0:
            _publish(a.output, output)
        _barrier()
    except (CheckpointError, UnsafeCheckpointError) as e:  # damaged, missing or unsafe
        raise SystemExit(f"convert_hf_to_megatron: error: {e}") from None
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException included
        failure = write_failure(e, a.output)
        if failure is None:
            raise
        raise SystemExit(f"convert_hf_to_megatron: error: cannot write --output {output} "
                         f"({failure}); nothing was moved into it and the staging directory "
                         f"{a.output} was removed") from None
    finally:
        if rank == 0:
            shutil.rmtree(a.output, ignore_errors=True)
    a.output = output
    print(f"wrote {a.output}")
    print("model flags for adadpo-train:", shlex.join(shape.trainer_flags()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
