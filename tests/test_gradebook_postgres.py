"""The gradebook in PostgreSQL: ``bncourse grade --db postgresql://...`` against a
real server (Debian's ``postgresql``) that this test starts on a temporary
directory and port, and stops. nbgrader's own ``export`` then reads the same
grades, so the formgrader and every nbgrader command work on that gradebook."""

import csv
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from nbgrader.api import Gradebook

from bncourse.benchmark import nbgrader
from nbgrader_cycle import bncourse, make_course, model_and_release, write_submissions

SLUG = "ch4_backprop"


def _binaries() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the postgres user."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *command] if os.geteuid() == 0 \
        else command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of our own: ``postgresql://postgres@127.0.0.1:PORT/gradebook``."""
    bin_dir = _binaries()
    if bin_dir is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL is required in CI: `make system-deps` installs Debian's postgresql.")
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package; `make system-deps` as root).")
    with tempfile.TemporaryDirectory(prefix="bn-postgres-") as tmp:  # not pytest's: postgres must reach it
        folder = Path(tmp)
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        yield from _server(bin_dir, folder)


def _server(bin_dir: str, folder: Path):
    data, port = folder / "data", _free_port()
    run = lambda *args: subprocess.run(_as_postgres([f"{bin_dir}/{args[0]}", *args[1:]]), check=True,
                                       capture_output=True, text=True, timeout=120)
    run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    run("pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "gradebook")
        yield f"postgresql://postgres@127.0.0.1:{port}/gradebook"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")


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
