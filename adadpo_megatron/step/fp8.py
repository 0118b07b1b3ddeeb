"""FP8 settings: flags, validation, the mapping onto megatron-core, and the TE check.

FP8 in megatron-core runs through NVIDIA Transformer Engine (TE): each TE linear layer
keeps an ``fp8_meta`` (amax history and scale per tensor) and megatron-core wraps every
transformer layer in ``te.pytorch.fp8_autocast`` built from the ``TransformerConfig``
fields this module fills in. Without TE, megatron-core quietly returns a null context
and trains in bf16, so :func:`require_transformer_engine` turns that into a start-up error.

What stays out of FP8: the embedding, the output layer (a plain ``ColumnParallelLinear``
outside the autocast region), the log-softmax and the loss, which ``logprobs.py`` and
``losses.py`` compute in fp32.

Online reference and FP8 state. The online reference is a separate ``GPTModel`` (a frozen
copy of the policy), so its TE modules own their own ``fp8_meta``: running it can never
write the policy's amax history or scales. Two rules keep it that way:

* never share modules or ``fp8_meta`` between the two models (build the reference from its
  own config, load its weights; do not ``deepcopy`` a model while inside ``fp8_autocast``);
* run the reference under ``torch.no_grad()`` in its own forward (megatron-core enters a
  fresh ``fp8_autocast`` per model forward, whose amax reduction covers only the modules
  that ran inside it).

By default the reference also runs in FP8 with its own state (:func:`reference_config_kwargs`),
so that at step 0, policy == reference gives identical log-probs and zero rewards; pass
``in_fp8=False`` to run it in bf16. :func:`amax_histories` snapshots a model's FP8 state so a
test (or a debug assertion) can check that a reference forward left the policy's untouched.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from types import ModuleType
from typing import Any

import torch

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
AMAX_COMPUTE_ALGOS = ("max", "most_recent")

# Tokens per packed micro-batch must be a multiple of this for the FP8 GEMMs: TE's FP8
# kernels need 16-aligned dims, MXFP8 scales blocks of 32 values, blockwise 128x128 tiles.
_PACK_MULTIPLE = {"delayed": 16, "tensorwise": 16, "mxfp8": 32, "blockwise": 128}

# Minimum CUDA compute capability per recipe (FP8 tensor cores: Ada/Hopper; MXFP8: Blackwell).
_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}

# Megatron-LM defaults, kept so that a recipe behaves the same under either entry point.
_DEFAULT_RECIPE = "delayed"
_DEFAULT_AMAX_HISTORY_LEN = 1
_DEFAULT_AMAX_ALGO = "most_recent"

_INSTALL_FIX = (
    "install Transformer Engine built for this torch/CUDA "
    "(`pip install --no-build-isolation 'transformer-engine[pytorch]'`), "
    "or drop --fp8-format to train in bf16"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP8Settings:
    """FP8 training settings, one field per flag (Megatron-LM names and defaults)."""

    format: str | None = None
    """--fp8-format: 'e4m3' or 'hybrid' (e4m3 forward, e5m2 gradients); None = bf16 run."""
    recipe: str = _DEFAULT_RECIPE
    """--fp8-recipe: scaling recipe; 'delayed' uses the amax history below."""
    margin: int = 0
    """--fp8-margin: scale = 2**-margin * fp8_max / amax (delayed scaling only)."""
    amax_history_len: int = _DEFAULT_AMAX_HISTORY_LEN
    """--fp8-amax-history-len: steps of amax kept per tensor (delayed scaling only)."""
    amax_compute_algo: str = _DEFAULT_AMAX_ALGO
    """--fp8-amax-compute-algo: 'max' over the history or 'most_recent' (delayed only)."""
    param_gather: bool = False
    """--fp8-param-gather: keep weights in FP8 (TE fp8_model_init), halving weight memory."""

    def __post_init__(self) -> None:
        self._check_names()
        self._check_numbers()
        self._check_needs_format()

    @property
    def enabled(self) -> bool:
        """True when the run computes its GEMMs in FP8."""
        return self.format is not None

    def _check_names(self) -> None:
        for flag, value, valid in (
            ("--fp8-format", self.format, (None, *FP8_FORMATS)),
            ("--fp8-recipe", self.recipe, FP8_RECIPES),
            ("--fp8-amax-compute-algo", self.amax_compute_algo, AMAX_COMPUTE_ALGOS),
        ):
            if value not in valid:
                names = ", ".join(v for v in valid if v is not None)
                raise ValueError(f"{flag} {value!r} is not one of: {names}")

    def _check_numbers(self) -> None:
        if self.amax_history_len < 1:
            raise ValueError(
                f"--fp8-amax-history-len {self.amax_history_len} must be >= 1 "
                "(1 keeps only the latest amax)"
            )
        if self.margin < 0:
            raise ValueError(f"--fp8-margin {self.margin} must be >= 0")
        delayed_only = {
            "--fp8-amax-history-len": self.amax_history_len != _DEFAULT_AMAX_HISTORY_LEN,
            "--fp8-amax-compute-algo": self.amax_compute_algo != _DEFAULT_AMAX_ALGO,
            "--fp8-margin": self.margin != 0,
        }
        if self.recipe != "delayed":
            for flag, is_set in delayed_only.items():
                if is_set:
                    raise ValueError(
                        f"{flag} applies only to --fp8-recipe delayed, but the recipe is "
                        f"{self.recipe!r} (which computes scales from the current tensor): "
                        f"drop {flag} or use --fp8-recipe delayed"
                    )

    def _check_needs_format(self) -> None:
        if self.format is not None:
            return
        if self.recipe != _DEFAULT_RECIPE:
            raise ValueError(
                f"--fp8-recipe {self.recipe} has no effect without --fp8-format: "
                "add --fp8-format hybrid (or e4m3)"
            )
        if self.param_gather:
            raise ValueError("--fp8-param-gather needs --fp8-format hybrid (or e4m3)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FP8Settings:
        """Build from a namespace parsed with :func:`add_fp8_args` or by Megatron-LM.

        Both use the same ``dest`` names (``fp8``, ``fp8_recipe``, ...); a namespace
        without them (FP8 flags never added) gives the bf16 defaults.
        """
        return cls(
            format=getattr(args, "fp8", None),
            recipe=getattr(args, "fp8_recipe", _DEFAULT_RECIPE),
            margin=getattr(args, "fp8_margin", 0),
            amax_history_len=getattr(args, "fp8_amax_history_len", _DEFAULT_AMAX_HISTORY_LEN),
            amax_compute_algo=getattr(args, "fp8_amax_compute_algo", _DEFAULT_AMAX_ALGO),
            param_gather=getattr(args, "fp8_param_gather", False),
        )


def add_fp8_args(parser: argparse.ArgumentParser | Any) -> Any:
    """Add the FP8 flags (Megatron-LM names, dests and defaults) in an 'fp8' group.

    Takes an ``ArgumentParser`` (or an argument group); returns the group it added to.
    Do not call it on a Megatron-LM parser: Megatron-LM defines these flags itself.
    """
    group = parser.add_argument_group("fp8") if hasattr(parser, "add_argument_group") else parser
    group.add_argument(
        "--fp8-format", dest="fp8", default=None, choices=FP8_FORMATS,
        help="compute GEMMs in FP8 through Transformer Engine: e4m3 everywhere, or hybrid "
        "(e4m3 forward, e5m2 gradients); default: bf16",
    )
    group.add_argument(
        "--fp8-recipe", dest="fp8_recipe", default=_DEFAULT_RECIPE, choices=FP8_RECIPES,
        help="scaling recipe: delayed (amax history), tensorwise (current scaling), "
        "blockwise (128x128 tiles, Hopper), mxfp8 (Blackwell)",
    )
    group.add_argument(
        "--fp8-margin", dest="fp8_margin", type=int, default=0,
        help="scaling margin (power of 2), delayed recipe only",
    )
    group.add_argument(
        "--fp8-amax-history-len", dest="fp8_amax_history_len", type=int,
        default=_DEFAULT_AMAX_HISTORY_LEN,
        help="steps of amax history per tensor, delayed recipe only",
    )
    group.add_argument(
        "--fp8-amax-compute-algo", dest="fp8_amax_compute_algo", default=_DEFAULT_AMAX_ALGO,
        choices=AMAX_COMPUTE_ALGOS, help="amax from the history: max or most_recent",
    )
    group.add_argument(
        "--fp8-param-gather", dest="fp8_param_gather", action="store_true",
        help="keep the model weights in FP8 (saves weight memory; main grads stay fp32)",
    )
    return group


def transformer_config_kwargs(settings: FP8Settings) -> dict[str, Any]:
    """Return the ``TransformerConfig`` keyword arguments for these settings.

    Field names are those of megatron-core 0.16 to 0.19 (``fp8`` holds the format). A bf16
    run returns ``{"fp8": None, "fp8_param": False}`` so that no FP8 field is left implicit.
    """
    if not settings.enabled:
        return {"fp8": None, "fp8_param": False}
    return {
        "fp8": settings.format,
        "fp8_recipe": settings.recipe,
        "fp8_margin": settings.margin,
        "fp8_amax_history_len": settings.amax_history_len,
        "fp8_amax_compute_algo": settings.amax_compute_algo,
        "fp8_param": settings.param_gather,
    }


def reference_config_kwargs(settings: FP8Settings, *, in_fp8: bool = True) -> dict[str, Any]:
    """``TransformerConfig`` FP8 kwargs for the online reference model.

    ``in_fp8=True`` (default) mirrors the policy's numerics with the reference's own TE
    state; ``in_fp8=False`` runs the reference in bf16. Weights are never kept in FP8 for
    the reference (``fp8_param=False``): it is loaded once and never stepped.
    """
    if not in_fp8 or not settings.enabled:
        return {"fp8": None, "fp8_param": False}
    return {**transformer_config_kwargs(settings), "fp8_param": False}


def pack_multiple(settings: FP8Settings) -> int:
    """Multiple (tokens) every packed micro-batch is padded to: 1 for bf16, 16/32/128 for FP8."""
    if not settings.enabled:
        return 1
    return _PACK_MULTIPLE[settings.recipe]


def require_transformer_engine(settings: FP8Settings) -> ModuleType | None:
    """Check at start-up that FP8 can really run; return ``transformer_engine.pytorch``.

    Returns None for a bf16 run (TE is then not imported). Raises ``RuntimeError`` naming
    the cause and the fix when TE is missing or broken (any exception on import: a partial
    install raises OSError, AttributeError, ...), when megatron-core did not pick TE up,
    when there is no CUDA GPU, or when the GPU cannot run the chosen recipe.
    """
    if not settings.enabled:
        return None
    flags = f"--fp8-format {settings.format} --fp8-recipe {settings.recipe}"
    try:
        te = importlib.import_module("transformer_engine.pytorch")
    except Exception as exc:  # noqa: BLE001 - a broken TE can raise anything on import
        raise RuntimeError(
            f"{flags} needs NVIDIA Transformer Engine, but `import transformer_engine.pytorch` "
            f"failed with {type(exc).__name__}: {exc}. Fix: {_INSTALL_FIX}."
        ) from exc
    _check_megatron_sees_te(flags)
    _check_gpu(settings, flags, te)
    return te


def _check_megatron_sees_te(flags: str) -> None:
    # megatron-core probes TE once at import; if that probe failed (e.g. megatron was
    # imported before TE was fixed) it would run every layer in bf16 without a word.
    try:
        from megatron.core import fp8_utils
    except Exception as exc:  # noqa: BLE001 - same reason as above
        raise RuntimeError(f"{flags}: importing megatron.core.fp8_utils failed: {exc!r}") from exc
    if not getattr(fp8_utils, "HAVE_TE", False):
        raise RuntimeError(
            f"{flags}: transformer_engine imports, but megatron.core.fp8_utils did not find it "
            "(HAVE_TE is False), so megatron-core would train in bf16. Fix: make sure "
            "`import transformer_engine.pytorch` works before megatron.core is imported "
            "(same Python environment, matching CUDA libraries)."
        )


def _check_gpu(settings: FP8Settings, flags: str, te: ModuleType) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{flags} needs a CUDA GPU with FP8 tensor cores (H100, H200, L40S, B200), "
            "but torch sees no CUDA device. Fix: run on such a GPU, or drop --fp8-format."
        )
    supported, reason = _te_support(settings.recipe, te)
    if supported is None:  # this TE has no checker: fall back to the compute capability
        capability = torch.cuda.get_device_capability()
        need = _MIN_CAPABILITY[settings.recipe]
        supported = capability >= need
        reason = f"compute capability {capability} < {need}"
    if not supported:
        name = torch.cuda.get_device_name()
        raise RuntimeError(
            f"{flags}: the GPU {name!r} cannot run this FP8 recipe ({reason}). Fix: use an "
            "FP8-capable GPU (mxfp8 needs Blackwell), another --fp8-recipe, or drop --fp8-format."
        )


def _te_support(recipe: str, te: ModuleType) -> tuple[bool | None, str]:
    """Ask TE itself whether this GPU supports ``recipe``; (None, '') if TE cannot say."""
    checker_names = {
        "delayed": "check_fp8_support",
        "tensorwise": "check_fp8_support",
        "mxfp8": "check_mxfp8_support",
        "blockwise": "check_fp8_block_scaling_support",
    }
    fp8_module = getattr(te, "fp8", None)
    checker = getattr(fp8_module, checker_names[recipe], None)
    if checker is None:
        return None, ""
    supported, reason = checker()
    return bool(supported), str(reason)


def amax_histories(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Snapshot (cloned) of every TE module's forward and backward amax history.

    Keys are ``"<module name>/<scaling_fwd|scaling_bwd>"``; values are float32 tensors
    ``[history_len, num_fp8_tensors]``. Empty for a model without TE modules or before the
    first FP8 forward (TE allocates ``fp8_meta`` lazily).
    """
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        meta = getattr(module, "fp8_meta", None)
        if not isinstance(meta, dict):
            continue
        for key in ("scaling_fwd", "scaling_bwd"):
            state = meta.get(key)
            history = getattr(state, "amax_history", None)
            if isinstance(history, torch.Tensor):
                out[f"{name}/{key}"] = history.detach().clone()
    return out
