"""The self-consuming loop: iteration 0 on real data, then each arm's iterations on its own model's samples.

Each (arm, iteration) runs four stages, each leaving one file written atomically and skipped when that file
exists: the training set (`paradigms`), the model, the samples and the metrics (`stages`). Training resumes
from its last checkpoint. All randomness derives from (seed, arm, iteration, phase, index), so a resumed run
equals an uninterrupted one. Arms run side by side in processes (`workers`), or one after another with every
process on each stage under `accelerate launch`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

from model_collapse import dist
from model_collapse.config import ArmConfig, RunConfig, config_from_dict, config_to_dict, own_iteration0
from model_collapse.errors import UserError
from model_collapse.paradigms import build_training_set
from model_collapse.registry import resolve_device
from model_collapse.report import write_report
from model_collapse.rundir import RunDir, atomic_write_json, read_json, read_metrics
from model_collapse.stages import measure_stage, sample_model, train_model
from model_collapse.study import Study, arm_label, n_samples, prepare
from model_collapse.summary import summarize
from model_collapse.verdict import add_verdict
from model_collapse.workers import Job, run_jobs


def _bar(total: int, desc: str, position: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=False, disable=not show, file=sys.stderr,
                dynamic_ncols=True)


def _checkpoint_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["step"])


def run_stage(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, *, show: bool = True, position: int = 0,
              on_checkpoint: Callable | None = None) -> dict:
    """Run whatever is missing of (arm, iteration t) and return its metrics."""
    cfg = study.cfg
    label = arm_label(arm)
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
        with _bar(cfg.train_steps, f"{label:>22} it{t} train", position, show) as bar:
            ckpt = d / "train_state.safetensors"
            if ckpt.exists():
                bar.update(_checkpoint_step(ckpt))
            train_model(study, rd, arm, t, bar, on_checkpoint)
        timings["train_s"] = time.perf_counter() - t0
    dist.barrier()
    d = rd.arm_sample_dir(cfg, arm, t)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "samples.npz").exists():
        t0 = time.perf_counter()
        with _bar(n_samples(study, arm, t), f"{label:>22} it{t} sample", position, show) as bar:
            sample_model(study, rd, arm, t, bar)
        timings["sample_s"] = time.perf_counter() - t0
    dist.barrier()
    if not dist.is_main():  # metrics, once, on the main process
        dist.barrier()
        return {}
    if not (d / "metrics.json").exists():
        t0 = time.perf_counter()
        m = measure_stage(study, rd, arm, t)
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


def arm_iterations(cfg_dict: dict, out: str, arm_index: int, show: bool) -> None:
    """One arm's iterations 1.. (a worker job; the parent holds the run directory's lock)."""
    cfg = config_from_dict(cfg_dict)
    study = prepare(cfg, out)
    rd = RunDir(Path(out))
    for t in range(1, cfg.iterations):
        run_stage(study, rd, cfg.arms[arm_index], t, show=show, position=arm_index)


class Rows:
    """metrics.jsonl as the run goes: a row is appended, with its verdict, once every row before it exists
    (rows go in (iteration, arm) order)."""

    def __init__(self, study: Study, rd: RunDir):
        self.study, self.rd = study, rd
        self.history = read_metrics(rd.metrics_path)
        self.done = {(r["arm"], r["iteration"]) for r in self.history}

    def flush(self) -> None:
        cfg, rows = self.study.cfg, []
        for t in range(cfg.iterations):
            for arm in cfg.arms:
                if (arm.label(), t) in self.done:
                    continue
                f = self.rd.arm_sample_dir(cfg, arm, t) / "metrics.json"
                if not f.exists():
                    return self._append(rows)
                row = {"arm": arm.label(), "iteration": t, "paradigm": arm.paradigm, "selector": arm.selector,
                       "pool_factor": arm.pool_factor, **read_json(f)}
                add_verdict(row, self.history, cfg)
                self.history.append(row)
                self.done.add((arm.label(), t))
                rows.append(row)
        self._append(rows)

    def _append(self, rows: list[dict]) -> None:
        if rows:
            self.rd.append_metrics(rows)


def default_workers(cfg: RunConfig) -> int:
    if cfg.workers is not None:
        return min(cfg.workers, len(cfg.arms))
    if resolve_device(cfg.device).startswith("cuda"):
        return 1
    return max(1, min(len(cfg.arms), os.cpu_count() or 1))


def _iteration0(study: Study, rd: RunDir, show: bool) -> None:
    """Real-data references of every space (learned spaces are trained here, once, before any worker starts),
    the shared iteration 0, and the arms that sample the shared model with their own guidance."""
    if dist.is_main():
        for s in ["pixel"] + list(study.cfg.spaces):
            study.reference(s)
    run_stage(study, rd, None, 0, show=show)  # shared by every arm: one row per arm points at it
    for arm in study.cfg.arms:
        if own_iteration0(study.cfg, arm):
            run_stage(study, rd, arm, 0, show=show)


def _run_distributed(cfg: RunConfig, study: Study, out: Path, show: bool) -> dict:
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
        rows = Rows(study, rd) if dist.is_main() else None
        _iteration0(study, rd, show)
        for t in range(1, cfg.iterations):
            for arm in cfg.arms:
                run_stage(study, rd, arm, t, show=show)
                if rows:
                    rows.flush()
        summary = {}
        if rows:
            rows.flush()
            summary = _finish(cfg, rd, show)
        dist.barrier()
        return summary
    finally:
        rd.close()


def _finish(cfg: RunConfig, rd: RunDir, show: bool) -> dict:
    summary = summarize(read_metrics(rd.metrics_path), cfg, str(rd.path))
    atomic_write_json(rd.path / "summary.json", summary)
    if cfg.report:
        summary["report"] = str(write_report([rd.path], rd.path / "report.html", show=show))
    return summary


def run_loop(cfg: RunConfig, out: str | Path, *, show: bool = True, on_checkpoint: Callable | None = None) -> dict:
    """Run (or resume) a study in RUN_DIR `out`; returns the summary (also written to summary.json)."""
    out = Path(out)
    study = prepare(cfg, str(out))
    if dist.world() > 1:
        return _run_distributed(cfg, study, out, show)
    with RunDir.open(out, cfg) as rd:
        rows = Rows(study, rd)
        _iteration0(study, rd, show)
        rows.flush()
        workers = default_workers(cfg)
        if workers <= 1 or cfg.iterations == 1:
            for t in range(1, cfg.iterations):
                for arm in cfg.arms:
                    run_stage(study, rd, arm, t, show=show, on_checkpoint=on_checkpoint)
                    rows.flush()
        else:
            jobs = [Job(f"arm {a.label()}", arm_iterations, (config_to_dict(cfg), str(out), i, show))
                    for i, a in enumerate(cfg.arms)]
            run_jobs(jobs, workers, on_tick=rows.flush)
        rows.flush()
        return _finish(cfg, rd, show)
