"""Jobs side by side in processes, shared by `run` (arms, seeds) and `probe` (training-set sizes).

Fail fast: when one job raises, every other job is stopped within about a second and the error names the job
(hours of other arms are not worth finishing when the run has failed). Each worker ends itself when its parent
is gone (the parent holds the run directory's lock), and the cores are split between the workers (torch's
threads and numpy's BLAS threads alike).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

from model_collapse.errors import UserError


class WorkerError(RuntimeError):
    """A job failed in a worker process; the message names the job and carries its traceback."""


class JobFailed(BaseException):
    """Raised in the main thread by `JobsBeside` when a job has failed (a BaseException, as KeyboardInterrupt is:
    no `except Exception` of the interrupted code swallows it); `JobsBeside.failure_of` gives the job's error."""


@dataclass(frozen=True)
class Job:
    name: str  # says which job failed, e.g. "arm replace-greedy-k2, seed 1"
    fn: Callable  # a module-level function (it is pickled by reference into a spawned process)
    args: tuple
    after: str | None = None  # the name of a job that must have finished before this one starts


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


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n for the block, and back to the caller's count after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _entry(job: Job, threads: int, parent_pid: int, results) -> None:
    # a terminal's Ctrl-C reaches the whole process group: the parent stops its workers, which must not report it
    # as their own failure
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
             tick: float = 1.0, stop: threading.Event | None = None,
             on_done: Callable[[str], None] | None = None) -> None:
    """Run every job, at most `workers` at a time, each in a spawned process; call on_tick about every `tick`
    seconds while they run, and on_done(name) as each job succeeds; a job with `after` starts once that job has
    finished. The first failure terminates the others and raises (UserError stays UserError). Setting `stop` (from
    another thread) terminates the running jobs and returns within about `tick` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    threads = thread_budget(workers)
    pending, running, done, finished = list(jobs), {}, 0, set()
    names = {j.name for j in jobs}
    for j in jobs:
        if j.after is not None and j.after not in names:
            raise ValueError(f"job {j.name} waits for {j.after}, which is not among the jobs")
    try:
        while done < len(jobs):
            if stop is not None and stop.is_set():
                return
            while len(running) < workers:
                job = next((j for j in pending if j.after is None or j.after in finished), None)
                if job is None:
                    break
                pending.remove(job)
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
            finished.add(name)
            if on_done:
                on_done(name)
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


class JobsBeside:
    """`run_jobs` in a background thread while this thread does its own work: `wait_for(name)` waits for one job,
    `wait()` for all of them, each raising the jobs' first failure; `cancel()` terminates them and returns once
    they are gone. When a job fails while the main thread works, the main thread gets SIGUSR1, whose handler
    (installed here while the jobs run, where SIGUSR1 has no other handler) raises JobFailed, which `failure_of`
    turns into the job's error: the run stops within seconds, as `run_jobs` promises, and a user's Ctrl-C stays
    a KeyboardInterrupt. Elsewhere (another thread, a SIGUSR1 handler of the process's own) the failure waits for
    the next `wait_for` or `wait`."""

    def __init__(self, jobs: Sequence[Job], workers: int, on_tick: Callable[[], None] | None = None):
        self.failure: BaseException | None = None
        self._names = {j.name for j in jobs}
        self._stop, self._finished = threading.Event(), threading.Event()
        self._done: set[str] = set()
        self._changed = threading.Condition()
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL:
            self._previous = signal.signal(signal.SIGUSR1, _job_failed)
        self._thread = threading.Thread(target=self._run, args=(list(jobs), workers, on_tick),
                                        name="model-collapse jobs", daemon=True)
        self._thread.start()

    def _run(self, jobs, workers, on_tick) -> None:
        try:
            run_jobs(jobs, workers, on_tick, stop=self._stop, on_done=self._job_done)
        except BaseException as e:  # noqa: BLE001 - handed to the foreground thread
            self.failure = e
            if self._previous is not None and not self._stop.is_set():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        finally:
            self._finished.set()
            with self._changed:
                self._changed.notify_all()

    def _job_done(self, name: str) -> None:
        with self._changed:
            self._done.add(name)
            self._changed.notify_all()

    def _restore(self) -> None:
        """The process's own SIGUSR1 handling back, once the jobs are over (no signal is sent after that)."""
        if self._previous is not None and self._finished.is_set():
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def failure_of(self, e: BaseException) -> BaseException:
        """The error to raise for `e`, raised in the foreground: the job's failure where `e` is its JobFailed."""
        return self.failure if isinstance(e, JobFailed) and self.failure is not None else e

    def wait_for(self, name: str) -> None:
        if name not in self._names:
            raise ValueError(f"no job named {name!r}")
        with self._changed:
            while name not in self._done and not self._finished.is_set():
                self._changed.wait(0.5)
        if self.failure is not None:
            raise self.failure
        if name not in self._done:
            raise WorkerError(f"{name}: stopped before it finished")

    def cancel(self) -> None:
        self._stop.set()
        while not self._finished.wait(0.5):
            pass
        self._restore()

    def wait(self) -> None:
        try:
            # an Event, not Thread.join (an interrupted join marks a live thread dead in 3.11), and with a timeout:
            # a signal the kernel hands to another thread wakes no untimed wait of this one
            while not self._finished.wait(0.5):
                pass
            self._restore()
            if self.failure is not None:
                raise self.failure
        except BaseException as e:
            self.cancel()
            raise self.failure_of(e)


def _job_failed(signum, frame) -> None:
    raise JobFailed()
