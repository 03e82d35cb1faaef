"""Getting a class's submissions into nbgrader's ``submitted/`` folder.

The submissions come as a folder in nbgrader's layout
(``<student>/<assignment>/*.ipynb``), or as what an LMS exports: a zip (or its
extracted folder) whose file names carry the student, in Canvas's form
(``doejane_LATE_12345_67890_ch4_backprop-1.ipynb``: name, late flag, user id,
submission id, the student's file name with Canvas's ``-N`` resubmission suffix)
or Moodle's (``Jane Doe_12345_assignsubmission_file_/ch4.ipynb``). For each
student the latest notebook wins: the highest ``-N`` suffix, then the newest
entry; a student's own zip is opened; ``__MACOSX`` entries and macOS ``._`` files
are skipped; a notebook saved under another name is found by its grade cells.

A roster (CSV: ``student_id`` and ``lms_id``, optionally ``name``,
``first_name``, ``last_name``, ``email``, ``sis_id``, ``login_id``,
``section``) maps LMS users to nbgrader ids by the LMS's user id only - a display
name is for people to read, and anyone can take one. Without a roster, a
student's id is the LMS name and user id together. The :class:`ImportReport`
lists roster students without a submission and every file it could not place.
Every file received is kept under ``downloaded/<assignment>/`` - nothing is lost.

Everything received is hostile until proven otherwise: in a folder only regular
files are read (never a symbolic link, a pipe, a device or a folder named like a
notebook), with the instructor's rights but through file descriptors that refuse
to follow links; a damaged or encrypted zip entry, a file too large or a notebook
with too many cells is reported for its student alone, and everyone else is
imported.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

MAX_FILE = 20 * 2**20       # bytes: a larger notebook is refused
MAX_CELLS = 1000            # cells: the grader's own work per notebook grows with them
MAX_TOTAL = 4 * 2**30       # bytes read from one zip (zip bombs)
MAX_NESTING = 2             # a student's zip inside the LMS zip, and no deeper
STUDENT_ID = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9_.@+-]*")

CANVAS = re.compile(r"^(?P<name>[^_/]+?)(?P<late>_LATE)?_(?P<uid>\d+)_(?P<sid>\d+)_(?P<file>.+)$")
MOODLE = re.compile(r"^(?P<name>[^/]+?)_(?P<uid>\d+)_assignsubmission_(?:file|onlinetext)_/?(?P<file>.*)$")
RESUBMISSION = re.compile(r"^(?P<stem>.*?)-(?P<n>\d+)$")


class CollectError(ValueError):
    """The submissions cannot be read as given (the message says what to do)."""


@dataclass
class Roster:
    """The class list: nbgrader ids and how the LMS names each student."""

    rows: list[dict]

    @classmethod
    def load(cls, path: Path) -> "Roster":
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
        if not rows or "student_id" not in rows[0]:
            raise CollectError(f"{path}: a roster is a CSV file with a header row and at least the column "
                               f"student_id (optionally lms_id, name, first_name, last_name, email, sis_id, "
                               f"login_id, section).")
        ids = [r["student_id"] for r in rows]
        bad = [i for i in ids if not STUDENT_ID.fullmatch(i)]
        if bad or len(set(ids)) != len(ids):
            raise CollectError(f"{path}: every student_id must be unique and made of letters, digits and _.@+- "
                               f"(problem with: {', '.join(sorted(set(bad) or {i for i in ids if ids.count(i) > 1}))}).")
        return cls(rows)

    def ids(self) -> list[str]:
        return [r["student_id"] for r in self.rows]

    def match(self, uid: str) -> str | None:
        """The student_id of the LMS user ``uid`` (the roster's lms_id), or None."""
        return next((r["student_id"] for r in self.rows if uid and r.get("lms_id") == uid), None)

    def require_lms_ids(self) -> None:
        if not any(r.get("lms_id") for r in self.rows):
            raise CollectError("the roster has no lms_id column (or it is empty): LMS files are matched to students "
                               "by the LMS's user id only - a display name can be taken by anyone. Add each "
                               "student's LMS user id (Canvas: the ID column of the gradebook export; Moodle: "
                               "the participant id) as lms_id.")


@dataclass
class Candidate:
    """A notebook found for a student."""

    origin: str                 # where it came from, for the report
    name: str                   # the student's own file name
    data: bytes
    version: int = 0            # Canvas's -N resubmission suffix
    order: tuple = ()           # newer sorts later (the zip entry's date and time)
    late: bool = False


@dataclass
class ImportReport:
    slug: str
    imported: dict[str, str] = field(default_factory=dict)        # student -> what was imported
    late: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)                # choices made (renamed, older versions left)
    unmatched: list[str] = field(default_factory=list)            # files no student could be found for
    problems: list[str] = field(default_factory=list)             # files refused (unsafe, too big, unreadable)
    missing: list[str] = field(default_factory=list)              # roster students with no submission
    not_on_roster: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        """Whether any file received was not imported."""
        return bool(self.unmatched or self.problems)

    def text(self) -> str:
        lines = [f"Imported {len(self.imported)} submission(s) of {self.slug}"
                 + (f" ({len(self.late)} marked late by the LMS)" if self.late else "") + "."]
        for title, items in [("Chosen when a student sent several files", self.notes),
                             ("NOT IMPORTED - no student found for", self.unmatched),
                             ("NOT IMPORTED - refused", self.problems),
                             ("On the roster, no submission", self.missing),
                             ("Imported, but not on the roster", self.not_on_roster)]:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  - {item}" for item in items]
        return "\n".join(lines)


def _entries(data: bytes, origin: str, depth: int, budget: list[int], report: ImportReport):
    """(path, bytes, date_time) of a zip's files, nested zips opened, unsafe entries refused."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        report.problems.append(f"{origin}: not a readable zip file")
        return
    with archive:
        for info in archive.infolist():
            path = PurePosixPath(info.filename)
            if info.is_dir() or "__MACOSX" in path.parts or path.name.startswith("._") or path.name == ".DS_Store":
                continue
            where = f"{origin}:{info.filename}"
            if stat.S_ISLNK(info.external_attr >> 16):
                report.problems.append(f"{where}: a symbolic link (not imported)")
                continue
            if info.file_size > (MAX_FILE if not info.filename.endswith(".zip") else MAX_TOTAL):
                report.problems.append(f"{where}: {info.file_size} bytes, larger than allowed")
                continue
            if info.flag_bits & 0x1:
                report.problems.append(f"{where}: encrypted (not imported: ask the student for an unencrypted file)")
                continue
            budget[0] -= info.file_size
            if budget[0] < 0:
                report.problems.append(f"{where}: the archive unpacks to more than {MAX_TOTAL} bytes; stopped here")
                return
            try:
                content = archive.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
                report.problems.append(f"{where}: damaged in the archive ({type(exc).__name__}: {exc})"[:300])
                continue
            if path.suffix == ".zip":
                if depth >= MAX_NESTING:
                    report.problems.append(f"{where}: a zip nested too deeply")
                    continue
                for inner, blob, when in _entries(content, where, depth + 1, budget, report):
                    yield f"{info.filename}/{inner}", blob, when
                continue
            yield info.filename, content, info.date_time


class Refused(Exception):
    """A file that is not imported (the message says why)."""


def _read_regular(name: str, dir_fd: int) -> tuple[bytes, tuple]:
    """The bytes and modification time of ``name`` in the open folder ``dir_fd``, if it is a
    regular file of at most MAX_FILE bytes: a link is never followed, and a pipe or device
    is never read."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise Refused("a symbolic link" if exc.errno == 40 else f"unreadable ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused("not a regular file")
        if info.st_size > MAX_FILE:
            raise Refused(f"{info.st_size} bytes, larger than allowed")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise Refused("larger than allowed")
        return data, tuple(time.localtime(info.st_mtime)[:6])
    finally:
        os.close(fd)


def _walk(source: Path, report: ImportReport):
    """(relative path, bytes, date_time) of every regular file below the folder ``source``; links,
    pipes, devices and other oddities are reported and skipped (never followed)."""
    for folder, dirs, files, dir_fd in os.fwalk(source, follow_symlinks=False):
        rel_folder = Path(folder).relative_to(source)
        for name in sorted(dirs):
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                report.problems.append(f"{(rel_folder / name).as_posix()}: a symbolic link (not imported)")
            elif name.endswith(".ipynb"):
                report.problems.append(f"{(rel_folder / name).as_posix()}: not a regular file but a folder "
                                       f"named like a notebook (not imported)")
        for name in sorted(files):
            rel = (rel_folder / name).as_posix()
            if "__MACOSX" in Path(rel).parts or name.startswith("._") or name == ".DS_Store":
                continue
            try:
                yield rel, *_read_regular(name, dir_fd)
            except Refused as exc:
                report.problems.append(f"{rel}: {exc} (not imported)")


def _files(source: Path, report: ImportReport):
    """(relative path, bytes, date_time) of every file in a zip or a folder."""
    budget = [MAX_TOTAL]
    if source.is_file():
        yield from _entries(source.read_bytes(), source.name, 1, budget, report)
        return
    for rel, data, when in _walk(source, report):
        if rel.endswith(".zip"):
            for inner, blob, when in _entries(data, rel, 2, budget, report):
                yield f"{rel}/{inner}", blob, when
        else:
            yield rel, data, when


def _who(rel: str, lms: str):
    """(name, uid, late, student file name) from an LMS file path, or None."""
    top, _, rest = rel.partition("/")
    if lms in ("canvas", "auto"):
        m = CANVAS.match(top)
        if m:
            inner = m["file"] + (f"/{rest}" if rest else "")
            return m["name"], m["uid"], bool(m["late"]), inner
    if lms in ("moodle", "auto"):
        m = MOODLE.match(rel)
        if m:
            return m["name"], m["uid"], False, m["file"]
    return None


def _grade_ids(data: bytes) -> set[str]:
    try:
        nb = json.loads(data)
        return {c.get("metadata", {}).get("nbgrader", {}).get("grade_id") for c in nb.get("cells", [])} - {None}
    except (ValueError, AttributeError, TypeError):
        return set()


def _choose(slug: str, student: str, found: list[Candidate], grade_ids: set[str], report: ImportReport) -> Candidate | None:
    """The notebook to grade among a student's files: one named for the assignment (the
    latest resubmission), else the notebook that holds the assignment's grade cells."""
    notebooks = [c for c in found if c.name.endswith(".ipynb")]
    if not notebooks:
        report.unmatched += [f"{c.origin} (student {student}: not a notebook)" for c in found]
        return None

    def stem(c):
        base = PurePosixPath(c.name).stem
        m = RESUBMISSION.match(base)
        return (m["stem"], int(m["n"])) if m else (base, 0)

    named = [c for c in notebooks if stem(c)[0] == slug]
    if named:
        best = max(named, key=lambda c: (stem(c)[1], c.order))
    else:
        best = max(notebooks, key=lambda c: (len(_grade_ids(c.data) & grade_ids), stem(c)[1], c.order))
        report.notes.append(f"{student}: graded {best.name} as {slug}.ipynb (no file was named {slug}.ipynb)")
    others = [c.origin for c in found if c is not best]
    if others:
        report.notes.append(f"{student}: graded {best.origin}; also received, not graded: {', '.join(others)}")
    return best


def collect(root: Path, slug: str, source: Path, roster: Roster | None = None, lms: str = "auto") -> ImportReport:
    """Import ``source`` (a zip, an LMS folder, or a folder in nbgrader's layout) into
    ``root/submitted/<student>/<slug>/<slug>.ipynb``; originals go to ``root/downloaded/``."""
    source = Path(source)
    if not source.exists():
        raise CollectError(f"{source} does not exist: give the zip your LMS exported, or a folder.")
    report = ImportReport(slug)
    grade_ids = _assignment_grade_ids(root, slug)
    per_student: dict[str, list[Candidate]] = {}
    if source.is_dir() and _is_nbgrader_layout(source, slug):
        for rel, data, _ in _walk(source, report):
            parts = rel.split("/")
            if len(parts) != 3 or parts[1] != slug or not parts[2].endswith(".ipynb"):
                continue
            if not STUDENT_ID.fullmatch(parts[0]):
                report.problems.append(f"{rel}: {parts[0]!r} is not a valid student id (letters, digits, _.@+-)")
                continue
            per_student.setdefault(parts[0], []).append(Candidate(rel, parts[2], data))
    else:
        if roster:
            roster.require_lms_ids()
        for rel, data, when in _files(source, report):
            who = _who(rel, lms)
            if who is None:
                report.unmatched.append(f"{rel} (its name is not in {lms if lms != 'auto' else 'a known LMS'} form)")
                _keep(root, slug, "unmatched", rel, data)
                continue
            name, uid, late, inner = who
            student = roster.match(uid) if roster else _plain_id(name, uid)
            if student is None:
                report.unmatched.append(f"{rel} (LMS user {uid}, {name!r}: not on the roster)")
                _keep(root, slug, "unmatched", rel, data)
                continue
            per_student.setdefault(student, []).append(
                Candidate(rel, PurePosixPath(inner).name, data, order=tuple(when), late=late))
    for student, found in sorted(per_student.items()):
        for c in found:
            _keep(root, slug, student, c.origin, c.data)
        best = _choose(slug, student, found, grade_ids, report)
        if best is None:
            continue
        too_big = _too_big(best.data)
        if too_big:
            report.problems.append(f"{best.origin} (student {student}): {too_big} (not imported)")
            continue
        target = root / "submitted" / student / slug / f"{slug}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.is_file() and not target.is_symlink() and target.read_bytes() == best.data):
            for old in target.parent.glob("*.ipynb"):  # an unchanged submission is left as it is
                old.unlink()
            target.write_bytes(best.data)
        report.imported[student] = best.origin
        if best.late:
            report.late.add(student)
    if roster:
        report.missing = [s for s in roster.ids() if s not in report.imported]
        report.not_on_roster = sorted(set(report.imported) - set(roster.ids()))
    return report


def _too_big(data: bytes) -> str | None:
    """Why grading this notebook would cost the grader too much, or None (a file that is not
    valid JSON is imported: grading reports it as damaged, and keeps it)."""
    try:
        cells = json.loads(data).get("cells", [])
    except (ValueError, AttributeError, RecursionError):
        return None
    if isinstance(cells, list) and len(cells) > MAX_CELLS:
        return (f"the notebook has {len(cells)} cells; at most {MAX_CELLS} are graded (the exercise has "
                f"about 40): ask the student for the exercise's notebook")
    return None


def _is_nbgrader_layout(source: Path, slug: str) -> bool:
    return any(p.is_dir() and not p.is_symlink() and (p / slug).is_dir() and not (p / slug).is_symlink()
               for p in source.iterdir())


def _plain_id(name: str, uid: str) -> str:
    """Without a roster: the LMS name and user id (the name alone is anyone's to take)."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "", name.replace(" ", "_")).lstrip(".") or "student"
    return f"{base}_{re.sub(r'[^0-9A-Za-z]', '', uid)}"


def _keep(root: Path, slug: str, who: str, rel: str, data: bytes) -> None:
    """A copy of a received file under downloaded/ (a safe name: no path from the zip is trusted)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", rel.replace("/", "__"))[-200:]
    path = root / "downloaded" / slug / who / safe
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _assignment_grade_ids(root: Path, slug: str) -> set[str]:
    release = root / "exercises" / slug / f"{slug}.ipynb"
    source = root / "solutions" / slug / f"{slug}.ipynb"
    for path in (source, release):
        if path.is_file():
            return _grade_ids(path.read_bytes())
    return set()

