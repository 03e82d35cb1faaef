"""``bncourse``: grade a class with one command (``bncourse grade``), or step by step.

    bncourse grade SLUG SUBMISSIONS [--roster roster.csv] [--db URL] ...
    bncourse collect SLUG SUBMISSIONS      import a folder or an LMS zip into submitted/
    bncourse autograde SLUG [--student ID] autograde what is in submitted/ (sandboxed)
    bncourse watch SLUG                    grade each submission to nbgrader's exchange as it
                                           arrives, release its feedback
    bncourse feedback SLUG                 feedback HTML (hidden tests removed)
    bncourse export SLUG                   grades.csv and grades_canvas.csv
    bncourse report SLUG                   the misconception report (CSV and HTML)
    bncourse isolation                     what isolation this machine gives

Run from the course directory (or pass --course). Grading runs on a local Dask
cluster (a worker per core), or on an existing one with --scheduler tcp://HOST:PORT.
A submission graded before and unchanged is not graded again (--regrade does).
Exit status: 0 when everything was imported and graded, 1 when a submission could
not be graded, 2 when files of the import were dropped, 3 when grading was refused
(no isolation, bad input, no cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from bncourse.sandbox import IsolationUnavailable, Limits, probe

log = logging.getLogger("bncourse")


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bncourse", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--course", type=Path, default=Path.cwd(), help="the course directory (default: here)")
    parser.add_argument("--db", help="gradebook URL (nbgrader's db_url), e.g. postgresql://user@host/db; "
                                     "default: the course's SQLite gradebook.db")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, slug=True, submissions=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if slug:
            p.add_argument("slug", help="the assignment, e.g. ch4_backprop")
        if submissions:
            p.add_argument("submissions", type=Path, help="a folder (nbgrader layout, or an extracted LMS download) "
                                                          "or the zip your LMS exported")
        return p

    grade = add("grade", "import, autograde (sandboxed), feedback, grade sheets and misconception report",
                submissions=True)
    collect = add("collect", "import a folder or an LMS zip into submitted/", submissions=True)
    for p in (grade, collect):
        p.add_argument("--roster", type=Path, help="CSV with student_id (and lms_id, name, first_name, last_name, "
                                                   "email, sis_id, login_id, section)")
        p.add_argument("--lms", choices=["auto", "canvas", "moodle"], default="auto",
                       help="how the LMS names files (default: recognise Canvas and Moodle)")
    autograde = add("autograde", "autograde the submissions in submitted/, sandboxed")
    watch = add("watch", "follow nbgrader's exchange: grade each new submission as it arrives, release its "
                         "feedback (nbgrader release_feedback), keep the report current; Ctrl-C stops")
    watch.add_argument("--interval", type=float, default=5.0, help="seconds between looks at the exchange")
    watch.add_argument("--exchange", help="nbgrader's exchange folder (default: the course's Exchange.root)")
    watch.add_argument("--once", action="store_true", help="grade what has arrived, then stop")
    for p in (grade, autograde, watch):
        if p is not watch:
            p.add_argument("--student", action="append", help="only this student (repeat for several)")
            p.add_argument("--regrade", action="store_true",
                           help="grade again submissions already graded and unchanged since")
        p.add_argument("--scheduler", help="grade on the Dask cluster whose scheduler is at this address "
                                           "(tcp://HOST:PORT); default: a local cluster on this machine")
        p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="notebooks graded side by side on the local cluster (default: one per core)")
        p.add_argument("--cell-timeout", type=float, default=Limits.cell_timeout, help="seconds per cell")
        p.add_argument("--notebook-timeout", type=float, default=Limits.notebook_timeout, help="seconds per notebook")
        p.add_argument("--memory", type=_size, default=Limits.memory, help="memory per notebook (default 2G)")
        p.add_argument("--cpu-time", type=int, default=Limits.cpu, help="CPU seconds per notebook")
        p.add_argument("--processes", type=int, default=Limits.processes, help="processes per notebook")
        p.add_argument("--without-isolation", action="store_true",
                       help="grade even where no sandbox is available: submissions then run with YOUR rights")
    add("feedback", "write feedback HTML for every graded student")
    export = add("export", "write grades.csv and grades_canvas.csv")
    for p in (grade, export, watch):
        p.add_argument("--canvas-column", help="the assignment's column in Canvas, e.g. 'Chapter 4 (1234)'")
    for p in (export, watch):
        p.add_argument("--roster", type=Path)
    add("report", "write the misconception report")
    add("isolation", "say what isolation this machine gives a submission", slug=False)
    return parser


def _setup_logging(folder: Path) -> Path:
    """nbgrader's detailed log goes to a file; warnings and errors of our own to the terminal."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "grading.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("traitlets", "bncourse", "py.warnings", "distributed"):
        logger = logging.getLogger(name)
        # Dask changes the level of its loggers' stream handlers: "distributed" gets one of its own
        logger.handlers[:] = [handler if name != "distributed" else logging.FileHandler(path)]
        logger.handlers[0].setFormatter(handler.formatter)
        logger.setLevel(logging.WARNING if name == "distributed" else logging.INFO)
        logger.propagate = False
    logging.captureWarnings(True)  # SQLAlchemy's warnings from inside nbgrader belong in the log, not the terminal
    return path


def _limits(args) -> Limits:
    return Limits(cell_timeout=args.cell_timeout, notebook_timeout=args.notebook_timeout, memory=args.memory,
                  cpu=args.cpu_time, processes=args.processes)


def _isolation(args) -> bool:
    """Print what isolation is in force; refuse without it unless asked."""
    try:
        print(f"Isolation: {probe()}")
        return True
    except IsolationUnavailable as exc:
        if not args.without_isolation:
            print(f"Refusing to grade: {exc}\nWithout a sandbox a submission runs with your rights and can read "
                  f"the solutions, change the gradebook and other students' files. Install bubblewrap, or pass "
                  f"--without-isolation to grade anyway.", file=sys.stderr)
            raise SystemExit(3)
        print(f"WARNING: NO ISOLATION ({exc}). Submissions run with your rights.", file=sys.stderr)
        return False


def _config(args):
    from bncourse.autograde import course_config
    return course_config(args.course.resolve(), args.db)


def cmd_collect(args):
    from bncourse.collect import CollectError, Roster, collect
    try:
        roster = Roster.load(args.roster) if args.roster else None
        report = collect(args.course.resolve(), args.slug, args.submissions, roster, args.lms)
    except CollectError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(3)
    print(report.text())
    folder = args.course / "reports" / args.slug
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "import.txt").write_text(report.text() + "\n")
    (folder / "late.json").write_text(json.dumps(sorted(report.late)))
    return report


def _cluster(args, isolation: bool, students: int | None = None):
    """The Dask cluster that grades, starting in the background (see bncourse.cluster)."""
    from bncourse.cluster import Cluster
    workers = max(1, min(args.workers, students or args.workers))
    return Cluster(workers, _limits(args), isolation, args.scheduler).start()


def _bar(total: int, desc: str):
    """A progress bar on stderr: count, rate and time left."""
    from tqdm import tqdm
    return tqdm(total=total, unit="notebook", desc=desc, file=sys.stderr, smoothing=0.1)


def cmd_autograde(args, isolation: bool | None = None, cluster=None, on_graded=lambda student: None):
    from bncourse.autograde import autograde, save_results, submitted_students
    from bncourse.cluster import ClusterUnavailable

    isolation = _isolation(args) if isolation is None else isolation
    config = _config(args)
    students = args.student or submitted_students(config, args.slug)
    if not students:
        print(f"Nothing to grade: no folder submitted/<student>/{args.slug}/. Import first "
              f"(bncourse collect {args.slug} <zip or folder>).", file=sys.stderr)
        raise SystemExit(3)
    started = time.monotonic()
    own = cluster is None
    cluster = cluster or _cluster(args, isolation, len(students))
    bar, failed = None, []

    def planned(count):
        nonlocal bar
        bar = _bar(count, f"grading {args.slug}")

    def progress(student, status):
        if not status.graded:
            failed.append(student)
        else:
            on_graded(student)
        bar.set_postfix(graded=bar.n + 1 - len(failed), not_graded=len(failed))
        bar.update(1)

    try:
        statuses = autograde(config, args.slug, students, cluster, log, progress, args.regrade, planned)
        where = cluster.describe() if any(not s.unchanged for s in statuses.values()) else ""
    except ClusterUnavailable as exc:
        print(f"{exc}\nStart the scheduler and workers first (book/instructors.md, \"Grading on a cluster\"), "
              f"or leave out --scheduler to grade on this machine.", file=sys.stderr)
        raise SystemExit(3)
    finally:
        if bar is not None:
            bar.close()
        if own:
            cluster.close()
    save_results(args.course.resolve(), args.slug, statuses)
    seconds = time.monotonic() - started
    fresh = [s for s in statuses.values() if not s.unchanged]
    graded = [s for s in fresh if s.graded]
    print(f"Graded {len(graded)} of {len(fresh)} notebooks in {seconds:.1f} s "
          f"({seconds / max(len(fresh), 1):.2f} s per notebook" + (f", {where}" if where else "") + ")."
          + (f" {len(statuses) - len(fresh)} unchanged since they were graded: left as they were (--regrade "
             f"grades them again)." if len(fresh) < len(statuses) else ""))
    for status in statuses.values():
        if not status.graded:
            print(f"  NOT GRADED {status.student}: {status.reason}" + (" (unchanged)" if status.unchanged else ""))
        elif status.reason and not status.unchanged:
            print(f"  {status.student}: {status.reason}")
    warned = {s.student: s.warnings for s in fresh if s.warnings}
    if warned:
        print("nbgrader's warnings (a grade cell edited, its points changed...; all in grading.log):")
        for student, warnings in warned.items():
            print(f"  {student}: {warnings[0][:160]}" + (f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""))
    return statuses


def generate_feedback(config, slug: str, only: list[str] | None = None, quiet: bool = False) -> dict:
    """nbgrader's generate_feedback for every graded student (or ``only`` those), with a
    progress bar; nbgrader's result dict."""
    from nbgrader.converters import GenerateFeedback
    from nbgrader.utils import capture_log

    from bncourse.autograde import coursedir
    directory = coursedir(config, slug)
    graded = sorted(p.parts[-3] for p in Path(directory.root, directory.autograded_directory).glob(f"*/{slug}/*.ipynb"))
    if only is not None:
        directory.student_id_exclude = ",".join(s for s in graded if s not in set(only))
    total = len(graded if only is None else set(only) & set(graded))
    bar = _bar(total, f"feedback {slug}") if total > 1 and not quiet else None

    class Feedback(GenerateFeedback):
        def convert_single_notebook(self, notebook_filename):
            super().convert_single_notebook(notebook_filename)
            if bar is not None:
                bar.update(1)

    app = Feedback(coursedir=directory, config=config)
    app.force = True
    try:
        return capture_log(app)
    finally:
        if bar is not None:
            bar.close()


def cmd_feedback(args, statuses=None, done=()):
    """Feedback for every graded student; after grading, for those graded in this run only
    (but ``done``, whose feedback was written as their grade came in)."""
    config = _config(args)
    only = None if statuses is None else sorted(s.student for s in statuses.values()
                                                if not s.unchanged and s.student not in set(done))
    result = generate_feedback(config, args.slug, only) if only != [] else {"success": True}
    folder = args.course / "feedback"
    count = len(list(folder.glob(f"*/{args.slug}/*.html")))
    new = None if only is None else sum((folder / s / args.slug / f"{args.slug}.html").is_file() for s in [*only, *done])
    print(f"Feedback: {count} file(s) in {folder}/<student>/{args.slug}/" +
          (f" ({new} new)" if new is not None else "") +
          ("" if result["success"] else " (some failed: see reports/<slug>/grading.log)"))


def cmd_export(args, statuses=None):
    from bncourse.autograde import coursedir
    from bncourse.collect import Roster
    from bncourse.export import grade_rows, write_canvas, write_grades
    config = _config(args)
    roster = Roster.load(args.roster) if getattr(args, "roster", None) else None
    folder = args.course / "reports" / args.slug
    late_file = folder / "late.json"
    late = set(json.loads(late_file.read_text())) if late_file.is_file() else set()
    rows = grade_rows(coursedir(config, args.slug).db_url, args.slug, roster, late, statuses)
    grades = write_grades(rows, folder / "grades.csv")
    canvas = write_canvas(rows, roster, args.canvas_column or args.slug, folder / "grades_canvas.csv")
    pending = sum(1 for r in rows if r.get("pending_manual_points"))
    print(f"Grade sheets: {grades} and {canvas} (Canvas import)"
          + (f"; {pending} student(s) have written answers pending manual grading "
             f"(left blank in the Canvas sheet)" if pending else ""))


def cmd_report(args):
    from bncourse.autograde import load_results
    from bncourse.judge import task_names
    from bncourse.report import summary_lines, write_report
    root = args.course.resolve()
    tasks = task_names(root / "solutions" / args.slug / f"{args.slug}.ipynb")
    csv_path, html_path, table = write_report(load_results(root, args.slug), tasks, args.slug,
                                              root / "reports" / args.slug)
    print(f"Misconception report: {html_path} (and {csv_path.name})")
    for line in summary_lines(table):
        print(f"  {line}")


def cmd_grade(args):
    started = time.monotonic()
    isolation = _isolation(args)
    cluster = _cluster(args, isolation)  # workers and sandboxes warm up while the submissions are imported
    phases, fed, config = {}, [], _config(args)

    def feedback(student):  # while the workers grade the others
        if generate_feedback(config, args.slug, [student], quiet=True)["success"]:
            fed.append(student)

    try:
        report = cmd_collect(args)
        phases["import"] = time.monotonic()
        args.student = args.student or sorted(report.imported)
        statuses = cmd_autograde(args, isolation, cluster, feedback) if args.student else {}
        phases["grading and feedback"] = time.monotonic()
    finally:
        closing = threading.Thread(target=cluster.close)  # while the sheets and report are written
        closing.start()
    cmd_feedback(args, statuses, fed)
    phases["feedback"] = time.monotonic()
    cmd_export(args, statuses)
    cmd_report(args)
    phases["sheets and report"] = time.monotonic()
    closing.join()
    marks = [started, *phases.values()]
    print(f"Done in {time.monotonic() - started:.1f} s ("
          + ", ".join(f"{name} {b - a:.1f} s" for name, a, b in zip(phases, marks, marks[1:]))
          + f"). Detailed log: {args.course / 'reports' / args.slug / 'grading.log'}"
          f"; timings: {args.course / 'reports' / args.slug / 'timings.csv'}")
    if report.dropped:
        return 2
    return 1 if any(not s.graded for s in statuses.values()) else 0


def cmd_watch(args):
    from bncourse.watch import watch
    isolation = _isolation(args)
    return watch(args, _config(args), _cluster(args, isolation), log)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "isolation":
        try:
            print(probe())
            return 0
        except IsolationUnavailable as exc:
            print(f"No isolation: {exc}", file=sys.stderr)
            return 3
    if not (args.course / "nbgrader_config.py").is_file():
        print(f"{args.course.resolve()} is not a course directory (no nbgrader_config.py): run from the course "
              f"directory or pass --course.", file=sys.stderr)
        return 3
    _setup_logging(args.course / "reports" / args.slug)
    if args.command == "grade":
        return cmd_grade(args)
    if args.command == "autograde":
        statuses = cmd_autograde(args)
        return 1 if any(not s.graded for s in statuses.values()) else 0
    if args.command == "collect":
        return 2 if cmd_collect(args).dropped else 0
    if args.command == "watch":
        return cmd_watch(args)
    {"feedback": cmd_feedback, "export": cmd_export, "report": cmd_report}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
