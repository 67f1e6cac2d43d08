"""Background jobs: napari thread workers running generators, newest job wins.

Job generators compute and ``yield`` results (embeddings, statistics, propagation slices,
progress); they never touch Qt widgets or layers. ``JobRunner`` connects their signals to
callbacks that run on the GUI thread and drops whatever a superseded job still sends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ._session import EncodeCancelled, EncoderSettings, Prompts, Session

log = logging.getLogger("napari_structsam")


@dataclass
class Progress:
    done: int
    total: int
    text: str


class JobFailed(Exception):
    """A job's ``RuntimeError`` (torch raises those: out of memory, bad device...), re-raised
    as another type: superqt takes a RuntimeError from a worker for "the worker was deleted"
    and drops it, so neither ``errored`` nor ``finished`` would ever come."""


@dataclass
class Job:
    id: int
    kind: str  # "encode" or "propagate"
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued, running, done, cancelled, error
    worker: object = None
    slots: list = field(default_factory=list)  # (signal, slot) pairs to disconnect on shutdown

    def cancelled(self) -> bool:
        return self.cancel.is_set()


# ---------------------------------------------------------------------------- job generators


def encode_job(
    session: Session,
    slices: list[int],
    settings: EncoderSettings,
    prompts: Prompts | None,
    want_stats: bool,
    job: Job,
) -> Iterator:
    """Encode ``slices`` in order (the current one first, neighbours after), yielding each
    ``Encoded`` as soon as it exists; after the first, the FLOPs of this setting if unknown."""
    total = len(slices) + (1 if want_stats else 0)
    done = 0
    try:
        for i, z in enumerate(slices):
            yield Progress(done, total, f"encoding slice {z}" if session.is_3d else "encoding")
            # the current slice gets the prompts (prompt-aware); neighbours are prefetched plain
            enc = session.encode(z, settings, prompts if i == 0 else None, job.cancelled)
            done += 1
            yield enc
            if i == 0 and want_stats:
                yield Progress(done, total, "counting encoder FLOPs")
                fast = session.service.worth_timing_unmerged(settings, enc.embedding)
                yield session.flops_stats(z, settings, prompts, fast, job.cancelled)
                done += 1
        yield Progress(total, total, "done")
    except EncodeCancelled:
        return
    except RuntimeError as exc:
        raise JobFailed(f"{type(exc).__name__}: {exc}") from exc


def propagate_job(session: Session, z0: int, seed, settings, known, job: Job) -> Iterator:
    try:
        yield from session.propagate(z0, seed, settings, known, job.cancelled)
    except EncodeCancelled:
        return
    except RuntimeError as exc:
        raise JobFailed(f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------------- runner


class JobRunner:
    """At most one live job: starting one cancels the previous (newest wins).

    ``on_yield(job, value)``, ``on_done(job)`` and ``on_error(job, exc)`` run on the GUI thread
    and only for the live job; a cancelled job's late values are dropped. After ``shutdown``
    (the widget is gone) nothing is called back and no job starts.
    """

    def __init__(self, on_yield: Callable, on_done: Callable, on_error: Callable):
        self.on_yield = on_yield
        self.on_done = on_done
        self.on_error = on_error
        self.current: Job | None = None
        self.history: list[Job] = []  # every job started, with its final state (tests, status)
        self._next_id = 0
        self.closed = False

    @property
    def busy(self) -> bool:
        return self.current is not None and self.current.state in ("queued", "running")

    def cancel(self) -> None:
        job = self.current
        if job is not None and job.state in ("queued", "running"):
            job.cancel.set()
            job.state = "cancelled"
            if job.worker is not None:
                job.worker.quit()
        self.current = None

    def start(self, kind: str, func: Callable[..., Iterator], *args) -> Job:
        from napari.qt.threading import create_worker

        self.cancel()
        if self.closed:
            raise RuntimeError("the job runner was shut down")
        self._next_id += 1
        job = Job(self._next_id, kind)
        self.history.append(job)
        self.history[:] = self.history[-50:]
        self.current = job
        worker = create_worker(func, *args, job, _start_thread=False, _ignore_errors=True)
        job.worker = worker
        job.slots = [
            (worker.yielded, lambda value, job=job: self._yielded(job, value)),
            (worker.errored, lambda exc, job=job: self._errored(job, exc)),
            (worker.finished, lambda job=job: self._finished(job)),
        ]
        for signal, slot in job.slots:
            signal.connect(slot)
        job.state = "running"
        worker.start()
        return job

    def shutdown(self, timeout: float = 10.0) -> bool:
        """Cancel every job, disconnect its signals and wait (up to ``timeout`` s) for the
        worker threads to end; called when the widget goes away. True when none runs on.

        Cancelled encodes stop within one encoder block; waiting lets them finish emitting
        before the application tears Qt down (else: "wrapped C/C++ object ... deleted")."""
        self.closed = True
        self.cancel()
        workers = []
        for job in self.history:
            job.cancel.set()
            if job.state in ("queued", "running"):
                job.state = "cancelled"
            for signal, slot in job.slots:
                with contextlib.suppress(TypeError, RuntimeError):  # gone or not connected
                    signal.disconnect(slot)
            job.slots = []
            if job.worker is not None:
                with contextlib.suppress(RuntimeError):
                    job.worker.quit()
                    workers.append(job.worker)
        end = time.monotonic() + timeout
        running = [w for w in workers if _running(w)]
        while running and time.monotonic() < end:
            time.sleep(0.01)
            running = [w for w in running if _running(w)]
        if running:
            log.warning("%d StructSAM worker(s) still running after %.0f s", len(running), timeout)
        return not running

    def _live(self, job: Job) -> bool:
        return not self.closed and job is self.current and not job.cancelled()

    def _yielded(self, job: Job, value) -> None:
        if self._live(job):
            self.on_yield(job, value)

    def _errored(self, job: Job, exc) -> None:
        if job.cancelled() or self.closed:
            return
        job.state = "error"
        if job is self.current:
            self.current = None
            self.on_error(job, exc)

    def _finished(self, job: Job) -> None:
        if job.state == "running":
            job.state = "cancelled" if job.cancelled() else "done"
        if job is self.current and not self.closed:
            self.current = None
            self.on_done(job)

    def wait(self, timeout: float = 60.0) -> bool:
        """Block (processing Qt events) until no job runs; for scripts and tests."""
        import time

        from qtpy.QtWidgets import QApplication

        end = time.monotonic() + timeout
        while self.busy and time.monotonic() < end:
            QApplication.processEvents()
            time.sleep(0.005)
        return not self.busy


def _running(worker) -> bool:
    try:
        return bool(worker.is_running)
    except RuntimeError:  # its Qt side is already gone
        return False
