"""Grading on a real Dask cluster, into PostgreSQL, through faults.

One ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 (kept running
by a supervisor, as systemd or Kubernetes would) and a PostgreSQL server, all
started here. One course, three small classes of Chapter 1 graded with ``bncourse
grade --scheduler ... --db postgresql://...``, each through one fault:

- a worker process killed with SIGKILL while it grades a notebook;
- a sandbox killed (its kernel, SIGKILL) while it runs a notebook;
- the scheduler killed and started again mid-class.

Every time: each submission ends graded exactly once (the ledger holds one row per
student), the damaged one is reported as not graded, no grade of the other classes
changes, and running the same command again grades nothing and changes nothing."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook, MissingEntry

from bncourse.benchmark import environment
from bncourse.ledger import GRADED, NOT_GRADED, Ledger
from nbgrader_cycle import make_course, model_and_release, patched, require_isolation, write_submissions
from services import DaskCluster, postgres_server

SLUG = "ch1_feature_scaling"
WRONG = ("return 2 / n * X.T @ r, 2 / n * r.sum()", "return 1 / n * X.T @ r, 1 / n * r.sum()")
SLOW = "import time\ntime.sleep(3)\n"  # each notebook takes a while: a fault finds one running


def _slow(nb):
    nb = nbformat.from_dict(nb)
    first = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code")
    first.source = SLOW + first.source
    return nb


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    require_isolation()
    tmp = tmp_path_factory.mktemp("cluster")
    with postgres_server() as urls:
        cluster = DaskCluster(tmp).start()
        try:
            yield cluster, urls["gradebook"], tmp
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def course(services):
    _, _, tmp = services
    course = make_course(tmp, [SLUG])
    model, _ = model_and_release(course, SLUG)
    return course, _slow(model), _slow(patched(model, [WRONG]))


def _grade(course: Path, db: str, cluster: DaskCluster, incoming: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bncourse.cli", "--course", str(course), "--db", db, "grade", SLUG,
                             str(incoming), "--scheduler", cluster.address, "--cell-timeout", "60"],
                            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _scores(db: str) -> dict:
    with Gradebook(db) as gb:
        try:
            return {s.student.id: s.code_score for s in gb.find_assignment(SLUG).submissions}
        except MissingEntry:  # nothing graded yet
            return {}


def _kernels(cluster: DaskCluster, i: int) -> list:
    """Worker ``i``'s sandboxed kernel processes: the warm one, and the notebook's while one runs."""
    return [p for p in cluster.worker_processes(i)
            if "bncourse.kernel" in " ".join(p.cmdline()) and not p.cmdline()[0].endswith("bwrap")]


def _when_grading(cluster: DaskCluster, timeout: float = 600):
    """The worker index and kernel processes of the first worker seen running a notebook."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i in range(len(cluster.workers)):
            try:
                kernels = _kernels(cluster, i)
            except Exception:  # a process ended while we looked
                continue
            if len(kernels) >= 2:
                return i, kernels
        time.sleep(0.2)
    raise AssertionError("no worker started grading")


def _class(course, prefix: str):
    """Six students: four correct, one with a wrong gradient, one damaged file."""
    path, model, wrong = course
    submissions = {f"{prefix}{i}": model for i in range(4)}
    submissions[f"{prefix}_wrong"] = wrong
    submissions[f"{prefix}_damaged"] = '{"cells": [ not JSON'
    incoming = path.parent / f"incoming_{prefix}"
    write_submissions(incoming, SLUG, submissions)
    return incoming, list(submissions)


def _run_with_fault(services, course, prefix: str, fault) -> dict:
    cluster, db, _ = services
    incoming, students = _class(course, prefix)
    before = _scores(db)
    proc = _grade(course[0], db, cluster, incoming)
    done = threading.Event()
    fault_thread = threading.Thread(target=lambda: (fault(cluster), done.set()), daemon=True)
    fault_thread.start()
    out, err = proc.communicate(timeout=1200)
    fault_thread.join(600)
    history = [e for e in Ledger(db).history(SLUG) if e.student in students]
    after = _scores(db)
    cluster.wait_for_workers()
    again = _grade(course[0], db, cluster, incoming)
    out2, err2 = again.communicate(timeout=1200)
    return {"students": students, "exit": proc.returncode, "log": out + err, "history": history,
            "before": before, "after": after, "again_exit": again.returncode, "again_log": out2 + err2,
            "history_again": [e for e in Ledger(db).history(SLUG) if e.student in students],
            "scores_again": _scores(db), "fault_happened": done.is_set(), "prefix": prefix}


def _check(run: dict) -> None:
    """Graded exactly once, the damaged notebook reported, no other grade changed, and a
    second run that grades and changes nothing."""
    p, log = run["prefix"], run["log"]
    assert run["fault_happened"], log
    assert run["exit"] == 1, log[-4000:]
    rows = {}
    for entry in run["history"]:
        rows.setdefault(entry.student, []).append(entry.status)
    assert rows == {**{s: [GRADED] for s in run["students"] if s != f"{p}_damaged"}, f"{p}_damaged": [NOT_GRADED]}, \
        (rows, log[-4000:])
    assert f"NOT GRADED {p}_damaged: the notebook is not valid JSON" in log
    scores = run["after"]
    full = scores[f"{p}0"]
    assert full > 0 and all(scores[f"{p}{i}"] == full for i in range(4)) and scores[f"{p}_wrong"] < full, scores
    assert {s: v for s, v in scores.items() if s in run["before"]} == run["before"]  # the other classes' grades
    # the same command again: nothing graded, nothing changed
    assert run["again_exit"] == 1, run["again_log"][-3000:]
    assert run["history_again"] == run["history"]
    assert run["scores_again"] == scores
    assert "Graded 0 of 0 notebooks" in run["again_log"] and "6 unchanged since they were graded" in run["again_log"], \
        run["again_log"][-3000:]


def test_a_worker_killed_mid_class(services, course):
    """SIGKILL to a worker process while it grades: its notebook is graded elsewhere, once."""
    def kill_worker(cluster):
        i, _ = _when_grading(cluster)
        worker = next(p for p in cluster.worker_processes(i) if "spawn_main" in " ".join(p.cmdline()))
        worker.kill()  # the worker process (its nanny starts another)

    _check(_run_with_fault(services, course, "k", kill_worker))


def test_a_sandbox_killed_mid_notebook(services, course):
    """SIGKILL to a sandbox's warm kernel while a notebook runs in it: the worker starts a
    fresh sandbox and grades that notebook again on it (two attempts in the timings)."""
    killed = []

    def kill_sandbox(cluster):
        _, kernels = _when_grading(cluster)
        zygote = min(kernels, key=lambda p: p.create_time())
        zygote.kill()
        killed.append(zygote.pid)

    run = _run_with_fault(services, course, "b", kill_sandbox)
    _check(run)
    from bncourse.timings import read
    rows = [r for r in read(course[0] / "reports" / SLUG / "timings.csv") if r["student"].startswith("b")]
    assert killed and any(r["attempts"] == "2" for r in rows), rows


def test_the_scheduler_restarted_mid_class(services, course):
    """The scheduler killed (SIGKILL) and started again while notebooks are graded: the
    workers come back to it, the client submits again what had not finished."""
    def restart_scheduler(cluster):
        _when_grading(cluster)
        time.sleep(1.0)
        cluster.restart_scheduler()

    run = _run_with_fault(services, course, "r", restart_scheduler)
    _check(run)
    assert "scheduler came back" in (Path(course[0]) / "reports" / SLUG / "grading.log").read_text()
