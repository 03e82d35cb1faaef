"""The class's misconceptions: what the checks recognised, counted per task.

Every failing check already names the misconception it recognised (or says it
recognised none). This module counts, per task of an assignment, the students
who passed, who failed with each named misconception, who failed in a way no
catalogue entry reproduces, and whose notebook could not be graded, and writes
it as ``misconceptions.csv`` and ``misconceptions.html`` (a table and a bar
chart) - what the instructor teaches from next week.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections import Counter, defaultdict
from pathlib import Path

from bn_exercises.checking import ALSO, NOT_IMPLEMENTED
from bncourse.export import safe_cell

PASSED, UNRECOGNISED, NOT_GRADED = "passed", "failed, no known misconception", "could not be graded"
_LAST = (NOT_IMPLEMENTED, UNRECOGNISED, NOT_GRADED)


def tally(records: list[dict], tasks: list[str]) -> dict[str, dict[str, list[str]]]:
    """{task: {outcome: [students]}}; a notebook that produced no verdicts counts as
    not graded for every task, and a student who made two known mistakes together is
    counted under each."""
    table: dict[str, dict[str, list[str]]] = {t: defaultdict(list) for t in tasks}
    for record in records:
        verdicts = {t["task"]: t for t in record.get("tasks", [])}
        for task in tasks:
            verdict = verdicts.get(task)
            if verdict is None or verdict["status"] == "not graded":
                outcome = NOT_GRADED
            elif verdict["status"] == "passed":
                outcome = PASSED
            else:
                outcome = verdict.get("misconception") or UNRECOGNISED
            for part in outcome.split(ALSO):
                table[task][part].append(record["student"])
    return table


def _outcome_order(outcomes) -> list[str]:
    named = sorted(o for o in outcomes if o != PASSED and o not in _LAST)
    return [PASSED, *named, *_LAST]


def write_csv(table, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "outcome", "students", "student_ids"])
        for task, outcomes in table.items():
            for outcome in _outcome_order(outcomes):
                if outcomes.get(outcome):
                    writer.writerow([task, outcome, len(outcomes[outcome]),
                                     safe_cell(" ".join(sorted(outcomes[outcome])))])
    return path


def chart_png(table) -> bytes:
    """A horizontal stacked bar per task: passed (green), each misconception (its own
    colour), not attempted, unrecognised and not graded (greys); the legend on the right."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

    tasks = list(table)
    outcomes = [o for o in _outcome_order({o for t in table.values() for o in t})
                if any(table[t].get(o) for t in tasks)]
    fixed = {PASSED: "#2e7d32", NOT_IMPLEMENTED: "#d9d9d9", UNRECOGNISED: "#969696", NOT_GRADED: "#252525"}
    palette = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (4, 5, 14, 15)]  # no greens, greys
    named = iter(palette * 4)
    fig = Figure(figsize=(11, max(2.2, 0.45 * len(tasks) + 0.9, 0.26 * len(outcomes) + 0.6)))
    ax = fig.subplots()
    left = [0] * len(tasks)
    for outcome in outcomes:
        counts = [len(table[t].get(outcome, [])) for t in tasks]
        ax.barh(tasks, counts, left=left, label=outcome[:80], color=fixed.get(outcome) or next(named))
        left = [a + b for a, b in zip(left, counts)]
    ax.invert_yaxis()
    ax.set_xlabel("students")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def write_html(table, slug: str, path: Path) -> Path:
    rows = []
    for task, outcomes in table.items():
        total = sum(len(v) for v in outcomes.values()) or 1
        for outcome in _outcome_order(outcomes):
            students = outcomes.get(outcome, [])
            if students:
                rows.append(f"<tr><td>{html.escape(task)}</td><td>{html.escape(outcome)}</td>"
                            f"<td>{len(students)} ({100 * len(students) / total:.0f}%)</td>"
                            f"<td>{html.escape(' '.join(sorted(students)))}</td></tr>")
    image = base64.b64encode(chart_png(table)).decode()
    path.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(slug)}: misconceptions</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}</style></head><body>"
        f"<h1>{html.escape(slug)}: what the class got wrong</h1>"
        "<p>For each task: the students who passed, who failed with a misconception the checks recognised, "
        "who failed in a way no known misconception explains, and whose notebook could not be graded.</p>"
        f"<img alt='bar chart of outcomes per task' src='data:image/png;base64,{image}'>"
        "<table><tr><th>task</th><th>outcome</th><th>students</th><th>who</th></tr>"
        + "".join(rows) + "</table></body></html>")
    return path


def write_report(records: list[dict], tasks: list[str], slug: str, folder: Path) -> tuple[Path, Path, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    table = tally(records, tasks)
    return write_csv(table, folder / "misconceptions.csv"), write_html(table, slug, folder / "misconceptions.html"), table


def summary_lines(table, top: int = 3) -> list[str]:
    """The most common named misconceptions, for the end-of-grading summary."""
    counts = Counter({(task, o): len(s) for task, outs in table.items() for o, s in outs.items()
                      if o != PASSED and o not in _LAST})
    return [f"{n} x {task}: {o}" for (task, o), n in counts.most_common(top)]
