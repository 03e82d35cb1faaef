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
    roster = _roster(tmp_path, ["a,,Jane Doe", "b,556,"])  # by name, and by the participant id
    report = c.collect(course, SLUG, folder, roster, "moodle")
    assert "jane on moodle" in _imported(course, "a") and "rick on moodle" in _imported(course, "b")
    assert not report.dropped


def test_without_a_roster_the_lms_name_is_the_id(course, tmp_path):
    download = tmp_path / "d.zip"
    download.write_bytes(_zip({f"doejane_101_1_{SLUG}.ipynb": _nb("one"), f"doejane_202_2_{SLUG}.ipynb": _nb("two")}))
    report = c.collect(course, SLUG, download)
    assert sorted(report.imported) == ["doejane", "doejane_202"]


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
