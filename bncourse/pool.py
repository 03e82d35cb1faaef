"""Grader processes working side by side, each with a sandbox of its own.

A worker is a fresh Python process (``spawn``) that starts its sandbox once and
grades notebooks in it one after the other; the sandbox's warm kernel forks a
clean process per notebook, so no notebook pays for imports and none sees
another's state. The workers never run a submission's code themselves (the
sandbox does), so a hostile notebook cannot take one down; if a sandbox dies
anyway, its worker starts a new one and reports the notebook as not graded.
"""

from __future__ import annotations

import multiprocessing
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from bncourse.sandbox import Limits

UID_BASE = 60_000  # worker i's sandbox runs as user UID_BASE + i


@dataclass
class Job:
    key: Any                         # how the caller knows the result: (student, notebook)
    slug: str                        # the assignment
    release: Any                     # the gradebook's record of it (bncourse.judge.Release)
    secret: str                      # the course's grading secret (hidden cases' seeds)
    notebook: dict | None = None     # the sanitized notebook; or, to be sanitized by the worker:
    path: str | None = None          # the submitted notebook,
    root: str | None = None          # the course directory
    db_url: str | None = None        # and its gradebook


def _notebook(job: Job, configs: dict):
    """The job's sanitized notebook: given, or sanitized here as nbgrader will."""
    import nbformat

    from bncourse.autograde import course_config, sanitized
    if job.notebook is not None:
        return nbformat.from_dict(job.notebook)
    if (job.root, job.db_url) not in configs:
        configs[job.root, job.db_url] = course_config(Path(job.root), job.db_url)
    return sanitized(configs[job.root, job.db_url], job.slug, job.key[0], Path(job.path))


def _unreadable(exc: Exception) -> str:
    if type(exc).__name__ == "NotJSONError":
        return "the notebook is not valid JSON (a damaged or non-notebook file)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"the notebook cannot be read ({type(exc).__name__}: {text[:300]})"


def _work(conn, index: int, limits: Limits, isolation: bool) -> None:
    """A worker's loop: receive a Job, send back (key, NotebookResult dict)."""
    from bn_reference.grading import use_secret
    from bncourse.judge import NotebookResult, grade_notebook
    from bncourse.sandbox import Sandbox, SessionDied

    sandbox, configs = None, {}
    try:
        sandbox = Sandbox(uid=UID_BASE + index, limits=limits, isolation=isolation)
        sandbox.start()  # warm before the first notebook arrives
    except SessionDied:
        sandbox = None  # tried again, and reported, with the first notebook
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            try:
                nb = _notebook(job, configs)
            except Exception as exc:  # nbformat's NotJSONError, invalid nbgrader metadata...
                conn.send((job.key, NotebookResult(stopped=_unreadable(exc), failed=True).to_dict()))
                continue
            try:
                if sandbox is None or not sandbox.alive():
                    if sandbox is not None:
                        sandbox.shutdown()
                    sandbox = Sandbox(uid=UID_BASE + index, limits=limits, isolation=isolation)
                    sandbox.start()
                with use_secret(job.secret):
                    result = grade_notebook(sandbox, nb, limits, job.release).to_dict()
            except SessionDied as exc:
                if sandbox is not None:
                    sandbox.shutdown()
                sandbox = None
                result = NotebookResult(stopped=f"the sandbox failed ({exc}); grade this student again",
                                        failed=True).to_dict()
            except Exception:
                result = NotebookResult(stopped="the grader failed on this notebook: "
                                                + traceback.format_exc(limit=3), failed=True).to_dict()
            conn.send((job.key, result))
    finally:
        if sandbox is not None:
            sandbox.shutdown()


class Pool:
    """``workers`` grader processes: :meth:`submit` jobs, wait for one with :meth:`result`."""

    def __init__(self, workers: int, limits: Limits, isolation: bool = True):
        self.limits, self.isolation = limits, isolation
        self.context = multiprocessing.get_context("spawn")
        self.workers = [self._start(i) for i in range(workers)]
        self.queue: list[Job] = []
        self.busy: dict[int, Job] = {}
        self.done: dict[Any, dict] = {}
        self.submitted: set = set()

    def _start(self, index: int):
        ours, theirs = self.context.Pipe()
        process = self.context.Process(target=_work, args=(theirs, index, self.limits, self.isolation), daemon=True)
        process.start()
        theirs.close()
        return [process, ours]

    def submit(self, job: Job) -> None:
        self.queue.append(job)
        self.submitted.add(job.key)
        self._dispatch()

    def _dispatch(self) -> None:
        for i, (process, conn) in enumerate(self.workers):
            if i not in self.busy and self.queue:
                job = self.queue.pop(0)
                conn.send(job)
                self.busy[i] = job

    def step(self, timeout: float | None = None) -> list[Any]:
        """Wait for at least one result (or ``timeout``); returns the keys that finished."""
        waiting = {self.workers[i][1]: i for i in self.busy} | {self.workers[i][0].sentinel: i for i in self.busy}
        finished = []
        for ready in wait(list(waiting), timeout):
            i = waiting[ready]
            if i not in self.busy:
                continue
            process, conn = self.workers[i]
            job = self.busy.pop(i)
            try:
                key, result = conn.recv()
            except (EOFError, OSError):  # the worker itself died: replace it, report the notebook
                from bncourse.judge import NotebookResult
                key, result = job.key, NotebookResult(stopped="the grader process died; grade this student "
                                                              "again", failed=True).to_dict()
                process.join(1)
                self.workers[i] = self._start(i)
            self.done[key] = result
            finished.append(key)
        self._dispatch()
        return finished

    def result(self, key: Any) -> dict:
        """Block until ``key``'s result is in."""
        while key not in self.done:
            self.step()
        return self.done[key]

    def close(self) -> None:
        for process, conn in self.workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for process, _ in self.workers:
            process.join(15)
            if process.is_alive():
                process.kill()
