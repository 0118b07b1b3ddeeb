"""Output layer + per-token log-probs, forward and backward, four ways: time and peak memory.

Every variant gets the same inputs, the last hidden states ``[T, H]`` and this rank's
vocabulary shard of the output weight ``[V/TP, H]`` (both ``--dtypes``), global targets
and per-token weights ``w``; each computes ``sum_t w_t * log p(target_t)`` and its
gradients w.r.t. the hidden states and the weight:

* ``fused``: ``adadpo_megatron.fused_logprobs.fused_vocab_parallel_logprobs`` (tiles of
  ``[chunk_tokens, chunk_vocab]`` logits; never the whole logits).
* ``chunked``: ``logits = h @ W.T`` (the output layer), then
  ``adadpo_megatron.logprobs.vocab_parallel_logprobs`` (our unfused path).
* ``megatron``: ``logits = h @ W.T``, then megatron-core's
  ``-vocab_parallel_cross_entropy(logits, targets)`` (what ``GPTModel`` does with labels;
  it upcasts to fp32 and works in place on the upcast, i.e. on the logits themselves in
  fp32, which nothing else needs).
* ``naive``: ``logits = h @ W.T``, ``log_softmax(logits.float()).gather(...)``; under TP
  the logits are first all-gathered into ``[T, V]``.

Under TP each rank's hidden-state gradient is its vocabulary shard's part (megatron-core's
mapping in front of the output layer would all-reduce it: the same for every variant,
left out).

Memory ("peak extra"): each variant runs in fresh processes. After the inputs are built
and a tiny warm-up ran, the kernel's peak-RSS mark is reset (``5`` written to
``/proc/self/clear_refs``) and the resident set size read as the baseline; after forward
+ backward the peak extra is ``VmHWM - baseline``. glibc is told to mmap every allocation
above 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set and
RSS follows live tensor memory. On CUDA, ``torch.cuda.max_memory_allocated`` is used. The
table gives the peak with the two gradients (every variant must return them) and the
*work* memory: the peak minus those gradients' bytes, also as a multiple of the bf16
logits ``T x V/TP x 2`` bytes (the issue's goal: fused below 0.25).

Time: the median over ``--repeats`` runs of the wall-clock time and, on the CPU, of the
process CPU time (``time.process_time``; one thread per rank, so it is the compute the
variant needed, far less disturbed by other processes on a shared machine than the wall
clock). The ratios use CPU time on the CPU and wall time on CUDA.

Usage (one command; the CPU defaults take a few minutes on one thread, ~4 GB of memory):
    python benchmarks/bench_logprobs.py                     # T=2048, V=128,256, H=256, TP=1
    python benchmarks/bench_logprobs.py --tokens 8192 --hidden 4096  # stated size (~20 GB)
    python benchmarks/bench_logprobs.py --device cuda --tokens 8192 --vocab 128256 \\
        --hidden 4096 --dtypes bf16                                       # on one GPU
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
STATED_TOKENS, STATED_VOCAB = 8192, 128256
VARIANTS = ("fused", "chunked", "megatron", "naive")


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
    """hidden [T, H] (same on every rank), weight shard [V/TP, H], targets [T], w [T]."""
    import torch

    shared = torch.Generator().manual_seed(7)  # same on every rank
    hidden = (torch.randn(args.tokens, args.hidden, generator=shared)).to(device, dtype)
    vocab_local = args.vocab // world
    gen = torch.Generator().manual_seed(1000 + rank)
    weight = torch.empty(vocab_local, args.hidden, dtype=dtype, device=device)
    scale = 3.0 / args.hidden**0.5  # logits of standard deviation ~3
    for start in range(0, vocab_local, 4096):  # block-wise: no fp32 full-size temporary
        block = torch.randn(min(4096, vocab_local - start), args.hidden, generator=gen) * scale
        weight[start : start + block.shape[0]] = block.to(device, dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=shared).to(device)
    weights = torch.randn(args.tokens, generator=shared).to(device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets, weights


def _run_variant(name, hidden, weight, targets, weights, group, args):
    """One forward+backward; returns (log-probs [T] fp32, grad hidden, grad weight)."""
    import torch
    import torch.distributed as dist

    if name == "fused":
        from adadpo_megatron.fused_logprobs import fused_vocab_parallel_logprobs

        logps = fused_vocab_parallel_logprobs(
            hidden, weight, targets, group, args.fused_tokens, args.fused_vocab
        )
        return (logps, *torch.autograd.grad((logps * weights).sum(), [hidden, weight]))
    logits = hidden @ weight.T  # the output layer
    if name == "chunked":
        from adadpo_megatron.logprobs import vocab_parallel_logprobs

        logps = vocab_parallel_logprobs(logits, targets, group, chunk_tokens=args.chunk_tokens)
        del logits
        return (logps, *torch.autograd.grad((logps * weights).sum(), [hidden, weight]))
    if name == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logps = -vocab_parallel_cross_entropy(logits, targets)
        del logits
        return (logps, *torch.autograd.grad((logps * weights).sum(), [hidden, weight]))
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
    if world == 1:
        del logits, full
        return (logps, *torch.autograd.grad((logps * weights).sum(), [hidden, weight]))
    (grad_full,) = torch.autograd.grad((logps * weights).sum(), full)
    del full
    rank, width = dist.get_rank(group), logits.shape[-1]
    grad_shard = grad_full[:, rank * width : (rank + 1) * width]
    grads = torch.autograd.grad(logits, [hidden, weight], grad_shard)
    return (logps.detach(), *grads)


def worker(args) -> None:
    """One rank of one variant and dtype: prints a JSON line with its peak memory and times."""
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
    import adadpo_megatron.fused_logprobs  # noqa: F401 - import cost outside the baseline

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    # Warm-up on 16 tokens and a small vocabulary: lazy set-up stays out of the peak.
    tiny = argparse.Namespace(**{**vars(args), "tokens": 16, "vocab": 64 * world})
    _run_variant(args.variant, *_build_inputs(tiny, rank, world, device, dtype), group, tiny)
    hidden, weight, targets, weights = _build_inputs(args, rank, world, device, dtype)
    dist.barrier()
    times, cpu_times, peak = [], [], 0
    for _ in range(args.repeats):
        base = _reset_peak(args.device)
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        logps, g_h, g_w = _run_variant(args.variant, hidden, weight, targets, weights, group, args)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peak = max(peak, _peak(args.device) - base)
        checksum = [float(logps.detach().double().sum()), float(g_h.double().norm()),
                    float(g_w.double().norm())]
        del logps, g_h, g_w
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    print(json.dumps({"rank": rank, "peak": peak, "grad_bytes": grad_bytes, "times": times,
                      "cpu_times": cpu_times, "checksum": checksum}))
    dist.destroy_process_group()


def _launch(args, variant: str, tp: int, dtype: str) -> list[dict]:
    """Starts `tp` worker processes (a fresh set per variant) and collects their results."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", MASTER_ADDR="127.0.0.1")
    env.update(MASTER_PORT=str(port), WORLD_SIZE=str(tp), OMP_NUM_THREADS=str(args.threads))
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # big tensors: mmap, unmapped on free
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--dtype", dtype]
    for key in ("tokens", "vocab", "hidden", "chunk_tokens", "fused_tokens", "fused_vocab",
                "repeats", "threads", "device"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    procs = [
        subprocess.Popen(cmd, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, text=True)
        for r in range(tp)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} {dtype} TP={tp} worker failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _default_chunks(args) -> None:
    """fused: the library's tile; chunked: the library's chunk scaled by T/8192, so that its
    fp32 block is the same fraction of the logits as at the stated size (a fused tile does
    not grow with T: at T < 8192 it is a larger fraction than at the stated size)."""
    import inspect

    from adadpo_megatron.fused_logprobs import fused_vocab_parallel_logprobs
    from adadpo_megatron.logprobs import vocab_parallel_logprobs

    fused = inspect.signature(fused_vocab_parallel_logprobs).parameters
    args.fused_tokens = args.fused_tokens or fused["chunk_tokens"].default
    args.fused_vocab = args.fused_vocab or fused["chunk_vocab"].default
    if args.chunk_tokens is None:
        default = inspect.signature(vocab_parallel_logprobs).parameters["chunk_tokens"].default
        args.chunk_tokens = max(1, default * args.tokens // STATED_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="T (stated size: 8192)")
    parser.add_argument("--vocab", type=int, default=128256, help="global vocabulary V")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size H")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="chunked's chunk; default: its library default x T/8192")
    parser.add_argument("--fused-tokens", type=int, default=None,
                        help="fused tile rows; default: the library's chunk_tokens")
    parser.add_argument("--fused-vocab", type=int, default=None,
                        help="fused tile columns; default: the library's chunk_vocab")
    parser.add_argument("--tp", type=int, nargs="+", default=[1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--dtypes", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    _default_chunks(args)
    if args.worker:
        worker(args)
        return
    print(
        f"T={args.tokens}, V={args.vocab}, H={args.hidden} on {args.device}, fused tile "
        f"[{args.fused_tokens}, {args.fused_vocab}], chunked chunk_tokens={args.chunk_tokens}, "
        f"{args.threads} thread(s) per rank, median of {args.repeats} forward+backward runs, "
        "fresh processes per variant"
    )
    gib = 1024**3
    for dtype in args.dtypes:
        for tp in args.tp:
            logits_bf16 = args.tokens * (args.vocab // tp) * 2
            print(f"\n{dtype}, TP={tp}: bf16 logits per rank {logits_bf16 / gib:.3f} GiB")
            print(f"{'variant':>9} {'peak GiB':>9} {'work GiB':>9} {'work/logits':>12} "
                  f"{'wall s':>7} {'cpu s':>7}  checksum (sum logp, |grad h|, |grad W|)")
            rows = {}
            for variant in args.variants:
                res = _launch(args, variant, tp, dtype)
                peak = max(r["peak"] for r in res)
                work = max(r["peak"] - r["grad_bytes"] for r in res)
                wall, cpu = (
                    sorted(max(r[key][i] for r in res) for i in range(args.repeats))
                    for key in ("times", "cpu_times")
                )
                wall_s, cpu_s = wall[len(wall) // 2], cpu[len(cpu) // 2]
                # Ratios: CPU time on the CPU (robust to other processes on a shared
                # machine; one thread per rank), wall time on CUDA.
                rows[variant] = (work, cpu_s if args.device == "cpu" else wall_s)
                check = ", ".join(f"{c:.6e}" for c in res[0]["checksum"])
                print(f"{variant:>9} {peak / gib:9.3f} {work / gib:9.3f} "
                      f"{work / logits_bf16:12.3f} {wall_s:7.3f} {cpu_s:7.3f}  {check}")
            for other in ("megatron", "chunked", "naive"):
                if "fused" in rows and other in rows:
                    mem = rows["fused"][0] / max(rows[other][0], 1)
                    spd = rows["fused"][1] / rows[other][1]
                    kind = "cpu time" if args.device == "cpu" else "time"
                    print(f"  fused/{other}: work memory {mem:.3f}, {kind} {spd:.3f}")


if __name__ == "__main__":
    main()
