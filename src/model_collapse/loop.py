"""The self-consuming loop: iteration 0 on real data, then each arm's iterations on its own model's samples.

Every stage of every (arm, iteration) leaves one file, written atomically, and is skipped when that file exists:
train.npz (the training set and where each image came from), model.safetensors, samples.npz, metrics.json.
Training resumes from its last checkpoint. All randomness derives from (seed, arm, iteration, phase, index), so
a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model_collapse import diffusion as D
from model_collapse import dist
from model_collapse.config import ArmConfig, RunConfig, config_from_dict, config_to_dict
from model_collapse.data import ImageSet, load_images
from model_collapse.errors import UserError
from model_collapse.features import SpaceContext, extract
from model_collapse.metrics import (
    frechet_distance,
    gaussian_stats,
    generalization_score,
    kernel_inception_distance,
    kl_entropy,
    precision_recall,
    total_variance,
)
from model_collapse.neighbours import knn
from model_collapse.rng import derive_seed, numpy_rng
from model_collapse.rundir import RunDir, atomic_save_npz, atomic_write_json, load_npz, read_json, read_metrics
from model_collapse.selection import select

SHARED = "shared"  # the arm coordinate of iteration 0, which all arms share
PR_K = 5  # neighbours that define the real and generated manifolds of precision/recall, density/coverage


# ---------------------------------------------------------------------------------------------- the study


@dataclass
class Study:
    """What every stage needs, built once per process from the config and the data."""

    cfg: RunConfig
    data: ImageSet
    real_idx: np.ndarray  # the iteration-0 training subset (indices into data)
    spec: D.UNetSpec
    num_classes: int | None
    ctx: SpaceContext
    _cache: dict = field(default_factory=dict)  # see _cached

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape

    @property
    def device(self) -> str:
        return resolved_device(self.cfg)

    @property
    def n_eval(self) -> int:
        return self.cfg.n_eval or self.cfg.n_train

    def _cached(self, name: str, compute: Callable[[], dict]) -> dict:
        """Arrays computed once per run: kept in memory, and in RUN_DIR/features/<name>.npz for the other
        processes and for resumes."""
        if name not in self._cache:
            path = Path(self.ctx.run_dir) / "features" / f"{name}.npz" if self.ctx.run_dir else None
            if path is not None and path.exists():
                self._cache[name] = load_npz(path)
            else:
                arrays = compute()
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_save_npz(path, **arrays)
                self._cache[name] = arrays
        return self._cache[name]

    def real_stats(self, space: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance of the real data's features."""
        z = self._cached(f"real_stats_{space}",
                         lambda: dict(zip(("mu", "sigma"), gaussian_stats(extract(space, self.data.images, self.ctx)))))
        return z["mu"], z["sigma"]

    def real_reference(self, space: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Features of a seeded subset of the real data, as many images as are measured per iteration (at most
        the whole data): the reference of precision/recall and KID; and their PR_K-th nearest-neighbour radii
        (None when the subset is too small), computed once per process."""
        def compute():
            n = min(self.n_eval, len(self.data))
            pick = np.sort(numpy_rng(self.cfg.seed, "pr-reference").choice(len(self.data), n, replace=False))
            return {"features": extract(space, self.data.images[pick], self.ctx)}

        feats = self._cached(f"real_reference_{space}", compute)["features"]
        key = f"real_reference_radii_{space}"
        if key not in self._cache:
            radii = None
            if len(feats) > PR_K:
                radii = knn(feats, None, PR_K, device=self.cfg.device).distances[:, -1]
            self._cache[key] = radii
        return feats, self._cache[key]

    def train_settings(self) -> D.TrainSettings:
        c = self.cfg
        return D.TrainSettings(c.train_steps, c.batch_size, c.lr, c.lr_schedule, c.warmup_steps, c.weight_decay,
                               c.adam_beta1, c.adam_beta2, c.ema_decay, c.label_dropout, c.checkpoint_every,
                               c.grad_clip)


def resolved_device(cfg: RunConfig) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def model_spec(cfg: RunConfig) -> D.UNetSpec:
    base = D.MODEL_PRESETS[cfg.model]
    return D.UNetSpec(
        cfg.channels or base.channels,
        cfg.layers_per_block or base.layers_per_block,
        cfg.norm_groups or base.norm_groups,
        cfg.attention_levels if cfg.attention_levels is not None else base.attention_levels,
    )


def prepare(cfg: RunConfig, run_dir: str | None = None) -> Study:
    """Load and check the data against the config; raises UserError before anything is written."""
    data = load_images(cfg.data, cfg.data_root, cfg.data_download, cfg.image_size)
    n, h, w, c = data.images.shape
    if cfg.n_train > n:
        raise UserError(f"n_train = {cfg.n_train} is larger than the data ({n} images in {cfg.data})")
    if h != w:
        raise UserError(f"{cfg.data}: images are {h}x{w}; the UNet needs square images (set image_size)")
    spec = model_spec(cfg)
    D.check_model_shape(spec, h, where=f"model {cfg.model}")
    num_classes = None
    if cfg.conditional:
        if data.labels is None:
            raise UserError(f"conditional = true needs labels, and {cfg.data} has none")
        num_classes = int(data.labels.max()) + 1
    for a in cfg.arms:
        if a.per_class and data.labels is None:
            raise UserError(f"arm {a.label()}: per_class selection needs labels, and {cfg.data} has none")
    real_idx = numpy_rng(cfg.seed, "real-subset").choice(n, cfg.n_train, replace=False)
    ctx = SpaceContext(cfg.feature_dir, run_dir, data.images, data.labels, cfg.seed, cfg.domain_steps, cfg.device)
    return Study(cfg, data, np.sort(real_idx), spec, num_classes, ctx)


def pool_size(cfg: RunConfig, arm: ArmConfig) -> int:
    return int(math.ceil(arm.pool_factor * cfg.n_train))


def n_samples(study: Study, arm: ArmConfig | None, t: int) -> int:
    """Samples drawn at iteration t: the next iteration's pool (none after the last) and the evaluation set."""
    cfg = study.cfg
    need = study.n_eval
    if t < cfg.iterations - 1:
        arms = cfg.arms if arm is None else (arm,)
        need = max(need, max(pool_size(cfg, a) for a in arms))
    return need


def arm_guidance(cfg: RunConfig, arm: ArmConfig | None) -> float:
    if arm is None or arm.guidance is None:
        return cfg.guidance
    return arm.guidance


def own_iteration0(cfg: RunConfig, arm: ArmConfig | None) -> bool:
    """Whether the arm samples the shared iteration-0 model itself (its guidance differs from the run's)."""
    return arm is not None and arm_guidance(cfg, arm) != cfg.guidance


def sample_dir(study: Study, rd: RunDir, arm: ArmConfig | None, t: int) -> Path:
    return rd.sample_dir(arm.label() if arm else None, t, own_iteration0(study.cfg, arm))


# ---------------------------------------------------------------------------------------------- stages


def build_training_set(study: Study, rd: RunDir, arm: ArmConfig | None, t: int) -> None:
    """Write train.npz (images, labels, source_iteration, source_index) and, after iteration 0, selection.npz."""
    cfg, d = study.cfg, rd.iter_dir(arm.label() if arm else None, t)
    data = study.data
    if t == 0:
        labels = data.labels[study.real_idx] if data.labels is not None else None
        atomic_save_npz(d / "train.npz", images=data.images[study.real_idx], labels=labels,
                        source_iteration=np.full(cfg.n_train, -1), source_index=study.real_idx)
        return
    label = arm.label()
    n_fresh = int(round(arm.fresh_fraction * cfg.n_train)) if arm.paradigm == "fresh" else 0
    n_select = cfg.n_train - n_fresh
    # candidate pool: the previous model's samples, plus for accumulate the real data and every earlier pool
    sources = range(t) if arm.paradigm == "accumulate" else [t - 1]
    imgs, labs, src_it, src_ix = [], [], [], []
    if arm.paradigm == "accumulate":
        real = load_npz(rd.iter_dir(None, 0) / "train.npz")
        imgs.append(real["images"]), labs.append(real.get("labels")), src_it.append(real["source_iteration"])
        src_ix.append(real["source_index"])
    for s in sources:
        smp = load_npz(sample_dir(study, rd, arm, s) / "samples.npz")
        k = pool_size(cfg, arm)
        imgs.append(smp["images"][:k])
        labs.append(smp["labels"][:k] if "labels" in smp else None)
        src_it.append(np.full(k, s))
        src_ix.append(np.arange(k))
    pool = np.concatenate(imgs)
    pool_labels = np.concatenate(labs) if all(x is not None for x in labs) else None
    seed = derive_seed(cfg.seed, label, t, "select")
    feats = extract(arm.space, pool, study.ctx)
    sel = select(feats, n_select, arm.selector, seed, labels=pool_labels, per_class=arm.per_class,
                 tau0=cfg.tau0, decay=cfg.decay)
    idx = sel.indices
    images, labels = pool[idx], pool_labels[idx] if pool_labels is not None else None
    source_iteration, source_index = np.concatenate(src_it)[idx], np.concatenate(src_ix)[idx]
    if n_fresh:
        fresh = numpy_rng(cfg.seed, label, t, "fresh").choice(len(data), n_fresh, replace=False)
        images = np.concatenate([images, data.images[fresh]])
        if labels is not None:
            labels = np.concatenate([labels, data.labels[fresh]])
        source_iteration = np.concatenate([source_iteration, np.full(n_fresh, -1)])
        source_index = np.concatenate([source_index, fresh])
    params = {k: v for k, v in sel.params.items() if not isinstance(v, (dict, np.ndarray))}
    atomic_save_npz(d / "selection.npz", indices=idx, method=np.array(sel.method), seed=np.array(seed, np.int64),
                    order=sel.params.get("order"), **{k: np.array(v) for k, v in params.items()})
    atomic_save_npz(d / "train.npz", images=images, labels=labels, source_iteration=source_iteration,
                    source_index=source_index)


def _new_unet(study: Study, arm_label: str, t: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(study.cfg.seed, arm_label, t, "init"))
        unet = D.build_unet(study.spec, study.shape[0], study.shape[2], study.num_classes)
    if study.cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def _fast(study: Study, unet):
    """The module to run: compiled when asked (weights stay shared with `unet`, which is what gets saved)."""
    return torch.compile(unet) if study.cfg.compile else unet


def train_model(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, bar=None, on_checkpoint=None) -> None:
    cfg = study.cfg
    label = arm.label() if arm else SHARED
    d = rd.iter_dir(arm.label() if arm else None, t)
    tr = load_npz(d / "train.npz")
    unet = _new_unet(study, label, t)
    if cfg.finetune and t > 0:
        D.load_weights(rd.iter_dir(label if t > 1 else None, t - 1) / "model.safetensors", unet)
    ckpt = d / "train_state.safetensors"
    labels = tr.get("labels") if cfg.conditional else None
    hook = (lambda step: on_checkpoint(label, t, step)) if on_checkpoint else None
    acc = dist.accelerator(cfg.mixed_precision)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision) if acc is None else None
    D.train(_fast(study, unet), tr["images"], labels, study.train_settings(), cfg.seed, (label, t), checkpoint=ckpt,
            progress=(lambda step: bar.update(1)) if bar else None, on_checkpoint=hook,
            null_class=study.num_classes, device=study.device, accelerator=acc, amp_dtype=amp)
    unet.cpu()
    if dist.is_main():
        D.save_weights(d / "model.safetensors", unet)
        ckpt.unlink(missing_ok=True)


def sample_model(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, bar=None) -> None:
    cfg = study.cfg
    label = arm.label() if arm else SHARED
    d = rd.iter_dir(arm.label() if arm else None, t)
    unet = _new_unet(study, label, t)
    D.load_weights(d / "model.safetensors", unet)
    d = sample_dir(study, rd, arm, t)
    if t == 0 and own_iteration0(cfg, arm):
        label = arm.label()  # its own samples: its own noise
    n = n_samples(study, arm, t)
    class_labels = None
    if study.num_classes is not None:
        class_labels = np.arange(n) % study.num_classes  # sample i is drawn for class i mod C
    # under several processes, process r draws samples r, r + P, r + 2P, ...: each sample's noise depends on its
    # index only, so the samples are those of one process
    mine = np.arange(dist.rank(), n, dist.world())
    images = D.generate(_fast(study, unet), cfg.sampler, cfg.sample_steps, mine, cfg.seed, (label, t), study.shape,
                        batch_size=cfg.sample_batch,
                        class_labels=None if class_labels is None else class_labels[mine],
                        guidance=arm_guidance(cfg, arm), null_class=study.num_classes,
                        progress=(lambda k: bar.update(k * dist.world())) if bar else None, device=study.device,
                        amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision))
    if dist.world() == 1:
        atomic_save_npz(d / "samples.npz", images=images, labels=class_labels)
        return
    atomic_save_npz(d / f"samples.part{dist.rank()}.npz", images=images)
    dist.barrier()
    if dist.is_main():
        full = np.empty((n,) + tuple(study.shape), dtype=np.uint8)
        for r in range(dist.world()):
            part = d / f"samples.part{r}.npz"
            full[r :: dist.world()] = load_npz(part)["images"]
        atomic_save_npz(d / "samples.npz", images=full, labels=class_labels)
        for r in range(dist.world()):
            (d / f"samples.part{r}.npz").unlink()


def measure(study: Study, rd: RunDir, arm: ArmConfig | None, t: int) -> dict:
    """Per-(arm, iteration) metrics of the training set and of the model's first n_eval samples, every space."""
    cfg = study.cfg
    tr = load_npz(rd.iter_dir(arm.label() if arm else None, t) / "train.npz")
    d = sample_dir(study, rd, arm, t)
    samples = load_npz(d / "samples.npz")
    gen = samples["images"][: study.n_eval]
    m: dict = {"n_train": int(len(tr["images"])), "n_generated": int(len(gen)),
               "train_real_fraction": float(np.mean(tr["source_iteration"] < 0))}
    spaces = ["pixel"] + [s for s in cfg.spaces if s != "pixel"]
    for s in spaces:
        ft, fg = extract(s, tr["images"], study.ctx), extract(s, gen, study.ctx)
        if s != "pixel":  # cached so that reports and later analyses never recompute them
            atomic_save_npz(d / f"features_{s}.npz", train=ft, generated=fg)
        ent = kl_entropy(ft, cfg.entropy_k, device=cfg.device)
        sc = generalization_score(fg, ft, mem_ratio=cfg.mem_ratio, copy_ratio=cfg.copy_ratio, train_nn=ent.nn,
                                  device=cfg.device)
        suffix = "" if s == "pixel" else f"_{s}"
        m[f"train_entropy_{s}"] = ent.entropy
        m[f"train_duplicates{suffix}"] = ent.duplicates
        m[f"train_spacing_{s}"] = sc.train_spacing
        m[f"gen_score_{s}"] = sc.gen_score
        m[f"gen_score_ratio_{s}"] = sc.gen_score_ratio
        m[f"mem_fraction_{s}"] = sc.mem_fraction
        m[f"copy_fraction_{s}"] = sc.copy_fraction
        m[f"variance_{s}"] = total_variance(fg)
        m[f"fd_{s}"] = frechet_distance(*gaussian_stats(fg), *study.real_stats(s))
        ref, ref_radii = study.real_reference(s)
        if min(len(fg), len(ref)) > PR_K:  # against as many real images: k-NN manifolds of equal sample sizes
            for key, v in precision_recall(ref, fg, k=PR_K, real_radii=ref_radii, device=cfg.device).items():
                m[f"{key}_{s}"] = v
        if min(len(fg), len(ref)) >= 4:  # unbiased at any sample size, unlike the Frechet distance
            # subsets of half the samples (at most 1,000): with subsets as large as the sets, every subset would
            # be the whole set and the spread over subsets would say nothing
            m[f"kid_{s}"], m[f"kid_std_{s}"] = kernel_inception_distance(
                fg, ref, subsets=100, subset_size=min(1000, min(len(fg), len(ref)) // 2),
                seed=derive_seed(cfg.seed, "kid", arm.label() if arm else SHARED, t, s))
        if s == "pixel":  # `nearest` indexes the training set's distinct rows (metrics.distinct_rows)
            atomic_save_npz(d / "neighbours_pixel.npz", nearest=sc.nearest, d1=sc.d1, d2=sc.d2)
    if study.num_classes is not None:
        # what the samples look like, by the domain classifier: per-class counts, and the share that looks like
        # the class it was sampled for (guidance raises it, at the cost of diversity)
        from model_collapse.features import classify

        asked = samples["labels"][: study.n_eval]
        seen = classify(gen, study.ctx)
        m["gen_class_counts"] = np.bincount(seen, minlength=study.num_classes).tolist()
        m["gen_class_agreement"] = float(np.mean(seen == asked))
    return m


def run_stage(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, *, show: bool = True, position: int = 0,
              on_checkpoint: Callable | None = None) -> dict:
    """Run whatever is missing of (arm, iteration t) and return its metrics."""
    from tqdm import tqdm

    cfg = study.cfg
    label = arm.label() if arm else SHARED
    d = rd.iter_dir(arm.label() if arm else None, t)
    d.mkdir(parents=True, exist_ok=True)
    show = show and dist.is_main()
    timings = {}
    dist.barrier()
    if not (d / "train.npz").exists():
        t0 = time.perf_counter()
        if dist.is_main():
            build_training_set(study, rd, arm, t)
        timings["select_s"] = time.perf_counter() - t0
    dist.barrier()
    if not (d / "model.safetensors").exists():
        t0 = time.perf_counter()
        with tqdm(total=cfg.train_steps, desc=f"{label:>22} it{t} train", position=position, leave=False,
                  disable=not show, file=sys.stderr, dynamic_ncols=True) as bar:
            ckpt = d / "train_state.safetensors"
            if ckpt.exists():
                from safetensors import safe_open

                with safe_open(str(ckpt), framework="pt") as f:
                    bar.update(int(f.metadata()["step"]))
            train_model(study, rd, arm, t, bar, on_checkpoint)
        timings["train_s"] = time.perf_counter() - t0
    dist.barrier()
    d = sample_dir(study, rd, arm, t)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "samples.npz").exists():
        t0 = time.perf_counter()
        with tqdm(total=n_samples(study, arm, t), desc=f"{label:>22} it{t} sample", position=position,
                  leave=False, disable=not show, file=sys.stderr, dynamic_ncols=True) as bar:
            sample_model(study, rd, arm, t, bar)
        timings["sample_s"] = time.perf_counter() - t0
    dist.barrier()
    if not dist.is_main():  # metrics, once, on the main process
        dist.barrier()
        return {}
    if not (d / "metrics.json").exists():
        t0 = time.perf_counter()
        m = measure(study, rd, arm, t)
        timings["metrics_s"] = time.perf_counter() - t0
        atomic_write_json(d / "metrics.json", m)
        if timings:
            atomic_write_json(d / "timings.json", timings)
    m = read_json(d / "metrics.json")
    dist.barrier()
    if show:
        print(f"[{label}] iteration {t}: entropy {m['train_entropy_pixel']:.2f}, gen score "
              f"{m['gen_score_pixel']:.3f} (ratio {m['gen_score_ratio_pixel']:.2f}), fd {m['fd_pixel']:.3f}",
              file=sys.stderr, flush=True)
    return m


# ---------------------------------------------------------------------------------------------- arms


def _watch_parent(parent_pid: int) -> None:
    """End this worker when the parent (which holds the run directory's lock) is gone."""
    import threading

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def _arm_worker(cfg_dict: dict, out: str, arm_index: int, threads: int, show: bool, parent_pid: int) -> None:
    """One arm's iterations 1.. in its own process (the parent holds the run directory's lock)."""
    _watch_parent(parent_pid)
    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    study = prepare(cfg, out)
    rd = RunDir(Path(out))
    arm = cfg.arms[arm_index]
    for t in range(1, cfg.iterations):
        run_stage(study, rd, arm, t, show=show, position=arm_index)


def _pending_rows(study: Study, rd: RunDir, done: set) -> list[dict]:
    """Rows ready to append, in (iteration, arm) order: a row waits until every row before it exists."""
    cfg = study.cfg
    rows = []
    for t in range(cfg.iterations):
        for arm in cfg.arms:
            key = (arm.label(), t)
            if key in done:
                continue
            f = sample_dir(study, rd, arm, t) / "metrics.json"
            if not f.exists():
                return rows
            m = read_json(f)
            row = {"arm": arm.label(), "iteration": t, "paradigm": arm.paradigm, "selector": arm.selector,
                   "pool_factor": arm.pool_factor, **m}
            rows.append(row)
            done.add(key)
    return rows


def _flush_rows(study: Study, rd: RunDir, done: set, history: list[dict]) -> None:
    from model_collapse.verdict import add_verdict

    rows = _pending_rows(study, rd, done)
    for r in rows:
        add_verdict(r, history, study.cfg)
        history.append(r)
    if rows:
        rd.append_metrics(rows)


def default_workers(cfg: RunConfig) -> int:
    if cfg.workers is not None:
        return min(cfg.workers, len(cfg.arms))
    if resolved_device(cfg).startswith("cuda"):
        return 1
    return max(1, min(len(cfg.arms), os.cpu_count() or 1))


def _iteration0(study: Study, rd: RunDir, show: bool) -> None:
    """Real-data statistics of every space (learned spaces are trained here, once, before any worker starts),
    the shared iteration 0, and the arms that sample the shared model with their own guidance."""
    if dist.is_main():
        for s in ["pixel"] + list(study.cfg.spaces):
            study.real_stats(s)
            study.real_reference(s)
    run_stage(study, rd, None, 0, show=show)  # shared by every arm: one row per arm points at it
    for arm in study.cfg.arms:
        if own_iteration0(study.cfg, arm):
            run_stage(study, rd, arm, 0, show=show)


def _run_loop_distributed(cfg: RunConfig, study: Study, out: Path, show: bool) -> dict:
    """Under `accelerate launch`: arms one after another, every stage with all processes (training data
    parallel, sampling split by index), selection and metrics on the main process, which holds the lock."""
    rd, error = None, None
    if dist.is_main():
        try:
            rd = RunDir.open(out, cfg)
        except UserError as e:
            error = str(e)
    error = dist.share(error)
    if error:
        raise UserError(error)
    rd = rd or RunDir(out)
    try:
        history = read_metrics(rd.metrics_path) if dist.is_main() else []
        done = {(r["arm"], r["iteration"]) for r in history}
        _iteration0(study, rd, show)
        for t in range(1, cfg.iterations):
            for arm in cfg.arms:
                run_stage(study, rd, arm, t, show=show)
                if dist.is_main():
                    _flush_rows(study, rd, done, history)
        summary = {}
        if dist.is_main():
            _flush_rows(study, rd, done, history)
            summary = _finish(cfg, rd, out, show)
        dist.barrier()
        return summary
    finally:
        rd.close()


def _finish(cfg: RunConfig, rd: RunDir, out: Path, show: bool) -> dict:
    from model_collapse.summary import summarize

    summary = summarize(read_metrics(rd.metrics_path), cfg, str(out))
    atomic_write_json(out / "summary.json", summary)
    if cfg.report:
        from model_collapse.report import write_report

        summary["report"] = str(write_report([out], out / "report.html", show=show))
    return summary


def run_loop(cfg: RunConfig, out: str | Path, *, show: bool = True, on_checkpoint: Callable | None = None) -> dict:
    """Run (or resume) a study in RUN_DIR `out`; returns the summary (also written to summary.json)."""
    out = Path(out)
    study = prepare(cfg, str(out))
    if dist.world() > 1:
        return _run_loop_distributed(cfg, study, out, show)
    with RunDir.open(out, cfg) as rd:
        rows = read_metrics(rd.metrics_path)
        done = {(r["arm"], r["iteration"]) for r in rows}
        history = list(rows)
        _iteration0(study, rd, show)
        _flush_rows(study, rd, done, history)
        workers = default_workers(cfg)
        if workers <= 1 or cfg.iterations == 1:
            for t in range(1, cfg.iterations):
                for arm in cfg.arms:
                    run_stage(study, rd, arm, t, show=show, on_checkpoint=on_checkpoint)
                    _flush_rows(study, rd, done, history)
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(workers, mp_context=ctx) as ex:
                futs = [ex.submit(_arm_worker, config_to_dict(cfg), str(out), i, threads, show, os.getpid())
                        for i in range(len(cfg.arms))]
                while True:
                    finished, _ = cf.wait(futs, timeout=1.0, return_when=cf.FIRST_EXCEPTION)
                    _flush_rows(study, rd, done, history)
                    for f in finished:
                        if f.exception() is not None:
                            for g in futs:
                                g.cancel()
                            raise f.exception()
                    if len(finished) == len(futs):
                        break
        _flush_rows(study, rd, done, history)
        return _finish(cfg, rd, out, show)
