"""Benchmark the pair packer: C++ extension vs its pure-Python twin, and packing vs padding.

Workload: ``--pairs`` (default 1,000,000) synthetic preference pairs shaped like
UltraFeedback-binarized after tokenisation, packed into ``--capacity`` (default 8192 =
2 x 4096) token slots:

* prompt length ~ round(LogNormal(ln 120, 1.0)), clipped to [8, 2048];
* chosen and rejected completions drawn independently ~ round(LogNormal(ln 260, 0.8)),
  clipped to [4, 4096 - prompt], i.e. every sequence (prompt + completion) is at most
  4096 tokens, as ``adadpo-pack --max-seq-len 4096`` would truncate it;
* each sequence length is prompt + completion (the pair shares its prompt).

Reported, for each algorithm: packs vs the bound ``ceil(total / capacity)``, efficiency
(real tokens / packed slots), and the wall time of ``pack_pairs`` with ``backend="cpp"`` and
``backend="python"`` on the same arrays in the same run (best of ``--repeats``), with their
ratio; both backends' plans are checked to be identical. The padded baseline puts
``--batch-size`` consecutive pairs in a batch and pads all 2 x batch sequences to the longest
one (as TRL's DPO collator does): efficiency = real tokens / padded slots.

    python benchmarks/bench_packing.py            # the README figures
    python benchmarks/bench_packing.py --json     # the same, one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from adadpo_megatron.packing import ALGORITHMS, PackPlan, pack_pairs


def make_lengths(num_pairs: int, max_seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """UltraFeedback-like (chosen_lens, rejected_lens), int64 [num_pairs], each <= max_seq_len."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(np.rint(rng.lognormal(math.log(120), 1.0, num_pairs)), 8, max_seq_len // 2)
    prompt = prompt.astype(np.int64)

    def completion() -> np.ndarray:
        raw = np.rint(rng.lognormal(math.log(260), 0.8, num_pairs)).astype(np.int64)
        return np.clip(raw, 4, max_seq_len - prompt)

    return prompt + completion(), prompt + completion()


def padded_batch_slots(chosen: np.ndarray, rejected: np.ndarray, batch_size: int) -> int:
    """Token slots when each batch of ``batch_size`` pairs is padded to its longest sequence."""
    longest = np.maximum(chosen, rejected)
    starts = np.arange(0, longest.shape[0], batch_size)
    batch_max = np.maximum.reduceat(longest, starts)
    batch_pairs = np.diff(np.append(starts, longest.shape[0]))
    return int((2 * batch_pairs * batch_max).sum())


def best_time(fn: Callable[[], PackPlan], repeats: int) -> tuple[float, PackPlan]:
    """Smallest wall time of ``repeats`` calls (seconds) and the last result."""
    best = math.inf
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def same_plan(a: PackPlan, b: PackPlan) -> bool:
    """True when both plans hold identical arrays."""
    names = ("pack_of_pair", "pair_order", "pack_offsets", "pack_tokens")
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in names)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; return every figure in a JSON-able dict."""
    chosen, rejected = make_lengths(args.pairs, args.capacity // 2, args.seed)
    real = int(chosen.sum() + rejected.sum())
    bound = -(-real // args.capacity)
    padded = padded_batch_slots(chosen, rejected, args.batch_size)
    rows = []
    for algorithm in args.algorithms:

        def pack(backend: str, algorithm: str = algorithm) -> PackPlan:
            return pack_pairs(
                chosen, rejected, args.capacity, algorithm, seed=args.seed, backend=backend
            )

        cpp_s, plan = best_time(lambda: pack("cpp"), args.repeats)
        plan.validate(chosen, rejected)
        row: dict[str, Any] = {
            "algorithm": algorithm,
            "packs": plan.num_packs,
            "over_bound_pct": 100.0 * (plan.num_packs - bound) / bound,
            "efficiency": plan.efficiency(real),
            "cpp_s": cpp_s,
        }
        if not args.skip_python:
            python_s, twin = best_time(lambda: pack("python"), args.python_repeats)
            if not same_plan(plan, twin):
                raise AssertionError(f"{algorithm}: the C++ and Python plans differ")
            row.update(python_s=python_s, speedup=python_s / cpp_s)
        rows.append(row)
    return {
        "pairs": args.pairs,
        "capacity": args.capacity,
        "real_tokens": real,
        "bound_packs": bound,
        "padded_batch_size": args.batch_size,
        "padded_efficiency": real / padded,
        "repeats": {"cpp": args.repeats, "python": args.python_repeats},
        "machine": f"{platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "algorithms": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    """A compact human-readable table of ``run``'s result."""
    print(
        f"{result['pairs']:,} pairs, capacity {result['capacity']}, "
        f"{result['real_tokens']:,} real tokens, bound {result['bound_packs']:,} packs"
    )
    print(
        f"{'algorithm':<18} {'packs':>9} {'vs bound':>9} {'effic.':>7} "
        f"{'C++ s':>7} {'Python s':>9} {'speedup':>8}"
    )
    for row in result["algorithms"]:
        python_s = f"{row['python_s']:9.2f}" if "python_s" in row else f"{'-':>9}"
        speedup = f"{row['speedup']:7.0f}x" if "speedup" in row else f"{'-':>8}"
        print(
            f"{row['algorithm']:<18} {row['packs']:>9,} {row['over_bound_pct']:>+8.2f}% "
            f"{row['efficiency']:>7.2%} {row['cpp_s']:>7.3f} {python_s} {speedup}"
        )
    print(
        f"{'padded, batch ' + str(result['padded_batch_size']):<18} {'':>9} {'':>9} "
        f"{result['padded_efficiency']:>7.2%}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=8192, help="pack size (2 x max-seq-len)")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per padded batch")
    parser.add_argument("--seed", type=int, default=0, help="data and shuffle seed")
    parser.add_argument("--repeats", type=int, default=10, help="C++ timing: best of this many")
    parser.add_argument(
        "--python-repeats", type=int, default=3, help="Python twin timing: best of this many"
    )
    parser.add_argument("--skip-python", action="store_true", help="time the C++ packer only")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python benchmarks/bench_packing.py [flags]``."""
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
