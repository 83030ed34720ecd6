"""The memorization-transition probe: single models, training-set size x training steps.

One model per training-set size is trained on a seeded subset (subsets are nested: the first n images of one
seeded permutation) and evaluated at each step count: generalization score, the score relative to the training
set's own spacing, the nearest/second-nearest ratio test, the spacing-normalised copy test, and the Frechet distance
to held-out real images (the last `n_heldout` of the permutation, never trained on). Small sets trained long copy;
large sets do not. That is the classic generalization-to-memorization transition, measured on its own, so that a
loop's falling scores can be read against it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model_collapse import diffusion as D
from model_collapse.config import override_value, coerce
from model_collapse.data import load_images, pixel_vectors
from model_collapse.errors import UserError
from model_collapse.figures import probe_figure
from model_collapse.measure import MemorizationSettings, make_reference, memorization, quality
from model_collapse.metrics import distinct_index
from model_collapse.registry import MODEL_PRESETS, SAMPLERS, check_name
from model_collapse.rng import derive_seed, numpy_rng
from model_collapse.rundir import (RunDir, atomic_write_bytes, atomic_write_json, probe_row_path, read_json_object,
                                   checkpoint_step, read_probe, whole, whole_row)
from model_collapse.workers import Job, run_jobs


@dataclass(frozen=True)
class ProbeConfig:
    data: str = "digits"
    sizes: tuple[int, ...] = (32, 128)  # one model per core on 2 cores: about 3-4 minutes
    steps: tuple[int, ...] = (1000, 2000, 3000)
    seed: int = 0
    model: str = "tiny"
    batch_size: int = 32
    lr: float = 1e-3  # constant after warm-up, so evaluating at several step counts is one training run
    warmup_steps: int = 50
    sampler: str = "ddim"
    sample_steps: int = 50
    n_eval: int = 256  # generated samples per evaluation
    n_heldout: int = 500  # real images held out for the Frechet distance
    mem_ratio: float = 1.0 / 3.0
    copy_ratio: float = 1.0 / 3.0
    workers: int | None = None  # None = one per size up to the core count


def _ints(text: str, what: str) -> tuple[int, ...]:
    items = [v.strip() for v in text.split(",")]
    try:
        vals = tuple(int(v) for v in items)
    except ValueError:
        raise UserError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) <= 0 or max(vals) >= 2**31:
        raise UserError(f"--{what}: expected positive integers below 2^31, got {text!r}")
    return tuple(sorted(set(vals)))


def resolve_probe(data: str, sizes: str | None, steps: str | None, overrides: list[str]) -> ProbeConfig:
    kw: dict = {"data": data}
    if sizes:
        kw["sizes"] = _ints(sizes, "sizes")
    if steps:
        kw["steps"] = _ints(steps, "steps")
    names = {f.name: f.type for f in dataclasses.fields(ProbeConfig)}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        if k not in names or k in ("sizes", "steps"):
            raise UserError(f"--set {k}: unknown probe key; valid: {', '.join(n for n in names if n not in ('sizes', 'steps'))}")
        kw[k] = coerce(k, override_value(k, v.strip(), names[k]), names[k], "probe config: ")
    cfg = ProbeConfig(**kw)
    check_name("model", cfg.model, MODEL_PRESETS)
    check_name("sampler", cfg.sampler, SAMPLERS)
    if min(cfg.sizes) < 3:
        raise UserError("--sizes: each training-set size must be at least 3")
    for ok, msg in ((0 <= cfg.seed < 2**63, f"seed must lie in [0, 2^63), got {cfg.seed}"),
                    (cfg.batch_size > 0, f"batch_size must be > 0, got {cfg.batch_size}"),
                    (math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a finite number > 0, got {cfg.lr}"),
                    (cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}"),
                    (0 < cfg.sample_steps <= 1000, f"sample_steps must lie in [1, 1000], got {cfg.sample_steps}"),
                    (cfg.n_eval > 1, f"n_eval must be > 1, got {cfg.n_eval}"),
                    (cfg.n_heldout > 1, f"n_heldout must be > 1, got {cfg.n_heldout}"),
                    (0 < cfg.mem_ratio <= 1 and 0 < cfg.copy_ratio, "mem_ratio must lie in (0, 1], copy_ratio > 0"),
                    (cfg.workers is None or cfg.workers >= 1, f"workers must be >= 1, got {cfg.workers}")):
        if not ok:
            raise UserError(f"probe config: {msg}")
    return cfg


def _split(cfg: ProbeConfig, n_data: int):
    if max(cfg.sizes) + cfg.n_heldout > n_data:
        raise UserError(f"{cfg.data}: {n_data} images cannot hold the largest size {max(cfg.sizes)} plus "
                        f"{cfg.n_heldout} held-out images; lower --sizes or n_heldout")
    perm = numpy_rng(cfg.seed, "probe-subset").permutation(n_data)
    return perm, perm[-cfg.n_heldout :]


def probe_size(cfg_dict: dict, out: str, size: int, show: bool) -> None:
    """Train one size through every step count, evaluating (and saving a row) at each; resumable."""
    cfg = ProbeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    data = load_images(cfg.data)
    perm, held = _split(cfg, len(data))
    train = data.images[perm[:size]]
    ft = pixel_vectors(train)
    held_ref = make_reference(pixel_vectors(data.images[held]), cfg.n_eval, cfg.seed)
    d = probe_row_path(out, size, 0).parent
    d.mkdir(parents=True, exist_ok=True)
    spec = MODEL_PRESETS[cfg.model]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, "probe", size, "init"))
        unet = D.build_unet(spec, data.shape[0], data.shape[2])
    ckpt = d / "train_state.safetensors"
    for steps in cfg.steps:
        row_path = probe_row_path(out, size, steps)
        if whole_row(row_path):
            continue
        if ckpt.exists() and whole(ckpt, "training this size again from the start") and checkpoint_step(ckpt) > steps:
            ckpt.unlink()  # a row to redo before the checkpoint's step: this size trains again from the start (to
            #                the same weights; the later rows are there already)
        settings = D.TrainSettings(steps, cfg.batch_size, cfg.lr, "constant", cfg.warmup_steps, 1e-6, 0.95, 0.999,
                                   None, 0.0, 10**9)
        t0 = time.perf_counter()
        D.train(unet, train, None, settings, cfg.seed, ("probe", size), checkpoint=ckpt, save_final=True)
        gen = D.generate(unet, cfg.sampler, cfg.sample_steps, range(cfg.n_eval), cfg.seed, ("probe", size, steps),
                         data.shape, batch_size=256)
        fg = pixel_vectors(gen)
        m, _ = memorization(ft, fg, MemorizationSettings(1, cfg.mem_ratio, cfg.copy_ratio))
        q = quality(fg, held_ref, cfg.seed)
        row = {"size": size, "steps": steps, **m, "fd_heldout": q.pop("fd"),
               **{f"{k}_heldout": v for k, v in q.items()}}
        atomic_write_json(row_path, row)
        if show:
            print(f"[probe] size {size} steps {steps}: mem {row['mem_fraction']:.3f} copy {row['copy_fraction']:.3f} "
                  f"ratio {row['gen_score_ratio']:.2f} fd {row['fd_heldout']:.2f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)


def run_probe(cfg: ProbeConfig, out: str | Path, show: bool = True) -> dict:
    """Run (or resume) the probe in `out`; returns its rows and writes probe.json and figures/probe.png."""
    out = Path(out)
    data = load_images(cfg.data)
    perm, _ = _split(cfg, len(data))
    distinct = len(distinct_index(pixel_vectors(data.images[perm[: min(cfg.sizes)]])))
    if distinct < 2:
        raise UserError(f"{cfg.data}: the smallest training set ({min(cfg.sizes)} images) holds {distinct} distinct "
                        f"image(s); the probe measures memorization against at least 2")
    D.check_model_shape(MODEL_PRESETS[cfg.model], data.shape[0], where=f"model {cfg.model}")
    cfg_dict = json_cfg(cfg)
    stored = out / "probe_config.json"
    if stored.exists() and read_json_object(stored, "probe config") != cfg_dict:
        raise UserError(f"{out} holds a probe with a different config; use another --out")
    if out.exists() and not stored.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists, is not empty, and holds no probe; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    rd = RunDir(out)
    rd._lock()
    try:
        if not stored.exists():
            atomic_write_json(stored, cfg_dict)
        workers = cfg.workers or max(1, min(len(cfg.sizes), os.cpu_count() or 1))
        if workers <= 1:
            for size in cfg.sizes:
                probe_size(cfg_dict, str(out), size, show)
        else:
            run_jobs([Job(f"probe size {s}", probe_size, (cfg_dict, str(out), s, show)) for s in cfg.sizes], workers)
        rows = read_probe(out)
        result = {"out": str(out), "rows": rows, "transition": transition_summary(rows)}
        atomic_write_json(out / "probe.json", result)
        png = probe_figure(rows)
        if png is not None:
            rd.figures_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(rd.figures_dir / "probe.png", png)
        return result
    finally:
        rd.close()


def json_cfg(cfg: ProbeConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def transition_summary(rows: list[dict]) -> dict:
    """Memorization at the longest training for the smallest and the largest size, and whether it rose with
    training steps for the smallest."""
    if not rows:
        return {}
    sizes = sorted({r["size"] for r in rows})
    small = [r for r in rows if r["size"] == sizes[0]]
    large = [r for r in rows if r["size"] == sizes[-1]]
    return {
        "smallest_size": sizes[0],
        "largest_size": sizes[-1],
        "smallest_mem_by_steps": {r["steps"]: r["mem_fraction"] for r in small},
        "largest_mem_by_steps": {r["steps"]: r["mem_fraction"] for r in large},
        "smallest_rises": None if None in (small[-1]["mem_fraction"], small[0]["mem_fraction"]) else
        small[-1]["mem_fraction"] > small[0]["mem_fraction"],
    }


def format_probe(res: dict) -> str:
    lines = [f"probe: {res['out']}", f"{'size':>6} {'steps':>7} {'mem':>7} {'copy':>7} {'ratio':>7} {'fd':>7}"]
    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else f"{'-':>7}"

    for r in res["rows"]:
        lines.append(f"{r['size']:>6} {r['steps']:>7} {num(r.get('mem_fraction'), '>7.3f')} "
                     f"{num(r.get('copy_fraction'), '>7.3f')} {num(r.get('gen_score_ratio'), '>7.2f')} "
                     f"{num(r.get('fd_heldout'), '>7.2f')}")
    return "\n".join(lines)
