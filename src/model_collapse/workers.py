"""Jobs side by side in processes, shared by `run` (arms, seeds) and `probe` (training-set sizes).

Fail fast: when one job raises, every other job is stopped within about a second and the error names the job
(hours of other arms are not worth finishing when the run has failed). Each worker ends itself when its parent
is gone (the parent holds the run directory's lock), and the cores are split between the workers (torch's
threads and numpy's BLAS threads alike).
"""

from __future__ import annotations

import _thread
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
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
             tick: float = 1.0, stop: threading.Event | None = None,
             on_done: Callable[[str], None] | None = None) -> None:
    """Run every job, at most `workers` at a time, each in a spawned process; call on_tick about every `tick`
    seconds while they run, and on_done(name) as each job succeeds. The first failure terminates the others and
    raises (UserError stays UserError). Setting `stop` (from another thread) terminates the running jobs and
    returns within about `tick` seconds."""
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


def _interrupt_main() -> None:
    """A KeyboardInterrupt in the main thread: a real SIGINT where Python's own handler takes it (it also wakes a
    sleep or a lock wait), else the simulated one (at the main thread's next Python step)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:
        _thread.interrupt_main()


class JobsBeside:
    """`run_jobs` in a background thread while this thread does its own work: `wait_for(name)` waits for one job,
    `wait()` for all of them, each raising the jobs' first failure; `cancel()` terminates them and returns once
    they are gone. When a job fails while the main thread works, the main thread is interrupted (a
    KeyboardInterrupt, which `failure_of` turns back into the job's error): the run stops within seconds, as
    `run_jobs` promises."""

    def __init__(self, jobs: Sequence[Job], workers: int, on_tick: Callable[[], None] | None = None):
        self.failure: BaseException | None = None
        self._stop, self._finished = threading.Event(), threading.Event()
        self._done: set[str] = set()
        self._changed = threading.Condition()
        self._interrupt = threading.current_thread() is threading.main_thread()
        self._interrupted = False  # whether a KeyboardInterrupt was sent for a job's failure (not a user's Ctrl-C)
        self._thread = threading.Thread(target=self._run, args=(list(jobs), workers, on_tick),
                                        name="model-collapse jobs", daemon=True)
        self._thread.start()

    def _run(self, jobs, workers, on_tick) -> None:
        try:
            run_jobs(jobs, workers, on_tick, stop=self._stop, on_done=self._job_done)
        except BaseException as e:  # noqa: BLE001 - handed to the foreground thread
            self.failure = e
            if self._interrupt and not self._stop.is_set():
                self._interrupted = True
                _interrupt_main()
        finally:
            self._finished.set()
            with self._changed:
                self._changed.notify_all()

    def _job_done(self, name: str) -> None:
        with self._changed:
            self._done.add(name)
            self._changed.notify_all()

    def failure_of(self, e: BaseException) -> BaseException:
        """The error to raise for `e`, raised in the foreground: the jobs' failure when it caused `e`."""
        return self.failure if isinstance(e, KeyboardInterrupt) and self._interrupted else e

    def wait_for(self, name: str) -> None:
        with self._changed:
            while name not in self._done and not self._finished.is_set():
                self._changed.wait(0.5)
        if self.failure is not None:
            raise self.failure
        if name not in self._done:
            raise WorkerError(f"{name}: stopped before it finished")

    def cancel(self) -> None:
        self._stop.set()
        self._finished.wait()

    def wait(self) -> None:
        try:
            # an Event, not Thread.join (an interrupted join marks a live thread dead in 3.11), and with a timeout:
            # a signal the kernel hands to another thread wakes no untimed wait of this one
            while not self._finished.wait(0.5):
                pass
            if self.failure is not None:
                raise self.failure
        except BaseException as e:
            self.cancel()
            raise self.failure_of(e)
