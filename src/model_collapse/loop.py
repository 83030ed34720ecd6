"""The self-consuming loop: iteration 0 on real data, then each arm's iterations on its own model's samples.

Each (arm, iteration) runs four stages, each leaving one file written atomically and skipped when that file
exists: the training set (`paradigms`), the model, the samples and the metrics (`stages`). Training resumes
from its last checkpoint. All randomness derives from (seed, arm, iteration, phase, index), so a resumed run
equals an uninterrupted one. Arms run side by side in processes (`workers`), or one after another with every
process on each stage under `accelerate launch`; with `batch_models`, groups of (seed, arm) slices run in step,
each iteration's models of a group trained together as one batched model.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable

from model_collapse import dist
from model_collapse.config import (
    ArmConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
    own_iteration0,
    seed_config,
    study_seeds,
)
from model_collapse.diffusion import preload
from model_collapse.errors import UserError
from model_collapse.paradigms import build_training_set
from model_collapse.registry import resolve_device
from model_collapse.report import check_places, write_report
from model_collapse.rundir import RunDir, atomic_write_json, checkpoint_step, read_json, read_metrics, whole
from model_collapse.stages import measure_stage, sample_model, train_model, train_models_together
from model_collapse.study import Study, arm_label, n_samples, prepare
from model_collapse.summary import fmt_number, summarize
from model_collapse.verdict import add_verdict
from model_collapse.workers import Job, JobFailed, JobsBeside, run_jobs, thread_budget, torch_threads


def _bar(total: int, desc: str, position: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=False, disable=not show, file=sys.stderr,
                dynamic_ncols=True)


def _done(path: Path, shared: bool = True) -> bool:
    """Whether a stage's output is there and whole, decided by the main process and (`shared`) given to the others:
    on a shared file system they could see different things and part ways. A damaged file is moved aside (to
    NAME.damaged) with a warning, so the stage runs again and writes it whole (every stage is deterministic)."""
    done = dist.is_main() and whole(path, "running its stage again")
    return dist.share(done) if shared else done


@contextmanager
def _train_bar(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, position: int, show: bool,
               name_seed: bool = False):
    """A stage's training progress bar, started at its checkpoint's step. A damaged checkpoint is removed (`_done`):
    training starts over, to the same result."""
    label = arm_label(arm) + (f" s{study.cfg.seed}" if name_seed else "")
    with _bar(study.cfg.train_steps, f"{label:>22} it{t} train", position, show) as bar:
        ckpt = rd.iter_dir(arm.label() if arm else None, t) / "train_state.safetensors"
        if _done(ckpt):
            bar.update(checkpoint_step(ckpt))
        yield bar


def _training_set(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, timings: dict) -> None:
    """The stage's training set, unless it is there (built by the main process)."""
    d = rd.iter_dir(arm.label() if arm else None, t)
    d.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    if not _done(d / "train.npz"):
        t0 = time.perf_counter()
        if dist.is_main():
            build_training_set(study, rd, arm, t)
        timings["select_s"] = time.perf_counter() - t0
    dist.barrier()


def run_stage(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, *, show: bool = True, position: int = 0,
              on_checkpoint: Callable | None = None, train_only: bool = False, timings: dict | None = None) -> dict:
    """Run whatever is missing of (arm, iteration t) and return its metrics; with `train_only`, its training set
    and model only (returns {}). `timings` collects the seconds of the parts run here (and of earlier parts run
    in this process: they are written with the metrics)."""
    cfg = study.cfg
    label = arm_label(arm)
    d = rd.iter_dir(arm.label() if arm else None, t)
    d.mkdir(parents=True, exist_ok=True)
    show = show and dist.is_main()
    timings = {} if timings is None else timings
    _training_set(study, rd, arm, t, timings)
    if not _done(d / "model.safetensors"):
        t0 = time.perf_counter()
        with _train_bar(study, rd, arm, t, position, show) as bar:
            if cfg.batch_models and arm is not None and t > 0:  # batched arithmetic, even for one model
                train_models_together([(study, rd, arm, t)], [bar], on_checkpoint)
            else:
                train_model(study, rd, arm, t, bar, on_checkpoint)
        timings["train_s"] = time.perf_counter() - t0
    dist.barrier()
    if train_only:
        return {}
    d = rd.arm_sample_dir(cfg, arm, t)
    d.mkdir(parents=True, exist_ok=True)
    if not _done(d / "samples.npz"):
        t0 = time.perf_counter()
        with _bar(n_samples(study, arm, t), f"{label:>22} it{t} sample", position, show) as bar:
            sample_model(study, rd, arm, t, bar)
        timings["sample_s"] = time.perf_counter() - t0
    dist.barrier()
    if not dist.is_main():  # metrics, once, on the main process
        dist.barrier()
        return {}
    if not (_done(d / "metrics.json", shared=False) and _done(d / "neighbours_pixel.npz", shared=False)):
        # the main process alone measures (the neighbours file is the pixel space's, written with the metrics)
        t0 = time.perf_counter()
        m = measure_stage(study, rd, arm, t)
        timings["metrics_s"] = time.perf_counter() - t0
        atomic_write_json(d / "metrics.json", m)
        if timings:
            atomic_write_json(d / "timings.json", timings)
    m = read_json(d / "metrics.json")
    dist.barrier()
    if show:
        num = fmt_number
        entropy = "-inf (collapsed)" if m.get("train_collapsed_pixel") else num(m["train_entropy_pixel"], "{:.2f}")
        print(f"[{label}] iteration {t}: entropy {entropy}, gen score {num(m['gen_score_pixel'], '{:.3f}')} "
              f"(ratio {num(m['gen_score_ratio_pixel'], '{:.2f}')}), fd {num(m['fd_pixel'], '{:.3f}')}",
              file=sys.stderr, flush=True)
    return m


def flush_rows(cfg: RunConfig, rd: RunDir) -> None:
    """Append to a seed's metrics.jsonl, with its verdict, every finished row whose arm's earlier rows are all
    there (in (iteration, arm) order; an arm waits for no other arm, so a finished slice shows at once). Under
    the seed's rows lock, so that processes running its slices may all call it."""
    with rd.hold("rows"):
        history = read_metrics(rd.metrics_path)
        done = {(r["arm"], r["iteration"]) for r in history}
        rows, blocked = [], set()
        for t, arm in [(t, a) for t in range(cfg.iterations) for a in cfg.arms]:
            if (arm.label(), t) in done or arm.label() in blocked:
                continue
            f = rd.arm_sample_dir(cfg, arm, t) / "metrics.json"
            if not whole(f, "measuring it again when the run resumes"):
                blocked.add(arm.label())
                continue
            row = {"seed": cfg.seed, "arm": arm.label(), "iteration": t, "paradigm": arm.paradigm,
                   "selector": arm.selector, "pool_factor": arm.pool_factor, **read_json(f)}
            add_verdict(row, history, cfg)
            history.append(row)
            rows.append(row)
        if rows:
            rd.append_metrics(rows)


def order_rows(cfg: RunConfig, rd: RunDir) -> None:
    """Rewrite a seed's metrics.jsonl in (iteration, arm) order: with arms side by side, rows land in the order their
    stages finish, which varies from run to run; the finished file does not."""
    with rd.hold("rows"):
        rows = read_metrics(rd.metrics_path)
        place = {a.label(): i for i, a in enumerate(cfg.arms)}
        ordered = sorted(rows, key=lambda r: (r["iteration"], place.get(r["arm"], len(place))))
        if ordered != rows:
            rd.write_metrics(ordered)


def merge_rows(cfg: RunConfig, root: RunDir) -> None:
    """A run with `seeds`: RUN_DIR/metrics.jsonl as every seed's rows, seed by seed (rewritten whole); the
    caller holds the run's merge lock."""
    if cfg.seeds is not None:
        root.write_metrics([r for s in cfg.seeds for r in read_metrics(root.study_dir(cfg, s).metrics_path)])


def _merge_now(cfg: RunConfig, root: RunDir) -> None:
    """Merge while the run goes, unless another process is writing the merged files right now."""
    try:
        with root.hold("merge", wait=False):
            merge_rows(cfg, root)
    except UserError:
        pass


def references(study: Study, rd: RunDir) -> None:
    """The real-data references of every space (learned spaces are trained here, once per seed), under the seed's
    references lock: a process that gets here while another computes them waits and reads them from the cache."""
    with rd.hold("references") if dist.world() == 1 else nullcontext():
        for s in ["pixel"] + list(study.cfg.spaces):
            study.reference(s)


def references_job(cfg_dict: dict, out: str, seed: int) -> None:
    """A worker job: one seed's references, computed beside the training of its iteration 0."""
    cfg = config_from_dict(cfg_dict)
    rd = RunDir(Path(out)).study_dir(cfg, seed)
    references(prepare(seed_config(cfg, seed), str(rd.path)), rd)


def _iteration0(study: Study, rd: RunDir, show: bool, locked: bool = False, timings: dict | None = None) -> None:
    """The references, the shared iteration 0, and the arms that sample the shared model with their own guidance.
    Under the seed's iteration-0 lock (taken here unless `locked`): the first process to get here runs it, any
    other waits and finds it done."""
    # under accelerate every process runs every stage (the main one holds the run's exclusive lock)
    with rd.hold("iteration0") if dist.world() == 1 and not locked else nullcontext():
        if dist.is_main():
            references(study, rd)
        run_stage(study, rd, None, 0, show=show, timings=timings)  # shared by every arm: one row per arm points at it
        for arm in study.cfg.arms:
            if own_iteration0(study.cfg, arm):
                run_stage(study, rd, arm, 0, show=show)


def _iteration0_beside(cfg: RunConfig, root: RunDir, out: str, seed: int, jobs: list[Job], workers: int,
                       show: bool) -> None:
    """One seed's study on several cores: this process trains iteration 0's model on the cores a worker computing
    the references leaves free; once the references are done, the arms' workers start and wait for iteration 0
    (the seed's lock, taken before any of them starts); then, with the references as that worker computed them
    (never a second time here), this process samples and measures iteration 0, and the arms go on side by side.
    A job's failure interrupts this process; this process's failure stops the jobs before the lock is released."""
    rd, scfg = root.study_dir(cfg, seed), seed_config(cfg, seed)
    refs = f"seed {seed}, references"
    first = [Job(refs, references_job, (config_to_dict(cfg), out, seed))]
    jobs = [replace(j, after=refs) for j in jobs]  # they start on the references' core once it is free
    own = max(1, (os.cpu_count() or 1) - thread_budget(workers))  # the cores the references' worker leaves
    try:
        with ExitStack() as held:
            held.enter_context(rd.hold("iteration0"))
            beside = JobsBeside(first + jobs, workers, on_tick=lambda: _merge_now(cfg, root))
            try:
                study, timings = prepare(scfg, str(rd.path)), {}
                with torch_threads(own):
                    run_stage(study, rd, None, 0, show=show, train_only=True, timings=timings)
                beside.wait_for(refs)
                _iteration0(study, rd, show, locked=True, timings=timings)
                flush_rows(scfg, rd)
            except BaseException as e:
                beside.cancel()  # before the lock is released: no waiting worker starts iteration 0 meanwhile
                raise beside.failure_of(e)
        beside.wait()
    except JobFailed as e:  # a job's signal that landed between the handlers above (the lock's release)
        beside.cancel()
        raise beside.failure_of(e) from None


def run_seed(cfg_dict: dict, out: str, seed: int, arm_indices: tuple[int, ...] | None, show: bool,
             on_checkpoint: Callable | None = None) -> None:
    """One seed's study, or some of its arms (a slice): iteration 0, then each arm's iterations 1.. (a worker
    job, or called in the process that holds the run directory's lock)."""
    cfg = config_from_dict(cfg_dict)
    rd = RunDir(Path(out)).study_dir(cfg, seed)
    scfg = seed_config(cfg, seed)
    study = prepare(scfg, str(rd.path))
    preload()  # before the wait for iteration 0's lock
    _iteration0(study, rd, show)
    flush_rows(scfg, rd)
    for t in range(1, cfg.iterations):
        for i in range(len(cfg.arms)) if arm_indices is None else arm_indices:
            run_stage(study, rd, cfg.arms[i], t, show=show, position=i, on_checkpoint=on_checkpoint)
            flush_rows(scfg, rd)


def run_together(cfg_dict: dict, out: str, slices: tuple[tuple[int, int], ...], show: bool,
                 on_checkpoint: Callable | None = None) -> None:
    """A job of a `batch_models` run: the (seed, arm index) slices in step, iteration by iteration: their
    training sets, then their models trained together as one batched model (`stages.train_models_together`),
    then each slice's samples and metrics. Each seed's iteration 0 first, as `run_seed` runs it."""
    cfg = config_from_dict(cfg_dict)
    root = RunDir(Path(out))
    studies = {}
    for seed in dict.fromkeys(s for s, _ in slices):
        rd = root.study_dir(cfg, seed)
        studies[seed] = (prepare(seed_config(cfg, seed), str(rd.path)), rd)
    preload()
    for study, rd in studies.values():
        _iteration0(study, rd, show)
        flush_rows(study.cfg, rd)
    for t in range(1, cfg.iterations):
        stages = [(*studies[s], cfg.arms[j], t) for s, j in slices]
        timings: list[dict] = [{} for _ in stages]
        for (study, rd, arm, _), tm in zip(stages, timings):
            _training_set(study, rd, arm, t, tm)
        todo = [i for i, (_, rd, arm, _) in enumerate(stages)
                if not _done(rd.iter_dir(arm.label(), t) / "model.safetensors")]
        if todo:
            t0 = time.perf_counter()
            with ExitStack() as held:
                bars = [held.enter_context(_train_bar(*stages[i], pos, show, cfg.seeds is not None))
                        for pos, i in enumerate(todo)]
                train_models_together([stages[i] for i in todo], bars, on_checkpoint)
            batch_s = time.perf_counter() - t0
            for i in todo:  # each model's share of the batch (so that sums over stages count each second once)
                timings[i].update(train_s=batch_s / len(todo), train_batch_s=batch_s, trained_together=len(todo))
        for pos, ((study, rd, arm, _), tm) in enumerate(zip(stages, timings)):
            run_stage(study, rd, arm, t, show=show, position=pos, timings=tm)
            flush_rows(study.cfg, rd)


def default_workers(cfg: RunConfig, jobs: int) -> int:
    if cfg.workers is not None:
        return min(cfg.workers, jobs)
    if resolve_device(cfg.device).startswith("cuda"):
        return 1
    return max(1, min(jobs, os.cpu_count() or 1))


def _run_distributed(cfg: RunConfig, out: Path, show: bool) -> dict:
    """Under `accelerate launch`: seeds and arms one after another, every stage with all processes (training
    data parallel, sampling split by index), selection and metrics on the main process, which holds the lock."""
    root, error = None, None
    if dist.is_main():
        try:
            root = RunDir.open(out, cfg)
        except UserError as e:
            error = str(e)
    error = dist.share(error)
    if error:
        raise UserError(error)
    root = root or RunDir(out)
    try:
        for seed in study_seeds(cfg):
            rd, scfg = root.study_dir(cfg, seed), seed_config(cfg, seed)
            study = prepare(scfg, str(rd.path))
            _iteration0(study, rd, show)
            for t in range(1, cfg.iterations):
                for arm in cfg.arms:
                    run_stage(study, rd, arm, t, show=show)
                    if dist.is_main():
                        flush_rows(scfg, rd)
            if dist.is_main():
                flush_rows(scfg, rd)
        summary = _finish(cfg, root, show) if dist.is_main() else {}
        dist.barrier()
        return summary
    finally:
        root.close()


def _finish(cfg: RunConfig, root: RunDir, show: bool) -> dict:
    """Merged rows, summary and report from whatever slices are complete, written together under the run's
    merge lock (so that the last slice to finish writes the newest of all three)."""
    if cfg.report:  # refused before the summary is rewritten
        check_places([root.path], root.path / "report.html")
    with root.hold("merge"):
        merge_rows(cfg, root)
        summary = summarize(read_metrics(root.metrics_path), cfg, str(root.path))
        atomic_write_json(root.path / "summary.json", summary)
        if cfg.report:
            summary["report"] = str(write_report([root.path], root.path / "report.html", show=show))
    return summary


def _run_batched(cfg: RunConfig, root: RunDir, out: str, arm_slices: list, workers: int, show: bool,
                 on_checkpoint: Callable | None) -> None:
    """`batch_models`: the slices in groups trained as one batched model each (`run_together`), one group per
    worker, at least two slices to a group (a group of one trains beside a copy of itself); each seed's iteration
    0 first (seeds side by side)."""
    cfg_dict = config_to_dict(cfg)
    groups = max(1, min(workers, len(arm_slices) // 2))
    # sorted by arm, then seed, and dealt round-robin: each group gets a share of every arm's slices
    ordered = sorted(arm_slices, key=lambda sj: (sj[1], sj[0]))
    parts = [tuple(ordered[g::groups]) for g in range(groups)]
    if groups == 1:
        run_together(cfg_dict, out, parts[0], show, on_checkpoint)
        return
    seeds = list(dict.fromkeys(s for s, _ in arm_slices))
    run_jobs([Job(f"seed {s}, iteration 0", run_seed, (cfg_dict, out, s, (), show)) for s in seeds],
             min(workers, len(seeds)))
    run_jobs([Job(f"models {g + 1} of {groups} ({len(p)} slices)", run_together, (cfg_dict, out, p, show))
              for g, p in enumerate(parts)], groups, on_tick=lambda: _merge_now(cfg, root))


def run_loop(cfg: RunConfig, out: str | Path, *, show: bool = True, on_checkpoint: Callable | None = None,
             only: list[tuple[int, int | None]] | None = None) -> dict:
    """Run (or resume) a study in RUN_DIR `out`, every seed and arm or only the given (seed, arm index or None
    = every arm) slices; returns the summary of whatever slices are complete (also written to summary.json)."""
    out = Path(out)
    prepare(cfg)  # the data and model checks, before anything is written
    if dist.world() > 1:
        if cfg.batch_models:
            raise UserError("batch_models trains several models in one process; under accelerate launch the "
                            "processes share each model (data parallel): set batch_models = false")
        if only is not None:
            raise UserError("--only runs one slice per process; under accelerate launch run the whole study")
        return _run_distributed(cfg, out, show)
    with RunDir.open(out, cfg, shared=only is not None) as root, ExitStack() as held:
        plan = [(s, None) for s in study_seeds(cfg)] if only is None else only
        arm_slices = [(s, j) for s, i in plan for j in (range(len(cfg.arms)) if i is None else [i])]
        if only is not None:  # a slice refuses to run beside another process running the same (seed, arm)
            for s, j in arm_slices:
                held.enter_context(root.study_dir(cfg, s).hold(f"slice-{cfg.arms[j].label()}", wait=False))
        workers = default_workers(cfg, len(arm_slices))
        cfg_dict = config_to_dict(cfg)
        if cfg.batch_models and cfg.iterations > 1:
            _run_batched(cfg, root, str(out), arm_slices, workers, show, on_checkpoint)
        elif workers <= 1 or cfg.iterations == 1:
            for s, i in plan:
                run_seed(cfg_dict, str(out), s, None if i is None else (i,), show, on_checkpoint)
                _merge_now(cfg, root)
        else:
            seeds = list(dict.fromkeys(s for s, _ in plan))
            if len(seeds) > 1:  # iteration 0 of several seeds side by side
                run_jobs([Job(f"seed {s}, iteration 0", run_seed, (cfg_dict, str(out), s, (), show)) for s in seeds],
                         min(workers, len(seeds)))
            # arms side by side; arm-major order, so that the first jobs are of different seeds
            jobs = [Job(f"arm {cfg.arms[j].label()}" + (f", seed {s}" if cfg.seeds is not None else ""),
                        run_seed, (cfg_dict, str(out), s, (j,), show))
                    for j in range(len(cfg.arms)) for s, jj in arm_slices if jj == j]
            if len(seeds) == 1:  # one seed: its iteration 0 here, beside its references and the arms' start
                _iteration0_beside(cfg, root, str(out), seeds[0], jobs, workers, show)
            else:
                run_jobs(jobs, workers, on_tick=lambda: _merge_now(cfg, root))
        for s in dict.fromkeys(s for s, _ in plan):
            flush_rows(seed_config(cfg, s), root.study_dir(cfg, s))
            order_rows(cfg, root.study_dir(cfg, s))
        return _finish(cfg, root, show)
