"""Where notebooks are graded: Dask workers, each with a warm sandbox of its own.

The class grader's execution layer is ``dask.distributed``. On one machine
:class:`Cluster` starts a ``LocalCluster`` (one worker process per core, one
thread each); given ``--scheduler tcp://HOST:PORT`` it grades on an existing
cluster instead - started by hand (``dask scheduler``, ``dask worker``), by
dask-jobqueue on Slurm or PBS, or by dask-kubernetes.

Each worker gets the :class:`SandboxPlugin` (a Dask ``WorkerPlugin``): it takes a
user id that no other worker on that machine holds (an exclusive lock file per
id, released by the kernel even when the worker is killed) and starts a warm
sandbox for it, in the background, before the first notebook arrives. A task
(:func:`grade`) gets a :class:`Job` - the sanitized notebook, the gradebook's
record of the assignment (:class:`~bncourse.judge.Release`), the course's
grading secret and the limits - and returns the notebook's result: its ordinary
cells ran in the sandbox, its grade cells in the worker's own Python. A worker
needs nothing of the course directory and never sees the gradebook or the
solutions. Whoever can reach a scheduler can run code on its workers: the local
cluster speaks TLS with throw-away certificates (no other user of the machine can
join it); keep an existing cluster's scheduler on a private network, or give it
Dask's TLS (``tls://`` addresses, certificates in Dask's configuration).

Faults are Dask's to handle where it can: a worker that dies mid-notebook has
its task run again on another worker (and, after ``allowed-failures`` deaths,
reported as not graded); a sandbox that dies is restarted and the notebook run
once more on the fresh one; when the scheduler goes away, the client waits for it
to come back and submits again what had not finished.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import socket
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from distributed import WorkerPlugin

from bncourse.sandbox import Limits

PLUGIN = "bncourse-sandbox"
UID_BASE, UID_COUNT = 60_000, 900  # a worker's sandbox runs as one of these user ids (60 900+ are the tests')
RECONNECT = 120.0                  # seconds the client waits for a lost scheduler to come back
RESUBMISSIONS = 3                  # times notebooks lost with the scheduler are submitted again

log = logging.getLogger("bncourse")


@dataclass
class Job:
    """One notebook to grade: everything a worker needs, nothing of the course directory."""

    slug: str
    student: str
    notebook: dict                  # the submission, sanitized as nbgrader will (nbformat dict)
    release: Any                    # the gradebook's record of the assignment (bncourse.judge.Release)
    secret: str                     # the course's grading secret (hidden cases' seeds)
    limits: Limits = field(default_factory=Limits)
    isolation: bool = True
    queued: float = 0.0             # time.time() when the client submitted it


def failure(reason: str) -> dict:
    """A result for a notebook that was not graded through no fault of its own (a worker,
    sandbox or scheduler failed): running the command again grades it."""
    return {"outputs": {}, "execution_counts": {}, "graded": [], "tasks": [], "stopped": reason, "failed": True,
            "retry": True, "seconds": 0.0, "digest": ""}


# --------------------------------------------------------------------------
# On each worker: a user id of its own and a warm sandbox

def _lock_folder() -> Path:
    """Where the user-id locks live: root's /run, else a folder of this user's."""
    folder = Path("/run/bncourse-uids") if os.geteuid() == 0 else \
        Path(tempfile.gettempdir()) / f"bncourse-uids-{os.geteuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if info.st_uid != os.geteuid() or not os.path.isdir(folder) or os.path.islink(folder):
        raise RuntimeError(f"{folder} is not a folder of this user's: remove it")
    return folder


def allocate_uid(base: int = UID_BASE, count: int = UID_COUNT) -> tuple[int, int]:
    """(uid, fd): the first user id in ``base..base+count`` that no other process on this
    machine holds; holding ``fd`` open keeps it (the kernel lets go when the process dies)."""
    folder = _lock_folder()
    for uid in range(base, base + count):
        fd = os.open(folder / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return uid, fd
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError(f"all {count} sandbox user ids from {base} are taken on this machine")


class SandboxPlugin(WorkerPlugin):
    """A Dask worker's sandbox: a user id of its own and a warm kernel, started in the
    background as the worker starts and restarted when it dies or when a job asks for
    other limits. One notebook at a time uses it (a lock, should the worker have several
    threads)."""

    idempotent = True  # a second client's registration keeps the sandboxes that are running

    def __init__(self, limits: Limits, isolation: bool = True):
        self.limits, self.isolation = limits, isolation

    def setup(self, worker=None) -> None:
        name = getattr(worker, "name", None)
        self.name = f"{'?' if name is None else name}@{socket.gethostname()}"
        self.uid, self.lock_fd = allocate_uid()
        self.lock = threading.Lock()
        self.sandbox, self.error = None, None
        self.requests: queue.Queue = queue.Queue()
        self.owner = threading.Thread(target=self._own, name="bncourse-sandbox", daemon=True)
        self.owner.start()
        self.warmed = self._request(self.limits, self.isolation)

    def _own(self) -> None:
        """The thread that starts every sandbox of this worker, and lives as long as they
        do (bubblewrap's --die-with-parent ends a sandbox when the *thread* that started it
        ends). After the first start it loads the course's grading code, so that no
        notebook's time limits pay for the grader's imports."""
        primed = False
        while (request := self.requests.get()) is not None:
            limits, isolation, done = request
            self._discard()
            self._start(limits, isolation)
            if not primed:
                from bncourse.judge import _refused
                _refused()  # imports every reference and grading module
                primed = True
            done.set()

    def _request(self, limits: Limits, isolation: bool) -> threading.Event:
        done = threading.Event()
        self.requests.put((limits, isolation, done))
        return done

    def _start(self, limits: Limits, isolation: bool) -> None:
        from bncourse.sandbox import Sandbox
        try:
            sandbox = Sandbox(uid=self.uid, limits=limits, isolation=isolation)
            sandbox.start()
            self.sandbox, self.error = sandbox, None
        except Exception as exc:  # said with the first notebook, which tries again
            self.sandbox, self.error = None, exc

    def _discard(self) -> None:
        if self.sandbox is not None:
            self.sandbox.shutdown()
        self.sandbox = None

    def ready(self, limits: Limits, isolation: bool):
        """The warm sandbox, (re)started if it died or was made for other limits."""
        self.warmed.wait()
        sandbox = self.sandbox
        if sandbox is None or not sandbox.alive() or (sandbox.limits, sandbox.isolation) != (limits, isolation):
            self._request(limits, isolation).wait()
            if self.sandbox is None:
                from bncourse.sandbox import SessionDied
                raise SessionDied(f"the sandbox did not start: {self.error}")
        return self.sandbox

    def grade(self, job: Job) -> dict:
        """Grade ``job``'s notebook; a sandbox that dies under it is replaced and the
        notebook graded once more on the fresh one."""
        import nbformat

        from bn_reference.grading import use_secret
        from bncourse.judge import grade_notebook
        from bncourse.sandbox import SessionDied

        with self.lock:
            self.warmed.wait()
            started = time.time()
            for attempt in (1, 2):
                try:
                    sandbox = self.ready(job.limits, job.isolation)
                    with use_secret(job.secret):
                        result = grade_notebook(sandbox, nbformat.from_dict(job.notebook), job.limits,
                                                job.release).to_dict()
                    break
                except SessionDied as exc:
                    if self.sandbox is not None:
                        self.sandbox.healthy = False  # the owner thread replaces it
                    result = failure(f"the sandbox failed twice ({exc}); run the command again")
                except Exception:
                    result = failure("the grader failed on this notebook: " + traceback.format_exc(limit=3))
                    break
            result.update(worker=self.name, uid=self.uid, started=started, finished=time.time(), attempts=attempt)
            return result

    def teardown(self, worker=None) -> None:
        self.warmed.wait()
        self.requests.put(None)
        self.owner.join()
        self._discard()
        os.close(self.lock_fd)


class NoSandbox(RuntimeError):
    """The worker has no sandbox plugin (yet: a scheduler that restarted registers it anew)."""


def grade(job: Job) -> dict:
    """The Dask task: grade one notebook on this worker's sandbox."""
    from distributed import get_worker
    worker = get_worker()
    for _ in range(30):  # a registration may be on its way
        if PLUGIN in worker.plugins:
            return worker.plugins[PLUGIN].grade(job)
        time.sleep(1.0)
    raise NoSandbox("this Dask worker has no bncourse sandbox (bncourse registers it when it connects)")


# --------------------------------------------------------------------------
# On the client

class Cluster:
    """The Dask client that grades: on a ``LocalCluster`` of ``workers`` processes, or on
    the cluster whose scheduler is at ``scheduler``. :meth:`start` returns at once (the
    workers and their sandboxes warm up while the caller imports submissions)."""

    def __init__(self, workers: int, limits: Limits, isolation: bool = True, scheduler: str | None = None):
        self.workers, self.limits, self.isolation, self.scheduler = workers, limits, isolation, scheduler
        self._client = self._cluster = self._error = None
        self._pending: dict = {}  # future -> Job
        self._thread = threading.Thread(target=self._connect, daemon=True)

    def start(self) -> "Cluster":
        self._thread.start()
        return self

    def _connect(self) -> None:
        import dask
        from distributed import Client, LocalCluster
        try:
            with dask.config.set({"distributed.scheduler.allowed-failures": 2}):
                if self.scheduler:
                    self._client = Client(self.scheduler, timeout=30)
                else:
                    # TLS with throw-away certificates: another user of this machine cannot connect to
                    # the scheduler on 127.0.0.1 and run code as the grader (who may be root)
                    self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                                 host="127.0.0.1", security=True, dashboard_address=None,
                                                 silence_logs=logging.ERROR, memory_limit=0)
                    self._client = Client(self._cluster)
            self._client.register_plugin(SandboxPlugin(self.limits, self.isolation), name=PLUGIN)
        except Exception as exc:
            self._error = exc

    @property
    def client(self):
        self._thread.join()
        if self._error is not None:
            where = f"the Dask scheduler at {self.scheduler}" if self.scheduler else "a local Dask cluster"
            raise ClusterUnavailable(f"could not start grading on {where}: {self._error}") from self._error
        return self._client

    def describe(self) -> str:
        workers = self.client.scheduler_info().get("workers", {})
        where = f"the Dask cluster at {self.scheduler}" if self.scheduler else "a local Dask cluster"
        return f"{len(workers)} worker(s) on {where}"

    def submit(self, job: Job) -> None:
        """Queue ``job`` (a worker starts on it at once if one is free)."""
        job.queued = time.time()
        future = self.client.submit(grade, job, key=f"grade-{job.slug}-{job.student}-{uuid.uuid4().hex[:8]}",
                                    pure=False)
        self._pending[future] = job

    def completed(self) -> Iterator[tuple[Job, dict]]:
        """(job, result) for every job submitted, as each finishes. A job whose worker died
        too often is not graded; jobs lost with the scheduler are submitted again when it is
        back (or reported as not graded if it does not come back within RECONNECT seconds)."""
        from distributed import as_completed
        for attempt in range(RESUBMISSIONS + 1):
            if not self._pending:
                return
            lost, pending, self._pending = [], self._pending, {}
            for future in as_completed(list(pending)):
                job = pending.pop(future)
                result = self._outcome(future, job)
                if result is None:
                    lost.append(job)
                else:
                    yield job, result
            if lost and attempt < RESUBMISSIONS and self._reconnected():
                log.warning("the scheduler came back: submitting %d notebook(s) again", len(lost))
                for job in lost:
                    self.submit(job)
            else:
                for job in lost:
                    yield job, failure("it was lost with the Dask scheduler, which did not come back with workers "
                                       f"ready within {RECONNECT:.0f} s; run the command again")

    def grade_now(self, job: Job) -> dict:
        """Grade ``job`` apart from the others, and wait for its result."""
        job.queued = time.time()
        future = self.client.submit(grade, job, key=f"regrade-{job.slug}-{job.student}-{uuid.uuid4().hex[:8]}",
                                    pure=False)
        return self._outcome(future, job) or failure("the Dask scheduler went away; run the command again")

    def _outcome(self, future, job: Job) -> dict | None:
        """The future's result, a failure, or None if it was lost with the scheduler."""
        from distributed.scheduler import KilledWorker
        try:
            return future.result()
        except KilledWorker:
            return failure("the Dask workers grading it died, several times (a machine out of memory?); "
                           "run the command again")
        except NoSandbox:  # a worker of a scheduler that restarted, before the plugin reached it
            return None
        except Exception as exc:
            if future.status == "cancelled" or self.client.status != "running" or "lost" in str(exc).lower():
                return None
            return failure(f"the grading task failed ({type(exc).__name__}: {exc}); run the command again")

    def _reconnected(self) -> bool:
        """Wait (up to RECONNECT seconds) for the client to be connected to a scheduler with
        at least one worker."""
        deadline = time.monotonic() + RECONNECT
        while time.monotonic() < deadline:
            try:
                if self.client.status == "running" and self.client.scheduler_info().get("workers"):
                    # a new scheduler knows no plugin: register it again (it reaches the workers it has)
                    self.client.register_plugin(SandboxPlugin(self.limits, self.isolation), name=PLUGIN)
                    return True
            except Exception:
                pass
            time.sleep(1.0)
        return False

    def close(self) -> None:
        if self._thread.ident is not None:  # started
            self._thread.join()
        for thing in (self._client, self._cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:
                    pass


class ClusterUnavailable(RuntimeError):
    """Grading could not start on the cluster asked for (the message says why)."""
