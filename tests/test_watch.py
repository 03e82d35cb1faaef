"""``bncourse watch``: continuous grading of nbgrader's exchange, end to end.

The instructor releases Chapter 1 to an exchange on a temporary folder
(``nbgrader release_assignment``) and starts ``bncourse watch``. Two students
fetch it (``nbgrader fetch_assignment``) and hand in with ``nbgrader submit``: ada
the model answers, bob a notebook with the classic missing factor of 2; bob then
resubmits, corrected. Each fetches feedback with ``nbgrader fetch_feedback``. The
watcher is stopped, ada resubmits while it is down, and a second watcher takes up
exactly that one and nothing else. The timeline (submit to feedback fetched) is
printed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbgrader.api import Gradebook

from bncourse.benchmark import environment
from bncourse.ledger import GRADED, Ledger
from nbgrader_cycle import make_course, model_and_release, patched, require_isolation

SLUG = "ch1_feature_scaling"
WRONG = ("return 2 / n * X.T @ r, 2 / n * r.sum()", "return 1 / n * X.T @ r, 1 / n * r.sum()")  # no factor 2


def _nbgrader(cwd: Path, exchange: Path, *args: str, home: Path | None = None, check: bool = True) -> str:
    """An nbgrader command as a student (``home``) or the instructor runs it."""
    env = environment() | ({"HOME": str(home)} if home else {})
    extra = [f"--Exchange.root={exchange}", "--CourseDirectory.course_id=batchnorm"]
    if home:
        extra += [f"--Exchange.cache={home / '.cache'}"]
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not check, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


class Student:
    def __init__(self, name: str, tmp: Path, exchange: Path):
        self.name, self.exchange = name, exchange
        self.home = tmp / f"home_{name}"
        self.home.mkdir()
        _nbgrader(self.home, exchange, "fetch_assignment", SLUG, home=self.home)

    def submit(self, nb) -> float:
        nbformat.write(nb, self.home / SLUG / f"{SLUG}.ipynb")
        _nbgrader(self.home, self.exchange, "submit", SLUG, f"--student={self.name}", home=self.home)
        return time.monotonic()

    def feedback(self) -> list[Path]:
        # (it fails while the exchange has no feedback at all)
        _nbgrader(self.home, self.exchange, "fetch_feedback", SLUG, f"--student={self.name}", home=self.home,
                  check=False)
        return sorted((self.home / SLUG / "feedback").glob(f"*/{SLUG}.html"))

    def wait_for_feedback(self, count: int, submitted: float, timeout: float = 600) -> float:
        """Seconds from submission until the student's ``count``-th feedback is fetched."""
        while len(self.feedback()) < count:
            if time.monotonic() - submitted > timeout:
                raise AssertionError(f"no feedback for {self.name} within {timeout} s")
            time.sleep(1.0)
        return time.monotonic() - submitted


def _watch(course: Path, exchange: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bncourse.cli", "--course", str(course), "watch", SLUG,
                             "--exchange", str(exchange), "--interval", "1", "--workers", "1", *extra],
                            env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _scores(course: Path) -> dict:
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        return {s.student.id: (s.code_score, s.max_code_score) for s in gb.find_assignment(SLUG).submissions}


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    require_isolation()
    tmp = tmp_path_factory.mktemp("watch")
    course = make_course(tmp, [SLUG])
    model, _ = model_and_release(course, SLUG)
    exchange = tmp / "exchange"
    exchange.mkdir(mode=0o777)
    _nbgrader(course, exchange, "release_assignment", SLUG)
    ada, bob = Student("ada", tmp, exchange), Student("bob", tmp, exchange)
    timeline, outputs = {}, []
    watcher = _watch(course, exchange)
    try:
        first = {"ada": ada.submit(model), "bob": bob.submit(patched(model, [WRONG]))}
        timeline["ada"] = ada.wait_for_feedback(1, first["ada"])
        timeline["bob"] = bob.wait_for_feedback(1, first["bob"])
        scores_first = _scores(course)
        again = bob.submit(model)
        timeline["bob, resubmitted"] = bob.wait_for_feedback(2, again)
        scores_second = _scores(course)
    finally:
        watcher.send_signal(signal.SIGTERM)
        outputs.append(watcher.communicate(timeout=120)[0])
    history = Ledger(f"sqlite:///{course / 'gradebook.db'}").history(SLUG)
    late = ada.submit(model)  # while no watcher runs
    restarted = _watch(course, exchange, "--once")
    outputs.append(restarted.communicate(timeout=900)[0])
    timeline["ada, resubmitted while stopped (includes starting the watcher)"] = ada.wait_for_feedback(2, late, 0)
    for name, seconds in timeline.items():
        print(f"watch timeline: {name}: submit to feedback fetched in {seconds:.1f} s")
    return {"course": course, "scores_first": scores_first, "scores_second": scores_second, "history": history,
            "history_after": Ledger(f"sqlite:///{course / 'gradebook.db'}").history(SLUG), "outputs": outputs,
            "ada": ada, "bob": bob, "exit": (watcher.returncode, restarted.returncode)}


def test_each_submission_is_graded_and_its_feedback_fetched(watched):
    ada, bob = watched["scores_first"]["ada"], watched["scores_first"]["bob"]
    assert ada[0] == ada[1] > 0 and bob[0] < bob[1], watched["outputs"]
    feedback = watched["bob"].feedback()[0].read_text()
    assert "the factor 2 is missing" in feedback.replace("&#39;", "'")
    assert "BEGIN HIDDEN TESTS" not in feedback and "hidden=True" not in feedback


def test_a_resubmission_replaces_the_earlier_grade(watched):
    bob = watched["scores_second"]["bob"]
    assert bob[0] == bob[1] > 0
    assert watched["scores_second"]["ada"] == watched["scores_first"]["ada"]


def test_every_submission_is_graded_once_and_released(watched):
    history = [(e.student, e.status, e.released) for e in watched["history"]]
    assert sorted(history) == [("ada", GRADED, True), ("bob", GRADED, True), ("bob", GRADED, True)], history
    assert len({e.digest for e in watched["history"]}) == 3


def test_stopping_and_restarting_loses_and_repeats_nothing(watched):
    """The submission that arrived while no watcher ran is graded and released by the next
    one; nothing graded before is graded again."""
    before, after = watched["history"], watched["history_after"]
    assert after[:len(before)] == before
    new = after[len(before):]
    assert [(e.student, e.status, e.released) for e in new] == [("ada", GRADED, True)], new
    assert watched["exit"] == (0, 0), watched["outputs"]
    assert "Stopped" in watched["outputs"][0]
