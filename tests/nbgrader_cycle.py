"""The grading cycle, run on one chapter in a temporary course directory.

nbgrader's ``generate_assignment`` releases the exercise; a small class (the
model answers, the untouched release, buggy submissions, a corrupt file) is
graded with ``bncourse grade`` - the sandboxed class grader on top of
nbgrader's gradebook, as an instructor runs it (book/instructors.md) - which
also writes feedback, the grade sheet and the misconception report. Each
chapter's test file calls :func:`run_cycle` with its own buggy submissions.
Running every chapter's checks inside the sandbox is also what proves that they
keep to the grading contract (their ``run`` functions work without the
reference, which the sandbox does not have).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbgrader.api import Gradebook

from bncourse.benchmark import answered, environment, make_course

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class CycleResult:
    course: Path               # the temporary course directory
    release: Path              # the notebook generate_assignment wrote
    scores: dict               # student -> (autograded score, max autograded score), or None
    feedback: dict             # student -> feedback HTML text ("" if none)
    grades_csv: list           # rows of the exported grade sheet
    results: dict              # student -> the grader's verdicts (reports/<slug>/results/<student>.json)
    log: str                   # the commands' output, for diagnosing failures
    exit_code: int             # of bncourse grade


def require_isolation() -> None:
    """Skip (fail in CI) when this machine cannot sandbox a submission: bncourse would refuse."""
    import pytest

    from bncourse.sandbox import IsolationUnavailable, probe
    try:
        probe()
    except IsolationUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the class grader's sandbox is required in CI ({exc}); `make system-deps` installs it")
        pytest.skip(f"no sandbox on this machine: {exc}")


def bncourse(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``bncourse --course course ...`` as an instructor would."""
    require_isolation()
    return subprocess.run([sys.executable, "-m", "bncourse.cli", "--course", str(course), *args], env=environment(),
                          capture_output=True, text=True, timeout=1800)


def patched(nb: nbformat.NotebookNode, patches) -> nbformat.NotebookNode:
    """``nb`` with each (old, new) text replacement applied to the one cell containing ``old``."""
    nb = nbformat.from_dict(nb)
    for old, new in patches:
        cells = [c for c in nb.cells if old in c.source]
        assert len(cells) == 1 and cells[0].source.count(old) == 1, f"patch target not unique: {old!r}"
        cells[0].source = cells[0].source.replace(old, new)
    return nb


def model_and_release(course: Path, slug: str) -> tuple[nbformat.NotebookNode, nbformat.NotebookNode]:
    release = nbformat.read(course / "exercises" / slug / f"{slug}.ipynb", as_version=4)
    solution = nbformat.read(course / "solutions" / slug / f"{slug}.ipynb", as_version=4)
    return answered(release, solution), release


def write_submissions(folder: Path, slug: str, submissions: dict) -> None:
    """``folder/<student>/<slug>/<slug>.ipynb`` for each notebook (raw text for a str)."""
    for student, nb in submissions.items():
        target = folder / student / slug / f"{slug}.ipynb"
        target.parent.mkdir(parents=True)
        target.write_text(nb) if isinstance(nb, str) else nbformat.write(nb, target)


def collect_results(course: Path, slug: str, students, proc: subprocess.CompletedProcess, log: str) -> CycleResult:
    """What the graded class left behind: scores, feedback, grade sheet, verdicts."""
    scores = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student in students:
            try:
                sub = gb.find_submission(slug, student)
                scores[student] = (sub.code_score, sub.max_code_score)
            except Exception:  # nbgrader records no submission it could not read
                scores[student] = None
    feedback = {}
    for student in students:
        html = course / "feedback" / student / slug / f"{slug}.html"
        feedback[student] = html.read_text() if html.exists() else ""
    reports = course / "reports" / slug
    with open(reports / "grades.csv") as f:
        rows = list(csv.DictReader(f))
    results = {p.stem: json.loads(p.read_text()) for p in (reports / "results").glob("*.json")}
    return CycleResult(course, course / "exercises" / slug / f"{slug}.ipynb", scores, feedback, rows, results,
                       log + proc.stdout + proc.stderr, proc.returncode)


def run_cycle(tmp_path: Path, slug: str, buggy: dict) -> CycleResult:
    """Grade students ``solution`` (model answers), ``blank`` (the release untouched),
    ``corrupt`` (invalid JSON) and one student per entry of ``buggy`` ({student:
    [(old, new), ...]} patches of the model answers) with ``bncourse grade``."""
    course = make_course(tmp_path, [slug])
    model, release = model_and_release(course, slug)
    submissions = {"solution": model, "blank": release}
    submissions.update({student: patched(model, p) for student, p in buggy.items()})
    submissions["corrupt"] = '{"cells": [ this is not JSON'
    incoming = tmp_path / "incoming"
    write_submissions(incoming, slug, submissions)
    proc = bncourse(course, "grade", slug, str(incoming), "--cell-timeout", "120")
    result = collect_results(course, slug, submissions, proc, "")
    assert (course / "submitted" / "corrupt" / slug / f"{slug}.ipynb").read_text().startswith('{"cells"'), \
        "the corrupt submission was changed or lost"
    return result
