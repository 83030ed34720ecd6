"""Wall time of the built-in demo (`model-collapse run` with no arguments) and the comparisons it prints.

Run: .venv/bin/python benchmarks/bench_demo.py [--out DIR] [--set key=value ...]
The demo must finish within 3 minutes on a 2-core machine; this measures it (not a timed test). This machine's
speed drifts by 10% and more between spells, so the line also gives the speed of the demo's own training step
measured right before and right after (`tiny`, batch 32, one thread: the work that fills 80% of the demo's time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def step_ms(steps: int = 200) -> float:
    """ms per training step of the demo's model and batch on one thread, in a child process (as the workers run)."""
    code = ("import sys, time, numpy as np, torch; torch.set_num_threads(1)\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "from bench_loop import settings\n"
            "from model_collapse.diffusion import build_unet, train\n"
            "from model_collapse.registry import MODEL_PRESETS\n"
            "x = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 1)).astype(np.uint8)\n"
            f"s = settings({steps}, 32)\n"
            "train(build_unet(MODEL_PRESETS['tiny'], 8, 1), x, None, s, seed=0, coords=('warm',))\n"
            "t = time.perf_counter(); train(build_unet(MODEL_PRESETS['tiny'], 8, 1), x, None, s, seed=0, coords=('a',))\n"
            f"print((time.perf_counter() - t) / {steps} * 1e3)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="demo-bench-"), "demo")
    cmd = [sys.executable, "-m", "model_collapse", "run", "--out", out, "--json", "--quiet"]
    for o in args.overrides:
        cmd += ["--set", o]
    before = step_ms()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = step_ms()
    if p.returncode:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(p.returncode)
    summary = json.loads(p.stdout)
    print(f"demo wall time: {wall:.0f} s ({wall / 60:.1f} min), {os.cpu_count()} cores, run dir {out}; the machine's "
          f"speed: {before:.1f} ms per training step before, {after:.1f} after")
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
