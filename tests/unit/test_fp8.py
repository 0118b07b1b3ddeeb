"""FP8 settings: flag parsing, validation, the mapping onto the real TransformerConfig,
and the start-up errors when Transformer Engine or an FP8 GPU is missing."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from adadpo_megatron.step import fp8
from adadpo_megatron.step.fp8 import (
    FP8_FORMATS,
    FP8_RECIPES,
    FP8Settings,
    add_fp8_args,
    amax_histories,
    pack_multiple,
    reference_config_kwargs,
    require_transformer_engine,
    transformer_config_kwargs,
)

TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}


def _parse(argv: list[str]) -> FP8Settings:
    parser = argparse.ArgumentParser()
    add_fp8_args(parser)
    return FP8Settings.from_args(parser.parse_args(argv))


@pytest.mark.parametrize("fmt", FP8_FORMATS)
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_every_format_and_recipe_reaches_transformer_config(fmt: str, recipe: str) -> None:
    settings = _parse(["--fp8-format", fmt, "--fp8-recipe", recipe])
    config = TransformerConfig(**TINY, **transformer_config_kwargs(settings))
    assert config.fp8 == fmt
    assert config.fp8_recipe == recipe
    assert config.fp8_param is False
    assert (config.fp8_amax_history_len, config.fp8_amax_compute_algo) == (1, "most_recent")


def test_delayed_scaling_fields_reach_transformer_config() -> None:
    settings = _parse(
        [
            "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
            "--fp8-amax-compute-algo", "max", "--fp8-margin", "2", "--fp8-param-gather",
        ]
    )
    config = TransformerConfig(**TINY, **transformer_config_kwargs(settings))
    assert (config.fp8, config.fp8_recipe) == ("hybrid", "delayed")
    assert config.fp8_amax_history_len == 1024
    assert config.fp8_amax_compute_algo == "max"
    assert config.fp8_margin == 2
    assert config.fp8_param is True


def test_defaults_are_bf16_and_megatron_lm_defaults() -> None:
    settings = _parse([])
    assert not settings.enabled
    config = TransformerConfig(**TINY, **transformer_config_kwargs(settings))
    assert config.fp8 is None and config.fp8_param is False
    # Same defaults as Megatron-LM's own flags, so recipes behave the same either way.
    assert (settings.recipe, settings.amax_history_len, settings.amax_compute_algo) == (
        "delayed", 1, "most_recent",
    )
    assert FP8Settings.from_args(argparse.Namespace()) == settings


def test_mapped_names_are_transformer_config_fields() -> None:
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    for settings in (FP8Settings(), FP8Settings(format="e4m3")):
        assert set(transformer_config_kwargs(settings)) <= names


def test_reference_kwargs_own_state_or_bf16() -> None:
    settings = FP8Settings(format="hybrid", amax_history_len=16, param_gather=True)
    own = reference_config_kwargs(settings)
    assert own["fp8"] == "hybrid" and own["fp8_amax_history_len"] == 16
    assert own["fp8_param"] is False
    assert reference_config_kwargs(settings, in_fp8=False) == {"fp8": None, "fp8_param": False}
    TransformerConfig(**TINY, **own)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"format": "e5m2"}, "--fp8-format"),
        ({"format": "hybrid", "recipe": "custom"}, "--fp8-recipe"),
        ({"format": "hybrid", "amax_compute_algo": "mean"}, "--fp8-amax-compute-algo"),
        ({"format": "hybrid", "amax_history_len": 0}, "--fp8-amax-history-len"),
        ({"format": "hybrid", "margin": -1}, "--fp8-margin"),
        ({"format": "hybrid", "recipe": "tensorwise", "amax_history_len": 8},
         "--fp8-amax-history-len"),
        ({"format": "hybrid", "recipe": "mxfp8", "amax_compute_algo": "max"},
         "--fp8-amax-compute-algo"),
        ({"recipe": "blockwise"}, "--fp8-format"),
        ({"param_gather": True}, "--fp8-format"),
    ],
)
def test_invalid_settings_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        FP8Settings(**kwargs)


def test_argparse_rejects_unknown_choices() -> None:
    with pytest.raises(SystemExit):
        _parse(["--fp8-format", "e5m2"])


def test_pack_multiple_per_recipe() -> None:
    assert pack_multiple(FP8Settings()) == 1
    expected = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}
    for recipe, multiple in expected.items():
        assert pack_multiple(FP8Settings(format="hybrid", recipe=recipe)) == multiple


# ---------------------------------------------------------------------------------------
# require_transformer_engine: a fake `transformer_engine` package on sys.path stands in for
# broken or partial installs; the real one is never installed in the CPU environment.


@pytest.fixture
def fake_te(tmp_path, monkeypatch):
    """Return a function writing a fake transformer_engine package with given sources."""

    def write(init_source: str = "", pytorch_source: str = "") -> None:
        package = tmp_path / "transformer_engine"
        (package / "pytorch").mkdir(parents=True)
        (package / "__init__.py").write_text(textwrap.dedent(init_source))
        (package / "pytorch" / "__init__.py").write_text(textwrap.dedent(pytorch_source))
        monkeypatch.syspath_prepend(str(tmp_path))

    yield write
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        del sys.modules[name]


def test_bf16_never_imports_transformer_engine() -> None:
    assert require_transformer_engine(FP8Settings()) is None
    assert "transformer_engine" not in sys.modules


@pytest.mark.skipif(
    "transformer_engine" in sys.modules, reason="Transformer Engine is installed here"
)
def test_missing_te_fails_with_cause_and_fix() -> None:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    else:
        pytest.skip("Transformer Engine is importable here")
    with pytest.raises(RuntimeError) as err:
        require_transformer_engine(FP8Settings(format="hybrid"))
    message = str(err.value)
    assert "--fp8-format hybrid" in message and "Transformer Engine" in message
    assert "ModuleNotFoundError" in message
    assert "pip install" in message and "drop --fp8-format" in message


def test_partial_te_install_raising_oserror_is_caught(fake_te) -> None:
    fake_te(init_source="raise OSError('libtransformer_engine.so: cannot open shared object')")
    with pytest.raises(RuntimeError, match=r"OSError: libtransformer_engine\.so"):
        require_transformer_engine(FP8Settings(format="e4m3"))


def test_te_unseen_by_megatron_fails(fake_te, monkeypatch) -> None:
    from megatron.core import fp8_utils

    fake_te()
    monkeypatch.setattr(fp8_utils, "HAVE_TE", False)
    with pytest.raises(RuntimeError, match="HAVE_TE is False"):
        require_transformer_engine(FP8Settings(format="hybrid"))


@pytest.fixture
def te_seen(fake_te, monkeypatch):
    from megatron.core import fp8_utils

    monkeypatch.setattr(fp8_utils, "HAVE_TE", True)
    return fake_te


def test_no_gpu_fails(te_seen, monkeypatch) -> None:
    te_seen()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        require_transformer_engine(FP8Settings(format="hybrid"))


@pytest.mark.parametrize(
    ("capability", "recipe", "ok"),
    [((8, 0), "delayed", False), ((9, 0), "delayed", True), ((9, 0), "mxfp8", False),
     ((10, 0), "mxfp8", True), ((8, 9), "blockwise", False)],
)
def test_gpu_capability_fallback(te_seen, monkeypatch, capability, recipe, ok) -> None:
    te_seen()  # a TE without check_* functions: the compute capability decides
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    settings = FP8Settings(format="hybrid", recipe=recipe)
    if ok:
        assert require_transformer_engine(settings).__name__ == "transformer_engine.pytorch"
    else:
        with pytest.raises(RuntimeError, match=r"'Fake GPU' cannot run this FP8 recipe"):
            require_transformer_engine(settings)


def test_te_own_support_check_is_used(te_seen, monkeypatch) -> None:
    te_seen(pytorch_source="""
        import types
        fp8 = types.SimpleNamespace(
            check_fp8_support=lambda: (False, "Device compute capability 8.9 or higher required"),
        )
    """)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    with pytest.raises(RuntimeError, match="8.9 or higher required"):
        require_transformer_engine(FP8Settings(format="hybrid"))


def test_amax_histories_snapshots_te_like_modules() -> None:
    class Scaling:
        def __init__(self) -> None:
            self.amax_history = torch.zeros(4, 3)

    class TELike(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fp8_meta = {"scaling_fwd": Scaling(), "scaling_bwd": Scaling(), "recipe": None}

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), TELike())
    snap = amax_histories(model)
    assert set(snap) == {"1/scaling_fwd", "1/scaling_bwd"}
    model[1].fp8_meta["scaling_fwd"].amax_history.add_(1.0)
    assert snap["1/scaling_fwd"].sum() == 0  # a copy, not a view
    assert fp8.amax_histories(torch.nn.Linear(2, 2)) == {}
