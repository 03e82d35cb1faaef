"""How ``bncourse`` scales against serial ``nbgrader autograde``, measured side by side.

    python -m bncourse.benchmark [--students 60] [--chapters ch1_feature_scaling ch4_backprop ch5_inference]
                                 [--workers 1 2 4] [--class-size 12] [--class-chapter ch4_backprop] [--json FILE]

Builds a synthetic class in a temporary course directory - per chapter and student
a correct, a half-done (one answer still the stub), a blank, a crashing (one answer
raises) or a corrupt notebook - and grades identical copies of it, in the same run:

1. **scaling**: serial ``nbgrader autograde`` (a kernel per notebook, one at a time,
   no sandbox), then ``bncourse autograde`` on a local Dask cluster of 1, 2 and 4
   workers, and on a cluster reached over TCP (a ``dask scheduler`` and two ``dask
   worker`` processes started here, ``--scheduler``). For each: wall time (run it on a
   machine doing nothing else: the CPU time of the sandboxes' processes does not all
   reach this process's accounting, so CPU time is not compared), seconds per notebook,
   the ratio to serial nbgrader,
   throughput per worker, and the **overhead per notebook**: worker time per notebook
   beyond the notebook's own compute, which is measured by running the same
   notebooks' cells and checks in one warm process;
2. **a small class end to end**: ``bncourse grade`` (import, grading, feedback, grade
   sheets, report) against ``nbgrader autograde`` alone, on ``--class-size``
   students of ``--class-chapter``, with ``bncourse``'s own phase times.

It also measures every chapter's own compute per notebook (a model answer, in one warm
process), from which the instructors' page plans a large section, and says whether every
notebook got the same score from both graders. ``--json`` writes all of it to a file
(``make bench``: ``book/_data/grading_benchmark.json``, which the page reads). Timings
are measured, never asserted: machines are noisy.
"""

from __future__ import annotations

import argparse
import json
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


class Measured:
    """Wall seconds of the ``with`` block."""

    def __enter__(self):
        self.wall = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.wall


def bncourse(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``bncourse --course course ...``; its output."""
    return subprocess.run([sys.executable, "-m", "bncourse.cli", "--course", str(course), *args], env=environment(),
                          capture_output=True, text=True, timeout=7200)


def warm_compute(course: Path, chapters: list[str], students: int) -> tuple[float, float]:
    """(wall, CPU) seconds per notebook of the notebooks' own work - every code cell, the
    grade cells with the grader's checks (visible and hidden cases), the figures drawn - run
    in this one warm process on one thread (as in a sandbox), each kind of notebook once and
    weighted as the class has it. Each kind runs once untimed first: what a worker does once
    per chapter (imports, the reference's and the catalogue's answers to every case) is not a
    notebook's."""
    from bncourse.judge import Release

    kinds = [KINDS[i % len(KINDS)] for i in range(students)]
    wall = cpu = 0.0
    for slug in chapters:
        solution = nbformat.read(course / "solutions" / slug / f"{slug}.ipynb", as_version=4)
        release = nbformat.read(course / "exercises" / slug / f"{slug}.ipynb", as_version=4)
        record = Release.from_notebook(solution)
        notebooks = {kind: _submission(kind, release, solution) for kind in sorted(set(kinds) - {"corrupt"})}
        for text in notebooks.values():  # the corrupt kind is not a notebook: no compute at all
            _run_notebook(nbformat.reads(text, as_version=4), record)
        for kind, text in notebooks.items():
            spent = _run_notebook(nbformat.reads(text, as_version=4), record)
            wall += kinds.count(kind) * spent[0]
            cpu += kinds.count(kind) * spent[1]
    n = students * len(chapters)
    return wall / n, cpu / n


def _run_notebook(nb: nbformat.NotebookNode, record) -> tuple[float, float]:
    """(wall, CPU) seconds of running ``nb``'s code cells here, its grade cells restored
    from ``record`` (hidden tests included, as nbgrader does) and run with the grader's checks."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    from IPython.core.inputtransformer2 import TransformerManager

    from bn_exercises.execution import one_thread
    from bn_reference.grading import use_secret

    checks = record.checks()
    started, cpu_started = time.perf_counter(), time.process_time()
    names: dict = {}
    with use_secret("the benchmark's secret"), warnings.catch_warnings(), one_thread(), \
            tempfile.TemporaryDirectory() as scratch, _quiet():
        warnings.simplefilter("ignore")
        here = os.getcwd()
        os.chdir(scratch)
        try:
            for cell in nb.cells:
                if cell.cell_type != "code":
                    continue
                grade_id = (cell.metadata.get("nbgrader") or {}).get("grade_id")
                if grade_id in record.grade_cells:
                    cell.source = record.grade_cells[grade_id]
                    names.update(checks)
                try:
                    exec(TransformerManager().transform_cell(cell.source), names)
                except BaseException:
                    pass
                _render_figures()
        finally:
            os.chdir(here)
    return time.perf_counter() - started, time.process_time() - cpu_started


def _render_figures() -> None:
    """Draw the cell's open figures to PNG and close them, as Jupyter's inline backend does
    after every cell (the notebook's own work, in nbgrader and in the sandbox alike)."""
    import io

    import matplotlib.pyplot as plt
    for number in plt.get_fignums():
        plt.figure(number).savefig(io.BytesIO(), format="png", bbox_inches="tight")
    plt.close("all")


class _quiet:
    """stdout and stderr of the notebooks' cells, discarded."""

    def __enter__(self):
        import contextlib
        import io
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self.stack.enter_context(contextlib.redirect_stderr(io.StringIO()))

    def __exit__(self, *exc):
        self.stack.close()


class TcpCluster:
    """A ``dask scheduler`` and ``workers`` ``dask worker`` processes (one thread each) on
    127.0.0.1, as an instructor starts them by hand."""

    def __init__(self, workers: int):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address, self.count = f"tcp://127.0.0.1:{self.port}", workers

    def __enter__(self):
        dask = [sys.executable, "-m", "dask"]
        quiet = dict(env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.processes = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                            "--no-dashboard"], **quiet)]
        self.processes += [subprocess.Popen([*dask, "worker", self.address, "--nthreads", "1", "--no-dashboard"],
                                            **quiet) for _ in range(self.count)]
        from distributed import Client
        for _ in range(300):
            try:
                with Client(self.address, timeout=5) as client:
                    if len(client.scheduler_info()["workers"]) == self.count:
                        return self
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError("the Dask workers did not start")

    def __exit__(self, *exc):
        for proc in reversed(self.processes):
            proc.terminate()
            proc.wait(60)


def _row(name: str, m: Measured, n: int, serial: Measured | None = None, workers: int = 0,
         compute: tuple[float, float] | None = None) -> str:
    cells = [f"{name:42s}", f"{m.wall:8.1f}", f"{m.wall / n:6.2f}"]
    if serial is not None:
        cells += [f"{serial.wall / m.wall:6.2f}x"]
    if workers:
        cells += [f"{n / m.wall / workers:6.3f}"]
        if compute is not None:
            cells += [f"{m.wall * workers / n - compute[0]:6.2f}"]
    return " | ".join(cells)


def scaling(tmp: Path, chapters: list[str], students: int, worker_counts: list[int]) -> dict:
    """The scaling table (see the module's docstring)."""
    n = students * len(chapters)
    plain = build(tmp / "plain", chapters, students)
    compute = warm_compute(plain, chapters, students)
    print(f"\nScaling: {students} students x {len(chapters)} chapters = {n} notebooks "
          f"({', '.join(sorted(set(KINDS)))}), on {os.cpu_count()} CPU(s).")
    print(f"The notebooks' own compute, in one warm process: {compute[0]:.2f} s wall, {compute[1]:.2f} s CPU per "
          f"notebook.")
    print(" | ".join(["run".ljust(42), "wall s".rjust(8), "s/nb", "x serial", "nb/s/worker", "overhead/nb"]))
    runs = [(f"bncourse autograde, {w} worker(s)", w, None) for w in worker_counts] + \
           [("bncourse autograde, 2 workers over TCP", 2, "tcp")]
    copies = [shutil.copytree(plain, tmp / f"run{i}" / "course") for i in range(len(runs))]  # nothing graded yet
    with Measured() as serial:
        for slug in chapters:
            nbgrader(plain, "autograde", slug, "--create")
    print(_row("nbgrader autograde (serial, no sandbox)", serial, n))
    reference = _scores(plain, chapters, students)
    results = {"notebooks": n, "students": students, "chapters": chapters, "cpus": os.cpu_count(),
               "compute_wall": compute[0], "compute_cpu": compute[1],
               "serial_nbgrader": {"wall": serial.wall}, "runs": []}
    for (name, workers, tcp), course in zip(runs, copies):
        with Measured() as m:
            if tcp:
                with TcpCluster(workers) as cluster:
                    for slug in chapters:
                        bncourse(course, "autograde", slug, "--scheduler", cluster.address)
            else:
                for slug in chapters:
                    bncourse(course, "autograde", slug, "--workers", str(workers))
        print(_row(name, m, n, serial, workers, compute))
        differ = [k for k, v in _scores(course, chapters, students).items() if (v or 0) != (reference[k] or 0)]
        if differ:
            print(f"  SCORES DIFFER from nbgrader's for {len(differ)} notebook(s): {differ[:5]}")
        client = client_seconds(course, chapters)
        print(f"  the client's own time per notebook (nbgrader's recording into the gradebook): {client:.2f} s")
        results["runs"].append({"name": name, "workers": workers, "tcp": bool(tcp), "wall": m.wall,
                                "overhead_wall": m.wall * workers / n - compute[0], "client_seconds": client,
                                "same_scores": not differ})
    print("(overhead/nb: worker time per notebook beyond the notebook's own compute: "
          "wall x workers / notebooks - compute)")
    return results


def client_seconds(course: Path, chapters: list[str]) -> float:
    """Mean seconds the ``bncourse`` client spent on each graded notebook after its worker
    finished it (nbgrader's autograde pass that writes the gradebook, the ledger, the
    timings): it records one notebook at a time, so this bounds a class's rate whatever the
    number of workers. From ``timings.csv``: each notebook's recording starts when its
    result is in and the previous recording is done."""
    from datetime import datetime

    from bncourse import timings

    def at(stamp: str) -> float:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()

    spans = []
    for slug in chapters:
        rows = [r for r in timings.read(course / "reports" / slug / "timings.csv") if r["finished"]]
        rows.sort(key=lambda r: r["recorded"])
        previous = 0.0
        for r in rows:
            spans.append(at(r["recorded"]) - max(at(r["finished"]), previous))
            previous = at(r["recorded"])
    return sum(spans) / len(spans)


def chapter_compute(folder: Path) -> dict[str, dict[str, float]]:
    """Every chapter's own compute per notebook, a model answer's (the costliest kind: every
    cell and check runs), in one warm process: what the plan for a large section scales."""
    slugs = sorted(p.name for p in (ROOT / "solutions").iterdir() if p.is_dir())
    course = make_course(folder, slugs)
    out = {}
    for slug in slugs:
        wall, cpu = warm_compute(course, [slug], 1)  # student 0 hands in a model answer
        out[slug] = {"wall": wall, "cpu": cpu}
        print(f"{slug}: a model answer's own compute {wall:.2f} s wall, {cpu:.2f} s CPU")
    return out


def small_class(tmp: Path, slug: str, students: int) -> dict:
    """``bncourse grade`` end to end against ``nbgrader autograde`` alone, ``students`` of ``slug``."""
    plain = build(tmp / "small", [slug], students)
    incoming = tmp / "small_incoming"
    shutil.copytree(plain / "submitted", incoming)
    ours = tmp / "small_ours" / "course"
    shutil.copytree(plain, ours, ignore=shutil.ignore_patterns("submitted"))
    with Measured() as alone:
        nbgrader(plain, "autograde", slug, "--create")
    with Measured() as whole:
        proc = bncourse(ours, "grade", slug, str(incoming))
    print(f"\nA class of {students} ({slug}) end to end: bncourse grade (import, grading, feedback, sheets, report) "
          f"{whole.wall:.1f} s; nbgrader autograde alone {alone.wall:.1f} s: bncourse is "
          f"{alone.wall / whole.wall:.2f}x as fast.")
    phases = [line.split(". Detailed log")[0] for line in proc.stdout.splitlines() if line.startswith("Done in")]
    print("  " + (phases[0] if phases else proc.stdout[-2000:] + proc.stderr[-2000:]))
    a, b = _scores(plain, [slug], students), _scores(ours, [slug], students)
    differ = {k[1]: (a[k], b[k]) for k in a if (a[k] or 0) != (b[k] or 0)}
    print(f"  same score for every notebook: {not differ}" + (f" (nbgrader, bncourse: {differ})" if differ else ""))
    return {"students": students, "chapter": slug, "bncourse": {"wall": whole.wall},
            "nbgrader": {"wall": alone.wall}, "phases": phases[0] if phases else "",
            "same_scores": not differ}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=60)
    parser.add_argument("--chapters", nargs="+", default=["ch1_feature_scaling", "ch4_backprop", "ch5_inference"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--class-size", type=int, default=12)
    parser.add_argument("--class-chapter", default="ch4_backprop", help="the small class's chapter")
    parser.add_argument("--skip-scaling", action="store_true", help="only the small class end to end")
    parser.add_argument("--json", type=Path, help="also write the measurements here (book/_data/grading_benchmark.json "
                                                  "feeds the instructors' page and its plan for a large section)")
    args = parser.parse_args(argv)
    measured = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        measured["chapter_compute"] = chapter_compute(Path(tmp) / "chapters")
        measured["small_class"] = small_class(Path(tmp), args.class_chapter, args.class_size)
        if not args.skip_scaling:
            measured["scaling"] = scaling(Path(tmp), args.chapters, args.students, args.workers)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(measured, indent=1) + "\n")


if __name__ == "__main__":
    main()
