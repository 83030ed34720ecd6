"""Wall time of the built-in demo (`model-collapse run` with no arguments) and the comparisons it prints.

Run: .venv/bin/python benchmarks/bench_demo.py [--out DIR] [--set key=value ...]
The demo must finish within 10 minutes on a 2-core machine; this measures it (not a timed test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="demo-bench-"), "demo")
    cmd = [sys.executable, "-m", "model_collapse", "run", "--out", out, "--json", "--quiet"]
    for o in args.overrides:
        cmd += ["--set", o]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(p.returncode)
    summary = json.loads(p.stdout)
    print(f"demo wall time: {wall:.0f} s ({wall / 60:.1f} min), {os.cpu_count()} cores, run dir {out}")
    for arm, s in summary["arms"].items():
        ent = ", ".join(f"{v:.2f}" for v in s["train_entropy_pixel"])
        gs = ", ".join(f"{v:.3f}" for v in s["gen_score_pixel"])
        print(f"  {arm}: entropy [{ent}]  gen score [{gs}]  verdicts {s['verdict']}")
    for c in summary["claims"]:  # one seed: no interval, so the sign of each effect is what the demo shows
        if c["effect"] is None:
            continue
        side = c["effect"] < c["threshold"] if c["direction"] == "below" else c["effect"] > c["threshold"]
        print(f"  [{'yes' if side else 'NO '}] {c['id']}: effect {c['effect']:.4g} ({c['verdict']})")


if __name__ == "__main__":
    main()
