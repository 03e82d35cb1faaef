"""Autograding a class with nbgrader's own machinery, the notebooks run in sandboxes.

nbgrader autogrades a notebook in two passes: *sanitizing* (restore the grade
and locked cells from the gradebook, and here also the deleted grade cells) and
*autograding* (execute, then score into the gradebook). This module keeps both
and replaces only the execution:

1. every submission is sanitized here exactly as nbgrader will, and goes up front
   to the Dask workers (:mod:`bncourse.cluster`), which grade it in their
   sandboxes, side by side (:mod:`bncourse.judge`);
2. as each result arrives, nbgrader's ``Autograde`` runs for that student with
   :class:`SandboxExecute` in place of its ``Execute``: it takes the notebook's
   result (checking that it was made from the same cells) and writes the outputs;
   nbgrader's ``SaveAutoGrades`` scores them into the gradebook (SQLite or any
   ``db_url``), so the formgrader, manual grading and ``nbgrader export`` work as
   always. This process is the gradebook's one writer for the class; the
   ledger (:mod:`bncourse.ledger`) makes every write happen once per submission:
   a submission graded before, unchanged, is not graded again.

A notebook that could not be graded through no fault of its own (its worker, its
sandbox or the scheduler failed) leaves the gradebook untouched - an earlier grade
stays - and is reported as not graded; running the command again grades it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import nbformat
from nbconvert.preprocessors import ClearMetadataPreprocessor
from nbgrader.api import Gradebook, MissingEntry
from nbgrader.converters import Autograde, GenerateAssignment
from nbgrader.coursedir import CourseDirectory
from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, ClearOutput, DeduplicateIds,
                                    IgnorePattern, LimitOutput, NbGraderPreprocessor, OverwriteCells,
                                    OverwriteKernelspec, SaveAutoGrades)
from nbgrader import utils
from nbgrader.utils import capture_log
from traitlets.config import Config
from traitlets.config.loader import PyFileConfigLoader

from bncourse.judge import NotebookResult, Release, code_digest
from bncourse.ledger import FAILED, GRADED, NOT_GRADED, Ledger, digest
from bncourse.secret import course_secret
from bncourse.timings import Timings

if TYPE_CHECKING:  # the Dask client is imported by whoever grades, not by nbgrader_config.py's users
    from bncourse.cluster import Cluster, Job

HIDDEN = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS.*?^[ \t]*### END HIDDEN TESTS[^\n]*\n?", re.M | re.S)


class RestoreCells(OverwriteCells):
    """nbgrader's OverwriteCells, putting back deleted grade cells too, and quiet about
    the one change every released grade cell shows by design: its hidden tests were
    removed, so its checksum differs from the gradebook's."""

    def preprocess_cell(self, cell, resources, cell_index):
        self._released_as_is = False
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id is not None:
            try:
                source = self.gradebook.find_source_cell(grade_id, self.notebook_id, self.assignment_id).source
                self._released_as_is = HIDDEN.sub("", source).strip() == cell.source.strip() != source.strip()
            except MissingEntry:
                pass
        return super().preprocess_cell(cell, resources, cell_index)

    def report_change(self, name, attr, old, new):
        if attr == "checksum" and self._released_as_is:
            self.log.debug("grade cell %s as released (hidden tests restored)", name)
            return
        super().report_change(name, attr, old, new)

    def missing_cell_transform(self, source_cell, max_score, is_solution=False, is_task=False):
        """A deleted cell put back with the gradebook's source exactly (nbgrader prepends a
        comment to it, which would make it differ from the course's grade cell)."""
        cell = super().missing_cell_transform(source_cell, max_score, is_solution, is_task)
        if cell.cell_type == "code":
            cell.source = source_cell.source
        return cell


class NormalizeMetadata(NbGraderPreprocessor):
    """The nbgrader metadata of a submission's cells, checked against the gradebook before
    nbgrader's own passes read it (they raise ``KeyError: 'grade_id'`` on a malformed
    claim, and the notebook would not be graded at all). A cell whose metadata is
    malformed or names a cell the assignment does not have becomes a plain cell of the
    student's; of several cells claiming one grade id, the one holding the course's
    source (else the last, as nbgrader keeps it) keeps the id. Every change is a
    warning, so the instructor reads what was wrong with the notebook."""

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        with Gradebook(info["db_url"]) as gb:
            sources = {c.name: c.source for c in gb.find_notebook(info["notebook"], info["assignment"]).source_cells}
        claims: dict[str, list[int]] = {}
        for index, cell in enumerate(nb.cells):
            if "nbgrader" not in cell.metadata:
                continue
            why = _invalid_claim(cell.metadata["nbgrader"], sources)
            if why:
                self.log.warning("cell %d %s: treated as the student's own cell", index + 1, why)
                del cell.metadata["nbgrader"]
            else:
                claims.setdefault(cell.metadata["nbgrader"]["grade_id"], []).append(index)
        for grade_id, indices in claims.items():
            if len(indices) > 1:
                course = {sources[grade_id].strip(), HIDDEN.sub("", sources[grade_id]).strip()}
                keep = next((i for i in indices if nb.cells[i].source.strip() in course), indices[-1])
                for i in indices:
                    if i != keep:
                        del nb.cells[i].metadata["nbgrader"]
                self.log.warning("cells %s all claim the grade id %r: cell %d keeps it, the others are treated as "
                                 "the student's own cells", ", ".join(str(i + 1) for i in indices), grade_id, keep + 1)
        return nb, resources


def _invalid_claim(nbg, sources: dict[str, str]) -> str | None:
    """What is wrong with a cell's nbgrader metadata, or None."""
    if not isinstance(nbg, dict):
        return "has nbgrader metadata that is not a mapping"
    grade_id = nbg.get("grade_id")
    if not isinstance(grade_id, str):
        return "has nbgrader metadata without a grade id"
    if grade_id not in sources:
        return f"claims the grade id {grade_id[:80]!r}, which the assignment does not have"
    flags = [k for k in ("grade", "solution", "locked", "task") if k in nbg and not isinstance(nbg[k], bool)]
    if flags:
        return f"has nbgrader flags that are not true or false ({', '.join(flags)})"
    points = nbg.get("points", 0)
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not 0 <= points < 1e6:
        return "has invalid points"
    return None


SANITIZE = [NormalizeMetadata, ClearOutput, DeduplicateIds, OverwriteKernelspec, RestoreCells, CheckCellMetadata]


class SandboxExecute(NbGraderPreprocessor):
    """nbgrader's Execute, replaced: the notebook's outputs come from its sandboxed run.
    A cell nbgrader will score gets outputs only from the grader's own run of the
    course's grade cell; any other (one the grader did not run, or a cell whose grade
    metadata is not the gradebook's) gets an error - nbgrader scores a grade cell
    without an error as passed."""

    def preprocess(self, nb, resources):
        info = resources["nbgrader"]
        result = ClassRun.current.result_for(info["student"], info["notebook"], nb)
        why = result.get("stopped") or "the grader produced no result for it"
        graded = set(result.get("graded", []))
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            outputs = result["outputs"].get(index)
            if utils.is_grade(cell) and index not in graded:
                outputs = [nbformat.v4.new_output("error", ename="NotGraded", evalue=f"not graded: {why}",
                                                  traceback=[f"NotGraded: not graded: {why}"])]
            cell.outputs = [nbformat.from_dict(o) for o in outputs or []]
            cell.execution_count = result["execution_counts"].get(index)
        return nb, resources


# nbgrader's list with SandboxExecute for Execute; without its second metadata check (the sanitizing
# pass validated the metadata, and nothing here changes it: each check costs a jsonschema validation per cell)
AUTOGRADE = [SandboxExecute, IgnorePattern, ClearMetadataPreprocessor, LimitOutput, SaveAutoGrades,
             AssignLatePenalties]


def course_config(root: Path, db_url: str | None = None) -> Config:
    """The course's ``nbgrader_config.py``, with the sandboxed execution wired in."""
    config = PyFileConfigLoader("nbgrader_config.py", path=str(root)).load_config() \
        if (root / "nbgrader_config.py").is_file() else Config()
    config.CourseDirectory.root = str(root)
    if db_url:
        config.CourseDirectory.db_url = db_url
    config.Autograde.sanitize_preprocessors = SANITIZE
    config.Autograde.autograde_preprocessors = AUTOGRADE
    config.OverwriteCells.add_missing_cells = True
    return config


def coursedir(config: Config, slug: str = "", student: str = "*") -> CourseDirectory:
    directory = CourseDirectory(config=config)
    directory.assignment_id, directory.student_id = slug, student
    return directory


def ensure_assignment(config: Config, slug: str, log: logging.Logger) -> None:
    """Put the assignment in the gradebook (``generate_assignment``) if it is not there."""
    directory = coursedir(config, slug)
    with Gradebook(directory.db_url, directory.course_id) as gb:
        try:
            if gb.find_assignment(slug).notebooks:
                return
        except MissingEntry:
            pass
    app = GenerateAssignment(coursedir=directory, config=config)
    app.force = True
    result = capture_log(app)
    if not result["success"]:
        raise RuntimeError(f"nbgrader generate_assignment {slug} failed:\n{result.get('log', '')}"
                           f"{result.get('error', '')}")
    log.info("put %s in the gradebook (nbgrader generate_assignment)", slug)


def sanitized(config: Config, slug: str, student: str, path: Path) -> nbformat.NotebookNode:
    """The submission's cells as nbgrader's autograde will see them after sanitizing (its
    metadata check, which changes nothing, is left to nbgrader's own pass)."""
    nb = nbformat.read(path, as_version=4)
    resources = {"nbgrader": {"student": student, "assignment": slug, "notebook": path.stem,
                              "db_url": coursedir(config).db_url}}
    for cls in SANITIZE[:-1]:
        preprocessor = cls(config=config)
        if isinstance(preprocessor, OverwriteCells):
            preprocessor.add_missing_cells = True
        nb, resources = preprocessor.preprocess(nb, resources)
    return nb


@dataclass
class StudentStatus:
    student: str
    graded: bool = False
    reason: str = ""                # why not, or what was odd
    result: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what nbgrader warned about (edited grade cells...)
    digest: str = ""                # of what is graded (bncourse.ledger.digest)
    unchanged: bool = False         # graded before, as it is now: left alone


class ClassRun:
    """One class's autograde: the workers grade every submission in parallel, nbgrader
    scores each one here as its result arrives."""

    current: "ClassRun | None" = None

    def __init__(self, config: Config, slug: str, cluster: Cluster, log: logging.Logger):
        self.config, self.slug, self.cluster, self.log = config, slug, cluster, log
        self.directory = coursedir(config, slug)
        self.secret = course_secret(self.directory.db_url)
        self.release = Release.from_gradebook(self.directory.db_url, slug, slug)
        self.results: dict[str, dict] = {}
        self.queued: dict[str, float] = {}

    def job(self, student: str, nb: nbformat.NotebookNode) -> "Job":
        from bncourse.cluster import Job
        return Job(self.slug, student, dict(nb), self.release, self.secret, self.cluster.limits,
                   self.cluster.isolation)

    def submit(self, student: str, path: Path) -> None:
        """Sanitize one submission as nbgrader will, and queue it; an unreadable one is
        not graded (nbgrader will say why)."""
        try:
            nb = sanitized(self.config, self.slug, student, path)
        except Exception as exc:  # nbformat's NotJSONError, invalid nbgrader metadata...
            self.results[student] = NotebookResult(stopped=_unreadable(exc), failed=True).to_dict()
            return
        job = self.job(student, nb)
        self.cluster.submit(job)
        self.queued[student] = job.queued

    def result_for(self, student: str, notebook: str, nb: nbformat.NotebookNode) -> dict:
        result = self.results[student]
        if not result.get("failed") and result.get("digest") != code_digest(nb):
            # not the notebook nbgrader has: grade this one now
            self.log.warning("%s: the notebook graded differs from the one nbgrader sanitized; grading it again",
                             student)
            result = self.results[student] = self.cluster.grade_now(self.job(student, nb))
        return result


def _unreadable(exc: Exception) -> str:
    if type(exc).__name__ == "NotJSONError":
        return "the notebook is not valid JSON (a damaged or non-notebook file)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"the notebook cannot be read ({type(exc).__name__}: {text[:300]})"


def autograde(config: Config, slug: str, students: list[str], cluster: Cluster, log: logging.Logger,
              progress: Callable[[str, StudentStatus], None] = lambda *a: None, regrade: bool = False,
              planned: Callable[[int], None] = lambda n: None) -> dict[str, StudentStatus]:
    """Autograde ``students``' submissions of ``slug`` (in ``submitted/``) into the gradebook.
    A submission the ledger holds as graded (or as not gradable: a damaged file), unchanged,
    is left alone (unless ``regrade``);
    ``planned`` is told how many will be graded, ``progress`` each one as it is."""
    ensure_assignment(config, slug, log)
    run = ClassRun(config, slug, cluster, log)
    ledger = Ledger(run.directory.db_url)
    timings = Timings(Path(run.directory.root) / "reports" / slug / "timings.csv")
    done = ledger.latest(slug)
    statuses, paths, at_once = {}, {}, []
    for student in students:
        path = Path(run.directory.format_path(run.directory.submitted_directory, student, slug)) / f"{slug}.ipynb"
        status = statuses[student] = StudentStatus(student)
        if not path.is_file():
            status.reason = f"no {slug}.ipynb in its submission"
            at_once.append(student)
            continue
        status.digest = digest(path.parent, path.name, run.release)
        entry = done.get(student)
        if not regrade and entry is not None and entry.digest == status.digest and entry.status != FAILED:
            status.graded, status.unchanged = entry.status == GRADED, True
            status.reason = "" if status.graded else entry.reason
        else:
            paths[student] = path
    planned(len(paths) + len(at_once))
    for student, path in paths.items():
        run.submit(student, path)
        if student not in run.queued:  # unreadable: nbgrader says why, at once
            at_once.append(student)

    def record(student: str) -> None:
        status = statuses[student]
        _record(config, slug, run, status)
        if status.digest:
            outcome = GRADED if status.graded else FAILED if status.result.get("retry") else NOT_GRADED
            ledger.record(slug, student, status.digest, outcome, status.reason, status.result.get("worker", ""))
            timings.add(student, GRADED if status.graded else f"not graded: {status.reason}"[:200],
                        run.queued.get(student), status.result)
        if not status.graded:
            log.error("%s: not graded: %s", student, status.reason)
        progress(student, status)

    ClassRun.current = run
    try:
        for student in at_once:
            record(student)
        for job, result in cluster.completed():
            run.results[job.student] = result
            record(job.student)
    finally:
        ClassRun.current = None
        ledger.close()
    return statuses


def _record(config: Config, slug: str, run: ClassRun, status: StudentStatus) -> None:
    """nbgrader's autograde of one student, with the result the workers sent (none for a
    notebook not graded through no fault of its own: the gradebook is left as it is)."""
    result = run.results.get(status.student, {})
    if result.get("retry"):
        status.result, status.reason = result, result["stopped"]
        return
    # nbgrader records every student, even one whose notebook it cannot read (score 0)
    app = Autograde(coursedir=coursedir(config, slug, status.student), config=config)
    app.force, app.create_student = True, True
    outcome = capture_log(app)
    status.warnings = [line.removeprefix("[WARNING] ") for line in outcome.get("log", "").splitlines()
                       if line.startswith("[WARNING]")]
    status.result = run.results.get(status.student, {})
    status.graded = outcome["success"] and bool(status.result) and not status.result.get("failed")
    if not status.reason:
        status.reason = status.result.get("stopped") or ("" if outcome["success"] else _first_error(outcome))


def _first_error(outcome: dict) -> str:
    lines = [line for line in outcome.get("log", "").splitlines() if line.startswith("[ERROR]")]
    return lines[0].removeprefix("[ERROR] ") if lines else (outcome.get("error", "") or "unknown error")[-300:]


def save_results(root: Path, slug: str, statuses: dict[str, StudentStatus]) -> Path:
    """Each student's verdicts, for the misconception report (one JSON file per student,
    so regrading one student updates only theirs)."""
    folder = root / "reports" / slug / "results"
    folder.mkdir(parents=True, exist_ok=True)
    for student, status in statuses.items():
        if status.unchanged:  # its results are those of the run that graded it
            continue
        record = {"student": student, "graded": status.graded, "reason": status.reason,
                  "tasks": status.result.get("tasks", []), "seconds": status.result.get("seconds"),
                  "stopped": status.result.get("stopped"), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (folder / f"{student}.json").write_text(json.dumps(record, indent=1))
    return folder


def load_results(root: Path, slug: str) -> list[dict]:
    folder = root / "reports" / slug / "results"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def submitted_students(config: Config, slug: str) -> list[str]:
    directory = coursedir(config, slug)
    base = Path(directory.root) / directory.submitted_directory
    return sorted(p.name for p in base.iterdir() if (p / slug).is_dir()) if base.is_dir() else []

