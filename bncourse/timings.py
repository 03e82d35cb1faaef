"""Per-notebook timings, next to the report: ``reports/<slug>/timings.csv``.

One row per notebook graded (appended, run after run, so ``bncourse watch`` keeps
its history): when the client queued it, when a worker started and finished it,
when its grade was in the gradebook, which worker graded it and how many
attempts it took, and the seconds its cells and checks ran. Times are UTC, ISO
8601 with milliseconds (a worker's clock is its machine's).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

from bncourse.export import safe_cell

FIELDS = ["run", "student", "status", "queued", "started", "finished", "recorded", "worker", "attempts",
          "wait_seconds", "notebook_seconds", "total_seconds"]


def stamp(seconds: float | None) -> str:
    """``time.time()`` seconds as UTC ISO 8601 with milliseconds ("" for none)."""
    if not seconds:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}Z"


class Timings:
    """Appends one row per notebook to ``path`` (with a header when the file is new)."""

    def __init__(self, path: Path):
        self.path, self.run = path, stamp(time.time())
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, student: str, status: str, queued: float | None, result: dict) -> None:
        recorded = time.time()
        started, finished = result.get("started"), result.get("finished")
        row = {"run": self.run, "student": safe_cell(student), "status": status, "queued": stamp(queued),
               "started": stamp(started), "finished": stamp(finished), "recorded": stamp(recorded),
               "worker": result.get("worker", ""), "attempts": result.get("attempts", ""),
               "wait_seconds": f"{started - queued:.3f}" if started and queued else "",
               "notebook_seconds": f"{result.get('seconds', 0.0):.3f}",
               "total_seconds": f"{recorded - queued:.3f}" if queued else ""}
        new = not self.path.is_file()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)


def read(path: Path) -> list[dict]:
    """The rows of a timings file."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
