"""Importing an LMS download: Canvas and Moodle names, resubmissions, late flags,
a student's own zip, macOS debris, a notebook saved under another name, the
roster check - and the unsafe archives (paths that climb out, links, bombs)."""

import io
import shutil
import subprocess
import sys
import zipfile

import nbformat
import pytest

from bncourse import collect as c
from nbgrader_cycle import ROOT

SLUG = "ch4_backprop"


@pytest.fixture
def course(tmp_path):
    root = tmp_path / "course"
    shutil.copytree(ROOT / "solutions" / SLUG, root / "solutions" / SLUG)
    return root


def _nb(tag: str) -> bytes:
    """A notebook with the assignment's grade cells, told apart by ``tag``."""
    nb = nbformat.read(ROOT / "exercises" / SLUG / f"{SLUG}.ipynb", as_version=4)
    nb.cells[0].source = f"# {tag}"
    return nbformat.writes(nb).encode()


def _zip(entries: dict[str, bytes], dates: dict[str, tuple] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in entries.items():
            info = zipfile.ZipInfo(name, date_time=(dates or {}).get(name, (2026, 11, 1, 12, 0, 0)))
            z.writestr(info, data)
    return buffer.getvalue()


def _roster(tmp_path, rows=("a,101,Doe Jane", "b,102,Roe Rick", "c,103,Poe Edgar")) -> c.Roster:
    path = tmp_path / "roster.csv"
    path.write_text("student_id,lms_id,name\n" + "\n".join(rows) + "\n")
    return c.Roster.load(path)


def _imported(course, student) -> str:
    return (course / "submitted" / student / SLUG / f"{SLUG}.ipynb").read_text()


def test_canvas_zip_latest_resubmission_late_flag_nested_zip_and_debris(course, tmp_path):
    own_zip = _zip({f"{SLUG}.ipynb": _nb("rick from his own zip"), "__MACOSX/._ch4.ipynb": b"junk"})
    download = tmp_path / "submissions.zip"
    download.write_bytes(_zip({
        f"doejane_101_9001_{SLUG}.ipynb": _nb("jane first"),
        f"doejane_101_9002_{SLUG}-2.ipynb": _nb("jane latest"),
        f"doejane_101_9003_{SLUG}-1.ipynb": _nb("jane middle"),
        "roerick_LATE_102_9004_work.zip": own_zip,
        "__MACOSX/._doejane_101_9001_x.ipynb": b"junk",
        ".DS_Store": b"junk",
        "nobody_999_9005_ch4_backprop.ipynb": _nb("stranger"),
    }))
    report = c.collect(course, SLUG, download, _roster(tmp_path), "canvas")
    assert "jane latest" in _imported(course, "a")
    assert "rick from his own zip" in _imported(course, "b")
    assert report.late == {"b"} and report.missing == ["c"]
    assert len(report.unmatched) == 1 and "not on the roster" in report.unmatched[0]
    assert report.dropped and "NOT IMPORTED" in report.text()
    assert any("a: graded" in note and "also received" in note for note in report.notes)
    kept = sorted(p.name for p in (course / "downloaded" / SLUG).rglob("*") if p.is_file())
    assert len(kept) == 5  # every notebook received, graded or not, is kept
    report_again = c.collect(course, SLUG, download, _roster(tmp_path), "canvas")
    assert report_again.imported == report.imported  # importing twice gives the same class


def test_a_notebook_under_another_name_is_found_by_its_grade_cells(course, tmp_path):
    download = tmp_path / "d.zip"
    download.write_bytes(_zip({"doejane_101_1_notes.ipynb": b'{"cells": [], "metadata": {}}',
                               "doejane_101_2_Untitled (3).ipynb": _nb("jane renamed"),
                               "doejane_101_3_readme.txt": b"hello"}))
    report = c.collect(course, SLUG, download, _roster(tmp_path), "canvas")
    assert "jane renamed" in _imported(course, "a")
    assert any("graded Untitled (3).ipynb as ch4_backprop.ipynb" in note for note in report.notes)


def test_moodle_folders_and_names(course, tmp_path):
    folder = tmp_path / "moodle"
    (folder / "Jane Doe_555_assignsubmission_file_").mkdir(parents=True)
    (folder / "Jane Doe_555_assignsubmission_file_" / f"{SLUG}.ipynb").write_bytes(_nb("jane on moodle"))
    (folder / "Rick Roe_556_assignsubmission_file_").mkdir()
    (folder / "Rick Roe_556_assignsubmission_file_" / "ch4 final.ipynb").write_bytes(_nb("rick on moodle"))
    roster = _roster(tmp_path, ["a,555,Jane Doe", "b,556,"])  # by the participant id
    report = c.collect(course, SLUG, folder, roster, "moodle")
    assert "jane on moodle" in _imported(course, "a") and "rick on moodle" in _imported(course, "b")
    assert not report.dropped


def test_without_a_roster_the_lms_name_and_user_id_are_the_id(course, tmp_path):
    """Two users with one display name stay two students, whichever file comes first."""
    download = tmp_path / "d.zip"
    download.write_bytes(_zip({f"doejane_202_1_{SLUG}.ipynb": _nb("two"), f"doejane_101_2_{SLUG}.ipynb": _nb("one")}))
    report = c.collect(course, SLUG, download)
    assert sorted(report.imported) == ["doejane_101", "doejane_202"]
    assert "one" in _imported(course, "doejane_101") and "two" in _imported(course, "doejane_202")


def test_unsafe_entries_are_refused_and_nothing_escapes(course, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(f"doejane_101_1_{SLUG}.ipynb", _nb("jane"))
        z.writestr("../../escaped.ipynb", _nb("climbing out"))
        z.writestr(f"/abs_101_2_{SLUG}.ipynb", _nb("absolute"))
        link = zipfile.ZipInfo(f"roerick_102_3_{SLUG}.ipynb")
        link.external_attr = (0o120777 << 16)
        z.writestr(link, "/etc/passwd")
    download = tmp_path / "d.zip"
    download.write_bytes(buffer.getvalue())
    report = c.collect(course, SLUG, download, _roster(tmp_path), "canvas")
    assert any("symbolic link" in p for p in report.problems)
    assert not (tmp_path / "escaped.ipynb").exists() and not (course.parent / "escaped.ipynb").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.is_relative_to(course) or p in (download, tmp_path / "roster.csv") for p in written)
    assert set(report.imported) == {"a"}


def test_an_oversized_file_is_refused(course, tmp_path, monkeypatch):
    monkeypatch.setattr(c, "MAX_FILE", 1000)
    download = tmp_path / "d.zip"
    download.write_bytes(_zip({f"doejane_101_1_{SLUG}.ipynb": _nb("big")}))
    report = c.collect(course, SLUG, download, _roster(tmp_path), "canvas")
    assert report.imported == {} and "larger than allowed" in report.problems[0]


@pytest.mark.parametrize("text, says", [("id,name\nx,X\n", "student_id"),
                                        ("student_id\nx\nx\n", "unique"),
                                        ("student_id\nbad/id\n", "letters, digits")])
def test_a_bad_roster_is_explained(tmp_path, text, says):
    path = tmp_path / "roster.csv"
    path.write_text(text)
    with pytest.raises(c.CollectError, match=says):
        c.Roster.load(path)


def test_the_command_exits_non_zero_when_files_are_dropped(course, tmp_path):
    shutil.copy(ROOT / "nbgrader_config.py", course)
    download = tmp_path / "d.zip"
    download.write_bytes(_zip({f"doejane_101_1_{SLUG}.ipynb": _nb("jane"), "mystery.ipynb": _nb("who?")}))
    proc = subprocess.run([sys.executable, "-m", "bncourse.cli", "--course", str(course), "collect", SLUG,
                           str(download)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "mystery.ipynb" in proc.stdout and "NOT IMPORTED" in proc.stdout
    assert (course / "reports" / SLUG / "import.txt").read_text().startswith("Imported 1 submission")


# --- what a hostile class puts in a download (issue: the class grader, attacked again) ----------------

def test_a_display_name_cannot_take_another_students_place(course, tmp_path):
    """A user who is not on the roster, with a student's display name, sends a blank
    'resubmission': it is reported, never attached to her; her own work stays hers."""
    download = tmp_path / "d.zip"
    download.write_bytes(_zip({f"doejane_101_1_{SLUG}.ipynb": _nb("jane's own work"),
                               f"doejane_999_2_{SLUG}-3.ipynb": _nb("impostor's blank")}))
    report = c.collect(course, SLUG, download, _roster(tmp_path), "canvas")
    assert "jane's own work" in _imported(course, "a")
    assert report.imported == {"a": f"doejane_101_1_{SLUG}.ipynb"}
    assert any("LMS user 999" in u and "not on the roster" in u for u in report.unmatched)


def test_a_roster_without_lms_ids_is_refused_for_an_lms_download(course, tmp_path):
    path = tmp_path / "roster.csv"
    path.write_text("student_id,name\na,Doe Jane\n")
    download = tmp_path / "d.zip"
    download.write_bytes(_zip({f"doejane_101_1_{SLUG}.ipynb": _nb("jane")}))
    with pytest.raises(c.CollectError, match="matched to students by the LMS's user id only"):
        c.collect(course, SLUG, download, c.Roster.load(path), "canvas")


def _oddities(folder, secret):
    """A folder of submissions in nbgrader's layout with every kind of file that is not one."""
    import os

    for student, text in [("ann", "ann's work"), ("bob", "bob's work")]:
        (folder / student / SLUG).mkdir(parents=True)
        (folder / student / SLUG / f"{SLUG}.ipynb").write_bytes(_nb(text))
    (folder / "links_solution" / SLUG).mkdir(parents=True)
    (folder / "links_solution" / SLUG / f"{SLUG}.ipynb").symlink_to(ROOT / "solutions" / SLUG / f"{SLUG}.ipynb")
    (folder / "links_folder").mkdir()
    (folder / "links_folder" / SLUG).symlink_to(folder / "ann" / SLUG, target_is_directory=True)
    (folder / "links_secret" / SLUG).mkdir(parents=True)
    (folder / "links_secret" / SLUG / f"{SLUG}.ipynb").symlink_to(secret)
    (folder / "folder_notebook" / SLUG / f"{SLUG}.ipynb").mkdir(parents=True)
    (folder / "pipe" / SLUG).mkdir(parents=True)
    os.mkfifo(folder / "pipe" / SLUG / f"{SLUG}.ipynb")
    (folder / "zero" / SLUG).mkdir(parents=True)
    (folder / "zero" / SLUG / f"{SLUG}.ipynb").symlink_to("/dev/zero")


def test_links_pipes_devices_and_folders_are_never_read(course, tmp_path):
    """A folder import reads only regular files inside the folder: a link to the solutions,
    to another student's folder, to the instructor's private file or to /dev/zero, a pipe
    and a folder named like a notebook are each reported for their student, and everyone
    else is imported."""
    secret = tmp_path / "instructor_only.txt"
    secret.write_text("the instructor's private notes")
    secret.chmod(0o600)
    folder = tmp_path / "homes"
    _oddities(folder, secret)
    report = c.collect(course, SLUG, folder)  # would hang on the pipe, or fill memory from /dev/zero
    assert sorted(report.imported) == ["ann", "bob"]
    assert "ann's work" in _imported(course, "ann") and "bob's work" in _imported(course, "bob")
    problems = "\n".join(report.problems)
    for student, says in [("links_solution", "symbolic link"), ("links_folder", "symbolic link"),
                          ("links_secret", "symbolic link"), ("folder_notebook", "not a regular file"),
                          ("pipe", "not a regular file"), ("zero", "symbolic link")]:
        assert any(p.startswith(student) and says in p for p in report.problems), (student, problems)
    copied = [p.read_bytes() for folder in ("downloaded", "submitted") for p in (course / folder).rglob("*")
              if p.is_file()]
    assert not any(b"instructor's private notes" in data or b"BEGIN SOLUTION" in data for data in copied)
    assert report.dropped


def test_an_lms_folder_with_links_is_read_the_same_way(course, tmp_path):
    secret = tmp_path / "instructor_only.txt"
    secret.write_text("the instructor's private notes")
    folder = tmp_path / "extracted"
    folder.mkdir()
    (folder / f"doejane_101_1_{SLUG}.ipynb").write_bytes(_nb("jane"))
    (folder / f"roerick_102_2_{SLUG}.ipynb").symlink_to(secret)
    (folder / f"poeedgar_103_3_{SLUG}.ipynb").symlink_to(ROOT / "solutions" / SLUG / f"{SLUG}.ipynb")
    report = c.collect(course, SLUG, folder, _roster(tmp_path), "canvas")
    assert set(report.imported) == {"a"}
    assert sum("symbolic link" in p for p in report.problems) == 2


def test_a_damaged_or_encrypted_zip_entry_costs_only_its_student(course, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"doejane_101_1_{SLUG}.ipynb", _nb("jane"))
        z.writestr(f"roerick_102_2_{SLUG}.ipynb", _nb("rick CORRUPTME"))
        z.writestr(f"poeedgar_103_3_{SLUG}.ipynb", _nb("edgar"))
    data = bytearray(buffer.getvalue().replace(b"CORRUPTME", b"CORRUPTED", 1))  # no longer matches its CRC
    name = f"poeedgar_103_3_{SLUG}.ipynb".encode()
    for signature, flags_at, name_at in [(b"PK\x03\x04", 6, 30), (b"PK\x01\x02", 8, 46)]:  # local, central
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at:start + name_at + len(name)] == name:
                data[start + flags_at] |= 0x1  # "encrypted"
            start += 4
    download = tmp_path / "d.zip"
    download.write_bytes(bytes(data))
    report = c.collect(course, SLUG, download, _roster(tmp_path), "canvas")
    assert set(report.imported) == {"a"}
    assert any("roerick" in p and "damaged" in p for p in report.problems)
    assert any("poeedgar" in p and "encrypted" in p for p in report.problems)


def test_a_notebook_with_too_many_cells_is_refused_at_the_import(course, tmp_path):
    nb = nbformat.reads(_nb("huge").decode(), as_version=4)
    nb.cells += [nbformat.v4.new_code_cell("x = 1") for _ in range(c.MAX_CELLS + 10)]
    download = tmp_path / "d.zip"
    download.write_bytes(_zip({f"doejane_101_1_{SLUG}.ipynb": nbformat.writes(nb).encode(),
                               f"roerick_102_2_{SLUG}.ipynb": _nb("rick")}))
    report = c.collect(course, SLUG, download, _roster(tmp_path), "canvas")
    assert set(report.imported) == {"b"}
    assert any("cells; at most 1000 are graded" in p for p in report.problems)


def test_names_that_look_like_formulas_reach_no_spreadsheet_as_formulas(tmp_path):
    from bncourse.export import FIELDS, write_canvas, write_grades

    roster_path = tmp_path / "roster.csv"
    roster_path.write_text('student_id,lms_id,name,first_name,last_name,email,sis_id\n'
                           'a,101,"=HYPERLINK(""http://x"",""y"")",+1+cmd|x,-2-3,@SUM(A1),\tx\n')
    roster = c.Roster.load(roster_path)
    rows = [{"student_id": "a", "first_name": "+1+cmd|x", "last_name": "-2-3", "email": "@SUM(A1)", "lms_id": "101",
             "score": 7.5, "max_score": 10, "status": "graded"}]
    grades, canvas = write_grades(rows, tmp_path / "g.csv"), write_canvas(rows, roster, "=col", tmp_path / "c.csv")
    import csv as csvlib
    cells = [cell for path in (grades, canvas) for row in csvlib.reader(open(path)) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert "'=HYPERLINK(\"http://x\",\"y\")" in cells and "'+1+cmd|x" in cells and "7.5" in cells
    assert len(FIELDS) > 5
