"""The grading machinery shared by every chapter.

A *check* runs a learner's implementation and the reference on the same seeded
cases. When they disagree, it runs the chapter's *catalogue* of known wrong
implementations on that case; if one of them reproduces the learner's first
wrong output (its fingerprint), the failure names that misconception and says
how to fix it. Every output that differs is listed, with as many digits as it
takes to see the difference.

A chapter's check builds cases and calls :func:`run_check` with a ``run(fn,
case)`` function, the only place that touches the learner's object: it calls
it and returns plain data (arrays, tensors, numbers, strings, in dicts and
lists). ``run`` never uses the reference or a catalogue entry, because the
class grader runs it inside a sandbox that holds the learner's notebook and
neither of those (:mod:`bn_reference.grading.execution`). Each ``run`` gets a
private copy of the case's data, so an in-place change is caught and named.

Grade cells call a chapter's ``check_*`` functions; a correct answer prints to
stdout only (nbgrader scores a cell with stderr output as 0), even when the
learner's code warns: its stderr becomes a note.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .execution import Forbidden, LearnerError, Outcome, current_executor

__all__ = ["CheckFailed", "Case", "Misconception", "run_check", "report_pass",
           "REFERENCE_USED", "INPUT_CHANGED", "INSTRUMENTATION_OFF", "NOT_IMPLEMENTED"]

#: Misconceptions every check recognises, whatever the chapter.
REFERENCE_USED = "the course's reference implementation used instead of your own code"
INPUT_CHANGED = "the function changes its input in place"
INSTRUMENTATION_OFF = "the check's instrumentation switched off by the code being checked"
NOT_IMPLEMENTED = "not attempted: the function is still the stub"  # not a misconception, but worth counting

_MAX_LISTED = 10  # differing outputs listed in one message


class CheckFailed(AssertionError):
    """A learner's implementation disagrees with the reference.

    ``misconception`` is the name of the catalogue entry (or the core's own
    misconception) that describes the learner's mistake, or ``None``.
    """

    def __init__(self, message: str, misconception: str | None = None):
        super().__init__(message)
        self.misconception = misconception

    def _render_traceback_(self) -> list[str]:
        """What IPython shows: the message alone (it says where, in the learner's code;
        the grading package's frames would only hide it)."""
        return f"{type(self).__name__}: {self}".splitlines()


@dataclass(frozen=True)
class Case:
    """One input on which learner and reference are compared.

    ``label`` is shown to the learner (hidden cases get a generic label);
    ``data`` holds what the chapter's ``run`` function needs (arrays,
    hyper-parameters); ``mutable`` names the keys of ``data`` the learner's
    code is meant to change in place.
    """

    label: str
    data: Mapping[str, Any] = field(default_factory=dict)
    mutable: tuple[str, ...] = ()


@dataclass(frozen=True)
class Misconception:
    """A known wrong implementation, recognised by its output (its fingerprint).

    ``name`` says what is wrong, ``fix`` how to put it right; ``impl`` is the
    wrong implementation, called exactly like the learner's.
    """

    name: str
    fix: str
    impl: Any


# --------------------------------------------------------------------------
# Comparing outputs

def _leaves(x: Any, path: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts, tuples and lists of arrays into (path, leaf) pairs.

    A list of plain numbers (a loss history, say) is one leaf.
    """
    if isinstance(x, Mapping):
        return [leaf for k, v in x.items() for leaf in _leaves(v, f"{path}[{k!r}]" if path else str(k))]
    if isinstance(x, (tuple, list)) and not all(np.isscalar(v) for v in x):
        return [leaf for i, v in enumerate(x) for leaf in _leaves(v, f"{path}[{i}]" if path else f"output {i}")]
    return [(path or "output", x)]


def _as_array(x: Any) -> np.ndarray | None:
    """``x`` as a float64 array, or ``None`` when it is not numeric."""
    if x is None or isinstance(x, str):
        return None
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _pair(e: float, g: float) -> str:
    """'expected ..., got ...' with the fewest significant digits that tell them apart,
    and the relative error."""
    for digits in range(6, 18):
        se, sg = f"{e:.{digits}g}", f"{g:.{digits}g}"
        if se != sg:
            break
    if math.isfinite(e) and math.isfinite(g) and e != 0:
        return f"expected {se}, got {sg} (relative error {abs(g - e) / abs(e):.1e})"
    return f"expected {se}, got {sg}"


def _leaf_difference(expected: Any, got: Any, rtol: float, atol: float) -> str | None:
    """``None`` when two leaves agree, else a sentence saying how they differ."""
    e, g = _as_array(expected), _as_array(got)
    if e is None:
        return None if (type(expected) is type(got) and expected == got) else f"expected {expected!r}, got {got!r:.120}"
    if g is None:
        return f"expected a number or array, got {type(got).__name__} {got!r:.80}"
    if e.shape != g.shape:
        return f"expected shape {e.shape}, got shape {g.shape}"
    with np.errstate(invalid="ignore"):
        ok = np.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
    if ok.all():
        return None
    bad = int((~ok).sum())
    with np.errstate(invalid="ignore"):
        err = np.where(ok, 0.0, np.nan_to_num(np.abs(g - e), nan=np.inf))
    worst = np.unravel_index(int(np.argmax(err)), e.shape) if e.ndim else ()
    if not e.ndim:
        return _pair(float(e), float(g))
    return (f"{bad} of {e.size} values differ; worst at index {tuple(int(i) for i in worst)}: "
            f"{_pair(float(e[worst]), float(g[worst]))}")


def _differences(expected: Any, got: Any, rtol: float, atol: float) -> dict[str, str]:
    """{output path: how it differs} for every output of ``expected`` that ``got`` gets
    wrong or lacks, in ``expected``'s order (``got``'s extra outputs last)."""
    e_leaves, g_leaves = dict(_leaves(expected)), dict(_leaves(got))
    if set(e_leaves) != set(g_leaves) and 1 in (len(e_leaves), len(g_leaves)):
        return {"output": f"expected {len(e_leaves)} output(s), got {len(g_leaves)}"}
    diffs = {}
    for path, e in e_leaves.items():
        if path not in g_leaves:
            diffs[path] = "missing"
            continue
        diff = _leaf_difference(e, g_leaves[path], rtol, atol)
        if diff is not None:
            diffs[path] = diff
    diffs.update({path: "not expected" for path in g_leaves if path not in e_leaves})
    return diffs


def _match_score(wrong: Any, got: Any, diffs: dict[str, str], rtol: float, atol: float) -> tuple[int, int]:
    """How well a wrong implementation explains the learner's output: (how many of the
    learner's wrong outputs it reproduces, minus how many outputs it gets differently
    from the learner, right ones included). (0, 0) unless it reproduces the first wrong
    output, the primary symptom."""
    mismatched = _differences(wrong, got, rtol, atol)
    if "output" in diffs:  # the learner's outputs have the wrong structure: only a full match counts
        return (int(not mismatched), 0)
    if "output" in mismatched or next(iter(diffs)) in mismatched:
        return (0, 0)
    return (sum(path not in mismatched for path in diffs), -len(mismatched))


def _quietly(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` (course code) with warnings and floating-point warnings silenced, so
    that computing the reference or diagnosing a wrong answer never writes to stderr."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn()


# --------------------------------------------------------------------------
# Running a check

_FORBIDDEN_CACHE: dict[tuple[int, ...], tuple[Any, Forbidden]] = {}


def _course_code(reference: Any) -> list[Any]:
    """The functions and classes of the reference's module, except the helpers its
    grading module hands to notebooks (its ``PROVIDED`` names)."""
    module = inspect.getmodule(reference)
    if module is None or not module.__name__.startswith("bn_reference."):
        return []
    topic = module.__name__.rpartition(".")[2]
    try:
        provided = set(getattr(importlib.import_module(f"bn_reference.grading.{topic}"), "PROVIDED", ()))
    except ImportError:
        provided = set()
    return [obj for name, obj in vars(module).items()
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__
            and name not in provided]


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


def _error_failure(task: str, label: str, error: LearnerError) -> CheckFailed:
    """The failure for a learner's code that raised (or a ``run`` that refused it)."""
    if error.type == "CheckFailed":
        return CheckFailed(error.message, error.misconception)
    if error.type == "NotImplementedError":
        return CheckFailed(f"{task} is not implemented yet: the function still raises NotImplementedError. "
                           f"Replace `raise NotImplementedError()` with your code, then run this cell again.",
                           NOT_IMPLEMENTED)
    if error.type == "KeyboardInterrupt":
        return CheckFailed(f"{task} was interrupted on case: {label}\n  It ran longer than the time limit: "
                           f"look for a loop that never ends.")
    if error.type == "ReferenceNotAvailable":  # the class grader's stand-in for bn_reference's code
        return CheckFailed(f"{task} uses the course's reference implementation ({error.message}), which is not "
                           f"available while grading: write your own {task}.", REFERENCE_USED)
    where = f"\n  Where, in your code:\n{_indent(error.traceback, 4)}" if error.traceback.strip() else ""
    return CheckFailed(f"{task} raised {error.type}: {error.message}\n  on case: {label}{where}")


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.rstrip().splitlines())


def _list_differences(diffs: dict[str, str]) -> str:
    lines = [f"    - {path}: {diff}" for path, diff in list(diffs.items())[:_MAX_LISTED]]
    if len(diffs) > _MAX_LISTED:
        lines.append(f"    ... and {len(diffs) - _MAX_LISTED} more")
    return "\n".join(lines)


def _print_notes(task: str, notes: list[str]) -> None:
    """What the learner's code wrote to stderr, shown on stdout (it costs no points)."""
    if notes:
        text = "\n".join(dict.fromkeys(notes))
        print(f"Note: while {task} was being checked, your code wrote this to stderr or warned "
              f"(it costs no points):\n{_indent(text[:2000], 4)}")


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
    output that differs and naming the ``catalogue`` entry that reproduces the
    learner's first wrong output (and, among those, most of the others). Also fails,
    naming the mistake, when the learner's code changes its input in place or runs
    the course's own code. ``hidden`` cases are shown as "hidden case k of n".
    Returns the number of cases checked.
    """
    __tracebackhide__ = True  # IPython and pytest: show the learner the message, not our frames
    if student is reference:
        raise CheckFailed(f"{task} is the course's reference implementation, imported from bn_reference: "
                          f"write your own {task} in the notebook instead.", REFERENCE_USED)
    cases = list(cases)
    execute, forbidden = current_executor(), _forbidden(reference, catalogue, student)
    notes: list[str] = []
    try:
        for i, case in enumerate(cases, 1):
            label = f"hidden case {i} of {len(cases)}" if hidden else case.label
            expected = _quietly(lambda: _course_output(run, reference, case))
            outcome: Outcome = execute(run, student, case, forbidden)
            if outcome.notes:
                notes.append(outcome.notes)
            _judge(task, label, case, outcome, expected, run, catalogue, rtol, atol)
    finally:
        _print_notes(task, notes)
    return len(cases)


def _judge(task, label, case, outcome, expected, run, catalogue, rtol, atol) -> None:
    """Raise the right :class:`CheckFailed` for one case's outcome, or return."""
    __tracebackhide__ = True
    if outcome.reference_used:
        raise CheckFailed(
            f"{task} runs the course's own code ({', '.join(outcome.reference_used)}) on case: {label}\n"
            f"  Calling, wrapping, subclassing or copying bn_reference's implementation is not allowed: "
            f"write your own {task}.", REFERENCE_USED)
    if outcome.instrumentation_off:
        raise CheckFailed(
            f"{task} switched off the check's instrumentation ({outcome.instrumentation_off}) on case: {label}\n"
            f"  Remove the sys.setprofile / sys.settrace calls from your code.", INSTRUMENTATION_OFF)
    if outcome.error is not None:
        raise _error_failure(task, label, outcome.error)
    rtol, atol = case.data.get("rtol", rtol), case.data.get("atol", atol)
    diffs = _quietly(lambda: _differences(expected, outcome.value, rtol, atol))
    changed = (f"\n  It also changed its input {', '.join(outcome.mutated)} in place."
               if outcome.mutated else "")
    if diffs:
        best, best_score = None, (0, 0)
        for m in catalogue:
            try:
                wrong = _quietly(lambda: _course_output(run, m.impl, case))
            except Exception:
                continue
            score = _quietly(lambda: _match_score(wrong, outcome.value, diffs, rtol, atol))
            if score[0] > 0 and (best is None or score > best_score):  # ties: the earlier entry
                best, best_score = m, score
        named = (f"\n  Your output matches a known mistake: {best.name}.\n  How to fix it: {best.fix}"
                 if best is not None else "")
        raise CheckFailed(f"{task} is wrong on case: {label}{named}\n  Outputs that differ:\n"
                          f"{_list_differences(diffs)}{changed}", best.name if best else None)
    if outcome.mutated:
        raise CheckFailed(
            f"{task} changed its input {', '.join(outcome.mutated)} in place on case: {label}\n"
            f"  Your output matches a known mistake: {INPUT_CHANGED}.\n"
            f"  How to fix it: leave the caller's arrays alone - compute new ones (x = x - mu, not x -= mu), "
            f"or work on a copy (x = x.copy()).", INPUT_CHANGED)


def report_pass(task: str, n: int) -> None:
    """The one line a passing check prints (to stdout: stderr would cost the marks)."""
    print(f"{task}: all {n} cases agree with the reference.")
