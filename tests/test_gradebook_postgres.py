"""The gradebook in PostgreSQL: ``bncourse grade --db postgresql://...`` against a
real server (Debian's ``postgresql``) that this test starts on a temporary
directory and port, and stops. nbgrader's own ``export`` then reads the same
grades, so the formgrader and every nbgrader command work on that gradebook."""

import csv

import pytest
from nbgrader.api import Gradebook

from bncourse.benchmark import nbgrader
from nbgrader_cycle import bncourse, make_course, model_and_release, write_submissions
from services import postgres_server

SLUG = "ch1_feature_scaling"


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own: ``postgresql://postgres@127.0.0.1:PORT/gradebook``."""
    with postgres_server() as urls:
        yield urls["gradebook"]


def test_a_class_graded_into_postgresql_twice_with_the_same_result(postgres, tmp_path):
    course = make_course(tmp_path, [SLUG])
    model, release = model_and_release(course, SLUG)
    write_submissions(tmp_path / "incoming", SLUG, {"ada": model, "bob": release})
    proc = bncourse(course, "--db", postgres, "grade", SLUG, str(tmp_path / "incoming"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as local:  # made by the release, not by grading
        assert local.find_assignment(SLUG).num_submissions == 0
    with Gradebook(postgres) as gb:
        ada, bob = gb.find_submission(SLUG, "ada"), gb.find_submission(SLUG, "bob")
        assert ada.code_score == ada.max_code_score > 0 and bob.code_score == 0
    nbgrader(course, "export", "--to", "export.csv", f"--CourseDirectory.db_url={postgres}")
    with open(course / "export.csv") as f:
        rows = {row["student_id"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"ada", "bob"} and float(rows["ada"]["raw_score"]) > float(rows["bob"]["raw_score"])
    feedback = {s: (course / "feedback" / s / SLUG / f"{SLUG}.html").read_text() for s in ("ada", "bob")}
    grades = (course / "reports" / SLUG / "grades.csv").read_text()

    again = bncourse(course, "--db", postgres, "grade", SLUG, str(tmp_path / "incoming"))  # idempotent
    assert again.returncode == 0, again.stdout + again.stderr
    assert (course / "reports" / SLUG / "grades.csv").read_text() == grades
    assert {s: (course / "feedback" / s / SLUG / f"{SLUG}.html").read_text() for s in ("ada", "bob")} == feedback
