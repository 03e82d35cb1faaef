"""Running a learner's code under observation, for every check.

:func:`call_student` runs a check's ``run(student, case)`` on a private deep copy
of the case's data and returns an :class:`Outcome`: the value ``run`` returned,
or what the learner's code raised (with the learner's own frames only), what it
wrote to stderr or warned (a note: nbgrader zeroes a test cell with stderr
output, and a warning is no mistake), which inputs it changed in place, and
whether the course's own code (the reference, a catalogue entry) ran inside it
- called, wrapped, subclassed or copied and ``exec``'d.

The comparison happens elsewhere (:mod:`bn_exercises.checking`), so this module
is also what the class grader runs inside its sandbox, where the learner's
notebook lives and the reference does not: there, forbidden code is known only
by its fingerprints (:func:`fingerprint`), shipped with the call. In a learner's
own Jupyter nothing is forbidden: the learner package holds no answer to copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dis
import functools
import hashlib
import inspect
import io
import os
import sys
import threading
import traceback
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np

__all__ = ["Outcome", "LearnerError", "Forbidden", "call_student", "fingerprint", "trust_loaded_code",
           "use_executor", "current_executor", "one_thread"]

def _package_dirs() -> tuple[str, ...]:
    """The folders of the course's packages: this one, and the grader's bn_reference where
    it is installed (found without importing it)."""
    import importlib.util
    dirs = [os.path.dirname(os.path.abspath(__file__))]
    spec = importlib.util.find_spec("bn_reference")
    if spec is not None and spec.submodule_search_locations:
        dirs += [os.path.abspath(p) for p in spec.submodule_search_locations]
    return tuple(d + os.sep for d in dirs)


#: Frames from files under these folders (the course's packages) are not the learner's.
PACKAGE_DIRS = _package_dirs()
#: Code with fewer operations than this is matched by identity only: a two-line helper
#: written independently may compile to the same operations as the reference's.
MIN_OPERATIONS = 40
#: Modules loaded from files under these folders are libraries (see :func:`trust_loaded_code`).
LIBRARY_DIRS = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix)}
                     | {p + os.sep for p in (sys.prefix, sys.base_prefix)})
_NOTE_LIMIT = 2000  # characters of stderr kept per check call


@dataclass
class LearnerError:
    """What the learner's code raised: the exception's class name and message, and a
    traceback of the learner's own frames. ``misconception`` is set when a check's
    ``run`` raised :class:`~bn_reference.grading.CheckFailed` itself."""

    type: str
    message: str
    traceback: str = ""
    misconception: str | None = None


@dataclass
class Outcome:
    """Everything observed while ``run(student, case)`` ran."""

    value: Any = None
    error: LearnerError | None = None
    notes: str = ""                                             # stderr and warnings, as text
    mutated: list[str] = field(default_factory=list)            # paths of case data changed in place
    reference_used: list[str] = field(default_factory=list)     # course code that ran inside
    instrumentation_off: str | None = None                      # the learner's code disabled the watcher


def fingerprint(code: types.CodeType) -> str | None:
    """A digest of what a code object computes, blind to local names, docstrings, line
    numbers and how the compiler spelled a method call (CPython 3.11 compiles
    ``np.sqrt(x)`` differently when ``import numpy`` is in the same cell): the sequence
    of operations with the global and attribute names and constants they use, nested
    code by its own digest. ``None`` for code too small to tell a copy from a
    coincidence."""
    ops = _operations(code)
    return _digest(ops) if len(ops) >= MIN_OPERATIONS else None


def _digest(ops: tuple[str, ...]) -> str:
    return hashlib.sha256("\x00".join(ops).encode()).hexdigest()  # stable across processes, unlike hash()


def _operations(code: types.CodeType) -> tuple[str, ...]:  # uncached: it also runs in the sandbox
    ops = []
    for ins in dis.get_instructions(code):
        if ins.opname in _IGNORED:
            continue
        name = _SAME.get(ins.opname, ins.opname)
        if ins.opcode in _JUMPS or ins.opname in _LOCALS:
            ops.append(name)
        elif isinstance(ins.argval, types.CodeType):
            ops.append(f"{name} <{_digest(_operations(ins.argval))}>")
        else:
            ops.append(f"{name} {ins.argval!r}" if ins.arg is not None else name)
    return tuple(ops)


_IGNORED = {"RESUME", "NOP", "CACHE", "EXTENDED_ARG", "PUSH_NULL", "PRECALL", "COPY_FREE_VARS", "MAKE_CELL"}
_SAME = {"LOAD_METHOD": "LOAD_ATTR"}
_JUMPS = set(dis.hasjrel) | set(dis.hasjabs)
_LOCALS = {"LOAD_FAST", "STORE_FAST", "DELETE_FAST", "LOAD_DEREF", "STORE_DEREF", "LOAD_CLOSURE",
           "LOAD_FAST_CHECK", "LOAD_CLASSDEREF"}


def _codes_of(obj: Any, seen: set) -> Iterable[tuple[types.CodeType, str]]:
    """Every code object ``obj`` runs, with a name for it: a function's (and the
    functions nested in it), a class's methods (its course-defined bases included),
    a partial's function."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    if isinstance(obj, functools.partial):
        yield from _codes_of(obj.func, seen)
        for arg in (*obj.args, *obj.keywords.values()):
            if callable(arg):
                yield from _codes_of(arg, seen)
    elif isinstance(obj, (staticmethod, classmethod)):
        yield from _codes_of(obj.__func__, seen)
    elif isinstance(obj, property):
        for f in (obj.fget, obj.fset, obj.fdel):
            if f is not None:
                yield from _codes_of(f, seen)
    elif inspect.isfunction(obj):
        stack = [inspect.unwrap(obj).__code__]  # a decorator's wrapper is not course code
        while stack:
            code = stack.pop()
            if code.co_filename.startswith(PACKAGE_DIRS):
                yield code, name
            stack += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    elif inspect.isclass(obj):
        for klass in obj.__mro__:
            if not (getattr(klass, "__module__", "") or "").startswith("bn_reference"):
                continue
            for attr in vars(klass).values():
                yield from _codes_of(attr, seen)



@dataclass(frozen=True)
class Forbidden:
    """Course code that must not run inside the learner's: known by identity (where it
    is loaded, as in the learner's own Jupyter) and by fingerprint (a copy of its
    source compiles to the same fingerprint)."""

    codes: Mapping[types.CodeType, str] = field(default_factory=dict)
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    own: frozenset = frozenset()  # fingerprints of the task's own reference: a copy of it *in the source* counts

    @classmethod
    def of(cls, *objects: Any) -> "Forbidden":
        """The code of ``objects`` (functions, classes, partials)."""
        codes, seen = {}, set()
        for obj in objects:
            for code, name in _codes_of(obj, seen):
                codes.setdefault(code, name)
        prints = {}
        for code, name in codes.items():
            fp = fingerprint(code)
            if fp is not None:
                prints.setdefault(fp, name)
        return cls(codes, prints)

    def with_own(self, reference: Any) -> "Forbidden":
        """This set, marking the fingerprints of ``reference`` (the task's reference object)."""
        return Forbidden(self.codes, self.fingerprints, frozenset(Forbidden.of(reference).fingerprints))

    def shipped(self) -> "Forbidden":
        """The part that can travel to another process: the fingerprints."""
        return Forbidden({}, dict(self.fingerprints), self.own)

    def match(self, code: types.CodeType) -> str | None:
        """The name of the forbidden code ``code`` is (or is a copy of), else None. Every
        code object but the libraries' own (:func:`trust_loaded_code`) is fingerprinted,
        whatever file name it claims: ``exec`` can claim any."""
        name = self.codes.get(code)
        if name is None and self.fingerprints and not _trusted(code):
            fp = _fingerprint_cached(code)
            name = self.fingerprints.get(fp) if fp is not None else None
        return name


_TRUSTED: dict[int, types.CodeType] | None = None  # id -> code of the libraries' code (kept alive)
_FINGERPRINTS: dict[int, tuple[types.CodeType, str | None]] = {}


def trust_loaded_code() -> int:
    """Remember the code of every module loaded now from a library folder (and of the
    course's packages) as code that is never a learner's copy; returns how many code
    objects. The class grader's sandbox calls it once, before any notebook runs; in a
    process that ran no learner code yet, the first forbidden-code check calls it."""
    global _TRUSTED
    trusted: dict[int, types.CodeType] = {}
    roots = (*LIBRARY_DIRS, *PACKAGE_DIRS)

    def add(code):
        stack = [code]
        while stack:
            c = stack.pop()
            if id(c) not in trusted:
                trusted[id(c)] = c
                stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]

    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if not isinstance(path, str) or not os.path.abspath(path).startswith(roots):
            continue
        for value in list(vars(module).values()):  # plain type checks: no attribute of a library object is read
            members = list(vars(value).values()) if issubclass(type(value), type) else [value]
            for member in members:
                if type(member) in (staticmethod, classmethod):
                    member = member.__func__
                if type(member) is types.FunctionType:
                    add(member.__code__)
    _TRUSTED = trusted
    return len(trusted)


def _trusted(code: types.CodeType) -> bool:
    if _TRUSTED is None:
        trust_loaded_code()
    return id(code) in _TRUSTED and _TRUSTED[id(code)] is code


def _fingerprint_cached(code: types.CodeType) -> str | None:
    hit = _FINGERPRINTS.get(id(code))
    if hit is None or hit[0] is not code:
        if len(_FINGERPRINTS) > 200_000:
            _FINGERPRINTS.clear()
        hit = _FINGERPRINTS[id(code)] = (code, fingerprint(code))
    return hit[1]


class _Watcher:
    """A profile function (``sys.setprofile``) that notes forbidden code objects as they
    are called, and notes when the learner's code switches profiling off."""

    def __init__(self, forbidden: Forbidden):
        self.forbidden, self.seen, self.found, self.off, self.active = forbidden, set(), {}, None, True
        self._switches = (sys.setprofile, sys.settrace, threading.setprofile, threading.settrace)

    def __call__(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code in self.seen:
                return
            self.seen.add(code)
            name = self.forbidden.match(code)
            if name is not None:
                self.found.setdefault(name)
            if self.active and any(code is getattr(f, "__code__", None) for f in self._switches):
                self.off = f"threading.{code.co_name}"
        elif event == "c_call" and self.active and any(arg is f for f in self._switches):
            self.off = f"sys.{arg.__name__}"


@contextlib.contextmanager
def _watching(forbidden: Forbidden):
    """Profile this thread and the threads it starts with a :class:`_Watcher`."""
    watcher = _Watcher(forbidden)
    old, old_threads = sys.getprofile(), threading.getprofile()
    threading.setprofile(watcher)
    sys.setprofile(watcher)
    try:
        yield watcher
    finally:
        watcher.active = False
        sys.setprofile(old)
        threading.setprofile(old_threads)


@contextlib.contextmanager
def _capturing_stderr():
    """Redirect sys.stderr and record warnings; yields a list that receives the text."""
    notes: list[str] = []
    buffer = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(buffer):
        warnings.simplefilter("always")
        try:
            yield notes
        finally:
            seen = set()
            for w in caught:
                line = f"{w.category.__name__}: {w.message}"
                if line not in seen:
                    seen.add(line)
                    notes.append(line)
            if buffer.getvalue().strip():
                notes.insert(0, buffer.getvalue().rstrip())


def _learner_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without the course package's frames (the last six)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(PACKAGE_DIRS)]
    return "".join(traceback.format_list(frames[-6:]))


def _changed(before: Any, after: Any, path: str) -> list[str]:
    """Paths of the arrays and tensors of ``before`` that differ in ``after``."""
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        return [p for k in before if k in after
                for p in _changed(before[k], after[k], f"{path}[{k!r}]" if path else str(k))]
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)) and len(before) == len(after):
        return [p for i, (b, a) in enumerate(zip(before, after)) for p in _changed(b, a, f"{path}[{i}]")]
    if isinstance(before, np.ndarray):
        same = (isinstance(after, np.ndarray) and before.shape == after.shape and before.dtype == after.dtype
                and np.array_equal(before, after, equal_nan=before.dtype.kind in "fc"))
        return [] if same else [path]
    if type(before).__name__ == "Tensor" and hasattr(before, "detach"):
        import torch
        b, a = before.detach(), after.detach() if isinstance(after, torch.Tensor) else None
        same = a is not None and b.shape == a.shape and b.dtype == a.dtype and (
            torch.equal(b, a) or bool(torch.all((b == a) | (b.isnan() & a.isnan()))))
        return [] if same else [path]
    return []


@contextlib.contextmanager
def one_thread():
    """PyTorch on one thread for the block, when PyTorch is in use (restored after). Its
    reductions then add up in one order, so the reference recorded at release, the
    grader's live reference and the learner's code agree to the last bit when they
    compute the same thing, wherever they run (the class grader's sandbox runs one thread)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def call_student(run: Callable, student: Any, case: Any, forbidden: Forbidden = Forbidden()) -> Outcome:
    """Run ``run(student, case)`` on a private deep copy of ``case.data`` and observe it.

    The learner's stderr and warnings become ``notes``; an exception becomes ``error``
    (KeyboardInterrupt too: a time limit interrupts the learner's code); arrays of the
    case data that changed in place are listed in ``mutated`` (keys in
    ``case.mutable`` may change); forbidden code that ran is in ``reference_used``.
    """
    data = copy.deepcopy(case.data)
    private = type(case)(case.label, data, **{k: getattr(case, k) for k in ("mutable",) if hasattr(case, k)})
    outcome = Outcome()
    with _capturing_stderr() as notes, _watching(forbidden) as watcher:
        try:
            with one_thread():
                outcome.value = run(student, private)
        except (Exception, KeyboardInterrupt) as exc:
            outcome.error = LearnerError(type(exc).__name__, str(exc), _learner_traceback(exc),
                                         getattr(exc, "misconception", None))
    outcome.notes = "\n".join(notes)[:_NOTE_LIMIT]
    outcome.reference_used = list(watcher.found)
    outcome.instrumentation_off = watcher.off
    exempt = set(getattr(case, "mutable", ()))
    outcome.mutated = [p for k in case.data if k not in exempt for p in _changed(case.data[k], data.get(k), k)]
    return outcome


#: The function checks use to run the learner's code: ``call_student`` in the learner's
#: own process; the class grader substitutes one that runs it in its sandbox.
_executor: contextvars.ContextVar[Callable[..., Outcome] | None] = contextvars.ContextVar("bn_executor", default=None)


def current_executor() -> Callable[..., Outcome]:
    return _executor.get() or call_student


@contextlib.contextmanager
def use_executor(executor: Callable[..., Outcome]):
    """Within this block, checks run the learner's code with ``executor(run, student,
    case, forbidden) -> Outcome`` instead of :func:`call_student`."""
    token = _executor.set(executor)
    try:
        yield
    finally:
        _executor.reset(token)
