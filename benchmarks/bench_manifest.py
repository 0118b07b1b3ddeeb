"""What the checkpoint manifest costs: sha256 time over write time, for a checkpoint size.

Writes a torch_dist checkpoint of ``--size-mb`` of fp32 tensors in ``--shards`` shard
files (``torch.distributed.checkpoint`` in one process, each shard file as one rank of a
job writes it, fsynced as megatron-core's writer does), then hashes it as
``adadpo_megatron.trainer.manifest.write_manifest`` does right after a save, and also
verifies it as a load does. Reports the seconds and the ratios hash/write and
verify/write. Each rank hashes only the shards it wrote, so the per-rank ratio at scale is
the same as here with one shard per rank.

Two cases: hashing straight after the write (the files still in the page cache: what a
save costs) and, with ``--drop-caches`` (root, Linux), hashing cold (what a load of a
checkpoint written earlier costs).

    python benchmarks/bench_manifest.py --size-mb 1024 --dir /path/on/the/checkpoint/disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _write(path: str, size_mb: int, shards: int) -> float:
    """Seconds to write ``size_mb`` MiB as ``shards`` fsynced shard files with DCP."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    per_tensor = 16 * 1024 * 1024  # 16 MiB tensors, as large weight matrices are
    n = max(1, size_mb * 1024 * 1024 // per_tensor)
    state = {f"layer{i}.weight": torch.randn(per_tensor // 4) for i in range(n)}
    start = time.perf_counter()
    # One file per "rank": DCP's thread_count splits the files as ranks would.
    save(state, storage_writer=FileSystemWriter(path, thread_count=shards, sync_files=True),
         no_dist=True)
    os.sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=512, help="checkpoint size in MiB")
    p.add_argument("--shards", type=int, default=2, help="shard files (ranks writing)")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--drop-caches", action="store_true",
                   help="also hash with a cold page cache (needs root)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    from adadpo_megatron.trainer.manifest import verify_manifest, write_manifest

    root = tempfile.mkdtemp(prefix="bench_manifest-", dir=a.dir)
    try:
        ckpt = os.path.join(root, "iter_0000001")
        write_s = _write(ckpt, a.size_mb, a.shards)
        start = time.perf_counter()
        write_manifest(ckpt)
        hash_s = time.perf_counter() - start
        start = time.perf_counter()
        verify_manifest(ckpt)
        verify_s = time.perf_counter() - start
        cold_s = None
        if a.drop_caches and _drop_caches():
            start = time.perf_counter()
            verify_manifest(ckpt)
            cold_s = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = {"size_mb": round(size / 2**20, 1), "shards": a.shards, "write_s": round(write_s, 3),
           "hash_after_write_s": round(hash_s, 3), "verify_warm_s": round(verify_s, 3),
           "verify_cold_s": None if cold_s is None else round(cold_s, 3),
           "hash_over_write": round(hash_s / write_s, 3)}
    if cold_s is not None:
        out["cold_verify_over_write"] = round(cold_s / write_s, 3)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{out['size_mb']} MiB in {a.shards} shards: write {write_s:.2f} s, hash after "
              f"write {hash_s:.2f} s (ratio {out['hash_over_write']:.2f}), verify warm "
              f"{verify_s:.2f} s" + ("" if cold_s is None else
                                     f", verify cold {cold_s:.2f} s (ratio "
                                     f"{out['cold_verify_over_write']:.2f})"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
