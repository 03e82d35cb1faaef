"""The grader's checks: live, against the reference, on visible and hidden cases.

A chapter's grading module (``bn_reference.grading.<topic>``) holds what must not
reach learners: the catalogue of known wrong implementations (:class:`Misconception`),
the cases - visible ones, and hidden ones whose seeds come from the course's
grading secret (:func:`case_rng`) - and its ``check_*`` functions, which call
:func:`run_check`. What touches the learner's object, the ``run(fn, case)``
functions, lives in the learner package (``bn_exercises.<topic>``), and so do the
comparison and the messages (:func:`bn_exercises.checking.judge`): the learner's
visible checks are this module's visible checks, replayed from recorded answers
(:mod:`bn_reference.grading.record`).

The class grader runs ``run`` inside its sandbox, which holds the learner's
notebook and neither the reference nor the catalogue
(:func:`bn_exercises.execution.use_executor`).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import hashlib
import hmac
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from bn_exercises.checking import (ALSO, INPUT_CHANGED, INSTRUMENTATION_OFF, NOT_IMPLEMENTED, REFERENCE_USED, Case,
                                   CheckFailed, _quietly, judge, print_notes, report_pass)
from bn_exercises.execution import Forbidden, current_executor, one_thread

__all__ = ["CheckFailed", "Case", "Misconception", "combined", "run_check", "report_pass", "case_rng", "hidden_seed",
           "use_secret", "GradingSecretMissing", "REFERENCE_USED", "INPUT_CHANGED", "INSTRUMENTATION_OFF",
           "NOT_IMPLEMENTED"]


@dataclass(frozen=True)
class Misconception:
    """A known wrong implementation, recognised by its output (its fingerprint).

    ``name`` says what is wrong, ``fix`` how to put it right; ``impl`` is the
    wrong implementation, called exactly like the learner's.
    """

    name: str
    fix: str
    impl: Any


def combined(first: Misconception, second: Misconception, impl: Any) -> Misconception:
    """The entry for two mistakes made together (real code often has a second deviation
    beside the common one): ``impl`` makes both; the name and fix give both, joined by
    ``ALSO``, which the class report splits to count each. List combined entries after
    the single ones: a learner who makes one mistake is matched by it first."""
    return Misconception(f"{first.name}{ALSO}{second.name}", f"{first.fix} Also: {second.fix}", impl)


# --------------------------------------------------------------------------
# Hidden cases: seeded from the course's secret, so a learner cannot derive them

SECRET_VARIABLE = "BN_GRADING_SECRET"
_secret: contextvars.ContextVar[str | None] = contextvars.ContextVar("bn_grading_secret", default=None)


class GradingSecretMissing(RuntimeError):
    """Hidden cases were asked for without the course's grading secret."""


@contextlib.contextmanager
def use_secret(secret: str):
    """Within this block, hidden cases are drawn from ``secret`` (the class grader keeps
    one per course in its gradebook: ``bncourse.secret``)."""
    if not secret:
        raise ValueError("the grading secret must not be empty")
    token = _secret.set(secret)
    try:
        yield
    finally:
        _secret.reset(token)


def hidden_seed(stream: int | str) -> int:
    """A seed for hidden case stream ``stream``, derived from the course's grading secret
    (:func:`use_secret`, else the environment variable ``BN_GRADING_SECRET``)."""
    secret = _secret.get() or os.environ.get(SECRET_VARIABLE)
    if not secret:
        raise GradingSecretMissing(
            "hidden cases need the course's grading secret: grade with `bncourse` (it keeps the secret in the "
            "gradebook), or with `nbgrader autograde` from the course directory (its nbgrader_config.py hands "
            f"the secret to the kernel), or set {SECRET_VARIABLE} yourself.")
    digest = hmac.new(secret.encode(), f"hidden case stream {stream}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def case_rng(hidden: bool, stream: int) -> np.random.Generator:
    """The random generator of a chapter's case stream: seed ``stream`` for the visible
    cases (they are recorded for learners anyway), the course's secret for hidden ones."""
    return np.random.default_rng(hidden_seed(stream) if hidden else stream)


# --------------------------------------------------------------------------
# Running a check live

_FORBIDDEN_CACHE: dict[tuple[int, ...], tuple[Any, Forbidden]] = {}


def _course_code(reference: Any) -> list[Any]:
    """The functions and classes defined in the reference's module (the learner package's
    helpers that it imports are not among them)."""
    module = inspect.getmodule(reference)
    if module is None or not module.__name__.startswith("bn_reference."):
        return []
    return [obj for obj in vars(module).values()
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__]


def _forbidden(reference: Any, catalogue: Sequence[Misconception], student: Any) -> Forbidden:
    """The code of the reference's module and of the catalogue's implementations
    (cached). Nothing is forbidden to a catalogue entry checked as if it were a
    learner's (the tests do that; it is course code, and wrong by construction)."""
    impls = [m.impl for m in catalogue]
    if any(student is impl for impl in impls):
        return Forbidden()
    key = (id(reference), *(id(i) for i in impls))
    if key not in _FORBIDDEN_CACHE:  # keep the objects alive so that their ids stay unique
        forbidden = Forbidden.of(reference, *_course_code(reference), *impls).with_own(reference)
        _FORBIDDEN_CACHE[key] = ((reference, *impls), forbidden)
    return _FORBIDDEN_CACHE[key][1]


def _on_copy(run: Callable, fn: Any, case: Case) -> Any:
    """``run(fn, case)`` on a private deep copy of the case's data (course code only)."""
    with one_thread():
        return run(fn, Case(case.label, copy.deepcopy(case.data), case.mutable))


_RESULTS: dict[tuple, tuple[Any, Any]] = {}  # (impl, run, data) digests -> (impl, output)
_RESULTS_MAX = 4096


def _course_output(run: Callable, impl: Any, case: Case) -> Any:
    """``_on_copy(run, impl, case)`` for the reference or a catalogue entry, remembered: the
    cases are seeded, so grading a class computes the same outputs for every student.
    Cases whose data cannot be digested safely are computed every time."""
    data, runner = _digest_value(case.data), _digest_value(run)
    if data is None or runner is None:
        return _on_copy(run, impl, case)
    key = (id(impl), runner, data, case.mutable)
    if key not in _RESULTS:
        if len(_RESULTS) >= _RESULTS_MAX:
            _RESULTS.clear()
        _RESULTS[key] = (impl, _on_copy(run, impl, case))  # holding impl keeps its id its own
    return _RESULTS[key][1]


def _digest_value(x: Any, depth: int = 0) -> str | None:
    """A string that changes whenever ``x`` (case data, a run function) could behave
    differently: array contents, function code and closures, partial arguments. ``None``
    for anything it cannot vouch for."""
    if depth > 12:
        return None
    if x is None or isinstance(x, (bool, int, float, complex, str, bytes, np.generic)):
        return f"{type(x).__name__}:{x!r}"
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        if x.dtype.hasobject:
            return None
        return f"array{x.dtype}{x.shape}:{hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()}"
    if isinstance(x, (list, tuple, Mapping)):
        items = x.items() if isinstance(x, Mapping) else enumerate(x)
        parts = [(_digest_value(k, depth + 1), _digest_value(v, depth + 1)) for k, v in items]
        return None if any(None in p for p in parts) else f"{type(x).__name__}{parts}"
    if isinstance(x, functools.partial):
        parts = [_digest_value(v, depth + 1) for v in (x.func, x.args, x.keywords)]
        return None if None in parts else f"partial{parts}"
    if inspect.isfunction(x):
        cells = [_digest_value(c.cell_contents, depth + 1) for c in (x.__closure__ or ())]
        defaults = _digest_value(x.__defaults__, depth + 1)
        if None in cells or defaults is None:
            return None
        return f"function {x.__module__}.{x.__qualname__}@{id(x.__code__)}{cells}{defaults}"
    if inspect.isclass(x) or inspect.ismodule(x):
        return f"{x!r}@{id(x)}"
    if type(x).__module__ == "torch" and type(x).__name__ in ("dtype", "device"):
        return repr(x)
    return None


#: While set, :func:`run_check` notes its arguments here instead of running (the recorder).
_recording: contextvars.ContextVar[list | None] = contextvars.ContextVar("bn_recording", default=None)


def run_check(
    task: str,
    student: Any,
    reference: Any,
    cases: Iterable[Case],
    run: Callable[[Any, Case], Any],
    catalogue: Sequence[Misconception] = (),
    rtol: float = 1e-7,
    atol: float = 1e-9,
    hidden: bool = False,
) -> int:
    """Compare ``run(student, case)`` with ``run(reference, case)`` on every case.

    Raises :class:`CheckFailed` at the first case where they differ, listing every
    output that differs and naming the ``catalogue`` entry that reproduces every
    output the learner gets wrong. Also fails, naming the mistake, when the learner's
    code changes its input in place or runs the course's own code. ``hidden`` cases
    are shown as "hidden case k of n". Returns the number of cases checked.
    """
    __tracebackhide__ = True
    cases = list(cases)
    recording = _recording.get()
    if recording is not None:
        recording.append(dict(task=task, reference=reference, cases=cases, run=run, catalogue=list(catalogue),
                              rtol=rtol, atol=atol, hidden=hidden))
        return len(cases)
    if student is reference:
        raise CheckFailed(f"{task} is the course's reference implementation, imported from bn_reference: "
                          f"write your own {task} in the notebook instead.", REFERENCE_USED)
    execute, forbidden = current_executor(), _forbidden(reference, catalogue, student)
    notes: list[str] = []
    try:
        for i, case in enumerate(cases, 1):
            label = f"hidden case {i} of {len(cases)}" if hidden else case.label
            expected = _quietly(lambda: _course_output(run, reference, case))
            outcome = execute(run, student, case, forbidden)
            if outcome.notes:
                notes.append(outcome.notes)
            candidates = [(m.name, m.fix, functools.partial(_course_output, run, m.impl, case)) for m in catalogue]
            judge(task, label, case, outcome, expected, candidates, rtol, atol)
    finally:
        print_notes(task, notes)
    return len(cases)
