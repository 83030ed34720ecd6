"""One prepared GPU check: train the paper's UNet48 on 32x32 images in bf16, sample with DDPM and DDIM, and report
training steps/s and images/s for each sampler. Finishes in a few minutes on one GPU.

Run on a GPU machine:  python benchmarks/gpu_check.py --out gpu_check.json
CPU path (tiny sizes, what the test runs):  python benchmarks/gpu_check.py --cpu-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from model_collapse import diffusion as D  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny sizes on the CPU (tests)")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-samples", type=int, default=512)
    ap.add_argument("--ddpm-steps", type=int, default=1000)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cpu_tiny:
        device, amp, spec, side = "cpu", None, D.UNetSpec((8, 8, 16), 1, 4), 8
        args.steps, args.batch, args.n_samples, args.ddpm_steps, args.ddim_steps = 3, 4, 4, 5, 3
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU here; use --cpu-tiny for the CPU path")
        device, amp, spec, side = "cuda", torch.bfloat16, D.MODEL_PRESETS["unet48"], 32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    images = np.random.default_rng(0).integers(0, 256, size=(4096, side, side, 3), dtype=np.uint8)
    unet = D.build_unet(spec, side, 3)
    if args.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if args.compile:
        unet = torch.compile(unet)
    params = sum(p.numel() for p in unet.parameters())
    s = D.TrainSettings(args.steps, args.batch, 1e-4, "cosine", min(500, args.steps // 10), 1e-6, 0.95, 0.999,
                        None, 0.0, 10**9)
    # warm-up run (kernels, allocator, compilation), then the timed run
    D.train(unet, images, None, D.TrainSettings(3, args.batch, 1e-4, "constant", 0, 0, 0.95, 0.999, None, 0, 10**9),
            0, ("warm",), device=device, amp_dtype=amp)
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    D.train(unet, images, None, s, 0, ("gpu-check",), device=device, amp_dtype=amp)
    if device == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": "unet48" if side == 32
              else "tiny", "params": params, "precision": "bf16" if amp else "fp32", "train_steps": args.steps,
              "batch": args.batch, "train_steps_per_s": args.steps / train_s}
    for sampler, steps in (("ddpm", args.ddpm_steps), ("ddim", args.ddim_steps)):
        t = time.perf_counter()
        out = D.generate(unet, sampler, steps, range(args.n_samples), 0, ("gpu-check", sampler), (side, side, 3),
                         batch_size=args.n_samples, device=device, amp_dtype=amp)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        assert out.shape == (args.n_samples, side, side, 3) and out.dtype == np.uint8
        result[f"{sampler}_steps"] = steps
        result[f"{sampler}_images_per_s"] = args.n_samples / dt
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
