"""Sampling throughput of the UNet alone: batch size, float32 against bf16 autocast, one and two threads.

Run: .venv/bin/python benchmarks/bench_sampling.py [--preset tiny] [--side 8] [--channels 1] [--steps 20]
Images per second over `steps` DDIM steps of one batch (the UNet and the scheduler, no seeding or conversion),
each thread count in a child process; and, at batch 512 on one thread, the UNet's float32 rate from torch's flop
counter. What the loop's sampling can gain from the batch and from bf16; results go into benchmarks/RESULTS.md by
hand (bf16 changes the samples: see the seventh session's entry there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from bench_loop import plain_sample  # noqa: E402  (this folder is on the path: the script's own)
from model_collapse.diffusion import build_unet  # noqa: E402
from model_collapse.registry import MODEL_PRESETS  # noqa: E402

BATCHES = (128, 256, 512, 1024)


def images_per_s(unet, n: int, shape: tuple[int, int, int], steps: int, bf16: bool) -> float:
    c, side, _ = shape
    t0 = time.perf_counter()
    plain_sample(unet, n, side, c, steps, bf16=bf16)
    return n / (time.perf_counter() - t0)


def child(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.channels, args.side, args.side)
    unet = build_unet(MODEL_PRESETS[args.preset], args.side, args.channels).eval()
    for n in BATCHES:
        images_per_s(unet, n, shape, 3, False), images_per_s(unet, n, shape, 3, True)  # warm-up
        f32, bf = images_per_s(unet, n, shape, args.steps, False), images_per_s(unet, n, shape, args.steps, True)
        print(f"{args.threads} thread(s), batch {n}: float32 {f32:.0f} images/s, bf16 {bf:.0f} ({bf / f32:.2f}x)",
              flush=True)
    if args.threads == 1:
        from torch.utils.flop_counter import FlopCounterMode

        x, t = torch.randn(512, *shape), torch.tensor(500)
        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                unet(x, t)
            unet(x, t)
            t0 = time.perf_counter()
            for _ in range(5):
                unet(x, t)
            dt = (time.perf_counter() - t0) / 5
        flops = fc.get_total_flops()
        print(f"float32 forward at batch 512, 1 thread: {flops / 512 / 1e6:.2f} MFLOP per image, {dt * 1e3:.0f} ms, "
              f"{flops / dt / 1e9:.0f} GFLOP/s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny", choices=list(MODEL_PRESETS))
    ap.add_argument("--side", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # the child's
    args = ap.parse_args()
    if args.threads is not None:
        return child(args)
    print(f"torch {torch.__version__}, {args.preset} {args.side}x{args.side}x{args.channels}, DDIM {args.steps} steps",
          flush=True)
    for threads in (1, 2):
        subprocess.run([sys.executable, __file__, "--preset", args.preset, "--side", str(args.side), "--channels",
                        str(args.channels), "--steps", str(args.steps), "--threads", str(threads)], check=True)


if __name__ == "__main__":
    main()
