"""LossConfig validation, the registry's contract, and the README loss table (STYLE.md item 6)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from adadpo_megatron.losses import (
    FIELD_FLAGS,
    LossConfig,
    available_losses,
    compute_preference_loss,
    get_loss_spec,
    register_loss,
)
from adadpo_megatron.losses import registry as registry_module
from adadpo_megatron.losses.table import BEGIN, END, loss_table_markdown, replace_region

README = Path(__file__).resolve().parents[2] / "README.md"
BASE = ("dpo", "ipo", "hinge", "robust", "rdpo", "simpo", "cpo", "orpo")


def test_every_loss_of_losses_md_is_registered() -> None:
    assert set(available_losses()) == set(BASE) | {f"ada{b}" for b in BASE}
    assert len(available_losses()) == 16


def test_defaults_follow_losses_md() -> None:
    cfg = LossConfig()
    assert (cfg.name, cfg.balance_space, cfg.balance_granularity) == ("adadpo", "policy", "token")
    assert (cfg.balance_clip, cfg.balance_clip_mode, cfg.sft_weight) == (2.0, "upper", 0.0)
    assert LossConfig(name="adadpo", balance_clip=math.inf).balance_clip == math.inf
    with pytest.raises(TypeError):
        LossConfig("dpo")  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 0.2  # type: ignore[misc]


def test_needs_reference_comes_from_the_registry() -> None:
    free = {"simpo", "cpo", "orpo", "adasimpo", "adacpo", "adaorpo"}
    for name in available_losses():
        assert LossConfig(name=name).needs_reference == (name not in free), name


def test_unknown_name_lists_every_valid_name() -> None:
    with pytest.raises(ValueError, match="unknown preference loss 'dop'.*--preference-loss") as err:
        LossConfig(name="dop")
    assert all(name in str(err.value) for name in available_losses())


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (
            dict(name="dpo", gamma=1.0),
            r"LossConfig.gamma \(flag --simpo-gamma\) = 1.0 is not used by loss 'dpo'.*simpo, adasimpo",
        ),
        (
            dict(name="hinge", label_smoothing=0.1),
            r"label_smoothing.*not used by loss 'hinge'.*dpo, robust",
        ),
        (dict(name="dpo", alpha=0.1), r"alpha.*--rdpo-alpha.*not used.*rdpo"),
        (dict(name="simpo", lam=0.5), r"lam.*--cpo-lambda.*not used.*cpo, orpo"),
        (
            dict(name="dpo", balance_clip=3.0),
            r"balance_clip.*--adadpo-clip.*not used by loss 'dpo'.*adadpo",
        ),
        (dict(name="ipo", balance_clip_mode="both"), r"balance_clip_mode.*not used by loss 'ipo'"),
        (
            dict(name="adasimpo", balance_space="ratio"),
            r"balance_space.*--adadpo-space.*'ratio'.*reference-free.*adadpo",
        ),
        (dict(name="cpo", balance_space="ratio"), r"'ratio'.*reference-free"),
        (
            dict(name="adaipo", balance_granularity="sequence"),
            r"--adadpo-granularity.*'sequence'.*length-normalised.*adadpo",
        ),
        (dict(name="adaorpo", balance_granularity="sequence"), r"'sequence'.*length-normalised"),
        (dict(name="simpo", balance_granularity="sequence"), r"'sequence'.*length-normalised"),
        (dict(name="adadpo", balance_clip=0.5), r"balance_clip.*0.5.*>= 1, or inf"),
        (dict(name="adadpo", balance_clip=math.nan), r"balance_clip.*>= 1"),
        (dict(name="adadpo", beta=0.0), r"beta \(flag --dpo-beta\) = 0.0: must be > 0"),
        (dict(name="dpo", beta=-1.0), r"beta.*must be > 0"),
        (dict(name="dpo", beta=math.inf), r"beta.*finite"),
        (
            dict(name="robust", label_smoothing=0.5),
            r"label_smoothing \(flag --dpo-label-smoothing\) = 0.5: must lie in \[0, 0.5\)",
        ),
        (dict(name="adarobust", label_smoothing=0.7), r"label_smoothing.*\[0, 0.5\)"),
        (dict(name="dpo", label_smoothing=-0.1), r"label_smoothing.*\[0, 0.5\)"),
        (dict(name="cpo", lam=-1.0), r"lam.*must be >= 0"),
        (dict(name="dpo", sft_weight=-0.1), r"sft_weight.*--sft-weight.*>= 0"),
        (dict(name="adadpo", balance_space="pol"), r"balance_space.*'pol'.*policy, ratio"),
        (dict(name="adadpo", balance_granularity="seq"), r"balance_granularity.*token, sequence"),
        (dict(name="adadpo", balance_clip_mode="lower"), r"balance_clip_mode.*upper, both"),
    ],
)
def test_invalid_configurations_raise(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        LossConfig(**kwargs)


def test_valid_non_default_configurations() -> None:
    LossConfig(
        name="adadpo", balance_space="ratio", balance_granularity="sequence", balance_clip=math.inf
    )
    LossConfig(
        name="dpo", balance_space="ratio", balance_granularity="sequence"
    )  # where grad_ratio is measured
    LossConfig(name="robust", label_smoothing=0.49)
    LossConfig(name="adaorpo", lam=0.1, balance_clip=1.0, balance_clip_mode="both", sft_weight=1.0)
    LossConfig(name="adasimpo", gamma=-0.5, beta=10.0)


def test_every_field_has_a_flag() -> None:
    assert set(FIELD_FLAGS) == {f.name for f in dataclasses.fields(LossConfig)}


@pytest.mark.parametrize("name", available_losses())
def test_registry_entries_document_their_contract(name: str) -> None:
    spec = get_loss_spec(name)
    assert spec.contract.endswith(".") and len(spec.contract) < 100
    doc = spec.fn.__doc__ or ""
    for part in (
        "L = " if spec.base not in ("cpo", "orpo") else "term",
        "Shapes",
        "Stop-gradient",
        "k",
    ):
        assert part in doc, (name, part)
    assert set(spec.hparams) <= set(FIELD_FLAGS)
    assert spec.balanced == name.startswith("ada") and spec.base == (
        name[3:] if spec.balanced else name
    )


def test_adding_a_loss_is_one_decorated_function(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_loss(
        "squared",
        formula="`(1 - beta*h)^2`",
        needs_reference=True,
        length_normalised=False,
        hparams=("beta",),
        balanced="adasquared",
        balanced_formula="`squared` with `k`",
    )
    def squared(cfg, x, k):
        """A test loss.

        ``L = (1 - beta*(k*rho_w - rho_l))^2``.  Shapes: [N] -> [N].  Stop-gradient: k.
        """
        return (1 - cfg.beta * (k * x.rho_w - x.rho_l)) ** 2

    assert {"squared", "adasquared"} <= set(available_losses())
    pw = torch.tensor([-3.0, -5.0], dtype=torch.float64)
    pl = torch.tensor([-4.0, -2.0], dtype=torch.float64)
    loss, m = compute_preference_loss(
        LossConfig(name="adasquared", balance_clip=math.inf),
        pw,
        pl,
        pw - 1,
        pl,
        torch.tensor([1, 1]),
        torch.tensor([1, 1]),
    )
    k = torch.exp(pw - pl)
    torch.testing.assert_close(loss, (1 - 0.1 * (k * 1.0 - 0.0)) ** 2)
    torch.testing.assert_close(m["adadpo/coef_mean"], k)
    with pytest.raises(ValueError, match="registered twice"):
        register_loss("dpo", formula="", needs_reference=True, length_normalised=False)(squared)
    with pytest.raises(TypeError, match="docstring"):
        register_loss("nodoc", formula="", needs_reference=True, length_normalised=False)(
            lambda c, x, k: x.pol_w
        )


def _readme_region() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)]


def test_readme_loss_table_lists_exactly_the_registered_losses() -> None:
    lines = _readme_region().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| loss |")) + 2
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    names = [re.match(r"\| `([a-z]+)` \|", row).group(1) for row in rows]
    assert sorted(names) == sorted(available_losses())  # each once, none unknown


def test_readme_loss_region_is_the_generated_one() -> None:
    assert _readme_region() == "\n" + loss_table_markdown(), (
        "README.md's loss region is stale: run `python -m adadpo_megatron.losses.table --write README.md`"
    )
    assert replace_region(f"a{BEGIN}old{END}b", "new\n") == f"a{BEGIN}\nnew\n{END}b"
