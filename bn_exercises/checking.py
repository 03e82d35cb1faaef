"""Checking a learner's code: run it on a case, compare, say what is wrong.

A *check* runs the learner's function or class through a chapter's ``run(fn,
case)`` function - the only code that touches the learner's object: it calls it
and returns plain data (arrays, tensors, numbers, strings, in dicts and lists) -
and compares that data with the reference's on the same case. When they
disagree it compares it with the outputs of the chapter's catalogue of known
wrong implementations; if one of them reproduces every output the learner gets
wrong, the failure names that misconception and says how to fix it. Every output
that differs is listed, with as many digits as it takes to see the difference.

Two places run checks, with the same :func:`judge`:

- the learner's notebook (this package): the visible cases, the reference's
  outputs and the catalogue's outputs on them were *recorded* when the
  exercises were released (``answers/<topic>.npz``, :func:`recorded_check`); no
  reference or catalogue code ships with the learner package;
- the grader (``bn_reference.grading``): the same visible cases and hidden ones,
  against the live reference and catalogue.

A check's output goes to stdout only (nbgrader scores a cell with stderr output
as 0), even when the learner's code warns: its stderr becomes a note.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import math
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from . import codec
from .execution import LearnerError, Outcome, current_executor

__all__ = ["CheckFailed", "Case", "judge", "recorded_check", "report_pass", "REFERENCE_USED", "INPUT_CHANGED",
           "INSTRUMENTATION_OFF", "NOT_IMPLEMENTED", "ANSWERS_MISSING", "ALSO"]

#: Misconceptions every check recognises, whatever the chapter.
REFERENCE_USED = "the course's reference implementation used instead of your own code"
INPUT_CHANGED = "the function changes its input in place"
INSTRUMENTATION_OFF = "the check's instrumentation switched off by the code being checked"
NOT_IMPLEMENTED = "not attempted: the function is still the stub"  # not a misconception, but worth counting
ANSWERS_MISSING = "the recorded answers of the learner package are missing or stale"
#: Joins the names of mistakes made together (a combined catalogue entry): "A; also B".
ALSO = "; also "

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
        the checking package's frames would only hide it)."""
        return f"{type(self).__name__}: {self}".splitlines()


@dataclass(frozen=True)
class Case:
    """One input on which learner and reference are compared.

    ``label`` is shown to the learner (hidden cases get a generic label); ``data``
    holds what the chapter's ``run`` function needs (arrays, hyper-parameters);
    ``mutable`` names the keys of ``data`` the learner's code is meant to change in
    place.
    """

    label: str
    data: Mapping[str, Any] = field(default_factory=dict)
    mutable: tuple[str, ...] = ()


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


def _match(wrong: Any, got: Any, diffs: dict[str, str], rtol: float, atol: float) -> int | None:
    """How well a wrong implementation's output explains the learner's: ``None`` unless it
    reproduces *every* output the learner gets wrong; else minus the number of outputs
    on which it differs from the learner (where the learner is right), so that the
    entry that also agrees where the learner is right wins."""
    mismatched = _differences(wrong, got, rtol, atol)
    if "output" in diffs or "output" in mismatched:  # the structure is wrong: only a full match counts
        return 0 if not mismatched else None
    if any(path in mismatched for path in diffs):
        return None
    return -len(mismatched)


def _quietly(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` (course code) with warnings and floating-point warnings silenced, so
    that computing an answer or diagnosing a wrong one never writes to stderr."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn()


# --------------------------------------------------------------------------
# Judging one case

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
    """The differing outputs, shape mismatches first (they explain the rest)."""
    ordered = sorted(diffs.items(), key=lambda item: "shape" not in item[1])
    lines = [f"    - {path}: {diff}" for path, diff in ordered[:_MAX_LISTED]]
    if len(diffs) > _MAX_LISTED:
        lines.append(f"    ... and {len(diffs) - _MAX_LISTED} more")
    return "\n".join(lines)


def print_notes(task: str, notes: list[str]) -> None:
    """What the learner's code wrote to stderr, shown on stdout (it costs no points)."""
    if notes:
        text = "\n".join(dict.fromkeys(notes))
        print(f"Note: while {task} was being checked, your code wrote this to stderr or warned "
              f"(it costs no points):\n{_indent(text[:2000], 4)}")


#: A known wrong implementation as the judge sees it: its name, its fix, and a function
#: that returns its output on the case being judged (raising when it has none).
Candidate = tuple[str, str, Callable[[], Any]]


def judge(task: str, label: str, case: Case, outcome: Outcome, expected: Any, candidates: Iterable[Candidate],
          rtol: float = 1e-7, atol: float = 1e-9) -> None:
    """Raise the right :class:`CheckFailed` for one case's ``outcome``, or return.

    ``expected`` is the reference's output on ``case``; ``candidates`` the catalogue's
    (looked at only when the learner's output is wrong). A case's data may set its own
    ``rtol`` and ``atol``.
    """
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
        best, best_score = None, None
        for name, fix, output in candidates:
            try:
                wrong = _quietly(output)
            except Exception:
                continue
            score = _quietly(lambda: _match(wrong, outcome.value, diffs, rtol, atol))
            if score is not None and (best_score is None or score > best_score):  # ties: the earlier entry
                best, best_score = (name, fix), score
        named = (f"\n  Your output matches a known mistake: {best[0]}.\n  How to fix it: {best[1]}"
                 if best is not None else "")
        raise CheckFailed(f"{task} is wrong on case: {label}{named}\n  Outputs that differ:\n"
                          f"{_list_differences(diffs)}{changed}", best[0] if best else None)
    if outcome.mutated:
        raise CheckFailed(
            f"{task} changed its input {', '.join(outcome.mutated)} in place on case: {label}\n"
            f"  Your output matches a known mistake: {INPUT_CHANGED}.\n"
            f"  How to fix it: leave the caller's arrays alone - compute new ones (x = x - mu, not x -= mu), "
            f"or work on a copy (x = x.copy()).", INPUT_CHANGED)


def report_pass(task: str, n: int) -> None:
    """The one line a passing check prints (to stdout: stderr would cost the marks)."""
    print(f"{task}: all {n} cases agree with the reference.")


# --------------------------------------------------------------------------
# The recorded answers of the visible cases

FORMAT = 1  # of answers/<topic>.npz


@dataclass(frozen=True)
class RecordedCase:
    case: Case
    expected: Any
    wrong: tuple[Callable[[], Any], ...]  # each catalogue entry's output on the case, decoded when asked


@dataclass(frozen=True)
class RecordedTask:
    run: str                                 # "module:name" of the run function recorded with
    rtol: float
    atol: float
    catalogue: tuple[tuple[str, str], ...]   # (name, fix) of each entry
    cases: tuple[RecordedCase, ...]


class AnswersUnavailable(Exception):
    """The recorded answers cannot be read (the message says what is wrong)."""


def answers_path(topic: str):
    return importlib.resources.files(__package__).joinpath("answers", f"{topic}.npz")


def read_answers(source) -> dict[str, RecordedTask]:
    """The recorded tasks of one ``answers/<topic>.npz`` (a path or a file object)."""
    try:
        with np.load(source, allow_pickle=False) as npz:
            tree = json.loads(str(npz["index"]))
            arrays = {name: npz[name] for name in npz.files if name != "index"}
        if tree.get("format") != FORMAT:
            raise AnswersUnavailable(f"format {tree.get('format')!r}, expected {FORMAT}")
        resolve = codec.resolver()

        def value(t):
            return codec.decode(t, lambda i: arrays[f"a{i}"], resolve=resolve, tensors=True, reuse=True)

        def output(t):  # {"output": tree}, or None for an entry that raised on the case
            return (lambda: value(t["output"])) if t is not None else _raised

        return {task: RecordedTask(t["run"], t["rtol"], t["atol"], tuple(map(tuple, t["catalogue"])), tuple(
                    RecordedCase(Case(c["label"], value(c["data"]), tuple(c["mutable"])), value(c["expected"]),
                                 tuple(map(output, c["wrong"])))
                    for c in t["cases"]))
                for task, t in tree["tasks"].items()}
    except AnswersUnavailable:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, codec.DecodeError) as exc:
        raise AnswersUnavailable(f"{type(exc).__name__}: {exc}") from None


def _raised():
    raise LookupError("this entry raised on this case")


@lru_cache(maxsize=None)
def _answers(topic: str) -> dict[str, RecordedTask]:
    path = answers_path(topic)
    if not path.is_file():
        raise AnswersUnavailable(f"{path} does not exist")
    with path.open("rb") as f:
        return read_answers(f)


def _missing(task: str, why: str) -> CheckFailed:
    from . import __version__
    return CheckFailed(
        f"{task} cannot be checked: the recorded answers of the course's learner package (bn_exercises "
        f"{__version__}) are missing or do not match this check ({why}).\n  The install is stale or damaged. "
        f"Reinstall it: run `%pip uninstall -y bn_exercises` in a cell, then the notebook's first code cell "
        f"(it installs the package again), restart the kernel and run the notebook from the top.",
        ANSWERS_MISSING)


def recorded_check(check: Callable, task: str, student: Any, run: Callable[[Any, Case], Any],
                   hidden: bool = False) -> int:
    """Check ``student`` on the visible cases recorded for ``task``: ``run(student, case)``
    is judged against the reference's recorded output and, when wrong, the catalogue's.
    ``check`` is the chapter's check function calling this (its module names the
    chapter). ``hidden=True`` is for the grader: with the grader's bn_reference
    installed it runs the grader's check of the same name; without it, it says so.
    Prints the pass line and returns the number of cases."""
    __tracebackhide__ = True
    topic = check.__module__.rpartition(".")[2]
    if hidden:
        return _grader_check(check, topic, student)
    try:
        recorded = _answers(topic)[task]
    except KeyError:
        raise _missing(task, f"answers/{topic}.npz has no task {task}") from None
    except AnswersUnavailable as exc:
        raise _missing(task, str(exc)) from None
    if recorded.run != f"{run.__module__}:{run.__qualname__}":
        raise _missing(task, f"recorded with {recorded.run}, checked with {run.__module__}:{run.__qualname__}")
    execute, notes = current_executor(), []
    try:
        for item in recorded.cases:
            outcome = execute(run, student, item.case)
            if outcome.notes:
                notes.append(outcome.notes)
            candidates = [(name, fix, output) for (name, fix), output in zip(recorded.catalogue, item.wrong)]
            judge(task, item.case.label, item.case, outcome, item.expected, candidates, recorded.rtol, recorded.atol)
    finally:
        print_notes(task, notes)
    report_pass(task, len(recorded.cases))
    return len(recorded.cases)


def _grader_check(check: Callable, topic: str, student: Any) -> int:
    """The grader's check of the same name, on its hidden cases (where bn_reference is)."""
    __tracebackhide__ = True
    try:
        grader = getattr(importlib.import_module(f"bn_reference.grading.{topic}"), check.__name__)
    except (ImportError, AttributeError):
        raise CheckFailed(f"{check.__name__}(..., hidden=True) runs the grader's hidden cases, which only the "
                          f"course's grader has: in your notebook, run {check.__name__} without hidden=True.") \
            from None
    return grader(student, hidden=True)
