"""``bncourse watch SLUG``: grade each submission to nbgrader's exchange as it arrives.

Students hand in with nbgrader's own ``nbgrader submit``, which writes a folder
``<exchange>/<course>/inbound/<student>+<slug>+<timestamp>+<random>/`` holding the
notebook, ``timestamp.txt`` and ``submission_secret.txt``. Every few seconds the
watcher looks at the inbound folder and, for each student, takes the latest
submission (a resubmission replaces the earlier one):

1. imports it into ``submitted/<student>/<slug>/`` if it is not there yet - only
   regular files, read without following links (the inbound folder is writable by
   every student), and refused when the folder's owner is another user than the
   student it names;
2. grades what is new with the class grader (:func:`bncourse.autograde.autograde`,
   on the Dask cluster that stays warm between submissions): the ledger knows what
   was graded, by content, so nothing is graded twice;
3. writes that student's feedback (nbgrader's ``generate_feedback``) and releases it
   with nbgrader's own ``release_feedback``, so the student gets it with
   ``nbgrader fetch_feedback``; the ledger records the release;
4. brings the grade sheets and the misconception report up to date.

Everything the watcher decides comes from the exchange, ``submitted/`` and the
ledger, so stopping it (Ctrl-C, SIGTERM) at any moment and starting it again loses
nothing and repeats nothing that was recorded: a notebook graded but not yet
released is released, one cut off mid-grading is graded.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import time
from pathlib import Path

from nbgrader.utils import parse_utc

from bncourse.collect import STUDENT_ID, Refused, _read_regular, _too_big

FILES = ("timestamp.txt", "submission_secret.txt")  # what nbgrader needs beside the notebook, to release feedback
SECRET_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/")


def inbound(exchange: Path, course: str, slug: str, log) -> dict[str, Path]:
    """student -> their latest submission folder of ``slug`` in the exchange's inbound."""
    folder = exchange / course / "inbound"
    latest: dict[str, tuple] = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return {}
    for entry in entries:
        parts = entry.name.rsplit("+", 3)
        if len(parts) < 3 or parts[1] != slug or not entry.is_dir(follow_symlinks=False):
            continue
        student = parts[0]
        try:
            when = parse_utc(parts[2])
        except (ValueError, OverflowError):
            continue
        if not STUDENT_ID.fullmatch(student):
            log.warning("inbound %s: %r is not a valid student id; not imported", entry.name, student)
            continue
        if student not in latest or (when, entry.name) > latest[student][:2]:
            latest[student] = (when, entry.name, Path(entry.path))
    return {student: found[2] for student, found in latest.items()}


def _owner_ok(folder: Path, student: str) -> bool:
    """Whether ``folder`` may be ``student``'s: owned by that user, or by whoever runs the
    grader (an exchange where everyone is one user, as on a single-user hub)."""
    uid = os.lstat(folder).st_uid
    try:
        owner = pwd.getpwuid(uid).pw_name
    except KeyError:
        owner = None
    return uid == os.geteuid() or owner == student


def import_submission(root: Path, slug: str, student: str, source: Path, log) -> bool:
    """Copy a submission's notebook, timestamp and secret into ``submitted/`` if they are
    not there already; True if something changed."""
    if not _owner_ok(source, student):
        log.warning("inbound %s claims to be %s's but is owned by another user: not imported", source.name, student)
        return False
    wanted = {f"{slug}.ipynb": None, **{name: None for name in FILES}}
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in wanted:
            try:
                wanted[name] = _read_regular(name, fd)[0]
            except Refused as exc:
                if name == f"{slug}.ipynb":
                    log.warning("inbound %s: %s %s; not imported", source.name, name, exc)
                    return False
    finally:
        os.close(fd)
    problem = _too_big(wanted[f"{slug}.ipynb"]) or _bad_files(wanted)
    if problem:
        log.warning("inbound %s: %s; not imported", source.name, problem)
        return False
    target = root / "submitted" / student / slug
    files = {name: data for name, data in wanted.items() if data is not None}
    if target.is_dir() and {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == files:
        return False
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name, data in files.items():
        (target / name).write_bytes(data)
    return True


def _bad_files(files: dict) -> str | None:
    """What is wrong with a submission's timestamp or secret (they reach nbgrader's parsing)."""
    try:
        if files["timestamp.txt"] is not None:
            parse_utc(files["timestamp.txt"].decode().strip())
    except (ValueError, OverflowError, UnicodeDecodeError):
        return "timestamp.txt is not a time"
    secret = files["submission_secret.txt"]
    if secret is not None and (len(secret) > 200 or not set(secret.decode(errors="replace")) <= SECRET_CHARS):
        return "submission_secret.txt is not nbgrader's"
    return None


def release_feedback(config, slug: str, student: str) -> None:
    """nbgrader's release_feedback for one student (into the exchange)."""
    from nbgrader.auth import Authenticator
    from nbgrader.exchange import ExchangeFactory

    from bncourse.autograde import coursedir
    directory = coursedir(config, slug, student)
    exchange = ExchangeFactory(config=config)
    exchange.ReleaseFeedback(coursedir=directory, authenticator=Authenticator(config=config), config=config).start()


class Watcher:
    """One course's watch: a look at the exchange grades, releases and reports what is new."""

    def __init__(self, args: argparse.Namespace, config, cluster, log):
        from bncourse.autograde import ensure_assignment
        from bncourse.ledger import Ledger
        self.args, self.config, self.cluster, self.log = args, config, cluster, log
        self.root = args.course.resolve()
        if args.exchange:
            config.Exchange.root = str(Path(args.exchange).resolve())
        self.exchange = Path(config.Exchange.root if "root" in config.Exchange else "/usr/local/share/nbgrader/exchange")
        self.course_id = config.CourseDirectory.course_id
        ensure_assignment(config, args.slug, log)
        self.ledger = Ledger(_db_url(config))

    def look(self) -> int:
        """One look at the exchange; how many notebooks it graded."""
        from bncourse.autograde import autograde, save_results
        slug = self.args.slug
        latest = inbound(self.exchange, self.course_id, slug, self.log)
        for student, folder in sorted(latest.items()):
            if import_submission(self.root, slug, student, folder, self.log):
                self.log.info("imported %s from the exchange", folder.name)
        students = sorted(s for s in latest if (self.root / "submitted" / s / slug / f"{slug}.ipynb").is_file())
        statuses = autograde(self.config, slug, students, self.cluster, self.log) if students else {}
        fresh = {s: st for s, st in statuses.items() if not st.unchanged}
        if fresh:
            save_results(self.root, slug, fresh)
        released = self.release()
        for student, status in fresh.items():
            print(f"{time.strftime('%H:%M:%S')} {student}: " + ("graded" if status.graded else
                  f"NOT GRADED: {status.reason}") + ("; feedback released" if student in released else ""), flush=True)
        if fresh or released:
            self.report(statuses)
        return len(fresh)

    def release(self) -> set[str]:
        """Feedback for every graded submission whose feedback is not released yet."""
        from bncourse.cli import generate_feedback
        from bncourse.ledger import GRADED
        done = set()
        for student, entry in sorted(self.ledger.latest(self.args.slug).items()):
            if entry.status != GRADED or entry.released:
                continue
            result = generate_feedback(self.config, self.args.slug, [student], quiet=True)
            if not result["success"]:
                self.log.error("%s: feedback failed: %s", student, result.get("error", ""))
                continue
            release_feedback(self.config, self.args.slug, student)
            self.ledger.mark_released(entry)
            done.add(student)
        return done

    def report(self, statuses) -> None:
        """The grade sheets and the misconception report, brought up to date."""
        from bncourse.cli import cmd_export, cmd_report
        cmd_export(self.args, statuses)
        cmd_report(self.args)


def _db_url(config) -> str:
    from bncourse.autograde import coursedir
    return coursedir(config).db_url


def _stop(signum, frame):
    raise KeyboardInterrupt


def watch(args: argparse.Namespace, config, cluster, log) -> int:
    """Follow the exchange until Ctrl-C or SIGTERM (or one look, with ``--once``)."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        watcher = Watcher(args, config, cluster, log)
        print(f"Watching {watcher.exchange / watcher.course_id / 'inbound'} for {args.slug} "
              f"every {args.interval:g} s (Ctrl-C stops; nothing is lost).", flush=True)
        while True:
            watcher.look()
            if args.once:
                break
            time.sleep(args.interval)
    except KeyboardInterrupt:
        print("Stopped: what was graded is recorded; the next watch takes up the rest.", flush=True)
    finally:
        cluster.close()
    return 0

