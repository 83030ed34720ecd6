"""How a matrix product's time depends on its column count on this machine: the reason for `padded_count`.

Run: .venv/bin/python benchmarks/bench_product_shapes.py [--reps 7]
For rows x columns products of the selectors' shapes (the rows of a pool against a few to a few hundred centres or
accepted points, float32 and int8), prints each column count's median time next to the time of the padded count
`padded_count` gives (zero rows added to the second operand), both measured in this process, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from model_collapse.neighbours import padded_count  # noqa: E402


def median_ms(f, reps: int) -> float:
    f()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[reps // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    counts = [1, 6, 7, 13, 17, 31, 33, 63, 100, 127, 130, 150, 190, 255, 300, 500]
    for kind, rows, d in (("float32", 4096, 3072), ("float32", 16384, 384), ("int8", 4096, 3072)):
        if kind == "int8":
            a = torch.randint(-128, 128, (rows, d), dtype=torch.int8)
            pool = torch.randint(-128, 128, (600, d), dtype=torch.int8)

            def product(c):
                return torch._int_mm(a, pool[:c].T)
        else:
            a, pool, bias = torch.randn(rows, d), torch.randn(600, d), torch.randn(600)

            def product(c):
                return torch.addmm(bias[:c][None], a, pool[:c].T, alpha=-2.0)
        total_plain = total_padded = 0.0
        print(f"{kind}, {rows} x {d} rows against c columns: c, ms, padded c, ms, ratio")
        for c in counts:
            p = padded_count(c)
            plain = median_ms(lambda: product(c), args.reps)
            padded = median_ms(lambda: product(p), args.reps) if p != c else plain
            total_plain, total_padded = total_plain + plain, total_padded + padded
            print(f"  {c:4d} {plain:7.2f}  {p:4d} {padded:7.2f}  {padded / plain:5.2f}")
        share = total_padded / total_plain
        print(f"  all counts: {total_plain:.1f} ms plain, {total_padded:.1f} ms padded ({share:.2f})")


if __name__ == "__main__":
    main()
