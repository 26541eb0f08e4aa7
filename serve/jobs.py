"""The job queue: one worker thread runs jobs in the order they came; requests wait on their job's future.

A job is a function of the `Job` (it reports steps through `job.step`, which also stops it when it was
interrupted). Cancelling a queued job drops it; interrupting a running one stops it at its next step.
A client that goes away leaves its job running: its images are saved all the same.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("latentloom.serve")


class Interrupted(Exception):
    """Raised inside a running job (from its step callback) to stop it at the next step."""


class Cancelled(Exception):
    """The result of a job cancelled before it started."""


@dataclass
class Job:
    run: Callable[["Job"], Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    kind: str = "txt2img"
    state: str = "queued"  # queued, running, done, failed, cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    total_steps: int = 0  # over every batch of the job
    steps_done: int = 0
    batch_step: int = 0  # within the current batch (A1111's sampling_step)
    batch_steps: int = 0
    batches: int = 1
    interrupted: bool = False
    skipped: bool = False
    preview: bytes | None = None  # PNG of the latest decoded x0 estimate
    preview_id: int = 0
    preview_wanted: float = 0.0  # when someone last asked for a preview (decoding costs a VAE pass)
    textinfo: str | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def step(self, batch_step: int, batch_steps: int) -> None:
        """Called once per sampler step; raises `Interrupted` when the job was interrupted."""
        if self.interrupted:
            raise Interrupted(self.id)
        self.batch_step, self.batch_steps = batch_step, batch_steps
        self.steps_done += 1

    def progress(self) -> float:
        if self.state in ("done", "failed", "cancelled"):
            return 1.0
        return min(1.0, self.steps_done / self.total_steps) if self.total_steps else 0.0

    def eta(self) -> float | None:
        """Seconds left, from the pace so far (None until a step is done)."""
        if self.started is None or not self.steps_done or not self.total_steps:
            return None
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.steps_done * (self.total_steps - self.steps_done))

    def wants_preview(self) -> bool:
        return time.time() - self.preview_wanted < 5.0


class JobQueue:
    """Jobs in order, run by one worker thread; finished jobs stay listed a while for progress polls."""

    def __init__(self, *, keep_finished: int = 256) -> None:
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._keep = keep_finished
        self.current: Job | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="latentloom-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Job], Any], *, kind: str, job_id: str | None = None,
               total_steps: int = 0, batches: int = 1) -> Job:
        job = Job(run=run, kind=kind, total_steps=total_steps, batches=batches)
        with self._cond:
            if job_id and job_id not in self._jobs:  # a client's own id (A1111's force_task_id)
                job.id = job_id
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:  # forget the oldest finished jobs
                oldest = next((k for k, j in self._jobs.items() if j.state in ("done", "failed", "cancelled")), None)
                if oldest is None:
                    break
                del self._jobs[oldest]
            self._queue.append(job)
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """0 for the next job to run, None when the job is not waiting."""
        with self._cond:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._queue) + (1 if self.current is not None else 0)

    def cancel(self, job_id: str) -> str:
        """'queued' (dropped before it started), 'running' (interrupted), or 'not found'."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return "not found"
            if job.state == "queued":
                self._queue.remove(job)
                job.state, job.finished = "cancelled", time.time()
                job.future.set_exception(Cancelled(job_id))
                return "queued"
            job.interrupted = True
            return "running"

    def interrupt(self, *, skip: bool = False) -> bool:
        """Stop the running job at its next step (A1111's interrupt and skip)."""
        job = self.current
        if job is None:
            return False
        job.interrupted = True
        job.skipped = skip
        return True

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            for job in self._queue:
                job.state = "cancelled"
                job.future.set_exception(Cancelled(job.id))
            self._queue.clear()
            self._cond.notify()
        self.interrupt()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                job.state, job.started = "running", time.time()
                self.current = job
            try:
                result = job.run(job)
            except BaseException as err:  # the worker must outlive any job
                job.state = "failed"
                if not isinstance(err, (ValueError, TypeError, LookupError, Interrupted)):
                    log.exception("job %s (%s) failed", job.id, job.kind)
                job.future.set_exception(err)
            else:
                job.state = "done"
                job.future.set_result(result)
            finally:
                job.finished = time.time()
                with self._cond:
                    self.current = None
