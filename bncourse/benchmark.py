"""How much faster ``bncourse autograde`` grades a class than serial ``nbgrader autograde``.

    python -m bncourse.benchmark [--students 60] [--chapters ch1_feature_scaling ch4_backprop ch5_inference]

Builds a synthetic class in two identical temporary course directories - per
chapter and student a correct, a half-done (one answer still the stub), a blank,
a crashing (one answer raises) or a corrupt notebook - then grades one copy with
nbgrader's own ``autograde`` (a kernel per notebook, one at a time, no sandbox)
and the other with ``bncourse autograde`` (sandboxed, warm kernels, side by side),
in the same run, and prints wall times, seconds per notebook, their ratio, and
whether both gave every student the same score. Timings are measured, never
asserted: machines are noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbgrader.api import Gradebook

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["correct", "correct", "half", "correct", "blank", "correct", "crashing", "correct", "half", "corrupt"]


SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION")


def environment() -> dict:
    """The environment for the course's commands: this Python's tools first on the PATH."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def nbgrader(course: Path, *args: str) -> str:
    """Run an nbgrader command in ``course``; its combined output (a failure raises,
    except for autograde, which fails on purpose for a damaged submission)."""
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=course, env=environment(),
                          capture_output=True, text=True, timeout=7200)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and args[0] != "autograde":
        raise RuntimeError(f"nbgrader {' '.join(args)} failed:\n{output}")
    return output


def make_course(folder: Path, slugs: list[str], book_config: str | None = None) -> Path:
    """``folder/course``: a course directory with the repository's nbgrader_config.py and
    _config.yml (or ``book_config``: the released notebooks install from the repository it
    names) and the chapters' sources, released with ``nbgrader generate_assignment``."""
    course = folder / "course"
    course.mkdir(parents=True)
    shutil.copy(ROOT / "nbgrader_config.py", course)
    (course / "_config.yml").write_text(book_config or (ROOT / "_config.yml").read_text())
    for slug in slugs:
        shutil.copytree(ROOT / "solutions" / slug, course / "solutions" / slug)
        nbgrader(course, "generate_assignment", slug, "--force")
    return course


def answered(release, solution, stubs: int | None = None) -> nbformat.NotebookNode:
    """The release with every answer cell replaced by the model answer (markers removed),
    except the ``stubs``-th answer cell, left as released."""
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in solution.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    nb = nbformat.from_dict(release)
    cells = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") in answers]
    for i, cell in enumerate(cells):
        if i != stubs:
            lines = answers[cell.metadata["nbgrader"]["grade_id"]].splitlines()
            cell.source = "\n".join(line for line in lines if line.strip() not in SOLUTION_MARKERS)
    return nb


def _submission(kind: str, release, solution) -> str:
    """A notebook of the given kind, as JSON text."""
    if kind == "corrupt":
        return '{"cells": [ damaged'
    code = [c for c in solution.cells if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"]
    nb = release if kind == "blank" else answered(release, solution, len(code) // 2 if kind == "half" else None)
    if kind == "crashing":
        nb = nbformat.from_dict(nb)
        first = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code")
        first.source = "raise RuntimeError('a bug in the first answer')\n" + first.source
    return nbformat.writes(nb)


def build(folder: Path, chapters: list[str], students: int) -> Path:
    """A course directory with the chapters released and every student's submissions."""
    course = make_course(folder, chapters)
    for slug in chapters:
        release = nbformat.read(course / "exercises" / slug / f"{slug}.ipynb", as_version=4)
        solution = nbformat.read(course / "solutions" / slug / f"{slug}.ipynb", as_version=4)
        for i in range(students):
            target = course / "submitted" / f"s{i:03d}" / slug / f"{slug}.ipynb"
            target.parent.mkdir(parents=True)
            target.write_text(_submission(KINDS[i % len(KINDS)], release, solution))
    return course


def _scores(course: Path, chapters: list[str], students: int) -> dict:
    scores = {}
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        for slug in chapters:
            for i in range(students):
                try:
                    scores[slug, i] = gb.find_submission(slug, f"s{i:03d}").code_score
                except Exception:
                    scores[slug, i] = None
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=60)
    parser.add_argument("--chapters", nargs="+", default=["ch1_feature_scaling", "ch4_backprop", "ch5_inference"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    n = args.students * len(args.chapters)
    with tempfile.TemporaryDirectory() as tmp:
        plain = build(Path(tmp) / "plain", args.chapters, args.students)
        sandboxed = Path(tmp) / "sandboxed" / "course"
        shutil.copytree(plain, sandboxed)
        print(f"A class of {args.students} students x {len(args.chapters)} chapters = {n} notebooks "
              f"({', '.join(sorted(set(KINDS)))}), on {os.cpu_count()} CPU(s).")
        timings = {}
        started = time.perf_counter()
        for slug in args.chapters:
            nbgrader(plain, "autograde", slug, "--create")
        timings["nbgrader autograde (serial, no sandbox)"] = time.perf_counter() - started
        started = time.perf_counter()
        for slug in args.chapters:
            subprocess.run([sys.executable, "-m", "bncourse.cli", "--course", str(sandboxed), "autograde", slug,
                            "--workers", str(args.workers)], env=environment(), capture_output=True, timeout=7200)
        timings[f"bncourse autograde ({args.workers} workers, sandboxed)"] = time.perf_counter() - started
        for name, seconds in timings.items():
            print(f"  {name:45s} {seconds:8.1f} s   {seconds / n:6.2f} s per notebook")
        serial, ours = timings.values()
        print(f"  ratio: bncourse is {serial / ours:.2f}x faster")
        a, b = _scores(plain, args.chapters, args.students), _scores(sandboxed, args.chapters, args.students)
        differ = [k for k in a if (a[k] or 0) != (b[k] or 0)]
        print(f"  same score for every notebook: {not differ}" + (f" (differ: {differ[:5]})" if differ else ""))


if __name__ == "__main__":
    main()
