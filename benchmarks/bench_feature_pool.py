"""Selection from a memory-mapped feature array the size practitioners hold: time and peak memory.

Run: .venv/bin/python benchmarks/bench_feature_pool.py [--rows 1000000] [--dim 384] [--n 10000] [--path FILE]
     [--methods greedy threshold]
Writes a (rows, dim) float32 .npy of 1,024 Gaussian clusters (in tiles: never in memory whole), then runs
`model-collapse select FILE --n N --method METHOD --json` in a child process per method and reports its wall time
and peak resident memory (the child's own, from wait4).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from numpy.lib.format import open_memmap


def write_pool(path: str, rows: int, dim: int, tile: int = 100_000) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1024, dim)).astype(np.float32) * 3
    out = open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    for a in range(0, rows, tile):
        b = min(a + tile, rows)
        out[a:b] = centres[rng.integers(0, 1024, b - a)] + rng.normal(size=(b - a, dim)).astype(np.float32)
    out.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--path", default=None)
    ap.add_argument("--methods", nargs="*", default=["greedy", "threshold"], choices=["greedy", "threshold"])
    args = ap.parse_args()
    path = args.path or os.path.join(tempfile.mkdtemp(prefix="feature-pool-"), "pool.npy")
    if not os.path.exists(path):
        write_pool(path, args.rows, args.dim)
    cli = os.path.join(os.path.dirname(sys.executable), "model-collapse")
    for method in args.methods:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            t = time.perf_counter()
            p = subprocess.Popen([cli, "select", path, "--n", str(args.n), "--method", method, "--json", "--quiet"],
                                 stdout=out, stderr=err)
            _, status, usage = os.wait4(p.pid, 0)  # the child's own peak memory, not the largest of all children
            wall = time.perf_counter() - t
            p.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen's own record
            if p.returncode:
                err.seek(0)
                raise SystemExit(err.read())
            out.seek(0)
            res = json.load(out)
        peak = usage.ru_maxrss / 2**20
        what = (f"distances computed {res['distances_computed'] / (args.rows * args.n):.2f} of M*N" if method == "greedy"
                else f"tau0 {res['tau0']:.4g}, {res['passes']} passes")
        print(f"{method} {args.n} of {args.rows} x {args.dim} float32 (memory-mapped, "
              f"{os.path.getsize(path) / 2**30:.2f} GiB): {wall:.1f} s, peak resident memory {peak:.2f} GiB; {what}",
              flush=True)


if __name__ == "__main__":
    main()
