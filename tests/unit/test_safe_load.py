"""Megatron-LM torch-format files are read without unpickling arbitrary objects.

A crafted ``model_optim_rng.pt`` whose ``__reduce__`` would run a call is refused in one
line naming the file and the call, and the call never runs (the same file loaded the old
way, ``weights_only=False``, does run it: the payload is live). A checkpoint holding every
type Megatron-LM's ``save_checkpoint`` writes (args namespace with enums, dtype and paths,
Python/numpy/torch RNG state, optimizer, rerun state, TE extra state) still converts.
"""

from __future__ import annotations

import argparse
import fractions
import importlib.util
import io
import os
import pathlib
import random
import signal
import sys

import numpy as np
import pytest
import torch

from adadpo_megatron.conversion import files
from adadpo_megatron.conversion.safe_load import (
    UnsafeCheckpointError,
    allowed_globals,
    load_megatron_torch,
)
from adadpo_megatron.conversion.weights import LlamaShape, hf_to_megatron, split

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_megatron", REPO / "tools" / "convert_hf_to_megatron.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _shape() -> LlamaShape:
    return LlamaShape(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                      num_query_groups=2, head_dim=8, vocab_size=64, tie_embeddings=False)


def _random_hf(shape: LlamaShape) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from test_hf_convert import _random_hf as make

    return make(shape, seed=5)


class _Payload:
    """Unpickling this calls os.mkdir(marker): what an attacker's file would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _convert_back(tool, src: pathlib.Path, hf_dir: pathlib.Path, out: pathlib.Path) -> None:
    tool.main(["--to-hf", "--megatron", str(src), "--hf-config", str(hf_dir / "config.json"),
               "--output", str(out), "--format", "torch", "--dtype", "fp32"])


def test_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path) -> None:
    pytest.importorskip("safetensors")
    tool, shape = _tool(), _shape()
    files.write_hf(_random_hf(shape), shape, str(tmp_path / "hf"), dtype=torch.float32)
    assert tool.main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "mc"),
                      "--format", "torch", "--dtype", "fp32"]) == 0
    rank_file = tmp_path / "mc" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    ckpt = torch.load(rank_file, weights_only=False)  # our own file: trusted here
    marker = tmp_path / "PWNED"
    ckpt["args"].payload = _Payload(str(marker))
    torch.save(ckpt, rank_file)

    with pytest.raises(SystemExit) as info:
        _convert_back(tool, tmp_path / "mc", tmp_path / "hf", tmp_path / "back")
    message = str(info.value)
    assert "\n" not in message and str(rank_file) in message and "posix.mkdir" in message
    assert not marker.exists() and not (tmp_path / "back").joinpath("model.safetensors").exists()
    # The payload is real: the old loader runs it.
    torch.load(rank_file, weights_only=False)
    assert marker.is_dir()


def test_non_dict_and_foreign_class_are_refused(tmp_path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(UnsafeCheckpointError, match="holds a list"):
        load_megatron_torch(str(tmp_path / "list.pt"))
    torch.save({"args": fractions.Fraction(1, 3)}, tmp_path / "fraction.pt")
    with pytest.raises(UnsafeCheckpointError, match="fractions.Fraction"):
        load_megatron_torch(str(tmp_path / "fraction.pt"))


def _megatron_lm_extras(step: int) -> dict:
    """What Megatron-LM's generate_state_dict adds around the model (checkpointing.py)."""
    from megatron.core.enums import ModelType
    from megatron.core.rerun_state_machine import RerunMode
    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(
        params_dtype=torch.bfloat16, attention_backend=AttnBackend.auto,
        model_type=ModelType.encoder_or_decoder, exit_signal=signal.SIGTERM,
        save=pathlib.PosixPath("/ckpt"), data_path=["a", "b"], lr=3e-4, iteration=step)
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
           "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()}}
    optim = {"optimizer": {"state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(2.)}},
                           "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": [0]}]},
             "fp32_from_fp16_params": [[torch.zeros(3)]]}
    return {"args": args, "checkpoint_version": 3.0, "iteration": step, "optimizer": optim,
            "opt_param_scheduler": {"max_lr": 3e-4, "num_steps": step},
            "rng_state": [rng], "num_floating_point_operations_so_far": 12345,
            "rerun_state_machine": {"mode": RerunMode.DISABLED, "rerun_requested": False}}


def test_megatron_lm_checkpoint_with_every_type_it_writes_still_converts(tmp_path) -> None:
    pytest.importorskip("safetensors")
    tool, shape = _tool(), _shape()
    hf = _random_hf(shape)
    files.write_hf(hf, shape, str(tmp_path / "hf"), dtype=torch.float32)
    shards = split(hf_to_megatron(hf, shape, divisible_by=16, tp=2), shape, tp=2, pp=1, vpp=1)
    # Megatron-LM's own layout: iter_0000007/mp_rank_0T/model_optim_rng.pt and the tracker.
    for (t, _), (model,) in shards.items():
        model = {**model, "decoder.layers.0.self_attention.core_attention._extra_state":
                 io.BytesIO(b"te-fp8-state")}
        d = tmp_path / "mlm" / "iter_0000007" / f"mp_rank_{t:02d}"
        d.mkdir(parents=True)
        torch.save({"model": model, **_megatron_lm_extras(7)}, d / "model_optim_rng.pt")
    (tmp_path / "mlm" / files.TRACKER).write_text("7\n")
    loaded = load_megatron_torch(str(tmp_path / "mlm" / "iter_0000007" / "mp_rank_00" /
                                     "model_optim_rng.pt"))
    assert loaded["args"].attention_backend.name == "auto" and loaded["iteration"] == 7
    assert isinstance(loaded["rng_state"][0]["np_rng_state"][1], np.ndarray)
    _convert_back(tool, tmp_path / "mlm", tmp_path / "hf", tmp_path / "back")
    back, _ = files.read_hf(str(tmp_path / "back"))
    for key, tensor in hf.items():
        assert torch.equal(back[key], tensor), key


def test_fallback_allow_list_names_megatron_cores_list(monkeypatch) -> None:
    """Without megatron.core.safe_globals the list is rebuilt by name: the same objects."""
    from megatron.core.safe_globals import SAFE_GLOBALS

    monkeypatch.setitem(sys.modules, "megatron.core.safe_globals", None)
    assert {id(x) for x in allowed_globals()} == {id(x) for x in SAFE_GLOBALS}


def _dist_checkpoint(tmp_path, tool) -> tuple[pathlib.Path, pathlib.Path]:
    """A converter-written torch_dist checkpoint, made foreign (no adadpo meta/manifest, as
    Megatron-LM writes them), so nothing but the pickle check stands before DCP."""
    shape = _shape()
    files.write_hf(_random_hf(shape), shape, str(tmp_path / "hf"), dtype=torch.float32)
    assert tool.main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "mc"),
                      "--format", "torch_dist", "--dtype", "fp32"]) == 0
    ckpt = tmp_path / "mc" / "iter_0000000"
    for name in ("adadpo_meta.json", "adadpo_manifest.json"):
        (ckpt / name).unlink()
    return ckpt, tmp_path / "hf"


def _to_hf_dist(tool, ckpt: pathlib.Path, hf_dir: pathlib.Path, out: pathlib.Path) -> None:
    tool.main(["--to-hf", "--megatron", str(ckpt.parent), "--hf-config",
               str(hf_dir / "config.json"), "--output", str(out), "--format", "torch_dist",
               "--dtype", "fp32"])


def test_torch_dist_metadata_with_a_payload_is_refused(tmp_path) -> None:
    import pickle

    pytest.importorskip("safetensors")
    tool = _tool()
    ckpt, hf_dir = _dist_checkpoint(tmp_path, tool)
    _to_hf_dist(tool, ckpt, hf_dir, tmp_path / "ok")  # the clean checkpoint converts
    meta_file, marker = ckpt / ".metadata", tmp_path / "PWNED"
    meta = pickle.loads(meta_file.read_bytes())  # our own file: trusted here
    meta.planner_data = _Payload(str(marker))
    meta_file.write_bytes(pickle.dumps(meta))
    with pytest.raises(SystemExit) as info:
        _to_hf_dist(tool, ckpt, hf_dir, tmp_path / "back")
    message = str(info.value)
    assert "\n" not in message and str(meta_file) in message and "posix.mkdir" in message
    assert not marker.exists()
    pickle.loads(meta_file.read_bytes())  # DCP's own pickle.load runs it
    assert marker.is_dir()


def test_torch_dist_object_with_a_payload_is_refused(tmp_path) -> None:
    """A non-tensor object (DCP reads those with torch.load(weights_only=False))."""
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from adadpo_megatron.conversion.safe_load import check_dist_checkpoint
    from adadpo_megatron.trainer.checkpointing import CheckpointError, _load

    pytest.importorskip("safetensors")
    ckpt, _ = _dist_checkpoint(tmp_path, _tool())
    check_dist_checkpoint(str(ckpt))
    meta = pickle.loads((ckpt / ".metadata").read_bytes())
    name = next(k for k, v in meta.state_dict_metadata.items()
                if isinstance(v, BytesStorageMetadata))
    index = next(i for i in meta.storage_data if i.fqn == name)
    info = meta.storage_data[index]
    buf = io.BytesIO()
    torch.save(_Payload(str(tmp_path / "PWNED")), buf)
    shard = ckpt / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    meta.storage_data[index] = type(info)(info.relative_path, offset, len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UnsafeCheckpointError, match=f"object {name}: refused to unpickle "
                                                    "posix.mkdir"):
        check_dist_checkpoint(str(ckpt))
    with pytest.raises(CheckpointError, match="posix.mkdir"):  # the trainer's loader
        _load({}, str(ckpt))
    assert not (tmp_path / "PWNED").exists()


def test_loads_leave_the_process_wide_allow_list_as_it_was(tmp_path) -> None:
    """megatron-core registers its SAFE_GLOBALS at import and reads common.pt relying on
    them: a check must not unregister them (torch's safe_globals context would)."""
    import megatron.core  # noqa: F401 - registers megatron-core's allow-list

    before = torch.serialization.get_safe_globals()
    torch.save({"model": {}, "args": argparse.Namespace(a=1)}, tmp_path / "m.pt")
    load_megatron_torch(str(tmp_path / "m.pt"))
    assert set(torch.serialization.get_safe_globals()) == set(before)
    assert argparse.Namespace in before
