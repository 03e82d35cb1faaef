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


def _env() -> dict:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def _run(args: list[str], cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=7200)


def _submission(kind: str, release, solution) -> str:
    """A notebook of the given kind, as JSON text."""
    nb = nbformat.from_dict(release)
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in solution.cells
               if c.metadata.get("nbgrader", {}).get("solution") and c.cell_type == "code"}
    answered = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") in answers]
    for i, cell in enumerate(answered):
        keep_stub = kind == "blank" or (kind == "half" and i == len(answered) // 2)
        if not keep_stub:
            lines = answers[cell.metadata["nbgrader"]["grade_id"]].splitlines()
            cell.source = "\n".join(line for line in lines if "### BEGIN SOLUTION" not in line
                                    and "### END SOLUTION" not in line)
        if kind == "crashing" and i == 0:
            cell.source = "raise RuntimeError('a bug in the first answer')\n" + cell.source
    return '{"cells": [ damaged' if kind == "corrupt" else nbformat.writes(nb)


def build(folder: Path, chapters: list[str], students: int) -> Path:
    """A course directory with the chapters released and every student's submissions."""
    course = folder / "course"
    course.mkdir(parents=True)
    shutil.copy(ROOT / "nbgrader_config.py", course)
    for slug in chapters:
        shutil.copytree(ROOT / "solutions" / slug, course / "solutions" / slug)
        _run([sys.executable, "-m", "nbgrader", "generate_assignment", slug, "--force"], course)
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
            _run([sys.executable, "-m", "nbgrader", "autograde", slug, "--create"], plain)
        timings["nbgrader autograde (serial, no sandbox)"] = time.perf_counter() - started
        started = time.perf_counter()
        for slug in args.chapters:
            _run([sys.executable, "-m", "bncourse.cli", "--course", str(sandboxed), "autograde", slug,
                  "--workers", str(args.workers)], sandboxed)
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
