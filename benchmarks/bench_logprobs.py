"""Peak extra memory and time of forward+backward per-token log-probs, three ways.

Variants, each given the same bf16 vocab-sharded logits ``[T, V/TP]`` and global targets,
each computing ``sum_t w_t * log p(target_t)`` and its gradient w.r.t. the logits:

* ``ours``: ``adadpo_megatron.logprobs.vocab_parallel_logprobs``.
* ``naive``: ``log_softmax(logits.float()).gather(...)``; under TP the shards are first
  all-gathered into the full ``[T, V]`` (what one does without a vocab-parallel kernel).
* ``megatron``: ``-vocab_parallel_cross_entropy(logits, targets)`` from megatron-core
  (arguments positional: ``tp_group=`` exists only from 0.19). It computes in place on its
  fp32 upcast; for bf16 logits that upcast is a copy and the input is untouched, so no
  clone is made. With ``--dtype fp32`` the upcast is the input itself: the input is
  cloned first, and the clone is counted in its memory.

Memory ("peak extra"): every variant runs in fresh processes. After the inputs are built
and a tiny warm-up ran, the kernel's peak-RSS mark is reset (``5`` written to
``/proc/self/clear_refs``) and the resident set size is read as the baseline; then
forward+backward run, and the peak extra is ``VmHWM - baseline`` from
``/proc/self/status``. The gradient w.r.t. the logits counts: every variant must produce
it. (``ru_maxrss`` cannot be reset and is not used.) Tensors of this size are mmap-ed by
glibc and unmapped on free, so RSS follows live tensor memory. On CUDA,
``torch.cuda.max_memory_allocated`` is used instead.

Usage (CPU, what the report quotes):
    python benchmarks/bench_logprobs.py                      # T=2048, V=128,256, TP=1 and 2
    python benchmarks/bench_logprobs.py --tokens 8192        # the full stated size (~16 GB)
    python benchmarks/bench_logprobs.py --device cuda --tp 1 # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATED_TOKENS = 8192
VARIANTS = ("ours", "naive", "megatron")


def _proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status: the CPU benchmark needs Linux")


def _reset_peak(device: str) -> int:
    """Resets the peak-memory mark; returns the memory in use now (the baseline), bytes."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # "5": reset the peak RSS mark (VmHWM) to the current RSS
    return _proc_status_bytes("VmRSS")


def _peak(device: str) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else _proc_status_bytes("VmHWM")


def _build_inputs(args, rank, world, device, dtype):
    import torch

    vocab_local = args.vocab // world
    gen = torch.Generator().manual_seed(1000 + rank)
    logits = torch.empty(args.tokens, vocab_local, dtype=dtype, device=device)
    for start in range(0, args.tokens, 64):  # chunk-wise: no fp32 full-size temporary
        block = torch.randn(min(64, args.tokens - start), vocab_local, generator=gen) * 3
        logits[start : start + block.shape[0]] = block.to(device)
    shared = torch.Generator().manual_seed(7)  # same targets and weights on every rank
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=shared).to(device)
    weights = torch.randn(args.tokens, generator=shared).to(device)
    return logits.requires_grad_(), targets, weights


def _run_variant(name, logits, targets, weights, group, args):
    """One forward+backward; returns (log-probs [T] fp32, gradient of this rank's shard)."""
    import torch
    import torch.distributed as dist

    if name == "ours":
        from adadpo_megatron.logprobs import vocab_parallel_logprobs

        logps = vocab_parallel_logprobs(logits, targets, group, chunk_tokens=args.chunk_tokens)
        (grad,) = torch.autograd.grad((logps * weights).sum(), logits)
        return logps, grad
    if name == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        source = logits.clone() if logits.dtype == torch.float32 else logits
        logps = -vocab_parallel_cross_entropy(source, targets)
        (grad,) = torch.autograd.grad((logps * weights).sum(), logits)
        return logps, grad
    world = dist.get_world_size(group)
    if world > 1:  # naive TP: gather the whole vocabulary on every rank
        with torch.no_grad():
            parts = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(parts, logits.detach(), group=group)
            full = torch.cat(parts, dim=-1)
            del parts
        full.requires_grad_()
    else:
        full = logits
    logp_all = torch.log_softmax(full.float(), dim=-1)
    logps = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    del logp_all
    (grad,) = torch.autograd.grad((logps * weights).sum(), full)
    if world > 1:
        rank, width = dist.get_rank(group), logits.shape[-1]
        grad = grad[:, rank * width : (rank + 1) * width]
    return logps, grad


def worker(args) -> None:
    """One rank of one variant: prints a JSON line with its peak extra memory and times."""
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    group = dist.group.WORLD
    if args.variant == "megatron":
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    if args.variant == "ours":
        import adadpo_megatron.logprobs  # noqa: F401 - import cost outside the baseline
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    # Warm-up on 16 tokens: lazy library and thread-pool set-up stays out of the peak.
    tiny = argparse.Namespace(**{**vars(args), "tokens": 16})
    _run_variant(args.variant, *_build_inputs(tiny, rank, world, device, dtype), group, tiny)
    logits, targets, weights = _build_inputs(args, rank, world, device, dtype)
    dist.barrier()
    times, peak = [], 0
    for _ in range(args.repeats):
        base = _reset_peak(args.device)
        dist.barrier()
        start = time.perf_counter()
        logps, grad = _run_variant(args.variant, logits, targets, weights, group, args)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        peak = max(peak, _peak(args.device) - base)
        # After the peak is read: the fp64 norm below makes a gradient-sized copy.
        checksum = [float(logps.detach().double().sum()), float(grad.double().norm())]
        del logps, grad
    print(json.dumps({"rank": rank, "peak": peak, "times": times, "checksum": checksum}))
    dist.destroy_process_group()


def _launch(args, variant: str, tp: int) -> list[dict]:
    """Starts `tp` worker processes (a fresh set per variant) and collects their results."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(port), WORLD_SIZE=str(tp), OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", "--variant", variant]
    for key in ("tokens", "vocab", "chunk_tokens", "repeats", "threads", "dtype", "device"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    procs = [
        subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, text=True)
        for r in range(tp)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} TP={tp} worker failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="T (stated size: 8192)")
    parser.add_argument("--vocab", type=int, default=128256, help="global vocabulary V")
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="ours' chunk; default: the library default scaled by tokens/8192, so that the "
        "fp32 work block is the same fraction of the logits as at the stated size",
    )
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk_tokens is None:
        import inspect

        from adadpo_megatron.logprobs import vocab_parallel_logprobs

        default = inspect.signature(vocab_parallel_logprobs).parameters["chunk_tokens"].default
        args.chunk_tokens = max(1, default * args.tokens // STATED_TOKENS)
    if args.worker:
        worker(args)
        return
    print(
        f"T={args.tokens} (stated: {STATED_TOKENS}), V={args.vocab}, logits {args.dtype} on "
        f"{args.device}, ours' chunk_tokens={args.chunk_tokens}, {args.threads} thread(s) per "
        f"rank, median of {args.repeats} forward+backward runs, fresh processes per variant"
    )
    gib = 1024**3
    for tp in args.tp:
        logits_bytes = args.tokens * (args.vocab // tp) * (2 if args.dtype == "bf16" else 4)
        print(f"\nTP={tp}: logits per rank {logits_bytes / gib:.3f} GiB")
        print(f"{'variant':>9} {'peak extra GiB':>15} {'x logits':>9} {'time s':>8}  checksum")
        rows = {}
        for variant in args.variants:
            res = _launch(args, variant, tp)
            peak = max(r["peak"] for r in res)
            seconds = sorted(max(r["times"][i] for r in res) for i in range(args.repeats))
            rows[variant] = (peak, seconds[len(seconds) // 2])
            check = res[0]["checksum"]
            print(
                f"{variant:>9} {peak / gib:15.3f} {peak / logits_bytes:9.2f} "
                f"{rows[variant][1]:8.3f}  sum logp {check[0]:.6e}, |grad| {check[1]:.6e}"
            )
        if "ours" in rows:
            for other in ("naive", "megatron"):
                if other in rows:
                    mem = rows["ours"][0] / rows[other][0]
                    spd = rows["ours"][1] / rows[other][1]
                    print(f"  ours/{other}: peak extra memory {mem:.3f}, time {spd:.3f}")


if __name__ == "__main__":
    main()
