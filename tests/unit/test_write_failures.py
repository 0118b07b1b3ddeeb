"""A full disk (injected OSError(ENOSPC), or a small tmpfs where mounting works) during
each tool's writes: one line naming the path and the OS error, no staging files left,
what was there before intact. The checkpoint case runs in tests/distributed/test_faults.py.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "examples" / "data" / "tokenizer.model"
ENOSPC = "[Errno 28] No space left on device"


def _enospc(path) -> OSError:
    if path is None:  # a write to an open file: the error names no file
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"question {i} " * 8, "chosen": f"good answer {i} " * 6,
             "rejected": f"bad {i} " * 5} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pack(jsonl: Path, out: Path, *extra: str) -> int:
    from adadpo_megatron.data.pack_tool import main

    return main([str(jsonl), "--output", str(out), "--tokenizer", str(TOKENIZER),
                 "--pack-size", "256", *extra])


def test_describe_digs_out_the_os_error() -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    from adadpo_megatron.io_errors import describe_os_error, write_failure

    inner = _enospc("/ckpt/iter_0000006.tmp-1/__1_0.distcp")
    wrapped = CheckpointException("save failed", {1: (inner, None), 3: (ValueError("x"), None)})
    assert describe_os_error(wrapped) == f"/ckpt/iter_0000006.tmp-1/__1_0.distcp: {ENOSPC}"
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert describe_os_error(e).endswith(ENOSPC)
    assert write_failure(ValueError("a bug"), "/") is None  # not an I/O failure: shown as is


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="example tokenizer missing")
def test_pack_full_disk_removes_its_staging_and_keeps_the_old_dataset(tmp_path, monkeypatch,
                                                                      capsys) -> None:
    from adadpo_megatron.data import pack_tool

    jsonl = _pairs(tmp_path / "pairs.jsonl", 20)
    out = tmp_path / "ds"
    assert _pack(jsonl, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full(tmp, writer, opts):
        (tmp / "index.npz").write_bytes(b"partial")
        raise _enospc(tmp / "index.npz")

    monkeypatch.setattr(pack_tool, "_write_index", full)
    assert _pack(jsonl, out, "--overwrite") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"adadpo-pack: error: --output {out}: "), err
    assert ENOSPC in err[0] and "index.npz" in err[0] and "was removed" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "pairs.jsonl"]  # no ds.tmp-*
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.skipif(not TOKENIZER.is_file(), reason="example tokenizer missing")
def test_pack_on_a_full_tmpfs(tmp_path, capsys) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected test runs")
    try:
        jsonl = _pairs(tmp_path / "pairs.jsonl", 3000)
        assert _pack(jsonl, mnt / "ds") == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ENOSPC in err[0], err
        assert os.listdir(mnt) == []  # the staging directory is gone, nothing published
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_metrics_full_disk_is_one_error_naming_the_file(tmp_path) -> None:
    from adadpo_megatron.io_errors import WriteFailed
    from adadpo_megatron.trainer.metrics import MetricsWriter

    writer = MetricsWriter(enabled=True, log_dir=str(tmp_path), tensorboard_dir=None,
                           print_fn=lambda *a, **k: None)
    writer.log(1, 5, {"loss": 0.5})

    class Full:
        closed = False

        def write(self, text):
            raise _enospc(None)

        def close(self):
            raise _enospc(None)

    writer._jsonl = Full()
    with pytest.raises(WriteFailed) as info:
        writer.log(2, 5, {"loss": 0.4})
    assert str(info.value) == (f"cannot write the metrics log of step 2 "
                               f"({tmp_path / 'metrics.jsonl'}: {ENOSPC})")
    writer.close()  # the broken file was let go: closing again raises nothing
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_sidecar_full_disk_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    from adadpo_megatron.step import reference

    path = tmp_path / "ref_logprobs.npz"

    def savez(file, **arrays):
        Path(file).write_bytes(b"half")
        raise _enospc(file)

    monkeypatch.setattr(reference.np, "savez", savez)
    with pytest.raises(OSError) as info:
        reference.write_sidecar(str(path), np.zeros(4), "fp", {})
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def _converter():
    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_megatron", REPO / "tools" / "convert_hf_to_megatron.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_converter_full_disk_leaves_output_untouched(tmp_path, monkeypatch) -> None:
    pytest.importorskip("safetensors")
    import torch

    from adadpo_megatron.conversion.files import write_hf
    from adadpo_megatron.conversion.weights import LlamaShape

    tool = _converter()
    shape = LlamaShape(num_layers=1, hidden_size=8, num_attention_heads=2, num_query_groups=2,
                       head_dim=4, ffn_hidden_size=16, vocab_size=32,
                       tie_embeddings=False)
    state = {"model.embed_tokens.weight": torch.randn(32, 8),
             "model.norm.weight": torch.ones(8), "lm_head.weight": torch.randn(32, 8)}
    for name, dims in {"self_attn.q_proj": (8, 8), "self_attn.k_proj": (8, 8),
                       "self_attn.v_proj": (8, 8), "self_attn.o_proj": (8, 8),
                       "mlp.gate_proj": (16, 8), "mlp.up_proj": (16, 8),
                       "mlp.down_proj": (8, 16)}.items():
        state[f"model.layers.0.{name}.weight"] = torch.randn(*dims)
    state["model.layers.0.input_layernorm.weight"] = torch.ones(8)
    state["model.layers.0.post_attention_layernorm.weight"] = torch.ones(8)
    write_hf(state, shape, str(tmp_path / "hf"), dtype=torch.float32)
    out = tmp_path / "mc"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")

    real = tool.io.write_megatron_dist

    def full(*args, **kwargs):
        real(*args, **kwargs)  # most of it written, then the disk fills
        raise _enospc(Path(args[2]) / "iter_0000000" / "__0_0.distcp")

    monkeypatch.setattr(tool.io, "write_megatron_dist", full)
    with pytest.raises(SystemExit) as info:
        tool.main(["--hf", str(tmp_path / "hf"), "--output", str(out), "--dtype", "fp32"])
    text = str(info.value)
    assert text.startswith(f"convert_hf_to_megatron: error: cannot write --output {out} ("), text
    assert ENOSPC in text and "\n" not in text, text
    assert sorted(os.listdir(tmp_path)) == ["hf", "mc"]  # no mc.tmp-*
    assert os.listdir(out) == ["keep.txt"]
