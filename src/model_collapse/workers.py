"""Jobs side by side in processes, shared by `run` (arms, seeds) and `probe` (training-set sizes).

Fail fast: when one job raises, every other job is stopped within about a second and the error names the job
(hours of other arms are not worth finishing when the run has failed). Each worker ends itself when its parent
is gone (the parent holds the run directory's lock), and the cores are split between the workers (torch's
threads and the BLAS threads of numpy and scipy alike).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

from model_collapse.errors import UserError


class WorkerError(RuntimeError):
    """A job failed in a worker process; the message names the job and carries its traceback."""


@dataclass(frozen=True)
class Job:
    name: str  # says which job failed, e.g. "arm replace-greedy-k2, seed 1"
    fn: Callable  # a module-level function (it is pickled by reference into a spawned process)
    args: tuple


def watch_parent(parent_pid: int) -> None:
    """End this process when the parent is gone."""
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def thread_budget(workers: int) -> int:
    """Torch threads per worker: the cores split evenly, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _entry(job: Job, threads: int, parent_pid: int, results) -> None:
    watch_parent(parent_pid)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)  # numpy's BLAS too: two workers' default BLAS threads would fight for the cores
    try:
        job.fn(*job.args)
    except UserError as e:
        results.put((job.name, "user", str(e)))
    except OSError as e:  # the file system refused a path (a file where a folder should be, a full disk)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        results.put((job.name, "user", f"{where}{e.strerror or e}"))
    except BaseException as e:  # noqa: BLE001 - everything must reach the parent
        results.put((job.name, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    else:
        results.put((job.name, "ok", ""))


def run_jobs(jobs: Sequence[Job], workers: int, on_tick: Callable[[], None] | None = None,
             tick: float = 1.0, stop: threading.Event | None = None) -> None:
    """Run every job, at most `workers` at a time, each in a spawned process; call on_tick about every `tick`
    seconds while they run. The first failure terminates the others and raises (UserError stays UserError).
    Setting `stop` (from another thread) terminates the running jobs and returns within about `tick` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = thread_budget(workers)
    pending, running, done = list(jobs), {}, 0
    try:
        while done < len(jobs):
            if stop is not None and stop.is_set():
                return
            while pending and len(running) < workers:
                job = pending.pop(0)
                p = ctx.Process(target=_entry, args=(job, threads, os.getpid(), results), daemon=True)
                p.start()
                running[job.name] = p
            try:
                name, status, msg = results.get(timeout=tick)
            except queue.Empty:
                for name, p in list(running.items()):  # died without a word (killed, out of memory)
                    if not p.is_alive() and p.exitcode not in (0, None):
                        raise WorkerError(f"{name}: worker process died (exit code {p.exitcode})")
                if on_tick:
                    on_tick()
                continue
            running.pop(name).join()
            done += 1
            if status == "user":
                raise UserError(f"{name}: {msg}")
            if status == "error":
                raise WorkerError(f"{name} failed: {msg}")
            if on_tick:
                on_tick()
    finally:
        for p in running.values():
            if p.is_alive():
                p.terminate()
        for p in running.values():
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()


@contextmanager
def jobs_beside(jobs: Sequence[Job], workers: int, on_tick: Callable[[], None] | None = None):
    """Run `jobs` (as `run_jobs`) in a background thread while the `with` block works in this one; on leaving the
    block, wait for them and raise their failure. When the block itself raises, the jobs are terminated first."""
    stop, failure = threading.Event(), []

    def background():
        try:
            run_jobs(jobs, workers, on_tick, stop=stop)
        except BaseException as e:  # noqa: BLE001 - handed to the foreground thread
            failure.append(e)

    thread = threading.Thread(target=background, name="model-collapse jobs", daemon=True)
    thread.start()
    try:
        yield
        thread.join()  # an interrupt here, too, stops the jobs
    except BaseException:
        stop.set()
        thread.join()
        raise
    if failure:
        raise failure[0]
