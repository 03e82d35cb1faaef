"""What has been graded: a ledger in the gradebook's own database, keyed by content.

Every time the class grader records a notebook in the gradebook it appends a row
to ``bncourse_ledger`` (a table beside nbgrader's, in SQLite or PostgreSQL alike):
the assignment, the student, the digest of what was graded (the submitted
notebook's bytes, its submission time and the assignment's release), whether it
was graded (``graded``), could not be because of the notebook itself (``not
graded``: a damaged file) or failed through no fault of its own (``failed``: a
worker, sandbox or scheduler died), why, the worker and the time. Before grading,
a submission whose digest the ledger holds as graded or not graded is left alone,
so running a command again finishes what is missing (the failed ones) and touches
nothing that is done; a resubmission (another digest) is graded and replaces the
earlier grade. The rows are never changed but to mark that
a grade's feedback was released (``bncourse watch``), so the table is also the
history of the class: a notebook graded twice would show as two rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

_META = sa.MetaData()
_TABLE = sa.Table("bncourse_ledger", _META,
                  sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
                  sa.Column("assignment", sa.String(128), nullable=False, index=True),
                  sa.Column("student", sa.String(128), nullable=False),
                  sa.Column("digest", sa.String(64), nullable=False),
                  sa.Column("status", sa.String(16), nullable=False),
                  sa.Column("reason", sa.Text, nullable=False, default=""),
                  sa.Column("worker", sa.String(256), nullable=False, default=""),
                  sa.Column("graded_at", sa.String(32), nullable=False),
                  sa.Column("released", sa.Boolean, nullable=False, default=False))

GRADED, NOT_GRADED, FAILED = "graded", "not graded", "failed"


def digest(folder: Path, notebook: str, release) -> str:
    """What a grade depends on: the submitted notebook's bytes, its submission time
    (nbgrader's ``timestamp.txt``, for late penalties) and the assignment's release."""
    parts = [(folder / name).read_bytes() if (folder / name).is_file() else b"" for name in (notebook, "timestamp.txt")]
    record = json.dumps([sorted(release.grade_cells.items()), list(release.locked_sources)]).encode()
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in [*parts, record])).hexdigest()


@dataclass(frozen=True)
class Entry:
    student: str
    digest: str
    status: str
    reason: str
    worker: str
    graded_at: str
    released: bool
    id: int


class Ledger:
    """The ledger of the gradebook at ``db_url`` (the table is created on first use)."""

    def __init__(self, db_url: str):
        self.engine = sa.create_engine(db_url)
        try:
            _TABLE.create(self.engine, checkfirst=True)
        except sa.exc.DBAPIError:  # another grader created it meanwhile
            if not sa.inspect(self.engine).has_table(_TABLE.name):
                raise

    def latest(self, assignment: str) -> dict[str, Entry]:
        """student -> the latest entry of ``assignment``."""
        query = sa.select(_TABLE).where(_TABLE.c.assignment == assignment).order_by(_TABLE.c.id)
        with self.engine.connect() as connection:
            return {row.student: _entry(row) for row in connection.execute(query)}

    def history(self, assignment: str) -> list[Entry]:
        query = sa.select(_TABLE).where(_TABLE.c.assignment == assignment).order_by(_TABLE.c.id)
        with self.engine.connect() as connection:
            return [_entry(row) for row in connection.execute(query)]

    def record(self, assignment: str, student: str, content: str, status: str, reason: str = "",
               worker: str = "") -> None:
        with self.engine.begin() as connection:
            connection.execute(_TABLE.insert().values(
                assignment=assignment, student=student, digest=content, status=status,
                reason=reason[:2000], worker=worker[:256], graded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                released=False))

    def mark_released(self, entry: Entry) -> None:
        with self.engine.begin() as connection:
            connection.execute(_TABLE.update().where(_TABLE.c.id == entry.id).values(released=True))

    def close(self) -> None:
        self.engine.dispose()


def _entry(row) -> Entry:
    return Entry(row.student, row.digest, row.status, row.reason, row.worker, row.graded_at, bool(row.released),
                 row.id)
