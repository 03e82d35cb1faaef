"""The nbgrader cycle, run on one chapter in a temporary course directory.

generate_assignment -> submissions -> autograde -> generate_feedback -> export,
with nbgrader's own commands and the repository's ``nbgrader_config.py``, as an
instructor would run them (book/instructors.md). Each chapter's test file calls
:func:`run_cycle` with its own buggy submissions.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbgrader.api import Gradebook

ROOT = Path(__file__).resolve().parents[1]
SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")


@dataclass
class CycleResult:
    release: Path              # the notebook generate_assignment wrote
    scores: dict               # student -> (autograded score, max autograded score)
    feedback: dict             # student -> feedback HTML text ("" if none)
    grades_csv: list           # rows of the exported grade sheet
    log: str                   # nbgrader's output, for diagnosing failures


def nbgrader(course: Path, *args: str) -> str:
    """Run an nbgrader command in ``course``; return its combined output."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=env,
                          capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 or args[0] == "autograde", f"nbgrader {' '.join(args)} failed:\n{output}"
    return output


def answered(release: nbformat.NotebookNode, solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The release with every answer cell replaced by the model answer (markers removed)."""
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in solution.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    nb = nbformat.from_dict(release)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in answers:
            lines = [line for line in answers[grade_id].splitlines() if line.strip() not in SOLUTION_MARKERS]
            cell.source = "\n".join(lines)
    return nb


def patched(nb: nbformat.NotebookNode, patches) -> nbformat.NotebookNode:
    """``nb`` with each (old, new) text replacement applied to the one cell containing ``old``."""
    nb = nbformat.from_dict(nb)
    for old, new in patches:
        cells = [c for c in nb.cells if old in c.source]
        assert len(cells) == 1 and cells[0].source.count(old) == 1, f"patch target not unique: {old!r}"
        cells[0].source = cells[0].source.replace(old, new)
    return nb


def run_cycle(tmp_path: Path, slug: str, buggy: dict) -> CycleResult:
    """Run the cycle for ``slug`` with students ``solution`` (model answers), ``blank``
    (the release untouched), ``corrupt`` (invalid JSON) and one student per entry of
    ``buggy`` ({student: [(old, new), ...]} patches of the model answers)."""
    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(ROOT / "nbgrader_config.py", course)
    shutil.copytree(ROOT / "solutions" / slug, course / "solutions" / slug)
    log = nbgrader(course, "generate_assignment", slug, "--force")
    release_path = course / "exercises" / slug / f"{slug}.ipynb"
    release = nbformat.read(release_path, as_version=4)
    solution = nbformat.read(course / "solutions" / slug / f"{slug}.ipynb", as_version=4)

    submissions = {"solution": answered(release, solution), "blank": release}
    submissions.update({student: patched(submissions["solution"], p) for student, p in buggy.items()})
    for student, nb in [*submissions.items(), ("corrupt", None)]:
        target = course / "submitted" / student / slug / f"{slug}.ipynb"
        target.parent.mkdir(parents=True)
        if nb is None:
            target.write_text('{"cells": [ this is not JSON')
        else:
            nbformat.write(nb, target)
    (course / "students.csv").write_text("id\n" + "\n".join([*submissions, "corrupt"]) + "\n")
    log += nbgrader(course, "db", "student", "import", "students.csv")

    log += nbgrader(course, "autograde", slug, "--create")
    log += nbgrader(course, "generate_feedback", slug)
    log += nbgrader(course, "export", "--to", "grades.csv")

    scores = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for student in [*submissions, "corrupt"]:
            try:
                sub = gb.find_submission(slug, student)
                scores[student] = (sub.code_score, sub.max_code_score)
            except Exception:  # nbgrader records no submission it could not read
                scores[student] = None
    feedback = {}
    for student in [*submissions, "corrupt"]:
        html = course / "feedback" / student / slug / f"{slug}.html"
        feedback[student] = html.read_text() if html.exists() else ""
    with open(course / "grades.csv") as f:
        rows = list(csv.DictReader(f))
    assert (course / "submitted" / "corrupt" / slug / f"{slug}.ipynb").read_text().startswith('{"cells"'), \
        "the corrupt submission was changed or lost"
    return CycleResult(release_path, scores, feedback, rows, log)
