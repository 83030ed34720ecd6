"""Training and sampling throughput of the loop's own code against a plain diffusers loop, in the same process.

Run: .venv/bin/python benchmarks/bench_loop.py [--quick] [--rounds R] [--scale demo|unet48 ...] [--no-machine]
     [--together K ...]
The plain loop is the textbook one (forward, MSE, backward, clip, AdamW with torch's defaults, EMA lerp per
parameter); ours is `diffusion.train` (seeded per-step draws, schedules, checkpoint hooks) with its fused
optimizer, clipping and EMA, with them off, and K models trained together as one batched model
(`diffusion.train_together`, the loop's `batch_models`; times per model). Sampling: a plain DDIM loop on one batch against
`diffusion.generate` (one seeded generator per sample, fixed evaluation batch).
Machine: training steps/s of the whole machine, one model on every thread against one model per core side by side
(how the loop runs arms and seeds), for the plain loop and ours. Rounds alternate the variants and
the line reports each round's ratio (this machine's speed drifts); results go into benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from model_collapse.diffusion import (  # noqa: E402
    TrainSettings, build_unet, generate, make_sampler, make_train_scheduler, train, train_together)
from model_collapse.registry import MODEL_PRESETS  # noqa: E402

SCALES = {"demo": ("tiny", 8, 1, 32), "unet48": ("unet48", 32, 3, 32)}  # preset, side, channels, batch


def settings(steps: int, batch: int) -> TrainSettings:
    return TrainSettings(train_steps=steps, batch_size=batch, lr=1e-3, lr_schedule="constant", warmup_steps=50,
                         weight_decay=1e-6, adam_beta1=0.95, adam_beta2=0.999, ema_decay=0.995, label_dropout=0.0,
                         checkpoint_every=10**9, grad_clip=1.0)


def plain_train(unet, images: np.ndarray, s: TrainSettings) -> None:
    """The textbook loop: the same model, loss, clipping, AdamW and EMA, nothing else."""
    sched = make_train_scheduler()
    data = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    alphas = sched.alphas_cumprod
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.weight_decay)
    ema = [p.detach().clone() for p in params]
    unet.train()
    for _ in range(s.train_steps):
        idx = torch.randint(0, len(data), (s.batch_size,))
        noise = torch.randn((s.batch_size,) + tuple(data.shape[1:]))
        t = torch.randint(0, 1000, (s.batch_size,))
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * data[idx] + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1.0 - s.ema_decay)


@torch.no_grad()
def plain_sample(unet, n: int, side: int, channels: int, steps: int, bf16: bool = False) -> None:
    """One batch of n DDIM samples, the textbook way (bf16: the UNet under bf16 autocast)."""
    sampler = make_sampler("ddim", make_train_scheduler())
    sampler.set_timesteps(steps)
    x = torch.randn(n, channels, side, side)
    unet.eval()
    for t in sampler.timesteps:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            eps = unet(x, t).sample.float()
        x = sampler.step(eps, t, x).prev_sample


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def together(preset: str, side: int, channels: int, images: np.ndarray, s: TrainSettings, k: int) -> None:
    """k models trained as one batched model (`diffusion.train_together`, `batch_models = true`)."""
    unets = []
    for i in range(k):
        torch.manual_seed(i)
        unets.append(build_unet(MODEL_PRESETS[preset], side, channels))
    train_together(unets, [images] * k, [None] * k, s, list(range(k)), [("bench",)] * k)


def bench(scale: str, quick: bool, rounds: int, side_by_side: bool = True, ks: tuple[int, ...] = (8,)) -> None:
    preset, side, channels, batch = SCALES[scale]
    steps = (40 if quick else 200) if scale == "demo" else (3 if quick else 10)
    n_sample, sample_steps = (256, 10 if quick else 50) if scale == "demo" else (32, 2 if quick else 5)
    images = np.random.default_rng(0).integers(0, 256, size=(256, side, side, channels), dtype=np.uint8)
    s = settings(steps, batch)

    def unet():
        torch.manual_seed(0)
        return build_unet(MODEL_PRESETS[preset], side, channels)

    variants = {
        "plain": lambda: plain_train(unet(), images, s),
        "ours": lambda: train(unet(), images, None, s, 0, ("bench",)),
        "ours, fused off": lambda: train(unet(), images, None, s, 0, ("bench",), fused=False),
    }
    per = {k: 1 for k in variants}  # models each call trains
    for k in ks:
        variants[f"ours, {k} models together"] = lambda k=k: together(preset, side, channels, images, s, k)
        per[f"ours, {k} models together"] = k
    train(unet(), images, None, settings(2, batch), 0, ("warm",))  # warm-up: thread pools, first-call dispatch
    together(preset, side, channels, images, settings(2, batch), 2)
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn) / per[k])  # seconds per model
    base = times["plain"]
    for k, ts in times.items():
        ratios = ", ".join(f"{b / t:.2f}x" for b, t in zip(base, ts))
        print(f"train {scale} ({preset}, {side}x{side}x{channels}, batch {batch}, {steps} steps) {k}: "
              f"{steps / min(ts):.1f} steps/s per model best, {np.median(ts) / steps * 1e3:.1f} ms/step per model "
              f"median; speed vs plain per round: {ratios}", flush=True)

    model = unet()
    model.eval()
    variants = {"plain": lambda: plain_sample(model, n_sample, side, channels, sample_steps),
                "ours": lambda: generate(model, "ddim", sample_steps, range(n_sample), 0, ("bench",),
                                         (side, side, channels), batch_size=n_sample)}
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            times[k].append(timed(fn))
    for k, ts in times.items():
        ratios = ", ".join(f"{b / t:.2f}x" for b, t in zip(times["plain"], ts))
        print(f"sample {scale} DDIM-{sample_steps}, {n_sample} images, {k}: {n_sample / min(ts):.0f} images/s best; "
              f"speed vs plain per round: {ratios}", flush=True)
    if side_by_side:
        machine(scale, preset, side, channels, batch, steps, images, rounds, ks)


def _worker(kind: str, preset: str, side: int, channels: int, batch: int, steps: int, threads: int, start, done,
            k: int = 1):
    torch.set_num_threads(threads)
    images = np.random.default_rng(0).integers(0, 256, size=(256, side, side, channels), dtype=np.uint8)
    torch.manual_seed(0)
    model = build_unet(MODEL_PRESETS[preset], side, channels)
    s = settings(steps, batch)
    train(build_unet(MODEL_PRESETS[preset], side, channels), images, None, settings(2, batch), 0, ("warm",))
    if kind == "together":
        together(preset, side, channels, images, settings(2, batch), 2)
    start.wait()
    if kind == "plain":
        plain_train(model, images, s)
    elif kind == "together":
        together(preset, side, channels, images, s, k)
    else:
        train(model, images, None, s, 0, ("bench",))
    done.put(time.perf_counter())


def machine(scale, preset, side, channels, batch, steps, images, rounds, ks=()) -> None:
    """Training throughput of the whole machine: one model per core side by side, one thread each (how the loop
    runs its arms and seeds: `workers.thread_budget`), and k models trained together per core (`batch_models`),
    against one model on every thread."""
    import multiprocessing as mp

    cores = os.cpu_count() or 1
    ctx = mp.get_context("spawn")

    def side_by_side(kind: str, n: int, threads: int, k: int = 1) -> float:
        start, done = ctx.Barrier(n + 1), ctx.Queue()
        procs = [ctx.Process(target=_worker,
                             args=(kind, preset, side, channels, batch, steps, threads, start, done, k))
                 for _ in range(n)]
        for p in procs:
            p.start()
        start.wait()
        t0 = time.perf_counter()
        ends = [done.get() for _ in procs]
        for p in procs:
            p.join()
        return n * k * steps / (max(ends) - t0)

    rates = {k: [] for k in ("plain, one model", "ours, one model", "plain, side by side", "ours, side by side")}
    rates.update({f"ours, {k} models together per core": [] for k in ks})
    for _ in range(rounds):
        rates["plain, one model"].append(side_by_side("plain", 1, cores))
        rates["ours, one model"].append(side_by_side("ours", 1, cores))
        rates["plain, side by side"].append(side_by_side("plain", cores, 1))
        rates["ours, side by side"].append(side_by_side("ours", cores, 1))
        for k in ks:
            rates[f"ours, {k} models together per core"].append(side_by_side("together", cores, 1, k))
    base = rates["plain, one model"]
    for k, rs in rates.items():
        ratios = ", ".join(f"{r / b:.2f}x" for b, r in zip(base, rs))
        print(f"machine {scale}, {cores} cores, {k}: {max(rs):.1f} steps/s best; vs plain one model per round: "
              f"{ratios}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", nargs="*", default=list(SCALES), choices=list(SCALES))
    ap.add_argument("--no-machine", action="store_true", help="skip the side-by-side training throughput")
    ap.add_argument("--together", type=int, nargs="*", default=[8],
                    help="numbers of models trained together as one batched model (batch_models)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for scale in args.scale:
        bench(scale, args.quick, args.rounds, not args.no_machine, tuple(args.together))


if __name__ == "__main__":
    main()
