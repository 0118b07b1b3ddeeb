"""Every tool checks its paths at start: one line naming the flag, path and cause, exit non-zero.

Cases: a missing input, an input that is a directory, an output whose parent is a file, and
an output on a read-only file system (simulated: the tests run as root, for whom permission
bits do not apply, and cannot mount one).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import pytest

from adadpo_megatron import preflight
from adadpo_megatron.preflight import PathError

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def readonly(monkeypatch):
    """Make every directory under the returned root refuse new files with EROFS."""
    real = tempfile.mkstemp
    roots: list[Path] = []

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        if dir is not None and any(Path(dir).resolve().is_relative_to(r) for r in roots):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return roots


def one_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_checks_name_the_flag_path_and_cause(tmp_path, readonly) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [
        (lambda: preflight.readable_file(tmp_path / "nope", "--x"), "--x {}/nope: no such file"),
        (lambda: preflight.readable_file(tmp_path, "--x"), "--x {}: is a directory, expected a file"),
        (lambda: preflight.readable_dir(afile, "--d"), "--d {}/afile: is a file, expected a directory"),
        (lambda: preflight.writable_dir(afile / "sub", "--save"), "--save {0}/afile/sub: its parent {0}/afile is a file"),
        (lambda: preflight.writable_dir(afile, "--save"), "--save {}/afile: is a file, expected a directory"),
        (lambda: preflight.writable_file(tmp_path, "--output"), "--output {}: is a directory, expected a file"),
    ]
    for call, message in cases:
        with pytest.raises(PathError) as info:
            call()
        assert str(info.value).startswith(message.format(tmp_path)), str(info.value)
    ro = tmp_path / "ro"
    ro.mkdir()
    readonly.append(ro.resolve())
    with pytest.raises(PathError, match=r"--log-dir .*/ro/logs: cannot write there \(Read-only file system\)"):
        preflight.writable_dir(ro / "logs", "--log-dir")
    preflight.writable_dir(tmp_path / "new" / "deep", "--save")  # created, probed, fine
    assert (tmp_path / "new" / "deep").is_dir() and not list((tmp_path / "new" / "deep").iterdir())


def test_pack_tool_paths(tmp_path, capsys, readonly) -> None:
    from adadpo_megatron.data import pack_tool

    sys.path.insert(0, str(REPO / "tests" / "data" / "pack"))
    from pack_helpers import write_wordlevel_tokenizer

    tok = write_wordlevel_tokenizer(tmp_path / "tok", ["a", "b"], config={"bos_token": "<s>", "eos_token": "</s>"})
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " a"}) + "\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    readonly.append(ro.resolve())
    cases = [
        ([str(tmp_path), "-o", str(tmp_path / "o1")], f"input {tmp_path}: is a directory"),
        ([str(src), "-o", str(afile / "out")], f"--output {afile}/out: {afile}: is a file"),
        ([str(src), "-o", str(ro / "out")], f"--output {ro}/out: {ro}: cannot write there (Read-only"),
        ([str(src), "-o", str(tmp_path / "o2"), "--tokenizer", str(tmp_path / "none.json")], "--tokenizer"),
    ]
    for argv, needle in cases:
        if "--tokenizer" not in argv:
            argv = [*argv, "--tokenizer", str(tok)]
        assert pack_tool.main([*argv, "--pack-size", "16"]) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith("adadpo-pack: error: ") and needle in line, line


def test_train_paths_fail_before_the_process_group(tmp_path, capsys, readonly, monkeypatch) -> None:
    from adadpo_megatron import train

    # Another test of this process may have a process group up already: watch our own call.
    started: list[bool] = []
    monkeypatch.setattr(train, "init_distributed", lambda cfg: started.append(True))

    data = tmp_path / "data"
    data.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    readonly.append(ro.resolve())
    base = ["--data-path", str(data), "--train-iters", "2", "--device", "cpu"]
    cases = [
        (["--data-path", str(tmp_path / "missing")], f"--data-path {tmp_path}/missing: no such directory"),
        (["--eval-data-path", str(afile)], f"--eval-data-path {afile}: is a file"),
        (["--save", str(afile / "ckpt")], f"--save {afile}/ckpt: its parent {afile} is a file"),
        (["--log-dir", str(ro / "logs")], f"--log-dir {ro}/logs: cannot write there (Read-only"),
        (["--tensorboard-dir", str(afile)], f"--tensorboard-dir {afile}: is a file"),
        (["--load", str(tmp_path / "nockpt")], f"--load {tmp_path}/nockpt: no such directory"),
        (["--preference-loss", "dpo", "--ref-logprobs", str(data)], f"--ref-logprobs {data}: is a directory"),
        (["--preference-loss", "dpo", "--ref-load", str(afile)], f"--ref-load {afile}: is a file"),
    ]
    for flags, needle in cases:
        assert train.main([*base, *flags]) == 2
        line = one_line(capsys.readouterr().err)
        assert line == f"adadpo-train: error: {needle}" or line.startswith(f"adadpo-train: error: {needle}"), line
    assert not started


def test_precompute_converter_and_planner_paths(tmp_path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    data = tmp_path / "data"
    data.mkdir()
    pre = _tool("precompute_ref_logprobs")
    with pytest.raises(SystemExit) as info:
        pre.parse(["--data-path", str(data), "--preference-loss", "dpo", "--ref-load", str(tmp_path / "nope")])
    assert str(info.value) == f"precompute_ref_logprobs: error: --ref-load {tmp_path}/nope: no such directory"
    with pytest.raises(SystemExit) as info:
        pre.parse(["--data-path", str(data), "--preference-loss", "dpo", "--output", str(afile / "x.npz")])
    assert str(info.value).startswith(f"precompute_ref_logprobs: error: --output {afile}: is a file")
    conv = _tool("convert_hf_to_megatron")
    with pytest.raises(SystemExit) as info:
        conv.main(["--hf", str(tmp_path / "nohf"), "--output", str(tmp_path / "out")])
    assert str(info.value) == f"convert_hf_to_megatron: error: --hf {tmp_path}/nohf: no such directory"
    with pytest.raises(SystemExit) as info:
        conv.main(["--hf", str(data), "--output", str(afile / "out")])
    assert str(info.value).startswith(f"convert_hf_to_megatron: error: --output {afile}/out: its parent")
    from adadpo_megatron.planner.cli import main as plan_main

    assert plan_main(["--config", str(tmp_path / "no.yaml"), "--model", "llama3-8b", "--num-gpus", "8"]) == 2
    assert one_line(capsys.readouterr().err) == f"plan_parallel.py: error: --config {tmp_path}/no.yaml: no such file"
    (tmp_path / "p.yaml").write_text("tensor-model-parallel-size: 8\n")
    assert plan_main(["--config", str(tmp_path / "p.yaml"), "--model", "llama3-8b", "--num-gpus", "8"]) == 0
    assert "TP=8" in capsys.readouterr().out  # the YAML is applied, not ignored
