"""Launch ``examples/megatron_lm/pretrain_adadpo.py`` under Megatron-LM's real loop (CPU).

Each launch is ``torchrun --nproc-per-node N tests/megatron_lm/shim.py
examples/megatron_lm/pretrain_adadpo.py <MODEL> <flags>``: the shim (test-only) patches
Megatron-LM's CUDA assumptions, then runs the entry unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from torchrun_launch import free_port  # noqa: E402

TOKENIZER = REPO / "examples" / "data" / "tokenizer.model"

# A tiny GPT as a Megatron-LM recipe gives it; the second block is what a CPU run needs
# (no fused CUDA kernels, gloo), the third what the AdaDPO entry needs.
MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
    "--num-attention-heads", "4", "--seq-length", "128", "--max-position-embeddings", "128",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "3e-3",
    "--lr-decay-style", "constant", "--clip-grad", "0", "--log-interval", "1",
    "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", str(TOKENIZER),
    "--distributed-backend", "gloo", "--transformer-impl", "local",
    "--no-gradient-accumulation-fusion",
    "--no-bias-gelu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion",
    "--no-persist-layer-norm",
    "--dataloader-type", "external", "--calculate-per-token-loss",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]  # fmt: skip

# The same model and optimiser in adadpo-train's flags (Megatron-LM's defaults spelled out:
# weight decay 0.01, no warm-up).
ADADPO_TRAIN_MODEL = [
    "--device", "cpu", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "256",
    "--num-attention-heads", "4", "--seq-length", "128", "--max-position-embeddings", "128",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "3e-3",
    "--lr-decay-style", "constant", "--lr-warmup-fraction", "0", "--clip-grad", "0",
    "--weight-decay", "0.01", "--log-interval", "1",
]  # fmt: skip


def _env(megatron_lm_path: str) -> dict[str, str]:
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "MEGATRON_LM_PATH": megatron_lm_path, "CUDA_DEVICE_MAX_CONNECTIONS": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # --wandb-project: no network
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def torchrun(nproc: int, script: list[str], env: dict[str, str], timeout: float = 300):
    """Run ``torchrun --nproc-per-node NPROC SCRIPT...`` from the repository root."""
    for _ in range(3):  # another job on the machine may take the free port first
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", *script]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)
        if "EADDRINUSE" not in proc.stderr:
            break
    return proc


def pretrain(megatron_lm_path: str, nproc: int, *flags: str, check: bool = True):
    """One ``pretrain_adadpo.py`` run under Megatron-LM's loop; the completed process."""
    proc = torchrun(nproc, [str(REPO / "tests" / "megatron_lm" / "shim.py"),
                            str(REPO / "examples" / "megatron_lm" / "pretrain_adadpo.py"),
                            *MODEL, *flags], _env(megatron_lm_path))
    if check:
        assert proc.returncode == 0, (f"pretrain_adadpo.py failed ({proc.returncode}):\n"
                                      f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_tool(megatron_lm_path: str, nproc: int, script: list[str]):
    """Run a plugin script (``-m adadpo_megatron.train``, a tool) under torchrun; must pass."""
    proc = torchrun(nproc, script, _env(megatron_lm_path))
    assert proc.returncode == 0, (f"{script[:2]} failed ({proc.returncode}):\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
