"""Grade sheets from nbgrader's gradebook: the course's CSV and an LMS-importable one.

``grades.csv`` has one row per student: scores (total, autograded, written),
the points still waiting for a grader (``pending_manual_points``), the LMS late
flag and whether the notebook could be graded. ``grades_canvas.csv`` is in the
form Canvas's gradebook import reads (Student, ID, SIS User ID, SIS Login ID,
Section, then one column for the assignment); a student whose written answers
are not graded yet gets an empty cell there, so that importing never posts an
incomplete grade.

Names, ids and e-mails come from students (an LMS display name, a roster the LMS
exported): a cell that a spreadsheet would run as a formula (it starts with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return) is written with a leading ``'``,
as OWASP recommends against CSV injection; numbers are written as they are.
"""

from __future__ import annotations

import csv
from pathlib import Path

from nbgrader.api import Gradebook, MissingEntry

from bncourse.collect import Roster

FIELDS = ["student_id", "first_name", "last_name", "email", "lms_id", "score", "max_score", "autograded_score",
          "written_score", "pending_manual_points", "pending_manual_cells", "late", "status"]


def grade_rows(db_url: str, slug: str, roster: Roster | None = None, late: set[str] = frozenset(),
               statuses: dict | None = None) -> list[dict]:
    """One dict per student (the roster's, and every student with a submission)."""
    people = {r["student_id"]: r for r in (roster.rows if roster else [])}
    rows = []
    with Gradebook(db_url) as gb:
        assignment = gb.find_assignment(slug)
        ids = list(people) + sorted({s.student.id for s in assignment.submissions} - set(people))
        for student in ids:
            info = people.get(student, {})
            row = {"student_id": student, "first_name": info.get("first_name", ""),
                   "last_name": info.get("last_name", ""), "email": info.get("email", ""),
                   "lms_id": info.get("lms_id", ""), "late": "yes" if student in late else ""}
            try:
                sub = gb.find_submission(slug, student)
            except MissingEntry:
                rows.append({**row, "score": 0, "max_score": assignment.max_score, "status": "no submission"})
                continue
            pending = [g for nb in sub.notebooks for g in nb.grades if g.manual_score is None and g.auto_score is None]
            status = (statuses or {}).get(student)
            row.update(score=round(sub.score, 4), max_score=sub.max_score, autograded_score=round(sub.code_score, 4),
                       written_score=round(sub.written_score, 4),
                       pending_manual_points=sum(g.max_score for g in pending), pending_manual_cells=len(pending),
                       status="graded" if status is None or status.graded else f"not graded: {status.reason}")
            rows.append(row)
    return rows


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value):
    """``value`` as a spreadsheet will not run it: text that starts like a formula gets a
    leading ``'`` (numbers stay numbers)."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value
    return value


def write_grades(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: safe_cell(v) for k, v in row.items()} for row in rows)
    return path


def write_canvas(rows: list[dict], roster: Roster | None, column: str, path: Path) -> Path:
    """Canvas's gradebook-import CSV; students with pending written answers are left blank."""
    people = {r["student_id"]: r for r in (roster.rows if roster else [])}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Student", "ID", "SIS User ID", "SIS Login ID", "Section", safe_cell(column)])
        max_score = rows[0]["max_score"] if rows else ""
        writer.writerow(["Points Possible", "", "", "", "", max_score])
        for row in rows:
            info = people.get(row["student_id"], {})
            name = info.get("name") or ", ".join(p for p in (row["last_name"], row["first_name"]) if p) \
                or row["student_id"]
            score = "" if row.get("pending_manual_points") else row["score"]
            writer.writerow(map(safe_cell, [name, info.get("lms_id", ""), info.get("sis_id", row["student_id"]),
                                            info.get("login_id", ""), info.get("section", ""), score]))
    return path
