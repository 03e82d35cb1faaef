"""Grading one notebook: its cells run in the sandbox, its checks run here.

:func:`grade_notebook` takes a submission already sanitized by nbgrader (grade
cells and locked cells restored from the gradebook, deleted grade cells put
back) and walks its code cells in order:

- an ordinary cell (the learner's solutions, the notebook's own code) runs in
  the sandboxed kernel, with a wall-clock limit;
- a grade cell never runs there. Its source, the course's, runs *here*, in the
  grader's process, where the checks, the reference and the catalogue are, with
  every name that is not a check standing for the learner's object of that name in
  the sandbox (:class:`RemoteObject`). Whenever a check needs the learner's code it
  ships its ``run`` function and the case there, and gets plain data back
  (:mod:`bncourse.protocol`), which it compares here.

So nothing the notebook does to itself - patching the grading code, numpy or
torch, redefining the check names, writing to stderr - changes what a check
decides, and the grade cell's outputs (what nbgrader scores) are written here from
the check's own verdict. Code that copies the course's reference is found both in
the sandbox (by the fingerprints of the code that runs) and here, in the
submission's source.
"""

from __future__ import annotations

import ast
import base64
import builtins
import contextlib
import functools
import importlib
import inspect
import io
import pkgutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import nbformat

import bn_exercises
import bn_reference
from bn_exercises.checking import (ALSO, ANSWERS_MISSING, INPUT_CHANGED, INSTRUMENTATION_OFF, NOT_IMPLEMENTED,
                                   REFERENCE_USED, CheckFailed)
from bn_exercises.execution import Forbidden, LearnerError, Outcome, call_student, fingerprint, use_executor
from bncourse.sandbox import Limits, Sandbox, SessionDied

# Course code travels by value: the sandbox has no bn_reference, and the notebook may have
# patched its own copy of bn_exercises (the checks' code it runs must be the grader's).
cloudpickle.register_pickle_by_value(bn_reference)
cloudpickle.register_pickle_by_value(bn_exercises)

_TEXT_LIMIT = 20_000
_CELL_OUTPUTS = 2_000_000  # bytes of one cell's outputs the grader keeps (whatever the sandbox sends)
_MAX_OUTPUTS = 200         # outputs of one cell the grader looks at
_GRACE = 5.0  # seconds a cell gets to stop after it is interrupted


@dataclass
class TaskResult:
    """The verdict of one grade cell."""

    grade_id: str
    task: str                       # what the cell checks (the check's name without check_)
    status: str                     # "passed", "failed" or "not graded"
    misconception: str | None = None
    message: str = ""


@dataclass
class NotebookResult:
    """What grading one notebook produced: outputs by cell index, and the verdicts."""

    outputs: dict[int, list] = field(default_factory=dict)
    execution_counts: dict[int, int] = field(default_factory=dict)
    graded: list[int] = field(default_factory=list)  # the cells run as the course's grade cells, here
    tasks: list[TaskResult] = field(default_factory=list)
    stopped: str | None = None      # why cells were left unrun, if they were
    failed: bool = False            # the grader itself failed: this notebook is not graded
    seconds: float = 0.0
    digest: str = ""                # of the code cells' sources, to match nbgrader's own sanitizing

    def to_dict(self) -> dict:
        return asdict(self)


def code_digest(nb: nbformat.NotebookNode) -> str:
    """A digest of a notebook's code cells (index and source)."""
    import hashlib
    text = "\x00".join(f"{i}:{c.source}" for i, c in enumerate(nb.cells) if c.cell_type == "code")
    return hashlib.sha256(text.encode()).hexdigest()


def _grade_id(cell) -> str | None:
    nbg = cell.metadata.get("nbgrader")
    grade_id = nbg.get("grade_id") if isinstance(nbg, dict) else None
    return grade_id if isinstance(grade_id, str) else None


@dataclass(frozen=True)
class Release:
    """The gradebook's own record of an assignment notebook - what a submission cannot
    change: its code grade cells (id -> source) and the sources of its locked cells
    (whose imports name the checks). Whether a cell of a submission runs on the
    grader's side is decided from this record, never from the submission's metadata."""

    grade_cells: dict[str, str]
    locked_sources: tuple[str, ...]

    @classmethod
    def from_gradebook(cls, db_url: str, assignment: str, notebook: str) -> "Release":
        from nbgrader.api import Gradebook
        with Gradebook(db_url) as gb:
            nb = gb.find_notebook(notebook, assignment)
            solutions = {c.name for c in nb.solution_cells}
            codes = {c.name for c in nb.grade_cells if c.cell_type == "code"} - solutions
            sources = {c.name: c for c in nb.source_cells}
            return cls({name: sources[name].source for name in codes if name in sources},
                       tuple(c.source for c in nb.source_cells if c.locked and c.cell_type == "code"))

    @classmethod
    def from_notebook(cls, nb: nbformat.NotebookNode) -> "Release":
        """The record of a course notebook of our own (the source in ``solutions/``)."""
        def flags(cell):
            nbg = cell.metadata.get("nbgrader", {})
            return nbg.get("grade", False), nbg.get("solution", False), nbg.get("locked", False)
        code = [c for c in nb.cells if c.cell_type == "code"]
        return cls({_grade_id(c): c.source for c in code if flags(c)[0] and not flags(c)[1]},
                   tuple(c.source for c in code if flags(c)[2] or (flags(c)[0] and not flags(c)[1])))

    def is_grade_cell(self, cell) -> bool:
        """Whether ``cell`` is one of the course's grade cells, as the gradebook records it."""
        grade_id = _grade_id(cell)
        return cell.cell_type == "code" and grade_id in self.grade_cells and cell.source == self.grade_cells[grade_id]

    def checks(self) -> dict[str, Any]:
        """The checks the locked cells import, as the grader's: a name imported from the
        learner package's ``bn_exercises.<topic>`` stands for the live check of the same
        name in ``bn_reference.grading.<topic>`` (visible and hidden cases, against the
        reference)."""
        names = {}
        grade_sources = set(self.grade_cells.values())
        for source in self.locked_sources:
            if source in grade_sources:
                continue
            try:
                tree = ast.parse(_python_source(source))
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
                if module.startswith(("bn_exercises.", "bn_reference.grading.")):
                    grader = importlib.import_module(f"bn_reference.grading.{module.rpartition('.')[2]}")
                    for alias in node.names:
                        if alias.name.startswith("check_"):
                            names[alias.asname or alias.name] = getattr(grader, alias.name)
        return names

    def known_misconceptions(self) -> set[str]:
        """Every misconception name the notebook's checks can report: the core's, the
        catalogues', and the names a grading or learner module defines as upper-case string
        constants (a ``run`` raises CheckFailed with those)."""
        names = {REFERENCE_USED, INPUT_CHANGED, INSTRUMENTATION_OFF, NOT_IMPLEMENTED, ANSWERS_MISSING}
        for grader in {importlib.import_module(f.__module__) for f in self.checks().values()}:
            learner = importlib.import_module(f"bn_exercises.{grader.__name__.rpartition('.')[2]}")
            for entries in getattr(grader, "CATALOGUE", {}).values():
                names |= {part for m in entries for part in m.name.split(ALSO)} | {m.name for m in entries}
            names |= {v for module in (grader, learner) for k, v in vars(module).items()
                      if k.isupper() and isinstance(v, str)}
        return names


_RELEASES: dict[tuple, tuple[dict[str, Any], set[str]]] = {}


def _checks_and_names(release: Release) -> tuple[dict[str, Any], set[str]]:
    """``release.checks()`` and ``release.known_misconceptions()``, worked out once per
    assignment in a worker (every job brings its own copy of the same record)."""
    key = (tuple(sorted(release.grade_cells.items())), release.locked_sources)
    if key not in _RELEASES:
        _RELEASES[key] = release.checks(), release.known_misconceptions()
    checks, known = _RELEASES[key]
    return dict(checks), set(known)


def _python_source(source: str) -> str:
    """A cell's source as plain Python (IPython magics turned into calls)."""
    from IPython.core.inputtransformer2 import TransformerManager
    return TransformerManager().transform_cell(source)


class RemoteObject:
    """Stands, in a grade cell run by the grader, for the notebook's object ``name``."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<the notebook's {self.name}>"


class _GradeCellNames(dict):
    """The local names of a grade cell: the checks the notebook imports, Python's
    built-ins, and for every other name the notebook's object of that name."""

    def __init__(self, checks: dict[str, Any]):
        super().__init__()
        self.checks = checks

    def __getitem__(self, name: str) -> Any:
        if dict.__contains__(self, name):
            return dict.__getitem__(self, name)
        if name in self.checks:
            return self.checks[name]
        if hasattr(builtins, name):
            raise KeyError(name)
        return RemoteObject(name)


def _check_names(source: str) -> list[str]:
    """The check functions a grade cell calls (``check_x`` -> ``x``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    calls = [n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    return list(dict.fromkeys(c.removeprefix("check_") for c in calls if c.startswith("check_")))


def source_fingerprints(nb: nbformat.NotebookNode, release: Release | None = None) -> set[str]:
    """Fingerprints of every function and class body written in the notebook's own cells
    (all its code cells but the course's grade cells)."""
    release = release or Release({}, ())
    prints = set()
    for cell in nb.cells:
        if cell.cell_type != "code" or release.is_grade_cell(cell):
            continue
        try:
            code = compile(_python_source(cell.source), "<cell>", "exec")
        except (SyntaxError, ValueError):
            continue
        stack = [code]
        while stack:
            c = stack.pop()
            fp = fingerprint(c)
            if fp is not None:
                prints.add(fp)
            stack += [k for k in c.co_consts if hasattr(k, "co_code")]
    return prints


# --------------------------------------------------------------------------
# What the grader ships into the sandbox: course code, never an implementation

class ShippingRefused(RuntimeError):
    """A check tried to send the reference or a catalogue entry into the sandbox (a
    course bug: ``run`` functions and case data must not use them)."""


@functools.cache
def _refused() -> dict[int, str]:
    """ids of the objects that must never enter the sandbox: every function and class of
    the reference modules and every catalogue implementation."""
    refused = {}
    for info in pkgutil.iter_modules(bn_reference.__path__):
        if info.ispkg:
            continue
        module = importlib.import_module(f"bn_reference.{info.name}")
        try:
            grading = importlib.import_module(f"bn_reference.grading.{info.name}")
        except ImportError:
            grading = None
        for name, obj in vars(module).items():
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__:
                refused[id(obj)] = f"{module.__name__}.{name}"
        for task, entries in getattr(grading, "CATALOGUE", {}).items():
            for m in entries:
                for obj in (m.impl, getattr(m.impl, "func", None)):
                    if obj is not None:
                        refused[id(obj)] = f"the catalogue entry {m.name!r} of {task}"
    return refused


class _CoursePickler(cloudpickle.Pickler):
    def reducer_override(self, obj):
        name = _refused().get(id(obj))
        if name is not None:
            raise ShippingRefused(f"{name} would be shipped into the sandbox: a check's run function or case "
                                  f"data uses it, and it must not")
        return super().reducer_override(obj)


def ship(obj: Any) -> bytes:
    """``obj`` cloudpickled for the sandbox, refusing the reference and the catalogue."""
    buffer = io.BytesIO()
    _CoursePickler(buffer).dump(obj)
    return buffer.getvalue()


_CHECK_CODE: dict[tuple[int, int], tuple[Any, Any, bytes]] = {}  # (run, forbidden) ids -> (run, forbidden, bytes)


def ship_check_code(run: Any, forbidden: Forbidden) -> bytes:
    """What the sandbox runs a check's ``run`` with - ``call_student``, ``run`` and the
    fingerprints of ``forbidden`` - shipped by value; the same bytes for every notebook a
    worker grades (course code does not change while it runs), so pickled once."""
    key = (id(run), id(forbidden))
    if key not in _CHECK_CODE:  # holding run and forbidden keeps their ids theirs
        _CHECK_CODE[key] = (run, forbidden, ship((call_student, run, forbidden.shipped())))
    return _CHECK_CODE[key][2]


# --------------------------------------------------------------------------
# Outputs the grader accepts from the sandbox

def _text(value: Any, limit: int = _TEXT_LIMIT) -> str:
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "\n[truncated]"


def _clean_output(output: Any) -> dict | None:
    """An nbformat output rebuilt from the sandbox's report, keeping only plain text,
    PNG images and errors: no HTML or JavaScript reaches the instructor's formgrader."""
    if not isinstance(output, dict):
        return None
    kind = output.get("output_type")
    if kind == "stream":
        name = "stderr" if output.get("name") == "stderr" else "stdout"
        return nbformat.v4.new_output("stream", name=name, text=_text(output.get("text", "")))
    if kind == "error":
        ename, evalue = _text(output.get("ename", "Error"), 200), _text(output.get("evalue", ""), 2000)
        traceback = [_text(line, 2000) for line in output.get("traceback", [])[-40:] if isinstance(line, str)]
        return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=traceback or [f"{ename}: {evalue}"])
    if kind in ("execute_result", "display_data"):
        data = output.get("data") if isinstance(output.get("data"), dict) else {}
        kept = {}
        if isinstance(data.get("text/plain"), str):
            kept["text/plain"] = _text(data["text/plain"])
        if _is_png(data.get("image/png")):
            kept["image/png"] = data["image/png"]
        if not kept:
            return None
        if kind == "execute_result":
            return nbformat.v4.new_output("execute_result", data=kept, execution_count=None)
        return nbformat.v4.new_output("display_data", data=kept)
    return None


def _bounded_outputs(raw: Any) -> list:
    """The outputs of a cell as the grader keeps them: cleaned, at most ``_MAX_OUTPUTS`` of
    them and ``_CELL_OUTPUTS`` bytes in all (the kernel caps them too, but the kernel is in
    the student's hands)."""
    raw = raw if isinstance(raw, list) else []
    kept, size, dropped = [], 0, max(0, len(raw) - _MAX_OUTPUTS)
    for output in map(_clean_output, raw[:_MAX_OUTPUTS]):
        if output is None:
            continue
        n = len(str(output.get("text", ""))) + sum(len(str(v)) for v in output.get("data", {}).values()) \
            + len(str(output.get("evalue", ""))) + sum(map(len, output.get("traceback", [])))
        if size + n > _CELL_OUTPUTS:
            dropped += 1
            continue
        size += n
        kept.append(output)
    if dropped:
        kept.append(nbformat.v4.new_output("stream", name="stdout", text=f"\n[{dropped} more output(s) dropped by "
                                           f"the grader: a cell keeps at most {_CELL_OUTPUTS // 10**6} MB]\n"))
    return kept


def _is_png(data: Any) -> bool:
    """Whether ``data`` is base64 text of a PNG image (of a sane size)."""
    if not isinstance(data, str) or len(data) > _CELL_OUTPUTS:
        return False
    try:
        return base64.b64decode(data[:24], validate=True)[:8] == b"\x89PNG\r\n\x1a\n"
    except ValueError:
        return False


def _strings(value: Any) -> list[str]:
    return [_text(x, 200) for x in value if isinstance(x, str)] if isinstance(value, list) else []


def _error(ename: str, evalue: str) -> dict:
    return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


# --------------------------------------------------------------------------
# The grader's side of a notebook

class NotebookGrader:
    """Runs one sanitized notebook: ordinary cells in ``sandbox``, grade cells here."""

    def __init__(self, sandbox: Sandbox, nb: nbformat.NotebookNode, limits: Limits, release: Release):
        self.sandbox, self.nb, self.limits, self.release = sandbox, nb, limits, release
        self.checks, self.known = _checks_and_names(release)
        self.prints = source_fingerprints(nb, release)
        self.result = NotebookResult(digest=code_digest(nb))
        self.defined: dict[tuple[int, int], int] = {}
        self._keep: list = []
        self.deadline = 0.0
        self.cell_deadline = 0.0

    # -- the remote executor: a check's run(...) on the notebook's object ----------

    def execute(self, run, student, case, forbidden: Forbidden) -> Outcome:
        if not isinstance(student, RemoteObject):  # course code checking course code
            return call_student(run, student, case, forbidden)
        code = self.defined.get((id(run), id(forbidden)))
        if code is None:  # the check's code travels once per notebook, the cases with every call
            code = len(self.defined)
            self.defined[id(run), id(forbidden)] = code
            self._keep.append((run, forbidden))  # their ids stay theirs while this notebook is graded
            defined = self._request({"op": "define", "id": code, "payload": ship_check_code(run, forbidden)})
            if defined.get("error"):
                raise RuntimeError(f"the check's code did not load in the sandbox: {defined['error']}")
        reply = self._request({"op": "call", "name": student.name, "code": code, "payload": ship(case)})
        if reply.get("printed"):
            print(_text(reply["printed"], 5000), end="" if str(reply["printed"]).endswith("\n") else "\n")
        found = self.outcome(reply.get("outcome"))
        # a copy of *this task's* reference anywhere in the notebook's source; a copy of other course
        # code counts where it runs inside the learner's call (the sandbox reports that)
        copied = sorted({forbidden.fingerprints[fp] for fp in forbidden.own & self.prints})
        found.reference_used = sorted(set(found.reference_used) | set(copied))
        return found

    def outcome(self, data: Any) -> Outcome:
        """An :class:`Outcome` from the sandbox's report, every field checked."""
        data = data if isinstance(data, dict) else {}
        error = data.get("error")
        if isinstance(error, dict):
            misconception = error.get("misconception")
            error = LearnerError(_text(error.get("type", "Error"), 100), _text(error.get("message", ""), 3000),
                                 _text(error.get("traceback", ""), 4000),
                                 misconception if isinstance(misconception, str) and misconception in self.known
                                 else None)
        else:
            error = None
        off = data.get("instrumentation_off")
        return Outcome(value=data.get("value"), error=error, notes=_text(data.get("notes", ""), 2000),
                       mutated=_strings(data.get("mutated")), reference_used=_strings(data.get("reference_used")),
                       instrumentation_off=_text(off, 100) if isinstance(off, str) else None)

    def _request(self, message: dict) -> dict:
        """A request to the notebook's process, which gets the cell's time limit for it
        (the checks' own work here is not counted against the learner); on timeout,
        interrupt it and give it a few seconds to answer."""
        if message.get("op") in ("call", "define"):  # a fresh budget: the previous cell may have used its own
            self.cell_deadline = min(time.monotonic() + self.limits.cell_timeout, self.deadline)
        try:
            return self.sandbox.request(message, self.cell_deadline - time.monotonic())
        except TimeoutError:
            self.sandbox.interrupt()
            try:
                reply = self.sandbox.request(None, _GRACE)
            except TimeoutError:
                raise SessionDied("it did not stop when interrupted at the time limit") from None
            reply["timed_out"] = True
            return reply

    # -- cells -------------------------------------------------------------------

    def run_cell(self, index: int, cell) -> None:
        self.cell_deadline = min(time.monotonic() + self.limits.cell_timeout, self.deadline)
        reply = self._request({"op": "exec", "source": cell.source})
        outputs = _bounded_outputs(reply.get("outputs"))
        if reply.get("timed_out"):
            outputs = [o for o in outputs if not (o.output_type == "error" and o.ename == "KeyboardInterrupt")]
            outputs.append(_error("CellTimeoutError", self._timeout_message()))
        for o in outputs:
            if o.output_type == "error" and o.ename == "MemoryError":
                o.evalue = f"{o.evalue} (the notebook may use at most {self.limits.memory / 2**30:g} GiB)".strip()
                o.traceback.append(f"MemoryError: {o.evalue}")
        self.result.outputs[index] = outputs
        count = reply.get("execution_count")
        self.result.execution_counts[index] = count if isinstance(count, int) else None

    def _timeout_message(self) -> str:
        if time.monotonic() >= self.deadline:
            return (f"the notebook ran longer than its {self.limits.notebook_timeout:.0f} s limit and was "
                    f"interrupted here")
        return (f"this cell ran longer than the {self.limits.cell_timeout:.0f} s limit and was interrupted: "
                f"look for a loop that never ends")

    def run_grade_cell(self, index: int, cell) -> None:
        grade_id = _grade_id(cell)
        task = ", ".join(_check_names(cell.source)) or grade_id
        printed, verdict = io.StringIO(), TaskResult(grade_id, task, "passed")
        error = None
        with contextlib.redirect_stdout(printed), use_executor(self.execute):
            try:
                exec(compile(cell.source, f"<grade cell {grade_id}>", "exec"), {"__builtins__": builtins},
                     _GradeCellNames(self.checks))
            except CheckFailed as exc:
                error = _error("CheckFailed", str(exc))
                verdict = TaskResult(grade_id, task, "failed", exc.misconception, str(exc))
            except SessionDied:
                raise
            except Exception as exc:  # the grader's own fault: say so, and do not count it against the learner
                error = _error("GraderError", f"the check itself failed ({type(exc).__name__}: {exc}); "
                                              f"tell your instructor")
                verdict = TaskResult(grade_id, task, "not graded", None, str(exc))
        outputs = [nbformat.v4.new_output("stream", name="stdout", text=_text(printed.getvalue()))] \
            if printed.getvalue() else []
        self.result.outputs[index] = outputs + ([error] if error else [])
        self.result.graded.append(index)
        self.result.tasks.append(verdict)

    def skip(self, index: int, cell, reason: str) -> None:
        self.result.outputs[index] = [_error("NotRun", f"not run: {reason}")]
        if self.release.is_grade_cell(cell):
            grade_id = _grade_id(cell)
            task = ", ".join(_check_names(cell.source)) or grade_id
            self.result.tasks.append(TaskResult(grade_id, task, "not graded", None, reason))

    def grade(self) -> NotebookResult:
        started = time.monotonic()
        self.deadline = started + self.limits.notebook_timeout
        self.oom_kills, self.limit_hits = self.sandbox.oom_kills(), self.sandbox.memory_limit_hits()
        self.sandbox.open()
        unrun, died_at, detail = [], None, ""
        try:
            for index, cell in enumerate(self.nb.cells):
                if cell.cell_type != "code":
                    continue
                if self.result.stopped:
                    unrun.append((index, cell))
                    continue
                try:
                    if time.monotonic() >= self.deadline:
                        raise TimeoutError
                    (self.run_grade_cell if self.release.is_grade_cell(cell) else self.run_cell)(index, cell)
                except TimeoutError:
                    self.result.stopped = (f"the notebook reached its {self.limits.notebook_timeout:.0f} s "
                                           f"time limit before cell {index + 1}")
                    unrun.append((index, cell))
                except SessionDied as exc:
                    died_at, detail = index, str(exc)
                    self.result.stopped = "the notebook's process ended"
        finally:
            ended = self.sandbox.close()
        if died_at is not None:
            self._record_death(died_at, ended, detail)
        for index, cell in unrun:
            self.skip(index, cell, self.result.stopped)
        self.result.seconds = time.monotonic() - started
        return self.result

    def _record_death(self, index: int, ended: dict, detail: str) -> None:
        """Say, in the cell where it happened, how the notebook's process ended."""
        how = {"SIGSEGV": "it crashed (segmentation fault)", "SIGXCPU": "it used up its CPU time",
               "SIGKILL": "it was killed (it did not stop when interrupted, or ran out of resources)",
               "SIGABRT": "it aborted"}
        out_of_memory = self.sandbox.oom_kills() > self.oom_kills or self.sandbox.memory_limit_hits() > self.limit_hits
        if ended.get("signal") == "SIGKILL" and out_of_memory:  # killed by the kernel, or at its time limit
            reason = (f"it ran out of memory: the notebook may hold at most {self.limits.memory / 2**30:g} GiB "
                      f"(its processes, shared memory and files in /tmp and /dev/shm together)")
        elif "did not stop when interrupted" in detail:
            reason = f"it did not stop when interrupted at the {self.limits.cell_timeout:.0f} s time limit"
        elif ended.get("ended") == "signal":
            reason = how.get(ended.get("signal"), f"it was stopped by {ended.get('signal')}")
        elif ended.get("ended") == "exit":
            reason = f"it exited with code {ended.get('code')} (os._exit, or a crash in compiled code)"
        else:
            reason = "it stopped answering"
        self.result.stopped = f"the notebook's process ended in cell {index + 1}: {reason}"
        self.result.outputs[index] = self.result.outputs.get(index, []) + [_error(
            "KernelDied", f"{self.result.stopped}. The cells before it keep their results; the cells after it "
                          f"were not run.")]
        cell = self.nb.cells[index]
        if self.release.is_grade_cell(cell):
            grade_id = _grade_id(cell)
            self.result.tasks.append(TaskResult(grade_id, ", ".join(_check_names(cell.source)) or grade_id,
                                                "not graded", None, self.result.stopped))


def task_names(source: Path) -> list[str]:
    """The tasks of an assignment, in order, from its source notebook's grade cells."""
    nb = nbformat.read(source, as_version=4)
    release = Release.from_notebook(nb)
    return [", ".join(_check_names(c.source)) or _grade_id(c) for c in nb.cells if release.is_grade_cell(c)]


def grade_notebook(sandbox: Sandbox, nb: nbformat.NotebookNode, limits: Limits, release: Release) -> NotebookResult:
    """Grade one sanitized notebook in ``sandbox`` (which must be started): the cells
    ``release`` names as the course's grade cells here, every other cell in the sandbox."""
    return NotebookGrader(sandbox, nb, limits, release).grade()
